"""`prunepipe data imagenet` on a miniature ILSVRC-2012 tree (tests/helpers/mini_imagenet.py)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from launch.cli import main
from pipeline.data.imagenet import ConvertOptions, convert_imagenet
from pipeline.data.imagenet_source import scan_source
from pipeline.data.manifest import DatasetError, read_manifest
from tests.helpers.mini_imagenet import make_mini_imagenet

ROOT = Path(__file__).resolve().parents[1]


def _convert(src, out, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return convert_imagenet(ConvertOptions(Path(src), Path(out), **kw))


def _samples(out: Path, split: str) -> dict[str, tuple[bytes, int, str]]:
    """key → (jpg bytes, label, shard) over every shard of the split, asserting no key twice."""
    found: dict[str, tuple[bytes, int, str]] = {}
    for tar_path in sorted((out / split).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name in members:
            key, ext = name.split(".", 1)
            if ext == "jpg":
                assert key not in found, f"{key} in two shards"
                found[key] = (members[name], int(members[f"{key}.cls"]), tar_path.name)
    return found


def _order(out: Path, shard: str) -> list[int]:
    with tarfile.open(out / shard) as tar:
        return [int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls")]


def _conversion(out: Path) -> dict:
    """The converter's own notes in dataset.json (read_manifest validates only the schema's fields)."""
    return json.loads((out / "dataset.json").read_text())["conversion"]


def _stat(out: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for split in ("train", "val") for p in (out / split).iterdir()}


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return make_mini_imagenet(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def converted(mini, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    return _convert(mini.root, out, per_shard=32, devkit=mini.devkit), out


def test_every_image_once_with_its_label(mini, converted):
    _, out = converted
    for split, files in (("train", mini.train), ("val", mini.val)):
        samples = _samples(out, split)
        expected = {mini.key(rel): mini.label(rel) for rel in files if rel not in mini.special["corrupt"]}
        assert {k: v[1] for k, v in samples.items()} == expected  # val: devkit IDs mapped through meta.mat


def test_class_map_is_imagefolders(mini, converted):
    from torchvision.datasets import ImageFolder

    _, out = converted
    class_to_idx = ImageFolder(str(mini.root / "train")).class_to_idx
    assert json.loads((out / "classes.json").read_text()) == class_to_idx
    manifest = read_manifest(out)
    assert dict(zip(manifest["classes"], range(manifest["num_classes"]), strict=True)) == class_to_idx


def test_shards_mix_classes(converted):
    result, out = converted
    for split in ("train", "val"):
        shards = sorted(p.name for p in (out / split).glob("*.tar"))
        assert len(shards) >= 3
        for shard in shards:
            labels = _order(out, f"{split}/{shard}")
            assert len(set(labels[:12])) >= 4, f"{shard} starts with too few classes: {labels[:12]}"
            assert labels != sorted(labels)
    # planned shard sizes of a split differ by at most one (equal shards balance the by-shard
    # loader split); a skipped file makes its shard one smaller still
    manifest = read_manifest(out)
    for split in ("train", "val"):
        counts = [s["count"] for s in manifest["splits"][split]]
        skipped = sum(row[0].startswith(split) for row in result.skipped)
        assert max(counts) - min(counts) <= 1 + skipped


def test_stored_jpegs_byte_identical_odd_ones_converted(mini, converted):
    _, out = converted
    samples = {**_samples(out, "train"), **_samples(out, "val")}
    converted_keys = {mini.key(r) for r in mini.special["cmyk"] + mini.special["png"]}
    for rel in list(mini.train) + list(mini.val):
        key = mini.key(rel)
        if rel in mini.special["corrupt"]:
            continue
        source = (mini.root / rel).read_bytes()
        stored = samples[key][0]
        im = Image.open(io.BytesIO(stored))
        assert im.format == "JPEG" and stored[:3] == b"\xff\xd8\xff"
        if key not in converted_keys:
            assert stored == source, rel  # plain RGB and grayscale JPEGs: as stored
            continue
        assert stored != source and im.mode == "RGB"
        want = np.asarray(Image.open(mini.root / rel).convert("RGB"), dtype=np.int16)
        assert np.abs(np.asarray(im, dtype=np.int16) - want).mean() < 6  # same picture, q95 re-encode
    assert any(Image.open(io.BytesIO(samples[mini.key(r)][0])).mode == "L" for r in mini.special["gray"])


def test_dali_cpu_decodes_every_sample_as_pil_does(mini, converted):
    """Evidence for keeping grayscale JPEGs: DALI's CPU decoder (RGB output) gives 3 channels
    equal to PIL's convert("RGB"); converted CMYK/PNG samples read the same way."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    result, out = converted
    shards = [s for split in ("train", "val") for s in read_manifest(out)["splits"][split]]

    @pipeline_def(batch_size=16, num_threads=1, device_id=None)
    def pipe():
        jpg, cls = fn.readers.webdataset(paths=[str(out / s["path"]) for s in shards], ext=["jpg", "cls"],
                                         index_paths=[str(out / s["index"]) for s in shards], name="Reader")
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), cls, fn.get_property(jpg, key="source_info")

    samples = {**_samples(out, "train"), **_samples(out, "val")}
    p = pipe()
    p.build()
    seen = {}
    while len(seen) < len(samples):
        images, labels, infos = p.run()
        for i in range(len(images)):
            key = bytes(np.array(infos[i])).decode().rsplit(":", 1)[-1].split(".")[0]
            seen[key] = (np.array(images[i]), int(bytes(np.array(labels[i])).decode()))
    assert len(seen) == len(samples) == result.written["train"] + result.written["val"]
    odd = {mini.key(r) for kind in ("gray", "cmyk", "png") for r in mini.special[kind]}
    for key, (pixels, label) in seen.items():
        assert label == samples[key][1] and pixels.ndim == 3 and pixels.shape[2] == 3
        if key in odd:
            pil = np.asarray(Image.open(io.BytesIO(samples[key][0])).convert("RGB"), dtype=np.int16)
            assert pixels.shape == pil.shape and np.abs(pixels.astype(np.int16) - pil).mean() < 0.5, key


def test_corrupt_file_skipped_counted_and_reported(mini, converted):
    result, out = converted
    (bad,) = mini.special["corrupt"]
    assert [row[0] for row in result.skipped] == [bad]
    assert result.skipped[0][1] == "corrupt or truncated JPEG" and "truncated" in result.skipped[0][2]
    manifest = read_manifest(out)  # validates and verifies every count against the index files
    split = bad.split("/")[0]
    assert _conversion(out)["skipped"] == {"corrupt or truncated JPEG": 1}
    for s in ("train", "val"):
        found = len(mini.train if s == "train" else mini.val)
        written = sum(x["count"] for x in manifest["splits"][s])
        assert written == result.written[s] == found - (s == split)
    assert bad in result.summary() and "corrupt or truncated JPEG: 1" in result.summary()
    assert result.converted == {"CMYK JPEG → RGB JPEG": 3, "PNG → RGB JPEG": 2}
    assert manifest["image_size"] == 224 and tuple(manifest["mean"]) == (0.485, 0.456, 0.406)


def _small(root: Path, **kw):
    kw = {"classes": 5, "train_per_class": 4, "val_per_class": 3, "size_range": (40, 60), "gray": 0, "cmyk": 0,
          "png": 0, "corrupt": 0, **kw}
    return make_mini_imagenet(root, **kw)


@pytest.mark.parametrize("source", ["kaggle", "csv", "class folders"])
def test_val_labels_from_each_source(tmp_path, source):
    mini = _small(tmp_path / "src", flat_val=source != "class folders", seed=3)
    labels = {"kaggle": mini.kaggle_csv, "csv": mini.label_csv, "class folders": None}[source]
    _convert(mini.root, tmp_path / "out", per_shard=4, val_labels=labels)
    got = {k: v[1] for k, v in _samples(tmp_path / "out", "val").items()}
    assert got == {mini.key(rel): mini.label(rel) for rel in mini.val}


def test_resume_rewrites_only_unfinished_shards(mini, tmp_path):
    out = tmp_path / "out"
    first = _convert(mini.root, out, per_shard=32, devkit=mini.devkit)
    before = _stat(out)
    lost = (out / "train/train-000003.tar").read_bytes()
    # an interrupted run: one shard's pair never written, one index from a shard cut short, a temp file
    (out / "train/train-000003.tar").unlink()
    (out / "train/train-000003.idx").unlink()
    (out / "val/val-000001.idx").write_text("v1.2 0\n")
    (out / "train/.train-000005.tar.k2j4h1").write_bytes(b"partial")
    (out / "dataset.json").unlink()
    again = _convert(mini.root, out, per_shard=32, devkit=mini.devkit, workers=2)
    assert again.shards_written == 2 and again.images_this_run < first.images_this_run
    after = _stat(out)
    redone = {"train/train-000003.tar", "train/train-000003.idx", "val/val-000001.tar", "val/val-000001.idx"}
    assert set(after) == set(before)  # the temp file is gone
    assert {k for k in before if before[k] != after[k]} == redone
    assert (out / "train/train-000003.tar").read_bytes() == lost  # the plan is followed, not redrawn
    read_manifest(out)
    assert _conversion(out)["written"] == first.written
    # a finished conversion rerun: nothing to write, the manifest is back
    assert _convert(mini.root, out, per_shard=32, devkit=mini.devkit).shards_written == 0
    assert _stat(out) == after


def test_other_options_or_source_need_overwrite(tmp_path):
    mini = _small(tmp_path / "src")
    out = tmp_path / "out"
    _convert(mini.root, out, per_shard=4, devkit=mini.devkit)
    with pytest.raises(DatasetError, match=r"different options \(per_shard 4 then, 8 now\)"):
        _convert(mini.root, out, per_shard=8, devkit=mini.devkit)
    with pytest.raises(DatasetError, match="different options .seed 0 then, 1 now"):
        _convert(mini.root, out, per_shard=4, seed=1, devkit=mini.devkit)
    extra = mini.root / "train" / mini.wnids[0] / "extra_1.JPEG"
    shutil.copy(mini.root / next(iter(mini.train)), extra)
    with pytest.raises(DatasetError, match="different source files .train 20 images then, 21 now"):
        _convert(mini.root, out, per_shard=4, devkit=mini.devkit)
    result = _convert(mini.root, out, per_shard=8, devkit=mini.devkit, overwrite=True)
    assert result.written["train"] == 21
    # the old conversion's extra shards are gone: only the new plan's shards remain
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == ["train-000000.tar", "train-000001.tar",
                                                                     "train-000002.tar"]
    read_manifest(out)
    assert _conversion(out)["per_shard"] == 8


def test_out_holding_another_dataset_needs_overwrite(tmp_path):
    mini = _small(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "dataset.json").write_text("{}")
    with pytest.raises(DatasetError, match="did not plan"):
        _convert(mini.root, tmp_path / "out", devkit=mini.devkit)
    _convert(mini.root, tmp_path / "out", devkit=mini.devkit, overwrite=True)
    assert read_manifest(tmp_path / "out")["num_classes"] == 5


def test_source_layout_errors(tmp_path):
    mini = _small(tmp_path / "src", labels=("devkit", "kaggle"))
    root = mini.root
    with pytest.raises(DatasetError, match="ambiguous .ILSVRC2012_devkit_t12 and LOC_val_solution.csv"):
        scan_source(root)
    assert len(scan_source(root, devkit=mini.devkit).val) == 15
    with pytest.raises(DatasetError, match="is a CSV and --devkit"):
        scan_source(root, val_labels=mini.kaggle_csv, devkit=mini.devkit)
    gt = mini.devkit / "data" / "ILSVRC2012_validation_ground_truth.txt"
    assert len(scan_source(root, val_labels=gt).val) == 15  # meta.mat found beside it
    (mini.devkit / "data" / "meta.mat").rename(tmp_path / "meta.mat")
    with pytest.raises(DatasetError, match="meta.mat"):
        scan_source(root, val_labels=gt)
    # an unknown wnid among the val labels
    bad = tmp_path / "bad.csv"
    bad.write_text(mini.kaggle_csv.read_text().replace(mini.wnids[2], "n99999999"))
    with pytest.raises(DatasetError, match="wnid 'n99999999' is not a train class"):
        scan_source(root, val_labels=bad)
    # both layouts in val/
    (root / "val" / mini.wnids[0]).mkdir()
    with pytest.raises(DatasetError, match="val/ is ambiguous"):
        scan_source(root, devkit=mini.devkit)


def test_class_folder_val_with_unknown_wnid(tmp_path):
    mini = _small(tmp_path / "src", flat_val=False)
    (mini.root / "val" / mini.wnids[1]).rename(mini.root / "val" / "n00000001")
    with pytest.raises(DatasetError, match="val/n00000001 is not a train class"):
        scan_source(mini.root)


def _cli(args: list[str], capsys) -> tuple[int, str]:
    rc = main(["data", *args])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("nosrc", "--src is required"),
    ("zero", "--per-shard 0: allowed range"),
    ("negative", "--per-shard -5: allowed range"),
    ("workers", "--workers 0: allowed range"),
    ("notrain", "no train/ folder"),
    ("missing", "not a folder"),
    ("inside", "is inside --src"),
    ("labels", "--val-labels"),
    ("nolabels", "val/ is flat and no labels were found"),
    ("digits", "--src: only for `prunepipe data imagenet`"),
])
def test_cli_bad_arguments_one_line(tmp_path, capsys, case, message):
    src = _small(tmp_path / "src", labels=()).root
    out = str(tmp_path / "out")
    args = {
        "nosrc": ["imagenet", "--out", out],
        "zero": ["imagenet", "--src", str(src), "--out", out, "--per-shard", "0"],
        "negative": ["imagenet", "--src", str(src), "--out", out, "--per-shard", "-5"],
        "workers": ["imagenet", "--src", str(src), "--out", out, "--workers", "0"],
        "notrain": ["imagenet", "--src", str(src / "val"), "--out", out],
        "missing": ["imagenet", "--src", str(tmp_path / "nowhere"), "--out", out],
        "inside": ["imagenet", "--src", str(src), "--out", str(src / "shards")],
        "labels": ["imagenet", "--src", str(src), "--out", out, "--val-labels", str(tmp_path / "no.csv")],
        "nolabels": ["imagenet", "--src", str(src), "--out", out],
        "digits": ["digits", "--src", str(src), "--out", out],
    }[case]
    rc, err = _cli(args, capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("prunepipe: error: ") and message in err
    assert not (tmp_path / "out" / "dataset.json").exists()


@pytest.mark.multiprocess
@pytest.mark.parametrize("extra", [["--per-shard", "0"], []])
def test_cli_entry_point_one_line_error(tmp_path, extra):
    src = _small(tmp_path / "src", labels=()).root
    args = ["--src", str(src)] if extra else []
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "data", "imagenet", *args, "--out",
                           str(tmp_path / "out"), *extra], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("prunepipe: error: ")


@pytest.mark.multiprocess
def test_worker_count_does_not_change_the_shards(mini, converted, tmp_path):
    _, out1 = converted
    _convert(mini.root, tmp_path / "out", per_shard=32, devkit=mini.devkit, workers=2)
    for split in ("train", "val"):
        names = sorted(p.name for p in (out1 / split).iterdir())
        assert names == sorted(p.name for p in (tmp_path / "out" / split).iterdir())
        for name in names:
            assert (out1 / split / name).read_bytes() == (tmp_path / "out" / split / name).read_bytes()


@pytest.mark.multiprocess
def test_killed_conversion_resumes(mini, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "launch.cli", "data", "imagenet", "--src", str(mini.root), "--out", str(out),
           "--devkit", str(mini.devkit), "--per-shard", "4", "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list((out / "conversion").glob("train-*.json"))) < 3 and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if (out / "dataset.json").exists():
        pytest.skip("the conversion finished before it could be killed")
    finished = {p.stem for p in (out / "conversion").glob("*-*.json")}
    kept = {name: (out / "train" / f"{name}.tar").stat().st_ino for name in finished if name.startswith("train")}
    assert 3 <= len(finished) < 84
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{84 - len(finished)} of 84 shards written" in rerun.stdout
    assert {n: (out / "train" / f"{n}.tar").stat().st_ino for n in kept} == kept
    manifest = read_manifest(out)
    lost = sum(r.startswith("train") for r in mini.special["corrupt"])
    assert sum(s["count"] for s in manifest["splits"]["train"]) == len(mini.train) - lost
    labels = Counter(v[1] for v in _samples(out, "val").values())
    assert labels == Counter(mini.label(r) for r in mini.val)


def test_stats_are_those_of_the_eval_view(converted, tmp_path):
    """--stats: per-channel mean/std of the pixels torchvision's eval transform yields
    (Resize(256) + CenterCrop(224)), every image weighing the same."""
    import torch
    from torchvision.transforms import v2 as T

    from pipeline.data.imagenet_stats import compute_stats

    _, out = converted
    view = T.Compose([T.ToImage(), T.Resize(256, antialias=True), T.CenterCrop(224), T.ToDtype(torch.float64, scale=True)])
    pixels = torch.cat([view(Image.open(io.BytesIO(jpg)).convert("RGB")).reshape(3, -1)
                        for jpg, _, _ in _samples(out, "train").values()], dim=1)
    shards = read_manifest(out)["splits"]["train"]
    mean, std = compute_stats(out, shards, 10_000, seed=0, progress=False)  # more than there are: all of them
    assert np.allclose(mean, pixels.mean(1).numpy(), atol=0.001)
    assert np.allclose(std, pixels.std(1).numpy(), atol=0.001)
    # a seeded subset: what the conversion writes into the manifest
    sub = compute_stats(out, shards, 40, seed=7, progress=False)
    assert sub != (mean, std) and sub == compute_stats(out, shards, 40, seed=7, progress=False)


def test_stats_option_fills_the_manifest(tmp_path):
    from pipeline.data.imagenet_stats import compute_stats

    mini = _small(tmp_path / "src")
    result = _convert(mini.root, tmp_path / "out", per_shard=8, devkit=mini.devkit, stats=12, seed=5)
    manifest = read_manifest(tmp_path / "out")
    mean, std = compute_stats(tmp_path / "out", manifest["splits"]["train"], 12, seed=5, progress=False)
    assert manifest["mean"] == tuple(round(x, 4) for x in mean) and manifest["std"] == tuple(round(x, 4) for x in std)
    assert "computed from 12 train images" in result.summary()
