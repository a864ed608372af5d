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

A journal is input like any other: every path it names (a model folder, a plot, an artifact,
and what lies in them and in ``logs/``) must resolve, links followed, inside the trial's own
folder, or nothing is uploaded at all. A run that already holds other values for the params a
segment would log (the trial folder was rewritten after an earlier sync) is left as it is and
named; the other trials are still synced.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
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
    for path in journals:  # all of them before anything is uploaded
        check_paths(path, root, only_uri)
    rows: list[Uploaded] = []
    clients: dict[tuple[str, str], Any] = {}
    conflicts: list[str] = []
    for path in progress(show=len(journals) >= 5, iterable=journals, desc="sync", unit="trial"):
        rows += _sync_journal(path, root, tracking_uri, only_uri, clients, print_fn, conflicts)
    if conflicts:
        if rows:
            print_fn(format_rows(rows))
        raise JournalError(f"{'; '.join(conflicts)}; {len(rows)} other run(s) synced")
    return rows


class ParamConflict(Exception):
    """A segment whose run already holds other values for some of its params."""


# --- what a journal may point at --------------------------------------------------------------------
def _pending(records: list[Record], only_uri: str | None) -> list[Record]:
    return [rec for seg in segments(records) if only_uri is None or seg.start.data["tracking_uri"] == only_uri
            for rec in seg.pending()]


def _named_paths(rec: Record) -> list[tuple[str, str]]:
    """(what, path) for every path a record names."""
    if rec.kind == "artifact":
        return [("artifact", rec.data["path"])]
    if rec.kind == "model":
        return [("model folder", rec.data["model_dir"])] + ([("plot", rec.data["plot"])] if rec.data.get("plot") else [])
    return []


def _confine(path: Path, base: Path, where: str) -> Path:
    """``path`` resolved (links followed; a relative one taken from ``base``), refused unless
    it lies inside ``base`` (itself resolved)."""
    resolved = (base / path).resolve()
    if not resolved.is_relative_to(base):
        raise JournalError(f"{where} lies outside the trial's folder {base} (it resolves to {resolved}): "
                           "refused, nothing was synced")
    return resolved


def _confine_tree(folder: Path, base: Path, where: str) -> None:
    """``folder`` and everything under it (what an upload of the folder would read)."""
    folder = _confine(folder, base, where)
    if folder.is_dir():
        for p in sorted(folder.rglob("*")):
            _confine(p, base, f"{where}: {p.relative_to(folder)}")


def check_paths(journal: Path, root: Path, only_uri: str | None = None) -> None:
    """Every path the journal's pending records name (and ``logs/``) stays inside the trial's
    folder, the journal's own, which stays inside ``root``; :class:`JournalError` otherwise."""
    base, top = journal.parent.resolve(), root.resolve()
    if not base.is_relative_to(top):
        raise JournalError(f"{journal}: the trial's folder resolves to {base}, outside {root}: refused, nothing was synced")
    records, _ = read_journal(journal)
    for rec in _pending(records, only_uri):
        for what, raw in _named_paths(rec):
            if not isinstance(raw, str) or not raw or "\x00" in raw:
                raise JournalError(f"{journal} line {rec.line}: {what} {raw!r} is not a path: refused, nothing was synced")
            _confine_tree(Path(raw), base, f"{journal} line {rec.line}: {what} {raw}")
    _confine_tree(journal.parent / "logs", base, f"{journal}: logs/")


def _resolved(rec: Record, base: Path) -> Record:
    """The record with its paths resolved as :func:`check_paths` checked them: what is uploaded
    is what was checked, whatever the working directory."""
    data = dict(rec.data)
    for key in ("path", "model_dir", "plot"):
        if rec.kind in ("artifact", "model") and isinstance(data.get(key), str) and data[key]:
            data[key] = str((base / data[key]).resolve())
    return replace(rec, data=data)


def _sync_journal(path: Path, root: Path, tracking_uri: str | None, only_uri: str | None,
                  clients: dict, print_fn, conflicts: list[str]) -> list[Uploaded]:
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
                try:
                    rows.append(_sync_segment(journal, seg, folder, uri, clients))
                except ParamConflict as err:
                    conflicts.append(str(err))
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
    pending = seg.pending()
    if seg.start in pending:
        _check_params(client, run_id, seg, journal.path)
    base = journal.path.parent.resolve()
    for rec in [_resolved(r, base) for r in pending]:
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


def _check_params(client, run_id: str, seg: Segment, journal: Path) -> None:
    """MLflow refuses to change a logged param: a run holding other values than the segment's
    (its trial folder rewritten after an earlier sync) is named, with the keys, and left alone."""
    from pipeline import registry

    held = client.get_run(run_id).data.params
    new = registry.param_values(seg.start.data.get("params") or {})
    differing = sorted(k for k, v in new.items() if k in held and held[k] != v)
    if differing:
        shown = ", ".join(f"{k} {held[k]!r} -> {new[k]!r}" for k in differing[:4])
        more = f" and {len(differing) - 4} more" if len(differing) > 4 else ""
        raise ParamConflict(f"run {run_id} already holds other params than {journal} (line {seg.start.line}): "
                            f"{shown}{more}; that trial was not synced (its folder was rewritten after an earlier "
                            "sync? sync it into another store or experiment)")


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
        trial = Path(best["model_dir"]).parent
        journal = Journal(trial).open()
        try:
            journal.append("register", model_name=name, alias=registry.CHALLENGER, metrics=metrics,
                           description=description)
            if plot is not None:
                # sync uploads only what lies in the trial's folder: a copy of the search's plot
                kept = trial / "search" / Path(plot).name
                kept.parent.mkdir(exist_ok=True)
                shutil.copy2(plot, kept)
                journal.append("artifact", path=str(kept), folder="search")
        finally:
            journal.close()
        print(f"[prunepipe] MLflow store {cfg.registry.tracking_uri} unreachable ({registry.first_line(err, 160)}): "
              f"the registration of {name} is kept in {journal.path}; `prunepipe sync {cfg.output_dir}` makes it",
              flush=True)
        return None
