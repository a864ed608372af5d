"""Shards, manifest and the loader contract: each sample once per epoch across ranks and workers."""

import collections

import pytest
import torch

from pipeline.config import DataConfig
from pipeline.data.contract import BatchLoader
from pipeline.data.convert import DatasetError, read_manifest, write_synthetic
from pipeline.data.loaders import ShardedSamples, build_loader


def test_digits_manifest_counts_every_real_image(digits_root):
    m = read_manifest(digits_root)
    n_train = sum(s["count"] for s in m["splits"]["train"])
    n_val = sum(s["count"] for s in m["splits"]["val"])
    assert n_train + n_val == 1797  # scikit-learn's digits
    assert m["num_classes"] == 10 and m["image_size"] == 16


def _keys(root, world, workers, epoch):
    m = read_manifest(root)
    seen = []
    for rank in range(world):
        ds = ShardedSamples(root, m["splits"]["train"], rank, world, workers, None, shuffle=True, seed=3, buffer=0)
        ds.epoch = epoch
        for w in range(workers):
            keys = [s["__key__"] for s in ds._raw(rank * workers + w)]
            assert len(keys) == ds.slot_count(rank * workers + w)
            seen += keys
    return seen, sum(s["count"] for s in m["splits"]["train"])


@pytest.mark.parametrize("world, workers", [(1, 1), (2, 1), (2, 2), (3, 2)])
def test_each_sample_once_per_epoch_by_sample(digits_root, world, workers):
    # validation readers (equal=False) yield every sample exactly once, whatever the split mode index
    seen, total = _keys(digits_root, world, workers, epoch=1)
    assert len(seen) == total and len(set(seen)) == total


def test_each_sample_once_per_epoch_by_shard(tmp_path):
    write_synthetic(tmp_path, num_classes=3, image_size=8, train_samples=200, val_samples=20, per_shard=10)
    ds = ShardedSamples(tmp_path, read_manifest(tmp_path)["splits"]["train"], 0, 2, 2, None, True, 0, 0)
    assert ds.by_shard()  # 20 shards for 4 readers
    for epoch in (0, 1):
        seen, total = _keys(tmp_path, 2, 2, epoch)
        assert len(seen) == total == len(set(seen))
    # the shard order changes between epochs (shuffled), identically on every rank
    a, _ = _keys(tmp_path, 2, 2, 0)
    b, _ = _keys(tmp_path, 2, 2, 1)
    assert a != b and sorted(a) == sorted(b)


def test_loader_contract(digits_root):
    cfg = DataConfig(root=str(digits_root), image_size=16, batch_size=32, num_workers=0)
    for split in ("train", "val"):
        loader = build_loader(cfg, split, rank=0, world=2, device=torch.device("cpu"))
        batches = list(loader)
        assert len(batches) == len(loader)
        x, y = batches[0]
        assert x.shape == (32, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert abs(x.mean().item()) < 1.0  # normalised by the manifest's statistics
        counts = collections.Counter(int(t) for _, yb in batches for t in yb)
        assert set(counts) <= set(range(10)) and len(counts) == 10


def test_synthetic_backend_contract():
    cfg = DataConfig(backend="synthetic", image_size=8, batch_size=4, synthetic_samples=32, synthetic_classes=3)
    loader = build_loader(cfg, "train", 0, 2, torch.device("cpu"))
    batches = list(loader)
    assert len(batches) == len(loader) == 4
    assert all(int(y.max()) < 3 for _, y in batches)
    x, _ = next(iter(build_loader(cfg, "train", 0, 2, torch.device("cpu"), channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="prunepipe data digits"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("per_shard", [10, 128])  # by shard, by sample
def test_training_readers_yield_equal_counts_without_repeats(tmp_path, per_shard):
    write_synthetic(tmp_path, num_classes=3, image_size=8, train_samples=203, val_samples=20, per_shard=per_shard)
    shards = read_manifest(tmp_path)["splits"]["train"]
    seen, per_rank = [], []
    for rank in range(2):
        ds = ShardedSamples(tmp_path, shards, rank, 2, 2, None, True, 0, 0, equal=True)
        got = []
        for w in range(2):
            quota = ds.slot_yield(rank * 2 + w)
            got += [s["__key__"] for _, s in zip(range(quota), ds._raw(rank * 2 + w), strict=False)]
        per_rank.append(len(got))
        assert ds.rank_batches(7) == sum(-(-ds.slot_yield(rank * 2 + w) // 7) for w in range(2))
        seen += got
    assert per_rank[0] == per_rank[1]  # the same number of optimizer steps on every rank
    assert len(seen) == len(set(seen))  # nothing repeated
    assert 203 - len(seen) <= 3  # only the remainder is dropped (fewer than the 4 readers)


@pytest.mark.parametrize("backend", ["webdataset", "synthetic"])
def test_every_backend_keeps_the_loader_contract(digits_root, backend):
    cfg = DataConfig(root=str(digits_root), backend=backend, image_size=16, batch_size=32, num_workers=0,
                     max_bad_fraction=0.25, synthetic_samples=96, synthetic_classes=10)
    loader = build_loader(cfg, "train", 0, 1, torch.device("cpu"))
    assert isinstance(loader, BatchLoader)
    assert loader.num_classes == 10 and loader.errors.total == 0
    # the engine's bad-sample limit travels with a loader that can skip samples
    assert loader.max_bad_fraction == (0.25 if backend == "webdataset" else None)
    loader.set_epoch(1)
    batches = list(loader)
    assert len(batches) == len(loader) > 0
    images, labels = batches[0]
    assert images.shape[1:] == (3, 16, 16) and labels.dtype == torch.int64
