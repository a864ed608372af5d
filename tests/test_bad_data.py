"""data.on_error on the PyTorch/WebDataset backend: every kind of bad sample is skipped and counted
(naming shard and key) or stops the run in one line; never a traceback, never a wrong label."""

import pytest
import torch

from pipeline.config import DataConfig
from pipeline.data.errors import BadDataError
from pipeline.data.loaders import build_loader
from pipeline.data.manifest import DatasetError
from pipeline.distributed import DistInfo
from pipeline.engine import lockstep, train_epoch
from tests.helpers.ddp_check import ddp_backend
from tests.helpers.doctor import copy_dataset, manifest, rewrite_sample, truncate_shard, write_manifest_raw

CPU = torch.device("cpu")

# (component changes, words in the reason)
CASES = {
    "corrupt_jpeg": ({"jpg": b"\xff\xd8\xff\xe0 this is not a jpeg"}, "undecodable"),
    "no_cls": ({"cls": None}, "no .cls"),
    "label_not_int": ({"cls": b"seven"}, "not a non-negative integer"),
    "label_negative": ({"cls": b"-1"}, "not a non-negative integer"),
    "label_out_of_range": ({"cls": b"4"}, "out of range"),  # the fixture has 4 classes: 0..3
}


@pytest.fixture()
def ds(tmp_path, tiny_synthetic):
    return copy_dataset(tiny_synthetic, tmp_path / "ds")


def _cfg(root, policy, **kw):
    return DataConfig(root=str(root), image_size=16, batch_size=8, augment="none", on_error=policy, **kw)


def _val_labels(loader):
    return [int(y) for _, ys in loader for y in ys]


@pytest.mark.parametrize("case", sorted(CASES))
def test_skip_drops_only_the_bad_sample_and_names_it(ds, case):
    changes, words = CASES[case]
    clean = _val_labels(build_loader(_cfg(ds, "skip"), "val", 0, 1, CPU))
    shard = manifest(ds)["splits"]["val"][0]["path"]
    key = rewrite_sample(ds, shard, 3, **changes)
    loader = build_loader(_cfg(ds, "skip"), "val", 0, 1, CPU)
    labels = _val_labels(loader)
    assert labels == clean[:3] + clean[4:]  # exactly that sample is gone; no label moved
    assert loader.errors.total == 1
    (bad,) = loader.errors.take()
    assert (bad.shard, bad.key) == (shard, key) and words in bad.reason


@pytest.mark.parametrize("case", sorted(CASES))
def test_fail_stops_in_one_line_naming_shard_and_key(ds, case):
    changes, words = CASES[case]
    shard = manifest(ds)["splits"]["val"][0]["path"]
    key = rewrite_sample(ds, shard, 3, **changes)
    loader = build_loader(_cfg(ds, "fail"), "val", 0, 1, CPU)
    with pytest.raises(BadDataError) as err:
        _val_labels(loader)
    msg = str(err.value)
    assert shard in msg and key in msg and words in msg and "\n" not in msg


def test_truncated_shard_skip_counts_the_lost_tail_and_fail_stops_before_work(ds):
    shard = manifest(ds)["splits"]["val"][0]
    truncate_shard(ds, shard["path"], 0.5)
    loader = build_loader(_cfg(ds, "skip"), "val", 0, 1, CPU)
    total = sum(s["count"] for s in manifest(ds)["splits"]["val"])
    seen = len(_val_labels(loader))
    assert 0 < loader.errors.total == total - seen  # every lost sample counted, none invented
    assert loader.errors.take()[0].shard == shard["path"]
    with pytest.raises(BadDataError, match=shard["path"]):
        build_loader(_cfg(ds, "fail"), "val", 0, 1, CPU)


def test_truncated_training_shard_ends_the_epoch_early_without_error(ds):
    shard = manifest(ds)["splits"]["train"][0]
    truncate_shard(ds, shard["path"], 0.4, drop_index=True)  # found by the tar scan, not the index
    loader = build_loader(_cfg(ds, "skip"), "train", 0, 1, CPU)
    n = sum(len(y) for _, y in loader)
    assert n == sum(s["count"] for s in manifest(ds)["splits"]["train"]) - loader.errors.total


@pytest.mark.parametrize("change, error", [
    (lambda m: m["splits"].update(train=[]), DatasetError),
    (lambda m: m["splits"]["train"].append({"path": "train/gone.tar", "count": 16}), DatasetError),
])
@pytest.mark.parametrize("policy", ["skip", "fail"])
def test_empty_or_missing_shards_are_errors_under_both_policies(ds, change, error, policy):
    m = manifest(ds)
    change(m)
    write_manifest_raw(ds, m)
    with pytest.raises(error) as err:
        build_loader(_cfg(ds, policy), "train", 0, 1, CPU)
    assert "\n" not in str(err.value)


def test_an_epoch_of_mostly_bad_samples_stops(ds):
    shards = manifest(ds)["splits"]["train"]
    for shard in shards[:4]:  # 4 of 6 shards: 2/3 of the epoch is bad
        for pos in range(16):
            rewrite_sample(ds, shard["path"], pos, jpg=b"garbage")
    loader = build_loader(_cfg(ds, "skip", max_bad_fraction=0.05), "train", 0, 1, CPU)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
    info = DistInfo(0, 1, 0, CPU)
    with pytest.raises(BadDataError, match="max_bad_fraction"):
        train_epoch(ddp_backend(model, info), loader, info)


def test_lockstep_single_process_passes_everything_through():
    info = DistInfo(0, 1, 0, CPU)
    assert list(lockstep(iter(range(5)), info)) == [0, 1, 2, 3, 4]

    def broken():
        yield 1
        raise BadDataError("shard x key y: bad")

    with pytest.raises(BadDataError, match="shard x key y"):
        list(lockstep(broken(), info))


def _waits_forever(self, sample):
    import time

    time.sleep(3600)


@pytest.mark.timeout(120)  # without the guard, next() below waits for ever
@pytest.mark.parametrize("workers", [1, 2])
def test_a_stuck_worker_stops_the_loader_with_its_stack_and_leaves_no_worker(tiny_synthetic, capfd, monkeypatch,
                                                                              workers):
    """A read that never returns (a hung network mount, a deadlock after fork) must not leave a
    rank, and every rank waiting on it, silent for ever: the loader stops after
    data.worker_timeout_s, names the setting, and the stuck workers print where they are."""
    import os
    import time

    from pipeline.data import loaders

    monkeypatch.setattr(loaders.ShardedSamples, "_decode", _waits_forever)  # forked workers inherit it
    cfg = DataConfig(root=str(tiny_synthetic), image_size=16, batch_size=8, num_workers=workers, worker_timeout_s=2)
    loader = build_loader(cfg, "val", 0, 1, torch.device("cpu"))
    it = iter(loader)
    started = time.monotonic()
    with pytest.raises(loaders.DataStallError, match=r"val loader: no batch .* in 2 s \(data.worker_timeout_s\)") as err:
        next(it)
    assert time.monotonic() - started < 30
    pids = [int(p) for p in err.value.args[0].split("worker processes [")[1].split("]")[0].split(", ")]
    assert len(pids) == workers
    stacks = capfd.readouterr().err
    assert stacks.count("in _waits_forever") == workers, stacks[-3000:]
    del it
    deadline = time.monotonic() + 30  # the DataLoader's own shutdown ends its workers
    while any(os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().rsplit(")", 1)[1][:3]
              for p in pids):
        assert time.monotonic() < deadline, f"workers {pids} outlived their loader"
        time.sleep(0.2)


def test_worker_timeout_zero_means_no_timeout(tiny_synthetic):
    cfg = DataConfig(root=str(tiny_synthetic), image_size=16, batch_size=8, num_workers=1, worker_timeout_s=0)
    assert build_loader(cfg, "val", 0, 1, torch.device("cpu"))._dl.timeout == 0
    with pytest.raises(ValueError, match="worker_timeout_s"):
        DataConfig(worker_timeout_s=-1)
