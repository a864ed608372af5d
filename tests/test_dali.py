"""The DALI loader backend (CPU pipeline here) against the loader contract."""

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ConfigError, DataConfig
from pipeline.data.contract import BatchLoader
from pipeline.data.convert import write_manifest
from pipeline.data.errors import BadDataError, parse_label
from pipeline.data.manifest import DatasetError, read_manifest
from pipeline.data.shards import index_path, read_index, write_shard
from tests.conftest import ROOT
from tests.helpers.procs import run_tree

pytest.importorskip("nvidia.dali")

from pipeline.data.dali import LABEL_BYTES, build_dali_loader, parse_labels  # noqa: E402
from pipeline.data.dali_plan import Shard, epoch_plan  # noqa: E402
from pipeline.data.shards import IndexEntry  # noqa: E402

CPU = torch.device("cpu")
MEAN, STD = [0.5, 0.45, 0.4], [0.25, 0.25, 0.25]


def photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random image with mild noise: JPEG-like content, unlike pure noise."""
    small = rng.uniform(0, 255, (h // 16 + 2, w // 16 + 2, 3)).astype(np.uint8)
    big = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).astype(np.float64)
    return (big + rng.normal(0, 8, big.shape)).clip(0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_set(root: Path, counts: list[int], sizes=((24, 32),), classes: int = 5, edit=None, seed: int = 0) -> dict:
    """Shards of ``counts`` samples (both splits the same), keys s<shard>_<i>; ``edit(sample)`` may
    corrupt one. Returns {key: label} of the intact samples."""
    rng = np.random.default_rng(seed)
    entries, labels, n = [], {}, 0
    for s, count in enumerate(counts):
        samples = []
        for i in range(count):
            h, w = sizes[n % len(sizes)]
            key = f"s{s}_{i:03d}"
            sample = {"__key__": key, "jpg": jpeg(photo(rng, h, w)), "cls": str(n % classes)}
            labels[key] = n % classes
            if edit is not None and edit(sample) is False:
                labels.pop(key)
            samples.append(sample)
            n += 1
        rel = f"data/shard-{s:03d}.tar"
        write_shard(root / rel, samples)
        entries.append({"path": rel, "count": count, "index": index_path(rel).as_posix()})
    write_manifest(root, {"name": "t", "num_classes": classes, "image_size": 16, "mean": MEAN, "std": STD,
                          "splits": {"train": entries, "val": entries}})
    return labels


def cfg(root: Path, **kw) -> DataConfig:
    base = {"backend": "dali", "root": str(root), "image_size": 16, "batch_size": 8, "augment": "none", "num_workers": 1}
    return DataConfig(**{**base, **kw})


def run(loader, epoch: int | None = None) -> tuple[list[tuple[str, str]], list[int], int]:
    """(shard, key) and label of every sample yielded, and the number of batches."""
    if epoch is not None:
        loader.set_epoch(epoch)
    loader.trace, labels, batches = [], [], 0
    for images, y in loader:
        assert images.shape[0] == y.shape[0]
        labels += y.tolist()
        batches += 1
    return loader.trace, labels, batches


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("dali_small")
    return root, make_set(root, [16, 16, 16, 3], classes=10)  # 51 samples: not divisible by 2 or 3


def test_plan_train_equal_disjoint_val_exact():
    shards = [Shard(f"s{i}", Path(f"/x/{i}"), tuple(IndexEntry(f"k{i}_{j}", ()) for j in range(c)))
              for i, c in enumerate([7, 5, 9, 2])]
    keys = {(s.rel, e.key) for s in shards for e in s.entries}
    for world in (1, 2, 3, 4):
        left_out = set()
        for epoch in range(6):
            chunks = [[(g.shard.rel, e.key) for g in epoch_plan(shards, set(), True, 0, epoch, r, world)[0] for e in g.entries]
                      for r in range(world)]
            flat = [k for c in chunks for k in c]
            assert len(set(flat)) == len(flat) and set(flat) <= keys
            assert {len(c) for c in chunks} == {23 // world}
            left_out.add(frozenset(keys - set(flat)))
            val = [[(g.shard.rel, e.key) for g in epoch_plan(shards, set(), False, 0, epoch, r, world)[0] for e in g.entries]
                   for r in range(world)]
            assert sorted(k for c in val for k in c) == sorted(keys)
            assert max(map(len, val)) - min(map(len, val)) <= 1
        if 23 % world:
            assert len(left_out) > 1  # a different remainder is dropped across epochs
    one = [Shard("s", Path("/x"), tuple(IndexEntry(f"k{j}", ()) for j in range(23)))]
    kept = {frozenset(e.key for g in epoch_plan(one, set(), True, 0, epoch, 0, 2)[0] + epoch_plan(one, set(), True, 0, epoch, 1, 2)[0]
                      for e in g.entries) for epoch in range(6)}
    assert len(kept) > 1  # even with one shard, the dropped sample changes between epochs
    excluded = {("s0", "k0_1"), ("s2", "k2_4")}
    chunk = epoch_plan(shards, excluded, True, 0, 0, 0, 1)[0]
    assert not excluded & {(g.shard.rel, e.key) for g in chunk for e in g.entries}


@pytest.mark.parametrize("world", [2, 3])
def test_train_ranks_disjoint_equal_reshuffled_reproducible(small, world):
    root, labels = small
    c = cfg(root, augment="light", shuffle_buffer=16)
    loaders = [build_dali_loader(c, "train", r, world, CPU, seed=3) for r in range(world)]
    per_epoch = []
    for epoch in (0, 1):
        keys = [run(ld, epoch) for ld in loaders]
        lens = {len(ld) for ld in loaders}
        assert lens == {(51 // world) // 8}  # floor(quota / batch): the last partial batch dropped
        assert {b for _, _, b in keys} == lens
        flat = [k for t, _, _ in keys for k in t]
        assert len(flat) == len(set(flat)) == world * lens.pop() * 8  # disjoint, full batches only
        for t, y, _ in keys:
            assert y == [labels[k] for _, k in t]
        per_epoch.append([t for t, _, _ in keys])
    assert per_epoch[0] != per_epoch[1]
    again = build_dali_loader(c, "train", 0, world, CPU, seed=3)
    assert run(again, 1)[0] == per_epoch[1][0]  # same seed and epoch: the same samples in the same order
    assert run(build_dali_loader(c, "train", 0, world, CPU, seed=4), 1)[0] != per_epoch[1][0]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_val_every_sample_exactly_once(small, world):
    root, labels = small
    seen = []
    for r in range(world):
        ld = build_dali_loader(cfg(root, augment="imagenet"), "val", r, world, CPU)
        t, y, batches = run(ld)
        assert len(ld) == batches
        assert y == [labels[k] for _, k in t]
        seen += [k for _, k in t]
    assert sorted(seen) == sorted(labels)


def test_contract_types_and_channels_last(small):
    root, _ = small
    for channels_last in (True, False):
        ld = build_dali_loader(cfg(root, augment="imagenet"), "train", 0, 1, CPU, channels_last=channels_last)
        images, labels = next(iter(ld))
        assert images.shape == (8, 3, 16, 16) and images.dtype == torch.float32 and images.device == CPU
        assert labels.dtype == torch.int64 and labels.device == CPU
        assert images.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert images.is_contiguous() != channels_last
        assert ld.num_classes == 10 and ld.errors.total == 0
        assert isinstance(ld, BatchLoader) and ld.max_bad_fraction == cfg(root).max_bad_fraction
        assert not list(ld._tmp.rglob("*.idx"))  # index files go once DALI has parsed them
        ld.close()
        assert not ld._tmp.exists()


def test_pixels_match_pytorch_loader(tmp_path):
    """Validation pixels equal the PyTorch loader's within resize rounding.

    Both decoders are libjpeg-turbo and decode these JPEGs to identical pixels (checked here);
    what differs is the resize: DALI's float triangle filter against torchvision's fixed-point
    antialiased bilinear, each rounding to uint8, measured at most 3 levels apart (mean about
    0.1). A one-pixel shift of the crop or a 1 % scale error (DALI's own resize_shorter
    rounding) gives mean differences above 7 levels on these images.
    """
    from pipeline.data.loaders import build_loader

    make_set(tmp_path, [12], sizes=[(220, 300), (300, 220), (375, 500), (333, 500), (256, 256), (221, 301)])
    for augment in ("imagenet", "none"):
        c = cfg(tmp_path, image_size=64, augment=augment)
        d = torch.cat([x for x, _ in build_dali_loader(c, "val", 0, 1, CPU)])
        p = torch.cat([x for x, _ in build_loader(c.model_copy(update={"backend": "webdataset", "num_workers": 0}), "val", 0, 1, CPU)])
        levels = (d - p).abs() * torch.tensor(STD).view(1, 3, 1, 1) * 255  # back to 0..255 pixel levels
        assert d.shape == p.shape == (12, 3, 64, 64)
        assert levels.max() <= 4.0 and levels.mean() <= 0.5, (augment, levels.max(), levels.mean())


def test_light_train_is_a_padded_random_crop(tmp_path):
    """augment light, train: each image is one of the (2p + 1)² windows of the zero-padded
    source (torchvision's RandomCrop(size, padding=p)), never flipped, and the windows vary."""
    make_set(tmp_path, [24], sizes=[(16, 16)])
    ld = build_dali_loader(cfg(tmp_path, augment="light", shuffle_buffer=0), "train", 0, 1, CPU)
    ld.trace = []
    images = torch.cat([x for x, _ in ld])
    entries = {e.key: e for e in read_index(index_path(tmp_path / "data/shard-000.tar"))}
    tar = (tmp_path / "data/shard-000.tar").read_bytes()
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    pad, offsets = 2, set()
    for img, (_, key) in zip(images, ld.trace, strict=True):
        c = next(c for c in entries[key].components if c.ext == "jpg")
        src = torch.from_numpy(np.asarray(Image.open(io.BytesIO(tar[c.offset:c.offset + c.size])).convert("RGB")))
        padded = torch.nn.functional.pad(src.permute(2, 0, 1).float(), (pad,) * 4)
        windows = {(dy, dx): ((padded[:, dy:dy + 16, dx:dx + 16] / 255 - mean) / std) for dy in range(5) for dx in range(5)}
        err, where = min(((img - w).abs().max().item(), k) for k, w in windows.items())
        assert err < 1e-4, (key, err)
        offsets.add(where)
    assert len(offsets) > 5


def test_imagenet_train_flips_half_the_time(tmp_path):
    """augment imagenet, train: a left-dark, right-bright source comes out mirrored about half
    the time (RandomHorizontalFlip), and at the requested size whatever the crop."""
    ramp = np.repeat(np.repeat(np.linspace(0, 255, 96)[None, :, None], 64, 0), 3, 2).astype(np.uint8)
    entries = [{"path": "data/r.tar", "count": 64, "index": "data/r.idx"}]
    write_shard(tmp_path / "data/r.tar", ({"__key__": f"r{i:03d}", "jpg": jpeg(ramp), "cls": "1"} for i in range(64)))
    write_manifest(tmp_path, {"name": "r", "num_classes": 2, "image_size": 16, "mean": MEAN, "std": STD,
                              "splits": {"train": entries, "val": entries}})
    images = torch.cat([x for x, _ in build_dali_loader(cfg(tmp_path, augment="imagenet"), "train", 0, 1, CPU)])
    assert images.shape == (64, 3, 16, 16)
    mirrored = (images[..., :8].mean((1, 2, 3)) > images[..., 8:].mean((1, 2, 3))).float().mean().item()
    assert 0.25 < mirrored < 0.75


def test_parse_labels_agrees_with_parse_label():
    payloads = [b"3", b" 4\n", b"007", b"", b"1 2", b"-1", b"abc", b"5", b"1234567890", b"\x1c2\t", b"3.0",
                b"+3", "٣".encode(), b"0" * 40, b"4" + b" " * 40, b"2\x00", b"199", b"200", b"1 9"]
    raw = torch.zeros(len(payloads), LABEL_BYTES, dtype=torch.uint8)
    for i, p in enumerate(payloads):
        raw[i, :min(len(p), LABEL_BYTES)] = torch.tensor(list(p[:LABEL_BYTES]), dtype=torch.uint8)
    lengths = torch.tensor([len(p) for p in payloads])
    labels, ok = parse_labels(raw, lengths, 200)
    for i, p in enumerate(payloads):
        want = parse_label(p if p else None, 200)[0]
        if len(p) > LABEL_BYTES:
            want = None  # documented: longer payloads are bad labels
        assert (want is not None) == bool(ok[i]), p
        if want is not None:
            assert int(labels[i]) == want, p


# -- bad data --------------------------------------------------------------------------------

def _corrupt(key, field, value):
    def edit(sample):
        if sample["__key__"] != key:
            return None
        if value is None:
            del sample[field]
        else:
            sample[field] = value
        return False
    return edit


BAD = {  # kind: (edit, the start of the recorded reason)
    "corrupt_jpeg": (_corrupt("s1_004", "jpg", b"\xff\xd8\xff\xe0 not really a jpeg" * 20), "undecodable image"),
    "no_cls": (_corrupt("s1_004", "cls", None), "no .cls component"),
    "no_jpg": (_corrupt("s1_004", "jpg", None), "no .jpg component"),
    "non_integer_label": (_corrupt("s1_004", "cls", "cat"), "label 'cat' is not"),
    "out_of_range_label": (_corrupt("s1_004", "cls", "7"), "label 7 out of range"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
@pytest.mark.parametrize("split", ["val", "train"])
def test_bad_sample_skip_and_fail(tmp_path, kind, split):
    edit, reason = BAD[kind]
    labels = make_set(tmp_path, [10, 10, 10], edit=edit)
    ld = build_dali_loader(cfg(tmp_path), split, 0, 1, CPU)
    t, y, batches = run(ld)
    assert ("data/shard-001.tar", "s1_004") not in t
    assert y == [labels[k] for _, k in t]  # the rest keeps its own labels
    assert batches == len(ld)
    if split == "val":
        assert sorted(k for _, k in t) == sorted(labels)  # everything else, exactly once
    else:
        assert len(t) == len(set(t)) or kind == "corrupt_jpeg"  # after a decode failure train may repeat
        assert len(set(t)) >= 16
    assert ld.errors.total == 1
    (rec,) = ld.errors.records
    assert (rec.shard, rec.key) == ("data/shard-001.tar", "s1_004") and rec.reason.startswith(reason)
    # the next epoch plans around the quarantined sample: no second record
    run(ld, 1)
    assert ld.errors.total == 1

    with pytest.raises(BadDataError) as err:
        run(build_dali_loader(cfg(tmp_path, on_error="fail"), split, 0, 1, CPU))
    msg = str(err.value)
    assert "data/shard-001.tar" in msg and "s1_004" in msg and "\n" not in msg
    assert err.value.__cause__ is None and err.value.__context__ is None  # no DALI error chained to it


def test_truncated_shard_skip_and_fail(tmp_path):
    labels = make_set(tmp_path, [10, 10])
    tar = tmp_path / "data/shard-001.tar"
    os.truncate(tar, read_index(index_path(tar))[7].components[0].offset + 10)  # inside sample 7's image
    lost = 10 - read_manifest(tmp_path)["splits"]["val"][1]["readable"]
    assert lost == 3
    ld = build_dali_loader(cfg(tmp_path), "val", 0, 1, CPU)
    t, y, _ = run(ld)
    assert y == [labels[k] for _, k in t]
    assert len(t) == 20 - lost and all(k < f"s1_{10 - lost:03d}" for _, k in t)
    assert ld.errors.total == lost and len(ld.errors.records) == 1
    assert ld.errors.records[0].shard == "data/shard-001.tar" and ld.errors.records[0].key == f"s1_{10 - lost:03d}"
    with pytest.raises(BadDataError, match=r"data/shard-001\.tar.*s1_") as err:
        build_dali_loader(cfg(tmp_path, on_error="fail"), "val", 0, 1, CPU)
    assert "\n" not in str(err.value)


def test_shard_without_index_is_indexed(tmp_path):
    labels = make_set(tmp_path, [10, 7])
    os.unlink(tmp_path / "data/shard-001.idx")
    m = json.loads((tmp_path / "dataset.json").read_text())
    for s in m["splits"]["val"] + m["splits"]["train"]:
        s.pop("index")
    write_manifest(tmp_path, m)
    t, y, _ = run(build_dali_loader(cfg(tmp_path), "val", 0, 1, CPU))
    assert sorted(k for _, k in t) == sorted(labels) and y == [labels[k] for _, k in t]


@pytest.mark.parametrize("policy", ["skip", "fail"])
def test_manifest_errors_surface_unchanged(tmp_path, policy):
    make_set(tmp_path, [4])
    m = json.loads((tmp_path / "dataset.json").read_text())
    for variant in ("missing", "empty"):
        broken = json.loads(json.dumps(m))
        if variant == "missing":
            broken["splits"]["val"].append({"path": "data/gone.tar", "count": 3})
        else:
            broken["splits"]["val"] = []
        root = tmp_path / variant
        root.mkdir()
        (root / "data").symlink_to(tmp_path / "data")
        write_manifest(root, broken)
        with pytest.raises(DatasetError) as want:
            read_manifest(root)
        with pytest.raises(DatasetError) as got:
            build_dali_loader(cfg(root, on_error=policy), "val", 0, 1, CPU)
        assert str(got.value) == str(want.value) and "\n" not in str(got.value)


def test_missing_dali_is_one_line_config_error(small, monkeypatch):
    from pipeline.data.loaders import build_loader

    for mod in ("nvidia.dali", "nvidia.dali.fn", "nvidia.dali.types", "nvidia.dali.plugin.pytorch"):
        monkeypatch.setitem(sys.modules, mod, None)  # `import` of a None entry raises ImportError
    with pytest.raises(ConfigError) as err:
        build_loader(cfg(small[0]), "val", 0, 1, CPU)
    assert "pip install nvidia-dali" in str(err.value) and "\n" not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_dali_device_gpu_without_gpu(small):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(ConfigError, match="dali_device = gpu"):
        build_dali_loader(cfg(small[0], dali_device="gpu"), "val", 0, 1, CPU)


@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path, small):
    """torchrun, 2 ranks over gloo: evaluate over the DALI val loader equals one process; a
    sample quarantined by one rank in epoch 0 is excluded by both in epoch 1, chunks disjoint."""
    root, _ = small
    bad = tmp_path / "bad"
    make_set(bad, [10, 10, 10], edit=BAD["corrupt_jpeg"][0])
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "helpers" / "dali_eval.py"), str(root), str(bad), str(out)]
    proc = run_tree(cmd, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]

    from tests.helpers.dali_eval import evaluate_once

    single = evaluate_once(str(root), rank=0, world=1)
    for r in ranks:
        for k in ("val_top1", "val_top5"):
            assert r["metrics"][k] == pytest.approx(single[k], abs=1e-12)
        assert r["metrics"]["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
    assert ranks[0]["agreed"] == ranks[1]["agreed"] == [["data/shard-001.tar", "s1_004"]]
    assert ranks[0]["len"] == ranks[1]["len"] > 0
    assert not set(map(tuple, ranks[0]["keys"])) & set(map(tuple, ranks[1]["keys"]))
    assert ["data/shard-001.tar", "s1_004"] not in ranks[0]["keys"] + ranks[1]["keys"]
    assert ranks[0]["bad_records"] + ranks[1]["bad_records"] == 1  # recorded once, by the rank that met it


def test_exif_orientation_is_ignored_as_pil_and_torchvision_ignore_it(tmp_path):
    """A JPEG tagged 'rotate 90°' (EXIF orientation 6, common in photo collections) gives the
    same pixels through DALI as through the PyTorch loader: DALI would rotate it by default."""
    from pipeline.data.loaders import build_loader

    def tag(sample):
        img = Image.open(io.BytesIO(sample["jpg"]))
        exif = Image.Exif()
        exif[0x0112] = 6
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
        sample["jpg"] = buf.getvalue()

    make_set(tmp_path, [4], sizes=[(120, 200)], edit=tag)
    for augment in ("imagenet", "none"):
        c = cfg(tmp_path, image_size=32, augment=augment)
        d = torch.cat([x for x, _ in build_dali_loader(c, "val", 0, 1, CPU)])
        p = torch.cat([x for x, _ in build_loader(c.model_copy(update={"backend": "webdataset", "num_workers": 0}), "val", 0, 1, CPU)])
        levels = (d - p).abs() * torch.tensor(STD).view(1, 3, 1, 1) * 255
        assert levels.mean() <= 0.5, (augment, levels.mean())
