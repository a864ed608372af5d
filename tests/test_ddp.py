"""Real multi-process DDP over gloo, launched by torchrun."""

import json
import re

import pytest
import torch

from tests.conftest import DEMO, ROOT
from tests.helpers.procs import torchrun

pytestmark = pytest.mark.multiprocess


def _torchrun(*args, timeout=600):
    return torchrun(*args, cwd=ROOT, timeout=timeout)


def test_two_rank_ddp_keeps_ranks_identical(tmp_path, digits_root):
    out = tmp_path / "ddp.json"
    proc = _torchrun(str(ROOT / "tests" / "helpers" / "ddp_check.py"), str(out), str(digits_root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["world"] == 2
    assert r["trained"], "weights did not change"
    # what each rank trained on: the count its reader promised, the same on both ranks, one step a batch
    r0, r1 = r["ranks"]
    for rank in (r0, r1):
        assert rank["samples_seen"] == rank["declared"] > 0
        assert rank["steps"] == rank["batches"] > 0
    assert r0["samples_seen"] == r1["samples_seen"] and r0["steps"] == r1["steps"]
    from pipeline.data.manifest import read_manifest

    train_shards = read_manifest(digits_root)["splits"]["train"]
    total = sum(s["count"] for s in train_shards)
    seen = r0["samples_seen"] + r1["samples_seen"]
    assert total - max(s["count"] for s in train_shards) < seen <= total  # the equal quota drops < 1 shard
    # train_top1/loss are over both ranks' samples (all-reduced): equal on both ranks, and
    # top-1 is a whole number of correct samples out of all seen
    assert r0["train_top1"] == r1["train_top1"] and r0["train_loss"] == r1["train_loss"]
    assert 0.0 <= r0["train_top1"] <= 1.0 and r0["train_loss"] > 0
    correct = r0["train_top1"] * seen
    assert abs(correct - round(correct)) < 1e-6, (r0["train_top1"], seen)
    assert r["weights_equal"], "DDP ranks diverged"
    assert r["grads_equal"], "all-reduced gradients differ between ranks"
    from methods import method_names

    assert set(r["masks_equal"]) == set(method_names())  # every registered method ran under DDP
    assert all(r["masks_equal"].values()), r["masks_equal"]
    # lossvar: the calibration loss is sharded over 2 ranks and all-reduced; 1 rank decides the same
    from methods import SelectContext, get_method_class
    from pipeline.config import DataConfig
    from pipeline.data.loaders import calibration_set
    from pipeline.surgery import find_groups
    from tests.helpers.ddp_check import lossvar_model

    model = lossvar_model()
    groups = find_groups(model, 16, "inner")
    cfg = DataConfig(root=str(digits_root), image_size=16, batch_size=16, augment="none")
    ctx = SelectContext(calib=calibration_set(cfg, 64, 0, 1, torch.device("cpu")), image_size=16)
    single = get_method_class("lossvar")(groups, 0.5, seed=0, image_size=16).keep_masks(model, ctx)
    assert {k: v.int().tolist() for k, v in single.items()} == r["lossvar_masks"]


def test_prune_under_torchrun_registers_and_resumes(tmp_path, digits_root):
    db = tmp_path / "mlflow.db"
    common = [
        "-m", "launch.cli", "prune", str(DEMO),
        f"data.root={digits_root}", "data.image_size=16", "data.batch_size=32", f"output_dir={tmp_path / 'run'}",
        "prune.method=sfp", "prune.epochs=1", "prune.prune_ratio=0.5", "measure.rounds=4",
        f"registry.tracking_uri=sqlite:///{db}", "registry.experiment=t",
    ]
    first = _torchrun(*common, "train.epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "run" / "model" / "spec.json").is_file()
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    # a longer budget on the same folder resumes after the last finished epoch, not from scratch
    second = _torchrun(*common, "train.epochs=2")
    assert second.returncode == 0, second.stderr[-3000:]
    epochs = [int(m) for m in re.findall(r"\"epoch\": (\d+), \"phase\": \"(?:prune|finetune|final)\"", second.stdout)]
    assert epochs == [3], second.stdout[-2000:]  # only fine-tune epoch 2 (global epoch 3) ran
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(f"sqlite:///{db}").search_runs([MlflowClient(f"sqlite:///{db}").get_experiment_by_name("t").experiment_id])
    assert len(runs) == 2 and all("val_top1" in r.data.metrics for r in runs)
