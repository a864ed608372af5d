"""MLflow logging of one trial, journal first: nothing a trial logs is lost to a store that is down.

Every call is written to the trial's journal (:mod:`pipeline.journal`) before it is sent, and
sent by the same function ``prunepipe sync`` replays it with (:data:`APPLY`), so a record
logged live and one replayed later are the same MLflow calls. The journal is always written,
not only after a failure: a trial killed while MLflow was slow or half-way through a call
(SIGKILL, a lost node) has its records too, and no failure has to be recognised as such to be
kept. The first call that fails ends live logging for the rest of the trial (one bounded wait,
:data:`pipeline.registry.HTTP_LIMITS`, never one per epoch) and prints one line naming the
journal and the command that uploads it. A trial whose every call got through marks its
records synced when it ends; ``sync`` has nothing to do for it.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import Config, config_to_dict, flatten
from pipeline.distributed import DistInfo
from pipeline.journal import Journal, Record, read_journal, segments


# --- what each record does in MLflow (live, and when `prunepipe sync` replays it) ---------------
def _apply_start(data: dict[str, Any], run_id: str) -> None:
    import mlflow

    from launch.model_card import CONFIG_ARTIFACT
    from pipeline import registry

    registry.log_params(data["params"], run_id=run_id)
    if data.get("config") is not None:
        mlflow.log_dict(data["config"], CONFIG_ARTIFACT, run_id=run_id)
    registry.log_datasets(data.get("datasets") or [], run_id)


def _apply_metrics(data: dict[str, Any], run_id: str) -> None:
    from pipeline import registry

    registry.log_metrics(data["metrics"], step=data.get("step"), run_id=run_id, timestamp=data["ts"])


def _apply_artifact(data: dict[str, Any], run_id: str) -> str | None:
    import mlflow

    if not Path(data["path"]).is_file():
        return f"{data['path']} is gone: not uploaded"
    mlflow.log_artifact(data["path"], artifact_path=data["folder"], run_id=run_id)
    return None


def _apply_model(data: dict[str, Any], run_id: str) -> str | None:
    """The pruned-model folder as the run's pyfunc model (once: a run that has it keeps it)."""
    import mlflow

    from pipeline import registry
    from pipeline.pyfunc_model import log_pyfunc

    note = None
    if not registry.MlflowClient().get_run(run_id).data.tags.get(registry.MODEL_ID_TAG):
        if not Path(data["model_dir"]).is_dir():
            note = f"model folder {data['model_dir']} is gone: model not uploaded"
        else:
            # log_model logs to the active run only; resuming the run makes it that run
            with mlflow.start_run(run_id=run_id):
                info = log_pyfunc(data["model_dir"])
                mlflow.set_tag(registry.MODEL_ID_TAG, info.model_id)
    if data.get("plot"):
        note = _apply_artifact({"path": data["plot"], "folder": "plots"}, run_id) or note
    return note


def _apply_tags(data: dict[str, Any], run_id: str) -> None:
    from pipeline import registry

    client = registry.MlflowClient()
    for key, value in data["tags"].items():
        client.set_tag(run_id, key, value)


def _apply_end(data: dict[str, Any], run_id: str, t: float) -> None:
    from pipeline import registry

    registry.MlflowClient().set_terminated(run_id, status=data["status"], end_time=int(t * 1000))


# kind -> what it does to run ``run_id``; a returned string is a note (something not uploaded)
APPLY: dict[str, Callable[[Record, str], str | None]] = {
    "start": lambda r, run_id: _apply_start(r.data, run_id),
    "metrics": lambda r, run_id: _apply_metrics(r.data, run_id),
    "artifact": lambda r, run_id: _apply_artifact(r.data, run_id),
    "model": lambda r, run_id: _apply_model(r.data, run_id),
    "tags": lambda r, run_id: _apply_tags(r.data, run_id),
    "end": lambda r, run_id: _apply_end(r.data, run_id, r.t),
}


def create_run(client, experiment_id: str, start: Record, tags: dict[str, str] | None = None) -> str:
    """A new run from a ``start`` record: its name, tags (or ``tags``) and start time as the
    trial had them."""
    run = client.create_run(experiment_id, start_time=int(start.t * 1000),
                            tags=start.data["tags"] if tags is None else tags, run_name=start.data["run_name"])
    return run.info.run_id


# --- the trial's logger ---------------------------------------------------------------------------
class TrialLog:
    """MLflow logging of one trial, on rank 0 only (a no-op elsewhere or when disabled).

    The run is named by what it is (``l1 r0.40 <name>``, ``lossvar δ0.02 <name>``), nested
    under the search's parent run when ``PRUNEPIPE_PARENT_RUN_ID`` names one (the search's
    workers set it), and carries the data as an MLflow dataset input, the full resolved config
    as ``config/trial.yaml`` and the model as a pyfunc (:mod:`pipeline.pyfunc_model`)."""

    PARENT_ENV = "PRUNEPIPE_PARENT_RUN_ID"

    def __init__(self, cfg: Config, info: DistInfo, run_name: str) -> None:
        self.active = info.is_main and cfg.registry.enabled
        self.run_id: str | None = None
        self.online = self._told = False
        if not self.active:
            return
        from mlflow.tracking.context.registry import resolve_tags
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        from methods import budget_knob
        from pipeline import registry  # MLflow: only where it is used
        from pipeline.data.manifest import read_manifest

        self.cfg, self.out = cfg, Path(cfg.output_dir)
        self.journal = Journal(self.out).open()
        method = cfg.prune.method
        knob = budget_knob(method, cfg.prune.model_dump())  # what decided the widths, as the method says
        self.key = uuid.uuid4().hex
        tags = {"prunepipe.method": method, registry.TRIAL_TAG: run_name, registry.OUTPUT_DIR_TAG: str(cfg.output_dir),
                registry.JOURNAL_KEY_TAG: self.key}
        if parent := os.environ.get(self.PARENT_ENV):
            tags[MLFLOW_PARENT_RUN_ID] = parent
        datasets = []
        if cfg.data.backend != "synthetic":
            manifest = read_manifest(cfg.data.root, verify=False)
            datasets = [registry.dataset_ref(cfg.data.root, split, manifest) for split in ("train", "val")]
        start = self.journal.append(
            "start", key=self.key, tracking_uri=cfg.registry.tracking_uri, experiment=cfg.registry.experiment,
            run_name=registry.run_name(method, knob.tag(), run_name),
            tags=resolve_tags(tags),  # source, user, git commit: as the trial's own process sees them
            params=registry.param_values(flatten(config_to_dict(cfg))), config=config_to_dict(cfg),
            datasets=datasets)
        try:
            self._open_run(start)
        except Exception as err:  # noqa: BLE001 - whatever stops MLflow, the journal keeps the trial
            self._offline(err)
        self._send(start)

    def _open_run(self, start: Record) -> None:
        from pipeline import registry

        client = registry.connect(self.cfg.registry)
        end_stale_runs(self.journal.path, registry)
        exp = client.get_experiment_by_name(self.cfg.registry.experiment)
        self.run_id = create_run(client, exp.experiment_id, start)
        self.journal.append("run", key=self.key, run_id=self.run_id)
        self.online = True

    def _offline(self, err: BaseException) -> None:
        from pipeline.registry import first_line

        if not self._told:  # one line per trial, however many calls fail
            self._told = True
            print(f"[prunepipe] MLflow store {self.cfg.registry.tracking_uri} unreachable: this trial's params, "
                  f"metrics and model are kept in {self.journal.path}; `prunepipe sync {self.out}` uploads them "
                  f"[{first_line(err, 120)}]", flush=True)
        self.online = False

    def _send(self, rec: Record) -> None:
        if not self.online:
            return
        try:
            note = APPLY[rec.kind](rec, self.run_id)
        except Exception as err:  # noqa: BLE001 - the record is in the journal; sync sends it later
            self._offline(err)
            return
        if note:
            print(f"[prunepipe] {note}", flush=True)

    def metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.active:
            from pipeline.registry import metric_values

            self._send(self.journal.append("metrics", metrics=metric_values(metrics), step=step,
                                           ts=int(time.time() * 1000)))

    def artifact(self, path: Path, folder: str) -> None:
        if self.active:
            self._send(self.journal.append("artifact", path=str(path), folder=folder))

    def finish(self, model_dir: Path, plot: Path | None) -> None:
        if self.active:
            self._send(self.journal.append("model", model_dir=str(model_dir), plot=str(plot) if plot else None))
            self._close("FINISHED")

    def end(self, status: str) -> None:
        """End the run as ``status`` (MLflow's FAILED or KILLED) when the trial stops early, so
        it never reads FINISHED, nor RUNNING forever. Called while an error propagates."""
        if not self.active:
            return
        try:
            self._close(status)
        except Exception as err:  # noqa: BLE001 - the trial's own error is the one to report
            from pipeline.registry import first_line

            print(f"[prunepipe] could not mark the MLflow run {status}: {first_line(err)}", flush=True)

    def _close(self, status: str) -> None:
        self.active = False
        try:
            end = self.journal.append("end", status=status)
            self._send(end)
            if self.online:  # every record got through: nothing for `sync` to do
                self.journal.append("synced", key=self.key, upto=end.seq)
        finally:
            self.journal.close()


def end_stale_runs(journal: Path, registry: Any) -> None:
    """A trial killed outright (SIGKILL, a lost node) never ended its MLflow run, which would
    read RUNNING for ever; the next start of the same trial marks it KILLED. The journal says
    which runs those are: bound to an attempt (a ``run`` record) that has no ``end`` record. A
    run that ended in MLflow (FINISHED, FAILED, KILLED) is left as it is."""
    stale = [seg.run_id for seg in segments(read_journal(journal)[0]) if seg.run_id and not seg.ended()]
    for old in stale:
        try:
            if registry.end_if_running(registry.MlflowClient(), old):
                print(f"[prunepipe] the MLflow run {old} of an earlier attempt of this trial was left RUNNING "
                      "(killed before it could end): marked KILLED", flush=True)
        except Exception as err:  # noqa: BLE001 - a run deleted or in another store: nothing to mark
            print(f"[prunepipe] could not check the earlier MLflow run {old}: {registry.first_line(err)}", flush=True)
