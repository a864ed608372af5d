"""``prunepipe sync OUTPUT_DIR``: upload what trials kept in their journals while MLflow was down.

Every trial folder under ``OUTPUT_DIR`` with a journal (:mod:`pipeline.journal`) is replayed
segment by segment (one segment per attempt of the trial, one MLflow run): the run is found
again (its id from the journal, or its ``prunepipe.journal_key`` tag) or created with the
trial's name, tags and start time; the records it has not seen are applied with the very
functions the trial uses live (:data:`launch.trial_log.APPLY`); a registration the search could
not make is made; and a ``synced`` record is appended. Replaying is idempotent: metrics carry
their original timestamps (MLflow drops an identical metric), params their same values, the
model is logged only if the run has none, a version only if the run has none; a second sync
finds nothing pending. A journal a running trial holds is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError, RegistryConfig
from pipeline.journal import JOURNAL, Journal, JournalError, Record, Segment, find_journals, read_journal, segments

ENDED_BY_TAG = "prunepipe.ended_by"


@dataclass
class Uploaded:
    """One row of the table ``sync`` prints: one segment (a run) it brought into the store."""

    folder: str
    run_name: str
    run_id: str = "-"
    metrics: int = 0
    model: str = "-"
    registered: str = "-"
    status: str = "-"
    notes: list[str] = field(default_factory=list)


def sync_output(root: str | Path, tracking_uri: str | None = None, only_uri: str | None = None,
                print_fn=print) -> list[Uploaded]:
    """Replay every pending journal segment under ``root`` into ``tracking_uri`` (default: the
    store each trial was configured with). ``only_uri``: only segments logged for that store."""
    from pipeline.progress import progress

    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"OUTPUT_DIR {root}: no such folder")
    journals = find_journals(root)
    if not journals:
        raise ConfigError(f"OUTPUT_DIR {root}: no trial journal ({JOURNAL}) under it; nothing to sync")
    rows: list[Uploaded] = []
    clients: dict[tuple[str, str], Any] = {}
    for path in progress(show=len(journals) >= 5, iterable=journals, desc="sync", unit="trial"):
        rows += _sync_journal(path, root, tracking_uri, only_uri, clients, print_fn)
    return rows


def _sync_journal(path: Path, root: Path, tracking_uri: str | None, only_uri: str | None,
                  clients: dict, print_fn) -> list[Uploaded]:
    folder = str(path.parent.relative_to(root)) if path.parent != root else "."
    journal = Journal(path.parent)
    try:
        journal.open(blocking=False)
    except JournalError:
        print_fn(f"[sync] {path}: in use by a running trial (or another sync): left for the next sync")
        return []
    try:
        records, problems = read_journal(path)
        seen = {int(n) for r in records if r.kind == "skipped" for n in r.data["lines"]}
        fresh = [(line, msg) for line, msg in problems if line not in seen]
        for _, msg in fresh:
            print_fn(f"[sync] {msg}")
        if fresh:  # reported once; later syncs stay quiet about them
            journal.append("skipped", lines=[line for line, _ in fresh])
        rows = []
        for seg in segments(records):
            uri = tracking_uri or seg.start.data["tracking_uri"]
            if seg.pending() and (only_uri is None or seg.start.data["tracking_uri"] == only_uri):
                rows.append(_sync_segment(journal, seg, folder, uri, clients))
        return rows
    finally:
        journal.close()


def _client(uri: str, experiment: str, clients: dict):
    from pipeline import registry

    if (uri, experiment) not in clients:
        client = registry.connect(RegistryConfig(tracking_uri=uri, experiment=experiment))
        clients[uri, experiment] = (client, client.get_experiment_by_name(experiment).experiment_id)
    return clients[uri, experiment]


def _exists(client, run_id: str | None) -> bool:
    from mlflow.exceptions import MlflowException

    if not run_id:
        return False
    try:
        client.get_run(run_id)
        return True
    except MlflowException:
        return False


def _find_run(journal: Journal, seg: Segment, client, exp_id: str) -> str:
    """The segment's run in this store: by the id the journal bound it to, by its journal-key
    tag (a sync that died between creating the run and writing it down), or a new one."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from launch.trial_log import create_run
    from pipeline import registry

    if _exists(client, seg.run_id):
        return str(seg.run_id)
    found = client.search_runs([exp_id], f"tags.`{registry.JOURNAL_KEY_TAG}` = '{seg.key}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
    else:
        tags = dict(seg.start.data["tags"])
        if not _exists(client, tags.get(MLFLOW_PARENT_RUN_ID)):
            tags.pop(MLFLOW_PARENT_RUN_ID, None)  # the search's run is not in this store
        run_id = create_run(client, exp_id, seg.start, tags)
    journal.append("run", key=seg.key, run_id=run_id)
    return run_id


def _sync_segment(journal: Journal, seg: Segment, folder: str, uri: str, clients: dict) -> Uploaded:
    from launch.trial_log import APPLY
    from pipeline import registry

    client, exp_id = _client(uri, seg.start.data["experiment"], clients)
    row = Uploaded(folder=folder, run_name=seg.start.data["run_name"])
    run_id = _find_run(journal, seg, client, exp_id)
    row.run_id = run_id
    for rec in seg.pending():
        if rec.kind == "register":
            row.registered, note = _register(client, rec, run_id)
        elif rec.kind in APPLY:
            note = APPLY[rec.kind](rec, run_id)
        else:
            note = f"record kind {rec.kind!r} (line {rec.line}) unknown to this prunepipe: skipped"
        row.metrics += rec.kind == "metrics"
        if rec.kind == "model":
            row.model = "no" if note and "model not uploaded" in note else "yes"
        if note:
            row.notes.append(note)
    logs = journal.path.parent / "logs"
    if logs.is_dir():  # the search attaches workers' logs when it ends; it may not have reached the store
        client.log_artifacts(run_id, str(logs), artifact_path="logs")
    # we hold the journal's lock: the trial is not running, it died before ending its run
    if not seg.ended() and registry.end_if_running(client, run_id):
        client.set_tag(run_id, ENDED_BY_TAG, "sync (the trial stopped before it could end its run)")
    row.status = client.get_run(run_id).info.status
    journal.append("synced", key=seg.key, upto=seg.last_seq, notes=row.notes)
    return row


def _register(client, rec: Record, run_id: str) -> tuple[str, str | None]:
    """A registration the search could not make, made now (once); the alias moves to it unless
    a version registered after the search already holds it."""
    from pipeline import registry

    d = rec.data
    name, alias = d["model_name"], d.get("alias")
    done = registry.versions_of_run(client, name, run_id)
    if done:
        return f"{name} v{done[0].version}", None
    note = None
    holder = registry.version_by_alias(client, name, alias) if alias else None
    if holder is not None and int(holder.creation_timestamp) > rec.t * 1000:
        note = f"{name}@{alias} left on the newer v{holder.version}"
        alias = None
    version = registry.register(client, name, run_id, d["metrics"], alias=alias, description=d.get("description"))
    return f"{name} v{version}" + (f" @{alias}" if alias else ""), note


def format_rows(rows: list[Uploaded]) -> str:
    """The short table ``prunepipe sync`` prints."""
    head = f"{'trial folder':<28} {'run':<30} {'run id':<10} {'metrics':>7} {'model':>5}  {'registered':<24} status"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.folder[-28:]:<28} {r.run_name[:30]:<30} {r.run_id[:8]:<10} {r.metrics:>7} {r.model:>5}  "
                     f"{r.registered[:24]:<24} {r.status}")
        lines += [f"    note: {n}" for n in r.notes]
    return "\n".join(lines)


def sync_pending(cfg: Config) -> int:
    """Before a search: upload what earlier trials of ``cfg.output_dir`` kept for this store
    while it was down; never stops the search (a failure is one printed line)."""
    if not cfg.registry.enabled or not find_journals(cfg.output_dir):
        return 0
    try:
        rows = sync_output(cfg.output_dir, only_uri=cfg.registry.tracking_uri)
    except Exception as err:  # noqa: BLE001 - the journals stay; `prunepipe sync` retries
        from pipeline.registry import first_line

        print(f"[prunepipe] could not sync earlier trials' journals: {first_line(err)}", flush=True)
        return 0
    if rows:
        print(f"[prunepipe] uploaded {len(rows)} run(s) earlier trials kept while MLflow was unreachable:\n"
              f"{format_rows(rows)}", flush=True)
    return len(rows)


def register_best(cfg: Config, best: dict[str, Any], description: str, plot: Path | None) -> int | None:
    """Register the search's best trial as ``challenger``; when the store does not answer (or
    the trial's run never reached it), keep the registration in that trial's journal for
    ``sync`` and return None."""
    from pipeline import registry

    name = cfg.registry.model_name
    metrics = {k: v for k, v in best.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    try:
        if not best.get("run_id"):
            raise registry.RegistryError("the trial's run never reached the store")
        client = registry.connect(cfg.registry)
        version = registry.register(client, name, best["run_id"], metrics, description=description)
        if plot is not None:
            client.log_artifact(best["run_id"], str(plot), artifact_path="search")
        return version
    except Exception as err:  # noqa: BLE001 - whatever stopped it, the journal keeps the registration
        journal = Journal(Path(best["model_dir"]).parent).open()
        try:
            journal.append("register", model_name=name, alias=registry.CHALLENGER, metrics=metrics,
                           description=description)
            if plot is not None:
                journal.append("artifact", path=str(plot), folder="search")
        finally:
            journal.close()
        print(f"[prunepipe] MLflow store {cfg.registry.tracking_uri} unreachable ({registry.first_line(err, 160)}): "
              f"the registration of {name} is kept in {journal.path}; `prunepipe sync {cfg.output_dir}` makes it",
              flush=True)
        return None
