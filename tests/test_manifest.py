"""dataset.json is input: validated, paths kept inside the root, counts verified against the shards."""

import json
import subprocess
import sys

import pytest

from pipeline.data.manifest import DatasetError, read_manifest
from pipeline.data.shards import index_path, read_index, scan_tar
from tests.conftest import ROOT
from tests.helpers.doctor import copy_dataset, manifest, truncate_shard, write_manifest_raw


@pytest.fixture()
def ds(tmp_path, tiny_synthetic):
    return copy_dataset(tiny_synthetic, tmp_path / "ds")


def test_index_written_beside_every_shard_matches_the_tar(tiny_synthetic):
    m = read_manifest(tiny_synthetic)
    for shard in m["splits"]["train"] + m["splits"]["val"]:
        tar = tiny_synthetic / shard["path"]
        from_index = read_index(index_path(tar))
        from_tar, problem = scan_tar(tar)
        assert problem is None and from_index == from_tar and len(from_index) == shard["count"]


def _doctored(ds, change):
    m = manifest(ds)
    change(m)
    write_manifest_raw(ds, m)


def _set(path, value):
    def change(m):
        node = m
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    return change


def _delete(key):
    def change(m):
        del m[key]
    return change


@pytest.mark.parametrize("change, words", [
    (_set(["splits", "train", 0, "path"], "/etc/passwd"), "relative"),
    (_set(["splits", "train", 0, "path"], "../../../../etc/passwd"), "outside"),
    (_set(["splits", "train", 0, "count"], 10), "declared with 10 samples but holds 16"),
    (_set(["splits", "train", 0, "count"], 256), "declared with 256"),
    (_set(["splits", "train", 0, "count"], "many"), "count"),
    (_set(["num_classes"], 0), "num_classes"),
    (_set(["num_classes"], 1), "num_classes"),
    (_set(["num_classes"], "ten"), "num_classes"),
    (_set(["num_classes"], 1e9), "num_classes"),
    (_set(["std"], [0, 0.2, 0.2]), "std"),
    (_delete("mean"), "mean"),
    (_set(["splits", "train"], []), "splits.train"),
    (_set(["splits", "val", 0, "path"], "val/nope.tar"), "missing"),
    (_set(["classes"], ["a", "b"]), "classes"),
])
def test_bad_manifest_is_one_line_naming_the_problem(ds, change, words):
    _doctored(ds, change)
    with pytest.raises(DatasetError) as err:
        read_manifest(ds)
    msg = str(err.value)
    assert words in msg and "\n" not in msg


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe binary", ""])
def test_unreadable_manifest_is_one_line(ds, text):
    write_manifest_raw(ds, text)
    with pytest.raises(DatasetError) as err:
        read_manifest(ds)
    assert "dataset.json" in str(err.value) and "\n" not in str(err.value)


def test_symlinked_shard_outside_the_root_is_refused(ds, tmp_path):
    outside = tmp_path / "outside.tar"
    outside.write_bytes((ds / "train" / "train-000000.tar").read_bytes())
    link = ds / "train" / "evil.tar"
    link.symlink_to(outside)
    _doctored(ds, _set(["splits", "train", 0, "path"], "train/evil.tar"))
    with pytest.raises(DatasetError, match="outside"):
        read_manifest(ds)


@pytest.mark.parametrize("drop_index", [False, True])
def test_truncated_shard_is_found_without_reading_it(ds, drop_index):
    rel = manifest(ds)["splits"]["train"][0]["path"]
    truncate_shard(ds, rel, 0.5, drop_index=drop_index)
    shard = next(s for s in read_manifest(ds)["splits"]["train"] if s["path"] == rel)
    assert 0 < shard["readable"] < shard["count"] and shard["problem"]


def test_cli_reports_a_doctored_manifest_in_one_line(ds, tmp_path):
    _doctored(ds, _set(["splits", "train", 0, "path"], "/etc/passwd"))
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "prune", str(ROOT / "configs" / "demo.yaml"), f"data.root={ds}",
         f"output_dir={tmp_path / 'run'}", "registry.enabled=false"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("prunepipe: error:")]
    assert len(lines) == 1 and "/etc/passwd" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # stopped before any work


@pytest.mark.parametrize("args, words", [
    (["synthetic", "--per-shard", "-5"], "--per-shard"),
    (["synthetic", "--per-shard", "0"], "--per-shard"),
    (["synthetic", "--train-samples", "0"], "--train-samples"),
    (["synthetic", "--classes", "1"], "--classes"),
    (["digits", "--per-shard", "-1"], "--per-shard"),
])
def test_data_command_refuses_arguments_that_make_unusable_datasets(tmp_path, args, words):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "data", *args, "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "dataset.json").exists()


def test_written_manifest_round_trips(tiny_synthetic):
    m = read_manifest(tiny_synthetic)
    raw = json.loads((tiny_synthetic / "dataset.json").read_text())
    assert m["num_classes"] == raw["num_classes"] == 4
    assert [s["path"] for s in m["splits"]["train"]] == [s["path"] for s in raw["splits"]["train"]]
    assert all(s["readable"] == s["count"] and s["problem"] is None for s in m["splits"]["train"])
