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
    for name in ("check_config", "init_distributed", "setup", "prune", "cut", "measure", "finetune", "save"):
        _count(monkeypatch, recipe, name, calls)
    final = recipe.run_trial(_tiny(tmp_path, f"prune.method={method}"), report=lambda m: None)
    assert calls == ["check_config", "init_distributed", "setup", "prune", "cut", "measure", "finetune", "save"]
    # a training-aware method trains one pruning epoch of the budget of two; l1 fine-tunes both
    assert final["epochs"] == 2 and (tmp_path / "out" / "model" / "spec.json").is_file()


def test_a_trial_resumed_after_the_cut_skips_to_the_fine_tune(tmp_path, monkeypatch):
    cfg = _tiny(tmp_path, "train.budget_epochs=3")
    reports: list[dict] = []
    first = recipe.run_trial(cfg, report=reports.append)
    calls: list[str] = []
    for name in ("prune", "cut", "measure", "finetune"):
        _count(monkeypatch, recipe, name, calls)
    # the checkpoint says: fine-tune finished; a rerun resumes there and recomputes nothing
    again = recipe.run_trial(cfg, report=lambda m: None)
    assert calls == ["finetune"]
    assert again["pruned_val_top1"] == first["pruned_val_top1"]
    assert [r["epoch"] for r in reports if r.get("phase") == "finetune"] == [1, 2]  # the 3rd: in "final"
