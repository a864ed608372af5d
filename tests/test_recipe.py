"""The trial recipe (launch/recipe.py) as one read: its phases run in order, each once, and the
work every phase relies on (checking the config, joining the process group) happens once."""

from __future__ import annotations

import pytest

from launch import recipe
from tests.helpers.factories import demo_config


def _tiny(tmp_path, *extra: str):
    return demo_config(tmp_path, *[
        "data.backend=synthetic",
        "data.synthetic_samples=64", "data.batch_size=16", "data.image_size=16", "measure.batch_size=8",
        "measure.rounds=2", "measure.warmup=0", "measure.attempts=1", "train.budget_epochs=2", *extra])


def _count(monkeypatch, module, name: str, calls: list[str]) -> None:
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


@pytest.mark.parametrize("method", ["l1", "sfp"])
def test_a_trial_runs_its_phases_in_order_and_checks_and_joins_once(tmp_path, monkeypatch, method):
    calls: list[str] = []
    phases = ("check_config", "init_distributed", "setup", "drop_blocks", "allocate", "prune", "cut", "measure",
              "finetune", "save")
    for name in phases:
        _count(monkeypatch, recipe, name, calls)
    final = recipe.run_trial(_tiny(tmp_path, f"prune.method={method}"), report=lambda m: None)
    assert calls == list(phases)
    # a training-aware method trains one pruning epoch of the budget of two; l1 fine-tunes both
    assert final["epochs"] == 2 and (tmp_path / "out" / "model" / "spec.json").is_file()


def test_a_trial_resumed_after_the_cut_skips_to_the_fine_tune(tmp_path, monkeypatch):
    cfg = _tiny(tmp_path, "train.budget_epochs=3")
    reports: list[dict] = []
    first = recipe.run_trial(cfg, report=reports.append)
    calls: list[str] = []
    for name in ("drop_blocks", "allocate", "prune", "cut", "measure", "finetune"):
        _count(monkeypatch, recipe, name, calls)
    # the checkpoint says: fine-tune finished; a rerun resumes there and recomputes nothing
    again = recipe.run_trial(cfg, report=lambda m: None)
    assert calls == ["finetune"]
    assert again["pruned_val_top1"] == first["pruned_val_top1"]
    assert [r["epoch"] for r in reports if r.get("phase") == "finetune"] == [1, 2]  # the 3rd: in "final"


def test_blocks_and_loss_allocated_widths_reach_the_saved_model(tmp_path):
    """prune.blocks removes the lowest-loss-rise identity blocks before the widths; the loss
    allocator gives per-group widths to a method other than lossvar; both reach the spec."""
    import json

    from pipeline.spec import load_pruned, read_spec

    cfg = _tiny(tmp_path, "prune.blocks=2", "prune.scope=all", "prune.allocate=loss",
                "prune.allocator_options={target_macs_reduction: 0.3, calib_samples: 32}")
    final = recipe.run_trial(cfg, report=lambda m: None)
    spec = read_spec(tmp_path / "out" / "model")
    removed = spec["method_summary"]["removed_blocks"]
    assert len(removed) == 2 and spec["removed_blocks"] == removed and final["blocks_removed"] == 2
    assert spec["method_summary"]["allocator"] == "loss" and final["method_loss_evaluations"] > 0
    # per-group rates (uniform would give every group one rate), on the groups left by the blocks
    rates = spec["method_summary"]["rates"]
    assert len(set(rates.values())) > 1 and not any(name.startswith(tuple(removed)) for name in rates)
    from pipeline.models import build_model

    dense = build_model(cfg.model.arch, 10)
    for name, rate in rates.items():  # the cut kept what the allocator decided
        if name in spec["layers"] and ".conv" in name:
            width = dense.get_submodule(name).out_channels
            assert spec["layers"][name]["out"] == round(width * (1 - rate)), name
    model, _ = load_pruned(tmp_path / "out" / "model")
    assert all(type(model.get_submodule(b)).__name__ == "Identity" for b in removed)
    assert json.loads(json.dumps(spec["method_summary"]["block_loss_rise"])).keys() == set(removed)
    # the same trial decides the same blocks again (what a resume mid-pruning relies on)
    again = recipe.run_trial(_tiny(tmp_path / "b", "prune.blocks=2", "prune.scope=all", "prune.allocate=loss",
                                   "prune.allocator_options={target_macs_reduction: 0.3, calib_samples: 32}"),
                             report=lambda m: None)
    assert read_spec(tmp_path / "b" / "out" / "model")["removed_blocks"] == removed and again["macs"] == final["macs"]
