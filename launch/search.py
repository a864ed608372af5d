"""The Ray Tune search: each trial is a multi-worker Ray Train TorchTrainer job (DDP or DeepSpeed).

Ray Train V2's pattern: Tune runs a small driver function per trial that builds a
``TorchTrainer`` and calls ``fit()``; workers report with ``ray.train.report`` and
``TuneReportCallback`` forwards rank 0's metrics to Tune, where ASHA stops weak trials early.
A trial is just a set of dotted overrides on the base config.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from launch import objective
from launch import resume as resuming
from pipeline.config import Config, SearchSpaceEntry, build_config, config_to_dict

# On small CPU machines the worker group can take longer than Ray's default to start.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")
if not os.environ.get("RAY_ADDRESS"):
    # A local Ray stays on loopback: by default Ray on Linux advertises the machine's network
    # address even for a single node, and gloo picks the host name's interface; neither is
    # needed when every worker is on this machine (a cluster is joined through RAY_ADDRESS).
    # Set before anything imports ray: it reads this once, at import.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def init_ray(cfg: Config, verbose: bool = False) -> None:
    """Start a local Ray (or join RAY_ADDRESS's cluster) unless one is running; its workers'
    output reaches this console only when ``verbose`` (it is always in their log files)."""
    import ray

    if ray.is_initialized():
        return
    # The dashboard stays on: Ray Train's PlacementGroupCleaner asks its State API whether a
    # trial's controller has ended; without it every finished trial leaks its placement group
    # and, once the logical CPUs are all held, the next trial waits forever.
    s = cfg.search
    if os.environ.get("RAY_ADDRESS"):
        ray.init(configure_logging=False, log_to_driver=verbose)
        return
    # Logical CPUs over-provisioned on small machines: a trial's driver plus its workers must
    # fit, and the last trial's placement group is released a little after it ends; with an
    # exact fit the next trial's worker group waits for it until it times out.
    need = s.max_concurrent * (1 + math.ceil(s.num_workers * s.cpus_per_worker))
    ray.init(num_cpus=s.ray_num_cpus or max(8, 2 * need, os.cpu_count() or 1),
             configure_logging=False, log_to_driver=verbose)


def _sampler(entry: SearchSpaceEntry):
    from ray import tune

    if entry.choice is not None:
        return tune.choice(entry.choice)
    if entry.grid is not None:
        return tune.grid_search(entry.grid)
    if entry.uniform is not None:
        return tune.uniform(*entry.uniform)
    if entry.loguniform is not None:
        return tune.loguniform(*entry.loguniform)
    return tune.randint(*entry.randint)


def _report_numbers(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | str) and not isinstance(v, bool)}


def _train_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Runs in every Ray Train worker: the very same recipe as `prunepipe prune`."""
    import ray.train

    from launch.recipe import _TrialLog, run_trial
    from launch.search_log import tee_output

    cfg = build_config(loop_config["base"], loop_config["overrides"])
    tee_output(cfg.output_dir)  # the full log of this worker, beside the trial's checkpoint
    if loop_config.get("parent_run_id"):
        os.environ[_TrialLog.PARENT_ENV] = loop_config["parent_run_id"]  # the trial's run nests under the search's

    def report(metrics: dict[str, Any]) -> None:
        metrics = _report_numbers(metrics)
        # ASHA needs the metric in every result; before a fine-tune epoch it is the cut model's
        metrics.setdefault("val_top1", metrics.get("pruned_val_top1", 0.0))
        ray.train.report(metrics)

    # run_trial's last report carries "final": 1 ("done" is Tune's own key), sent only after
    # the model is saved and logged; returned too, for the trial's driver (see _trial_driver)
    final = _report_numbers(run_trial(cfg, report=report, run_name=loop_config["trial_id"]))
    final.setdefault("val_top1", final.get("pruned_val_top1", 0.0))
    return final


def _trial_driver(tune_config: dict[str, Any]) -> None:
    """One Tune trial: build and fit a TorchTrainer for this trial's overrides."""
    from ray import tune
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from launch.search_log import trial_overrides

    base = tune_config["__base__"]
    overrides = trial_overrides(tune_config)  # what this trial's method draws
    trial_name, trial_id = tune.get_context().get_trial_name(), tune.get_context().get_trial_id()
    # deterministic per-trial folders: a restarted trial finds its own checkpoint
    trial_dir = Path(base["output_dir"]) / "trials" / trial_name
    overrides["output_dir"] = str(trial_dir)
    done = resuming.finished_result(trial_dir)
    if done is not None:
        # a resumed search whose saved state missed this trial's end: its result, not a rerun
        tune.report(done)
        return
    overrides["name"] = trial_name
    cfg = build_config(base, overrides)
    s = cfg.search
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"base": base, "overrides": overrides, "trial_name": trial_name, "trial_id": trial_id,
                           "parent_run_id": tune_config.get("__parent__")},
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.gpus_per_worker > 0,
            resources_per_worker={"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.gpus_per_worker else {})},
            placement_strategy=s.placement_strategy,
        ),
        run_config=RunConfig(
            name=trial_name,
            storage_path=str(Path(base["output_dir"]) / "ray"),
            callbacks=[TuneReportCallback()],
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        ),
    )
    result = trainer.fit()
    # TuneReportCallback hands results over through a one-slot queue that is not drained once
    # this function returns: the last reports of a trial were seen lost. Ray Train V2's
    # Result.metrics are those of the last *checkpoint* (None here: the recipe keeps its own),
    # but Result.return_value is what rank 0's worker function returned: the final metrics.
    final = result.return_value
    if isinstance(final, dict) and final.get("final"):
        resuming.save_result(trial_dir, final)  # before Tune hears of the end (resume.py)
        tune.report(final)


def run_search(cfg: Config, verbose: bool = False, resume: bool = False, trust_state: bool = False) -> dict[str, Any]:
    """Search ``cfg.search.space``, register the best trial's model as ``challenger``; the
    trials' MLflow runs nest under one parent run that ends with the search. ``resume``
    continues the interrupted search of this name and output_dir (launch/resume.py), whose
    folder others may write if ``trust_state``."""
    from launch import search_log
    from launch.checks import check_config
    from launch.sync import sync_pending

    check_config(cfg, for_search=True)  # every method, option and scope the space may draw, before Ray starts
    if resume:
        parent = resuming.check(cfg, trust_state).get("parent_run_id")
        resuming.reopen_parent(cfg, parent)
    else:
        parent = search_log.start_parent(cfg)
        resuming.record(cfg, parent)
    sync_pending(cfg)  # what earlier trials kept on disk while the store was down goes up first
    result, rows = None, []
    try:
        rows = _run_trials(cfg, parent, verbose, resume)
        result = _decide(rows, cfg)
    except BaseException as err:
        if parent:
            search_log.close_trial_runs(cfg, parent, rows)
            # KILLED: interrupted, to be resumed; FAILED: it broke
            status = "KILLED" if isinstance(err, KeyboardInterrupt | SystemExit) else "FAILED"
            search_log.finish_parent(cfg, parent, None, None, status)
        raise
    resuming.mark_finished(cfg, result["version"], remeasure=result["remeasure"])
    if parent:
        search_log.close_trial_runs(cfg, parent, rows)
        search_log.finish_parent(cfg, parent, result, format_table(rows, result["best"], result.get("why")), "FINISHED")
    result["parent_run_id"] = parent
    return result


def _new_tuner(cfg: Config, parent: str | None, verbose: bool):
    """The Tune search over ``cfg.search.space``: ASHA on epochs, seeded draws, one line per event."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from launch.search_log import ConsoleView

    s = cfg.search
    param_space: dict[str, Any] = {k: _sampler(v) for k, v in s.space.items()}
    param_space["__base__"] = config_to_dict(cfg)
    param_space["__parent__"] = parent
    max_t = cfg.train.budget_epochs or (cfg.prune.epochs + cfg.train.epochs) or 1
    return tune.Tuner(
        _trial_driver,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=s.metric,
            mode="max",
            # stop_last_trials=False: a trial that reaches the last epoch must live on to save
            # and log its model; ASHA still cuts weak trials at the rungs before that
            scheduler=ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=min(s.grace_period, max_t),
                                    reduction_factor=s.reduction_factor, stop_last_trials=False),
            num_samples=s.num_samples,
            # the same draws on a rerun. The concurrency limit goes to the generator alone: Tune
            # ignores max_concurrent_trials beside a generator (with a warning on every search)
            search_alg=BasicVariantGenerator(random_state=cfg.seed, max_concurrent=s.max_concurrent),
        ),
        # verbose=0: no status box redrawn at every report; ConsoleView prints one line per event
        run_config=tune.RunConfig(name=cfg.name, storage_path=str(Path(cfg.output_dir) / "tune"),
                                  verbose=2 if verbose else 0, callbacks=[] if verbose else [ConsoleView(s.metric)]),
    )


def _run_trials(cfg: Config, parent: str | None, verbose: bool, resume: bool = False) -> list[dict[str, Any]]:
    """Run the Tune search, or continue the saved one when ``resume``; one row per trial (its
    metrics, or how it ended). Ctrl-C: :class:`~launch.resume.SearchInterrupted`."""
    from ray import tune

    init_ray(cfg, verbose)
    if resume:
        # Tune's pickled search space, scheduler and searcher, checked against cfg by resume.check.
        # Errored trials too: one whose workers died more than max_failures times (a lost node)
        # gets another chance, from its checkpoint; finished ones are kept as they are
        tuner = tune.Tuner.restore(str(resuming.experiment_dir(cfg)), trainable=_trial_driver,
                                   resume_unfinished=True, resume_errored=True)
    else:
        tuner = _new_tuner(cfg, parent, verbose)
    with resuming.SigintWatch() as watch:
        grid = tuner.fit()
    if not os.environ.get("RAY_ADDRESS"):
        # the finalists are re-measured "alone": a local Ray's daemons and the last trial's
        # workers winding down would share the cores (seen: every re-measurement flagged noisy)
        import ray

        ray.shutdown()
        time.sleep(2)
    if watch.interrupted:
        print(f"[prunepipe] search interrupted; its state is in {resuming.experiment_dir(cfg)}: continue it with "
              "`prunepipe search <the same config and overrides> --resume`", flush=True)
        raise resuming.SearchInterrupted
    rows = []
    for result in grid:
        m = result.metrics or {}
        conf = result.config or {}
        rows.append(
            {
                "trial": str(m.get("trial_id", "?")),
                "method": conf.get("prune.method", cfg.prune.method),
                "ratio": conf.get("prune.prune_ratio", cfg.prune.prune_ratio),
                "knob": _table_knob(conf, cfg),
                "status": "done" if m.get("final") else ("error" if result.error else "stopped"),
                **{k: m.get(k) for k in ("val_top1", "dense_val_top1", "macs_reduction", "params_reduction",
                                         *objective.SPEED_KEYS, "epoch", "run_id", "wall_s", "started_at",
                                         "ended_at", "model_dir")},
            }
        )
    return rows


def _decide(rows: list[dict[str, Any]], cfg: Config, timer=None) -> dict[str, Any]:
    """Re-measure the finalists alone, choose by the objective, plot the front, register."""
    obj = cfg.search.objective
    chosen = objective.finalists(rows, obj)
    if chosen:
        print(f"[prunepipe] re-measuring the speed of {len(chosen)} finalists alone, with the whole machine", flush=True)
        objective.remeasure(chosen, cfg, timer=timer)
    best, why = objective.choose(rows, obj)
    front = objective.pareto_front(rows)
    for r in rows:
        r["pareto"] = r in front
    plot = objective.plot_pareto(rows, front, best, Path(cfg.output_dir) / "pareto.png")
    version = None
    if best is not None and cfg.registry.enabled:
        from launch.sync import register_best  # a store that does not answer: kept for `prunepipe sync`

        version = register_best(cfg, best, _card(best, cfg), plot)
        best["registered"] = f"{cfg.registry.model_name} v{version} @challenger" if version else \
            f"{cfg.registry.model_name}: registration pending (`prunepipe sync {cfg.output_dir}`)"
    # nothing chosen only for want of a quiet machine: --resume may decide again later
    remeasure = best is None and bool(objective.only_noise(rows))
    return {"rows": rows, "best": best, "version": version, "why": why, "pareto": front, "plot": plot,
            "remeasure": remeasure}


def _card(best: dict[str, Any], cfg: Config) -> str:
    """The chosen trial's model card (its spec from the trial folder; the search's config when
    that folder is not on this node)."""
    from launch.model_card import build_card
    from pipeline.spec import SpecError, read_spec

    try:
        spec = read_spec(best["model_dir"])
    except (SpecError, TypeError):
        spec = {"arch": cfg.model.arch, "config": config_to_dict(cfg)}
    return build_card(spec, best.get("run_id"), best)


def _table_knob(conf: dict[str, Any], cfg: Config) -> str | None:
    """What the table's ratio column shows for a trial whose widths a setting other than the
    ratio decided (``δ0.1``, as its method writes it); None: the ratio it was given."""
    from launch.search_log import trial_knob

    _, knob = trial_knob(conf, config_to_dict(cfg))
    return None if knob.is_ratio else knob.tag()


def format_table(rows: list[dict[str, Any]], best: dict[str, Any] | None, why: str | None = None) -> str:
    """The results table printed at the end of a search: ``*`` the winner, ``P`` on the Pareto
    front of (top-1, measured speed-up), ``r`` speed re-measured alone after the trials; the
    last column says why a finished trial does not meet the objective."""
    head = f"{'trial':<12} {'method':<12} {'ratio':>6} {'status':<8} {'top-1':>6} {'dense':>6} {'MACs red.':>9} " \
           f"{'params red.':>11} {'img/s':>8} {'dense img/s':>11} {'speed-up [IQR]':>20} {'eff.':>5}  note"
    lines = [head, "-" * len(head)]

    def f(v, fmt):
        return format(v, fmt) if isinstance(v, int | float) else "-"

    for r in sorted(rows, key=lambda r: (r["status"] != "done", -(r["val_top1"] or 0))):
        flags = ("*" if best is not None and r is best else " ") + ("P" if r.get("pareto") else " ") + \
            ("r" if r.get("remeasured") else " ")
        mark = f" {flags} {r.get('why_not') or ''}".rstrip()
        knob = r.get("knob") or f(r["ratio"], ".2f")
        lines.append(
            f"{r['trial']:<12} {r['method']:<12} {knob:>6} {r['status']:<8} {f(r['val_top1'], '.3f'):>6} "
            f"{f(r['dense_val_top1'], '.3f'):>6} {f(r['macs_reduction'], '.1%'):>9} {f(r['params_reduction'], '.1%'):>11} "
            f"{f(r['img_s'], '.0f'):>8} {f(r['dense_img_s'], '.0f'):>11} {_speed(r):>20} "
            f"{f(r['speedup_efficiency'], '.2f'):>5}{mark}"
        )
    if any(r.get("speed_reliable") == 0 for r in rows):
        lines.append("? speed too noisy to trust (speed_reliable = 0): another job shared the machine; re-measure alone")
    for r in rows:
        if r.get("speed_drifted"):
            lines.append(f"? {r['trial']}: the machine's speed changed while it was timed (its dense ran "
                         f"{r['speed_drift']:+.0%} off the finalists' median), twice")
    if best is not None:
        lines.append(f"* chosen: {best.get('registered', 'not registered')} — {why or 'best top-1'}")
    else:
        lines.append(why or "no trial completed: nothing registered")
    lines.append("P = on the Pareto front of (top-1, measured speed-up); r = speed re-measured alone after the trials")
    return "\n".join(lines)


def _speed(r: dict[str, Any]) -> str:
    """``1.56x [1.50-1.61]``: the median speed-up and its interquartile range; ``?`` if unreliable."""
    if not isinstance(r.get("speedup"), int | float):
        return "-"
    text = f"{r['speedup']:.2f}x"
    if isinstance(r.get("speedup_low"), int | float) and isinstance(r.get("speedup_high"), int | float):
        text += f" [{r['speedup_low']:.2f}-{r['speedup_high']:.2f}]"
    return text + ("?" if r.get("speed_reliable") == 0 else " ")


def _pretrain_worker(loop_config: dict[str, Any]) -> None:
    from launch.recipe import run_pretrain
    from launch.search_log import tee_output

    cfg = build_config(loop_config["base"], {})
    tee_output(Path(cfg.output_dir) / "baseline")
    run_pretrain(cfg)


def ensure_baseline(cfg: Config, verbose: bool = False) -> Config:
    """Train the dense baseline once (as a DDP job) unless weights are given or it exists;
    its workers' logs go to ``<output_dir>/baseline/logs/`` (and the console when ``verbose``)."""
    from launch.recipe import baseline_path

    if cfg.model.weights is not None or cfg.baseline.epochs == 0:
        return cfg
    path = baseline_path(cfg)
    if not path.is_file():
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        init_ray(cfg, verbose)
        print(f"[prunepipe] training the dense baseline for {cfg.baseline.epochs} epochs → {path} "
              f"(log: {Path(cfg.output_dir) / 'baseline' / 'logs'})", flush=True)
        TorchTrainer(
            _pretrain_worker,
            train_loop_config={"base": config_to_dict(cfg)},
            scaling_config=ScalingConfig(num_workers=cfg.search.num_workers, use_gpu=cfg.search.gpus_per_worker > 0,
                                         resources_per_worker={"CPU": cfg.search.cpus_per_worker},
                                         placement_strategy=cfg.search.placement_strategy),
            run_config=RunConfig(name="baseline", storage_path=str(Path(cfg.output_dir) / "ray")),
        ).fit()
    else:
        print(f"[prunepipe] reusing the dense baseline {path}", flush=True)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"weights": str(path)})})
