"""Behaviours that only two real ranks show (tests/helpers/guards_check.py under torchrun):
the real loader's rank split, evaluation's all-reduce, the equal-steps check, and BN
recalibration's averaging."""

import json
import os
import sys

import pytest

from pipeline.data.manifest import read_manifest
from tests.conftest import ROOT
from tests.helpers.known_eval import KNOWN_SPLIT, N_SAMPLES, expected_metrics
from tests.helpers.procs import run_tree

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, digits_root) -> dict:
    out = tmp_path_factory.mktemp("guards") / "r.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "helpers" / "guards_check.py"), str(out), str(digits_root)]
    proc = run_tree(cmd, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2
    return result


def _keys_from_shards(digits_root, split: str) -> list[str]:
    """Every sample id of ``split``, read straight from the tar files (not through the loader)."""
    import tarfile

    keys = set()
    for shard in read_manifest(digits_root)["splits"][split]:
        with tarfile.open(digits_root / shard["path"]) as tar:
            for member in tar.getmembers():
                keys.add(f"{shard['path']}/{member.name.split('.', 1)[0]}")
    return sorted(keys)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("epoch", [0, 1])
def test_val_loader_gives_each_sample_to_exactly_one_rank(two_ranks, digits_root, workers, epoch):
    r0, r1 = two_ranks["loader"][f"val/w{workers}/e{epoch}"]
    assert r0["keys"] and r1["keys"], "a rank got no validation samples"
    assert not set(r0["keys"]) & set(r1["keys"]), "a validation sample was read by both ranks"
    assert len(set(r0["keys"])) == len(r0["keys"]) and len(set(r1["keys"])) == len(r1["keys"])
    assert sorted(r0["keys"] + r1["keys"]) == _keys_from_shards(digits_root, "val")
    assert [r0["batches"], r1["batches"]] == [r0["len"], r1["len"]]  # len() is what it yields


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("epoch", [0, 1])
def test_train_loader_splits_disjoint_equal_and_nearly_complete(two_ranks, digits_root, workers, epoch):
    r0, r1 = two_ranks["loader"][f"train/w{workers}/e{epoch}"]
    everything = set(_keys_from_shards(digits_root, "train"))
    a, b = set(r0["keys"]), set(r1["keys"])
    assert len(a) == len(r0["keys"]) and len(b) == len(r1["keys"]), "a sample came twice in one epoch"
    assert not a & b, "a training sample was read by both ranks"
    assert a | b <= everything
    assert len(a) == len(b), "ranks train on different sample counts: unequal steps"
    assert r0["batches"] == r0["len"] == r1["batches"] == r1["len"]
    # the equal quota drops fewer than one sample per reader (slots = ranks x workers) when the
    # split is by sample; by whole shard (no workers: 12 shards for 2 readers) the digits shards
    # are equal but the last, so the loss is under one shard
    slots = 2 * max(1, workers)
    shard_size = max(s["count"] for s in read_manifest(digits_root)["splits"]["train"])
    bound = slots if workers else shard_size
    assert len(everything) - len(a | b) < bound


def test_train_loader_reshuffles_between_epochs(two_ranks):
    for workers in (0, 2):
        e0 = two_ranks["loader"][f"train/w{workers}/e0"][0]["keys"]
        e1 = two_ranks["loader"][f"train/w{workers}/e1"][0]["keys"]
        assert e0 != e1


def test_evaluate_on_two_ranks_equals_the_whole_set(two_ranks):
    want = expected_metrics()
    assert KNOWN_SPLIT[0][0] == 0 and KNOWN_SPLIT[-1][1] == N_SAMPLES
    for rank in two_ranks["evaluate"]:  # every rank holds the whole set's figures
        for k, v in want.items():
            assert rank[k] == pytest.approx(v, rel=1e-6, abs=1e-9), (k, rank, want)


def test_unequal_steps_raise_on_every_rank(two_ranks):
    for rank in two_ranks["equal_steps"]:
        assert rank["unequal_check"] is not None and "ranks disagree" in rank["unequal_check"]
        assert "ranks disagree" in rank["unequal_epoch"], rank["unequal_epoch"]


def test_bn_recalibration_averages_the_ranks_estimates(two_ranks):
    bn = two_ranks["bn"]
    r0, r1 = bn["rank_estimates"]
    assert max(abs(x - y) for x, y in zip(r0, r1, strict=True)) > 0.5  # the ranks' data differ
    for rank in bn["ranks"]:
        assert rank == pytest.approx(bn["expected"], rel=1e-5, abs=1e-6)
