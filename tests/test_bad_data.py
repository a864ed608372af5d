"""data.on_error on the PyTorch/WebDataset backend: every kind of bad sample is skipped and counted
(naming shard and key) or stops the run in one line; never a traceback, never a wrong label."""

import re

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


@pytest.mark.timeout(180)  # without the guard, the reader below waits for ever
def test_a_stuck_worker_stops_the_loader_with_its_stack_and_leaves_no_worker(tiny_synthetic):
    """A read that never returns (a hung network mount, a deadlock after fork) must not leave a
    rank, and every rank waiting on it, silent for ever: the loader stops after
    data.worker_timeout_s, names the setting, and each stuck worker prints where it is."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, "-m", "tests.helpers.stuck_reader", str(tiny_synthetic), "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert re.match(r"val loader: no batch .* in 2 s \(data.worker_timeout_s\)", result["error"] or ""), result
    assert 2 <= result["seconds"] < 30 and len(result["pids"]) == 2
    assert proc.stderr.count("in waits_forever") == 2, proc.stderr[-3000:]  # one stack each, not interleaved
    assert result["left"] == [], "workers outlived their loader"


def test_workers_are_not_forked_from_the_rank_unless_asked(tiny_synthetic, monkeypatch):
    """A rank has gloo/NCCL, OpenMP and progress-bar threads; a worker forked from it can inherit
    a lock one of them held (pytorch/pytorch#130610). By default workers come from a forkserver."""
    import os

    from pipeline.data import loaders
    from tests.helpers.stuck_reader import ParentOfWorker

    monkeypatch.setattr(loaders, "ShardedSamples", ParentOfWorker)

    def parents(**kw) -> set[int]:
        cfg = DataConfig(root=str(tiny_synthetic), image_size=16, batch_size=8, num_workers=2, **kw)
        return {int(y) for _, ys in build_loader(cfg, "val", 0, 1, torch.device("cpu")) for y in ys}

    by_default = parents()
    assert len(by_default) == 1 and os.getpid() not in by_default
    assert parents(worker_start="fork") == {os.getpid()}


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_every_worker_start_method_reads_the_same_samples(tiny_synthetic, start):
    def labels(how: str) -> list[int]:
        cfg = DataConfig(root=str(tiny_synthetic), image_size=16, batch_size=8, num_workers=2, worker_start=how)
        return sorted(int(y) for _, ys in build_loader(cfg, "val", 0, 1, torch.device("cpu")) for y in ys)

    assert labels(start) == labels("forkserver") and len(labels(start)) == 32


def test_worker_timeout_zero_means_no_timeout(tiny_synthetic):
    cfg = DataConfig(root=str(tiny_synthetic), image_size=16, batch_size=8, num_workers=1, worker_timeout_s=0)
    assert build_loader(cfg, "val", 0, 1, torch.device("cpu"))._dl.timeout == 0
    with pytest.raises(ValueError, match="worker_timeout_s"):
        DataConfig(worker_timeout_s=-1)
