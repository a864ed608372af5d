"""A real Ray Tune search: 2 trials, each a 2-worker Ray Train DDP job, registered in MLflow."""

import pytest

from launch.search import format_table, run_search
from pipeline.config import absolutize, load_config
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_two_trial_search_registers_the_best(tmp_path, digits_root):
    import ray
    from mlflow.tracking import MlflowClient

    cfg = absolutize(load_config(ROOT / "configs" / "demo.yaml", [
        f"data.root={digits_root}", "data.image_size=16", "data.batch_size=64", f"output_dir={tmp_path / 'out'}",
        "train.epochs=1", "prune.epochs=1", "measure.rounds=4", "search.grace_period=1",
        "search.space={prune.method: {grid: [l1, sfp]}, prune.prune_ratio: {choice: [0.5]}}",
        # the winner by top-1 alone: the speed objective has its own tests (test_objective.py),
        # and a speed-up of a 16 px model timed on a shared CI machine may rightly be "noisy"
        "search.objective.min_speedup=null",
        f"registry.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "registry.model_name=searched",
    ]))
    try:
        result = run_search(cfg)
    finally:
        ray.shutdown()
    rows = result["rows"]
    assert sorted(r["method"] for r in rows) == ["l1", "sfp"]
    assert all(r["status"] == "done" for r in rows), rows
    for r in rows:
        assert 0.0 < r["macs_reduction"] < 1.0 and r["img_s"] > 0 and r["run_id"]
    best = result["best"]
    assert best["val_top1"] == max(r["val_top1"] for r in rows)
    client = MlflowClient(cfg.registry.tracking_uri)
    mv = client.get_model_version_by_alias("searched", "challenger")
    assert int(mv.version) == result["version"] and mv.run_id == best["run_id"]
    assert float(mv.tags["val_top1"]) == pytest.approx(best["val_top1"], rel=1e-4)
    # search.max_concurrent = 1: the trials ran one after the other
    spans = sorted((r["started_at"], r["ended_at"]) for r in rows)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False)), spans
    table = format_table(rows, best)
    assert "l1" in table and "sfp" in table and "challenger" in table
