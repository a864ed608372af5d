"""The DeepSpeed backend: its config, DDP-equal training on ZeRO 0/1/2, method hooks under
ZeRO-2, checkpoints, and the recipe under torchrun, the deepspeed launcher and Ray Train."""

import json
import os
import re
import sys

import pytest
import torch

from pipeline.backends import BACKENDS, backend_names
from pipeline.backends.deepspeed_config import build, derive, merge
from pipeline.config import TrainConfig
from tests.conftest import DEMO, ROOT
from tests.helpers.procs import free_port, run_tree, torchrun

# Measured (tests/helpers/ds_check.py, 2 gloo ranks, float32): ZeRO 0, 1 and 2 reproduce DDP's
# losses and weights bit for bit (both all-reduce a sum and divide by the world size). With
# clipping and accumulation the global norm is summed in another order: losses then differ by
# <= 3e-7 relative and weights by <= 1.1e-5 after 8 steps. The tolerances leave ~10x headroom
# for other machines' reduction orders, and stay far below what a lost hook edit or a lost
# momentum state changes (>= 6e-2 in weights, measured by the same helper).
LOSS_RTOL, WEIGHT_ATOL = 3e-6, 1e-4


def test_derived_config_follows_the_project_config():
    train = TrainConfig(backend="deepspeed", zero_stage=2, grad_accum=4, grad_clip=1.5)
    cfg = derive(train, micro_batch=32, amp=None)
    assert cfg["train_micro_batch_size_per_gpu"] == 32 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["zero_optimization"] == {"stage": 2} and cfg["gradient_clipping"] == 1.5
    assert cfg["zero_allow_untested_optimizer"] is True
    assert "torch_autocast" not in cfg and "bf16" not in cfg and "fp16" not in cfg  # float32 on CPU
    assert derive(train, 32, torch.bfloat16)["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert derive(train, 32, torch.float16)["torch_autocast"]["dtype"] == "float16"


def test_override_file_merges_over_derived_keys(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 1000},
                                "gradient_clipping": 0.5}))
    train = TrainConfig(backend="deepspeed", zero_stage=1, deepspeed_config=str(path))
    cfg = build(train, micro_batch=8, amp=None)
    # nested objects merge key by key: the stage from train.zero_stage survives the file's other keys
    assert cfg["zero_optimization"] == {"stage": 1, "overlap_comm": True, "reduce_bucket_size": 1000}
    assert cfg["gradient_clipping"] == 0.5 and cfg["train_micro_batch_size_per_gpu"] == 8
    assert merge({"a": {"b": 1}}, {"a": 2}) == {"a": 2}


def test_backend_registry_names_importable_classes():
    import importlib

    assert backend_names() == ["ddp", "deepspeed"]
    for name, target in BACKENDS.items():
        module, _, cls = target.partition(":")
        assert getattr(importlib.import_module(module), cls).name == name


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}


def _torchrun(*args, timeout=900):
    return torchrun(*args, cwd=ROOT, timeout=timeout, DS_ACCELERATOR="cpu")


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= LOSS_RTOL * max(1.0, abs(x)) for x, y in zip(a, b, strict=True))


@pytest.mark.multiprocess
def test_two_ranks_match_ddp_and_keep_hook_edits(tmp_path, digits_root):
    out = tmp_path / "ds.json"
    proc = _torchrun(str(ROOT / "tests" / "helpers" / "ds_check.py"), str(out), str(digits_root))
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["world"] == 2
    ddp = r["curves"]["ddp"]
    assert ddp[-1] < ddp[0]  # it trained
    for stage in ("z0", "z1", "z2"):
        assert _close(r["curves"][stage], ddp), (stage, r["curves"][stage], ddp)
        assert r["weights_diff"][stage] <= WEIGHT_ATOL, (stage, r["weights_diff"][stage])
    # accumulation + clipping: the same boundaries and norm on both backends, and not a no-op
    acc = r["accum"]
    assert _close(acc["z2"], acc["ddp"]) and acc["weights_diff"] <= WEIGHT_ATOL, acc
    assert acc["differs_from_no_accum"] > 1e-3
    # clipping bites on both backends, by far more than they differ
    assert min(acc["differs_from_no_clip"], acc["z2_differs_from_no_clip"]) > 100 * WEIGHT_ATOL, acc
    # SFP's epoch-end masking and ISTA's proximal step edit parameters in place; under ZeRO-2 the
    # run must still follow DDP, where such an edit is trivially kept
    for name, m in r["methods"].items():
        assert _close(m["z2"], m["ddp"]) and m["weights_diff"] <= WEIGHT_ATOL, (name, m)
    # a step with lr = 0 after the edit: the fp32 masters held the edit, nothing came back
    for name, s in r["survive"].items():
        assert s["zeros"] > 0 and s["max_change"] == 0.0, (name, s)
    # the gathered ZeRO-2 optimizer state resumes the run exactly, on ZeRO-2 and on DDP alike
    res = r["resume"]
    assert res["momentum_tensors"] == 62  # every resnet18 parameter's momentum buffer
    for name in ("z2", "ddp"):
        assert _close(res[name]["losses"], res["full"][2:]) and res[name]["weights_diff"] <= WEIGHT_ATOL, res
    assert res["without_state_diff"] > 100 * WEIGHT_ATOL  # the state matters: a cold restart differs


def _prune_args(tmp_path, *extra):
    return ["prune", str(DEMO), "data.backend=synthetic", "data.synthetic_samples=128",
            "data.batch_size=16", "data.image_size=16", f"output_dir={tmp_path / 'run'}", "prune.method=sfp",
            "prune.epochs=1", "prune.prune_ratio=0.5", "measure.rounds=2", "measure.warmup=1",
            "train.budget_epochs=null", "train.backend=deepspeed", "registry.enabled=false", *extra]


@pytest.mark.multiprocess
def test_prune_on_zero2_under_torchrun_resumes_without_ray_or_mlflow(tmp_path):
    helper = str(ROOT / "tests" / "helpers" / "no_tracking.py")
    # channels_last as on a GPU: DeepSpeed cannot flatten channels_last weights, the backend keeps them contiguous
    first = _torchrun(helper, *_prune_args(tmp_path, "train.zero_stage=2", "train.epochs=1", "train.channels_last=on"))
    assert first.returncode == 0, first.stderr[-4000:]
    assert (tmp_path / "run" / "model" / "spec.json").is_file()
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["phase"] == "finetune" and len(ckpt["optimizer"]["state"]) > 0  # the gathered momentum
    second = _torchrun(helper, *_prune_args(tmp_path, "train.zero_stage=2", "train.epochs=2"))
    assert second.returncode == 0, second.stderr[-4000:]
    epochs = [int(m) for m in re.findall(r"\"epoch\": (\d+), \"phase\": \"(?:prune|finetune|final)\"", second.stdout)]
    assert epochs == [3], second.stdout[-2000:]  # only fine-tune epoch 2 (global epoch 3) ran


@pytest.mark.multiprocess
def test_prune_under_the_deepspeed_launcher(tmp_path):
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_accelerators", "2",
           "--master_port", str(free_port()), "--no_local_rank", "--module", "launch.cli",
           *_prune_args(tmp_path, "train.zero_stage=1", "train.epochs=1")]
    proc = run_tree(cmd, timeout=900, cwd=ROOT, env=_env())
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    spec = json.loads((tmp_path / "run" / "model" / "spec.json").read_text())
    assert spec["config"]["train"]["backend"] == "deepspeed" and 0 < spec["metrics"]["macs_reduction"] < 1
    assert spec["metrics"]["epochs"] == 2
    assert spec["metrics"]["steps"] == 4  # 128 samples / (16 x 2 ranks): both ranks trained


@pytest.mark.ray
def test_search_trial_on_deepspeed_in_ray_train(tmp_path):
    from pipeline.config import absolutize, load_config
    from tests.helpers.isolated import run_search_in_child

    cfg = absolutize(load_config(DEMO, [
        "data.backend=synthetic", "data.synthetic_samples=128", "data.batch_size=16", "data.image_size=16",
        f"output_dir={tmp_path / 'out'}", "baseline.epochs=0", "train.budget_epochs=null", "train.epochs=1",
        "prune.epochs=0", "measure.rounds=2", "measure.warmup=1", "search.grace_period=1",
        "train.backend=deepspeed", "train.zero_stage=2", "search.space={prune.method: {grid: [l1]}}",
        "search.objective.min_speedup=null",  # the search mechanics on DeepSpeed, not the speed goal
        f"registry.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "registry.model_name=ds",
    ]))
    result = run_search_in_child(cfg)
    (row,) = result["rows"]
    assert row["status"] == "done" and 0 < row["macs_reduction"] < 1, row
    assert result["best"] is row
