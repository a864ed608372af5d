"""What a person sees of a search in MLflow and on the console: readable run names, trials
nested under one parent run, every run ended, the dataset input, the model card, one console
line per trial event."""

from types import SimpleNamespace

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from launch import search_log
from launch.model_card import build_card
from methods import budget_knob
from pipeline import registry
from pipeline.config import RegistryConfig
from tests.helpers.factories import demo_config


def _cfg(tmp_path, *extra):
    return demo_config(tmp_path, "registry.experiment=runs", *extra, store=True)


def test_run_names_say_method_and_knob():
    l1 = {"method": "l1", "prune_ratio": 0.4, "options": {}}
    assert registry.run_name("l1", budget_knob("l1", l1).tag()) == "l1 r0.40"
    lossvar = {"method": "lossvar", "prune_ratio": 0.5, "options": {"lossvar": {"delta": 0.0234}}}
    assert registry.run_name("lossvar", budget_knob("lossvar", lossvar).tag(), "b5ee6_00001") == \
        "lossvar δ0.0234 b5ee6_00001"
    base = {"prune": {"method": "l1", "prune_ratio": 0.5, "options": {}}}
    assert search_log.label({"__base__": base, "prune.method": "sfp", "prune.prune_ratio": 0.61}) == "sfp r0.61"
    # δ is drawn for every trial of the demo's space; only lossvar's label shows it
    drawn = {"__base__": base, "prune.options.lossvar.delta": 0.1}
    assert search_log.label({**drawn, "prune.method": "lossvar"}) == "lossvar δ0.1"
    assert search_log.label({**drawn, "prune.method": "l1"}) == "l1 r0.50"


def test_connect_marks_the_experiment_as_model_training(tmp_path):
    cfg = RegistryConfig(tracking_uri=f"sqlite:///{tmp_path / 'db.db'}", experiment="kind", model_name="m")
    client = registry.connect(cfg)
    exp = client.get_experiment_by_name("kind")
    assert exp.tags[registry.EXPERIMENT_KIND_TAG] == registry.MODEL_TRAINING == "custom_model_development"


def test_parent_run_collects_trials_and_ends_the_stopped_ones(tmp_path):
    cfg = _cfg(tmp_path)
    parent = search_log.start_parent(cfg)
    client = MlflowClient(cfg.registry.tracking_uri)
    assert client.get_run(parent).info.status == "RUNNING"
    logs = tmp_path / "trialA" / search_log.LOG_DIR
    logs.mkdir(parents=True)
    (logs / "1.log").write_text("worker output\n")
    children = {}
    for trial, end in (("A", False), ("B", True), ("C", False)):
        with mlflow.start_run(run_name=trial, parent_run_id=parent,
                              tags={registry.TRIAL_TAG: trial, registry.OUTPUT_DIR_TAG: str(tmp_path / f"trial{trial}")}
                              ) as run:
            children[trial] = run.info.run_id
            if not end:  # a process killed by the scheduler never ends its run: simulate it
                mlflow.end_run(status="RUNNING")
    rows = [{"trial": "A", "status": "stopped"}, {"trial": "B", "status": "done"}, {"trial": "C", "status": "error"}]
    assert search_log.close_trial_runs(cfg, parent, rows) == 2
    status = {t: client.get_run(r).info.status for t, r in children.items()}
    assert status == {"A": "KILLED", "B": "FINISHED", "C": "FAILED"}
    assert [f.path for f in client.list_artifacts(children["A"], "logs")] == ["logs/1.log"]
    result = {"rows": rows, "best": {"run_id": children["B"], "val_top1": 0.9}, "plot": None}
    search_log.finish_parent(cfg, parent, result, "the table", "FINISHED")
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.metrics["best_val_top1"] == 0.9
    assert {f.path for f in client.list_artifacts(parent, "search")} == {"search/results.md", "search/results.json"}


def test_console_view_prints_one_line_per_event_with_best_so_far():
    lines = []
    view = search_log.ConsoleView("val_top1", print_fn=lambda s, **_: lines.append(s))
    base = {"prune": {"method": "l1", "prune_ratio": 0.5, "options": {}}}
    a = SimpleNamespace(trial_id="a", config={"__base__": base, "prune.prune_ratio": 0.4}, local_path=None)
    b = SimpleNamespace(trial_id="b", config={"__base__": base, "prune.method": "sfp"}, local_path=None)
    view.on_trial_start(0, [], a)
    view.on_trial_result(0, [], a, {"epoch": 1, "phase": "finetune", "val_top1": 0.8})
    view.on_trial_result(0, [], b, {"epoch": 1, "phase": "finetune", "val_top1": 0.7})
    view.on_trial_result(0, [], a, {"epoch": 2, "val_top1": 0.85, "final": 1})
    view.on_trial_complete(0, [], a)
    view.on_trial_complete(0, [], b)
    assert len(lines) == 6
    assert "best so far 0.8000 l1 r0.40 [a]" in lines[2]  # b's 0.7 does not take the lead
    assert lines[4].endswith("done") and "stopped early" in lines[5]


def test_model_card_holds_what_a_person_needs():
    spec = {"arch": "resnet18", "num_classes": 10, "image_size": 32,
            "config": {"prune": {"method": "lossvar", "prune_ratio": 0.5, "scope": "inner", "round_to": 8,
                                 "options": {"lossvar": {"delta": 0.05}}},
                       "data": {"root": "/data/digits", "backend": "webdataset"}, "train": {"epochs": 2}},
            "metrics": {"val_top1": 0.91, "dense_val_top1": 0.95, "val_top5": 0.99, "dense_val_top5": 1.0,
                        "macs": 2e8, "dense_macs": 5e8, "params": 1e6, "dense_params": 1.1e7, "macs_reduction": 0.6,
                        "params_reduction": 0.9, "speedup": 1.5, "speedup_low": 1.4, "speedup_high": 1.6,
                        "speed_reliable": 1.0}}
    card = build_card(spec, "RUN1", {"speedup": 1.7, "remeasured": True})
    for needle in ("resnet18", "`lossvar`", "delta=0.05", "/data/digits", "91.0%", "95.0%", "99.0%", "−60.0%",
                   "−90.0%", "1.70x", "1.40–1.60", "re-measured alone", "plots/widths.png",
                   "mlflow artifacts download -r RUN1 -a config/trial.yaml", "prunepipe prune config/trial.yaml"):
        assert needle in card, needle
    assert card.splitlines()[0] == "resnet18 pruned with lossvar: top-1 91.0% (dense 95.0%), MACs −60.0%, 1.70x measured"
    assert "noisy" not in card
    assert "prune_ratio" not in card  # δ decided the rates; the ratio lossvar ignored would mislead
    ratio_spec = {**spec, "config": {**spec["config"], "prune": {**spec["config"]["prune"], "method": "l1"}}}
    assert "prune_ratio=0.5" in build_card(ratio_spec)
    assert "noisy" in build_card({**spec, "metrics": {**spec["metrics"], "speed_reliable": 0.0}})
    with pytest.raises(ValueError, match="spec.arch"):
        build_card({"num_classes": 10})


@pytest.mark.ray
def test_a_real_search_registers_the_best_as_a_person_sees_it(tmp_path, digits_root, capfd):
    """Two trials, each a 2-worker Ray Train DDP job: the best registered, the results table, and
    what a person sees of it in MLflow and on the console."""
    import numpy as np

    from launch.search import format_table
    from tests.helpers.isolated import run_search_in_child

    cfg = _cfg(tmp_path, f"data.root={digits_root}", "data.image_size=16", "train.budget_epochs=null",
               "train.epochs=1", "prune.epochs=1", "measure.rounds=4", "search.grace_period=1",
               "search.space={prune.method: {grid: [l1, lossvar]}, prune.options.lossvar.delta: {choice: [0.1]}}",
               # the winner by top-1 alone: the speed objective has its own tests (test_objective.py),
               # and a speed-up of a 16 px model timed on a shared CI machine may rightly be "noisy"
               "search.objective.min_speedup=null", "registry.model_name=seen")
    result = run_search_in_child(cfg)
    out = capfd.readouterr().out
    rows = result["rows"]
    assert sorted(r["method"] for r in rows) == ["l1", "lossvar"]
    assert all(r["status"] == "done" for r in rows), rows
    for r in rows:
        assert 0.0 < r["macs_reduction"] < 1.0 and r["img_s"] > 0 and r["run_id"]
    best = result["best"]
    assert best["val_top1"] == max(r["val_top1"] for r in rows)
    client = MlflowClient(cfg.registry.tracking_uri)
    mv = client.get_model_version_by_alias("seen", "challenger")
    assert int(mv.version) == result["version"] and mv.run_id == best["run_id"]
    assert float(mv.tags["val_top1"]) == pytest.approx(best["val_top1"], rel=1e-4)
    # search.max_concurrent = 1: the trials ran one after the other
    spans = sorted((r["started_at"], r["ended_at"]) for r in rows)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False)), spans
    table = format_table(rows, best)
    assert "l1" in table and "lossvar" in table and "challenger" in table

    exp = client.get_experiment_by_name("runs")
    assert exp.tags[registry.EXPERIMENT_KIND_TAG] == registry.MODEL_TRAINING
    runs = client.search_runs([exp.experiment_id])
    parent = client.get_run(result["parent_run_id"])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and len(runs) == 3  # every trial nested under the one search run
    assert sorted(r.info.run_name.rsplit(" ", 1)[0] for r in children) == ["l1 r0.50", "lossvar δ0.1"]
    assert all(r.info.status != "RUNNING" for r in runs)
    assert {f.path for f in client.list_artifacts(parent.info.run_id, "search")} >= \
        {"search/results.md", "search/results.json", "search/pareto.png"}
    from pipeline.data.manifest import read_manifest

    name = read_manifest(digits_root, verify=False)["name"]
    for child in children:
        inputs = child.inputs.dataset_inputs
        assert {d.dataset.name for d in inputs} == {name} and len(inputs) == 2  # train and val
        assert any(f.path == "logs" for f in client.list_artifacts(child.info.run_id))
    # the registered version: a pyfunc that predicts, with the model card as its description
    assert "Reproduce" in mv.description and cfg.model.arch in mv.description
    mlflow.set_tracking_uri(cfg.registry.tracking_uri)
    logits = mlflow.pyfunc.load_model("models:/seen@challenger").predict(np.zeros((2, 3, 16, 16), np.float32))
    assert logits.shape == (2, 10)
    # the console: one line per trial event, no Ray status box, no worker output
    assert out.count("[search] start") == 2 and out.count("[search] end") == 2
    assert "Trial status" not in out and "(RayTrainWorker" not in out and len(out.splitlines()) < 40, out
