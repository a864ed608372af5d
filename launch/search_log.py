"""What a person sees of a search: the console view, the parent MLflow run, the workers' logs.

* Console: one line per trial event (start, each epoch's result with the best so far, end)
  from a Ray Tune callback, instead of Ray's redrawn status box and every worker's output.
  ``--verbose`` brings those back.
* Worker logs: every process of a trial tees its stdout/stderr (file descriptors, so C++ and
  tqdm output too) into ``<trial folder>/logs/<pid>.log``; the search logs them to each
  trial's MLflow run when it ends.
* MLflow: one parent run per search, the trials nested under it, the results table, rows and
  Pareto plot as its artifacts; trial runs that Tune stopped (ASHA) or that failed are ended
  with that status instead of staying RUNNING forever.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

from pipeline.registry import OUTPUT_DIR_TAG, TRIAL_TAG

if TYPE_CHECKING:
    from methods import Knob

LOG_DIR = "logs"


def tee_output(folder: str | Path) -> Path:
    """Copy this process's stdout and stderr into ``folder/logs/<pid>.log`` while they still go
    where they went (Ray's worker log, which reaches the console only with ``--verbose``)."""
    path = Path(folder) / LOG_DIR / f"{os.getpid()}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # `tee` outlives nothing: it ends when this process's copies of the pipe close (its exit)
    where = os.dup(1)
    tee = subprocess.Popen(["tee", "-a", str(path)], stdin=subprocess.PIPE, stdout=where, close_fds=True)
    os.close(where)
    for fd in (1, 2):
        os.dup2(tee.stdin.fileno(), fd)
    return path


def trial_overrides(config: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings a trial's Tune config draws, less those its search space draws only for
    other methods (``methods:`` of a space entry): Tune samples every key of the space in every
    trial, but a trial of a method a key is not for keeps the base config's value."""
    root = config.get("__base__") or base or {}
    space = (root.get("search") or {}).get("space") or {}
    drawn = {k: v for k, v in config.items() if not k.startswith("__")}
    method = drawn.get("prune.method", (root.get("prune") or {}).get("method"))
    return {k: v for k, v in drawn.items()
            if not (isinstance(space.get(k), dict) and space[k].get("methods") and method not in space[k]["methods"])}


def trial_prune(config: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A trial's prune section: its Tune config's ``prune.*`` overrides over the prune section of
    ``__base__`` (or of ``base``, a whole config as a dict, where the Tune config has none)."""
    root = config.get("__base__") or base or {}
    prune = copy.deepcopy(root.get("prune") or {})
    for key, value in trial_overrides(config, base).items():
        if not key.startswith("prune."):
            continue
        *path, last = key.split(".")[1:]
        node = prune
        for part in path:
            if not isinstance(node.get(part), dict):
                node[part] = {}  # absent or null in the base: the override creates it
            node = node[part]
        node[last] = value
    return prune


def trial_knob(config: dict[str, Any], base: dict[str, Any] | None = None) -> tuple[str, Knob]:
    """(method, the knob that decided its widths, as the method describes it) of a trial's Tune config."""
    from methods import budget_knob

    prune = trial_prune(config, base)
    method = prune.get("method", "?")
    return method, budget_knob(method, prune)


def label(config: dict[str, Any]) -> str:
    """``l1 r0.40`` / ``lossvar δ0.02`` from a trial's Tune config (its overrides over ``__base__``)."""
    from pipeline.registry import run_name

    method, knob = trial_knob(config)
    return run_name(method, knob.tag())


class ConsoleView(Callback):
    """One line per trial event: start, a result (epoch, phase, metric, best so far), the end."""

    def __init__(self, metric: str, print_fn=print) -> None:
        self.metric, self.print = metric, print_fn
        self.best: tuple[float, str] | None = None
        self.final: set[str] = set()

    def _name(self, trial) -> str:
        return f"{label(trial.config)} [{trial.trial_id}]"

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.print(f"[search] start  {self._name(trial)}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        value = result.get(self.metric)
        if result.get("final"):
            if trial.trial_id in self.final:
                return  # the trial's driver hands the final result over again (launch/search.py)
            self.final.add(trial.trial_id)
        if isinstance(value, int | float) and (self.best is None or value > self.best[0]):
            self.best = (float(value), self._name(trial))
        best = f"   best so far {self.best[0]:.4f} {self.best[1]}" if self.best else ""
        shown = f"{value:.4f}" if isinstance(value, int | float) else "-"
        self.print(f"[search] result {self._name(trial)} epoch {result.get('epoch', '?')} "
                   f"{result.get('phase', '')} {self.metric} {shown}{best}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        how = "done" if trial.trial_id in self.final else "stopped early by the scheduler (ASHA)"
        self.print(f"[search] end    {self._name(trial)}: {how}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.print(f"[search] FAILED {self._name(trial)}: see {trial.local_path or 'its Ray log'}", flush=True)


def start_parent(cfg) -> str | None:
    """The search's parent MLflow run (None when the registry is off); its id is handed to the
    trials, which nest under it."""
    if not cfg.registry.enabled:
        return None
    from pipeline import registry

    client = registry.connect(cfg.registry)
    space = {k: v.model_dump(exclude_none=True) for k, v in cfg.search.space.items()}
    # created through the client, not started: it must stay RUNNING while the trials (other
    # processes) log under it, and not become this process's active run
    exp = client.get_experiment_by_name(cfg.registry.experiment)
    run = client.create_run(exp.experiment_id, run_name=f"search {cfg.name}", tags={"prunepipe.kind": "search"})
    for key, value in {"search.space": json.dumps(space), "search.num_samples": cfg.search.num_samples,
                       "search.metric": cfg.search.metric, "prune.method": cfg.prune.method}.items():
        client.log_param(run.info.run_id, key, str(value)[:500])
    return run.info.run_id


def close_trial_runs(cfg, parent: str, rows: list[dict[str, Any]]) -> int:
    """End every child run still RUNNING (a stopped trial's process was killed before it could)
    and attach each trial's worker logs; returns how many runs were ended here. A store that
    does not answer costs one line: ``prunepipe sync`` ends those runs and attaches the logs."""
    from pipeline.registry import bound_http_retries

    bound_http_retries()
    try:
        return _close_trial_runs(cfg, parent, rows)
    except Exception as err:  # noqa: BLE001 - the trials' journals keep what is missing
        from pipeline.registry import first_line

        print(f"[prunepipe] MLflow store {cfg.registry.tracking_uri} unreachable ({first_line(err, 160)}): "
              f"stopped trials' runs not ended, logs not attached; `prunepipe sync {cfg.output_dir}` does it", flush=True)
        return 0


def _close_trial_runs(cfg, parent: str, rows: list[dict[str, Any]]) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.registry.tracking_uri)
    exp = client.get_experiment_by_name(cfg.registry.experiment)
    status_of = {r["trial"]: r["status"] for r in rows}
    ended = 0
    for run in client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'", max_results=10000):
        folder = run.data.tags.get(OUTPUT_DIR_TAG)
        if folder and (Path(folder) / LOG_DIR).is_dir():
            client.log_artifacts(run.info.run_id, str(Path(folder) / LOG_DIR), artifact_path=LOG_DIR)
        if run.info.status == "RUNNING":
            status = "FAILED" if status_of.get(run.data.tags.get(TRIAL_TAG)) == "error" else "KILLED"
            client.set_tag(run.info.run_id, "prunepipe.ended_by", "search (trial stopped or failed before ending its run)")
            client.set_terminated(run.info.run_id, status)
            ended += 1
    return ended


def finish_parent(cfg, parent: str, result: dict[str, Any] | None, table: str | None, status: str) -> None:
    """Attach the results table, rows and Pareto plot to the parent run and end it; when the
    store does not answer, keep all that in ``output_dir``'s journal for ``prunepipe sync``."""
    from pipeline.registry import bound_http_retries

    bound_http_retries()
    try:
        _finish_parent(cfg, parent, result, table, status)
    except Exception as err:  # noqa: BLE001 - kept in the journal instead
        from pipeline.registry import first_line

        path = _journal_parent(cfg, parent, result, table, status)
        print(f"[prunepipe] MLflow store {cfg.registry.tracking_uri} unreachable ({first_line(err, 160)}): the search "
              f"run's results are kept in {path}; `prunepipe sync {cfg.output_dir}` uploads them", flush=True)


def _parent_extras(result: dict[str, Any] | None) -> tuple[dict[str, float], dict[str, str]]:
    best = (result or {}).get("best")
    if best is None:
        return {}, {}
    metrics = {f"best_{k}": float(best[k]) for k in ("val_top1", "speedup", "macs_reduction")
               if isinstance(best.get(k), int | float)}
    return metrics, {"prunepipe.best_run": str(best.get("run_id"))}


def _write_results(folder: Path, result: dict[str, Any], table: str | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.md").write_text((table or "") + "\n")
    (folder / "results.json").write_text(json.dumps(result["rows"], indent=1, default=str))


def _finish_parent(cfg, parent: str, result: dict[str, Any] | None, table: str | None, status: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.registry.tracking_uri)
    if result is not None:
        with tempfile.TemporaryDirectory() as tmp:
            _write_results(Path(tmp), result, table)
            client.log_artifacts(parent, tmp, artifact_path="search")
        if result.get("plot"):
            client.log_artifact(parent, str(result["plot"]), artifact_path="search")
    metrics, tags = _parent_extras(result)
    for key, value in metrics.items():
        client.log_metric(parent, key, value)
    for key, value in tags.items():
        client.set_tag(parent, key, value)
    client.set_terminated(parent, status)


def _journal_parent(cfg, parent: str, result: dict[str, Any] | None, table: str | None, status: str) -> Path:
    """The parent run's end as journal records in ``output_dir`` (the records a trial writes)."""
    import time

    from pipeline.journal import Journal
    from pipeline.registry import JOURNAL_KEY_TAG

    journal = Journal(cfg.output_dir).open()
    try:
        journal.append("start", key=parent, tracking_uri=cfg.registry.tracking_uri, experiment=cfg.registry.experiment,
                       run_name=f"search {cfg.name}", tags={"prunepipe.kind": "search", JOURNAL_KEY_TAG: parent},
                       params={}, config=None, datasets=[])
        journal.append("run", key=parent, run_id=parent)
        if result is not None:
            folder = Path(cfg.output_dir) / "search"
            _write_results(folder, result, table)
            for path in (folder / "results.md", folder / "results.json", result.get("plot")):
                if path:
                    journal.append("artifact", path=str(path), folder="search")
        metrics, tags = _parent_extras(result)
        if metrics:
            journal.append("metrics", metrics=metrics, step=None, ts=int(time.time() * 1000))
        if tags:
            journal.append("tags", tags=tags)
        journal.append("end", status=status)
    finally:
        journal.close()
    return journal.path
