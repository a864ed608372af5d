"""Faults that lose nothing: an MLflow store that is down when a trial logs (never there, or
killed mid-trial) costs the trial nothing; its journal keeps every record and `prunepipe sync`
uploads them once the store is back, exactly once."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from launch import cli
from pipeline import registry
from pipeline.config import RegistryConfig
from pipeline.journal import JOURNAL, Journal, read_journal, segments
from tests.conftest import ROOT
from tests.helpers.procs import free_port, http_ok, wait_for
from tests.test_cluster import BIN

DEMO = ROOT / "configs" / "demo.yaml"
TINY = ("data.backend=synthetic", "data.image_size=16", "data.synthetic_samples=64", "data.batch_size=32",
        "train.budget_epochs=null", "train.epochs=1", "prune.epochs=0", "measure.warmup=0", "measure.attempts=1",
        "measure.rounds=2", "train.bn_recalib_batches=0", "registry.experiment=sync", "registry.model_name=synced")
UNREACHABLE = "unreachable"


@contextmanager
def mlflow_server(port: int, folder: Path) -> Iterator[subprocess.Popen]:
    """`mlflow server` on 127.0.0.1:``port``, SQLite-backed in ``folder`` (kept across restarts);
    SIGKILLed (its whole process group) on exit: a crash, not a shutdown."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "server.log", "a") as log:
        proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder}/srv.db",
                                 "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/health"), "mlflow server", 180, proc)
        yield proc
    finally:
        kill_server(proc)


def kill_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def prune(out: Path, uri: str, *extra: str, wait: bool = True):
    cmd = [sys.executable, "-m", "launch.cli", "prune", str(DEMO), f"output_dir={out}", f"registry.tracking_uri={uri}",
           *TINY, *extra]
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def sync(capsys, *args: str) -> str:
    code = cli.main(["sync", *map(str, args)])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def unreachable_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if UNREACHABLE in line]


def final_metrics(out: Path) -> dict:
    """What the trial itself saved beside its model (spec.json), to compare the store against."""
    return json.loads((out / "model" / "spec.json").read_text())["metrics"]


def the_run(client: MlflowClient):
    runs = client.search_runs([client.get_experiment_by_name("sync").experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def check_uploaded(client: MlflowClient, out: Path) -> None:
    """The run holds the trial's params, its final metrics as the trial saved them, the model."""
    run = the_run(client)
    saved = final_metrics(out)
    assert run.info.status == "FINISHED"
    assert run.data.params["prune.method"] == "l1" and run.data.params["output_dir"] == str(out)
    for key in ("val_top1", "macs_reduction", "speedup", "params"):
        # the final record is logged at the last epoch's step, after it: MLflow's "latest" value
        # (what its UI shows) is the final evaluation, not the last epoch's
        assert run.data.metrics[key] == pytest.approx(saved[key], rel=1e-6), (key, run.data.metrics[key], saved[key])
    assert run.data.tags["prunepipe.model_id"].startswith("m-")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config", "plots"}


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_trial_with_no_store_finishes_and_sync_uploads_it_once(tmp_path, capsys):
    from launch.sync import register_best
    from pipeline.config import absolutize, load_config

    port, out = free_port(), tmp_path / "out"
    uri = f"http://127.0.0.1:{port}"  # nothing listens there yet
    t0 = time.monotonic()
    proc = prune(out, uri)
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = unreachable_lines(proc.stdout + proc.stderr)
    assert len(lines) == 1 and f"prunepipe sync {out}" in lines[0], lines
    assert "Traceback" not in proc.stderr
    assert took < 150, f"the trial took {took:.0f} s: waiting on the dead store?"
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "spec.json").is_file()
    assert (out / JOURNAL).is_file()
    # the search's registration of this trial as its best, with the store still down: journaled
    cfg = absolutize(load_config(DEMO, [f"output_dir={tmp_path}", f"registry.tracking_uri={uri}", *TINY]))
    best = {**final_metrics(out), "model_dir": str(out / "model"), "run_id": None}
    assert register_best(cfg, best, "## the card", None) is None
    assert len(unreachable_lines(capsys.readouterr().out)) == 1

    with mlflow_server(port, tmp_path / "store"):
        shown = sync(capsys, tmp_path)
        assert "l1 r0.50" in shown and "synced v1 @challenger" in shown, shown
        client = MlflowClient(uri)
        check_uploaded(client, out)
        run = the_run(client)
        mv = client.get_model_version_by_alias("synced", "challenger")
        assert mv.run_id == run.info.run_id and mv.description == "## the card"
        assert float(mv.tags["val_top1"]) == pytest.approx(final_metrics(out)["val_top1"], rel=1e-5)
        # a second sync finds nothing to do and creates nothing
        assert "nothing to sync" in sync(capsys, tmp_path)
        assert len(client.search_runs([run.info.experiment_id])) == 1
        assert len(client.search_model_versions("name = 'synced'")) == 1


def _running_with_params(db: Path) -> bool:
    if not db.exists():
        return False
    with sqlite3.connect(db) as con:
        try:
            return con.execute("select count(*) from runs r join params p on p.run_uuid = r.run_uuid "
                               "where r.status = 'RUNNING'").fetchone()[0] > 0
        except sqlite3.OperationalError:
            return False  # tables not created yet


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_store_killed_mid_trial_loses_nothing(tmp_path, capsys):
    port, out, store = free_port(), tmp_path / "out", tmp_path / "store"
    uri = f"http://127.0.0.1:{port}"
    with mlflow_server(port, store) as server:
        proc = prune(out, uri, wait=False)
        try:
            # the trial's run is there with its params: the trial is under way; kill the store
            wait_for(lambda: _running_with_params(store / "srv.db"), "the trial's run", 180, proc)
            kill_server(server)
            stdout, stderr = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert len(unreachable_lines(stdout + stderr)) == 1
    live_run = segments(read_journal(out / JOURNAL)[0])[-1].run_id  # the run the trial opened live
    with mlflow_server(port, store):
        shown = sync(capsys, out)
        assert live_run[:8] in shown, shown
        client = MlflowClient(uri)
        check_uploaded(client, out)
        assert the_run(client).info.run_id == live_run  # the trial's own run, continued
        # every metric record once: the records logged live and replayed are not doubled
        records, _ = read_journal(out / JOURNAL)
        logged = [r for r in records if r.kind == "metrics" and "val_top1" in r.data["metrics"]]
        assert len(client.get_metric_history(live_run, "val_top1")) == len(logged) >= 2
        assert "nothing to sync" in sync(capsys, out)


@pytest.mark.timeout(120)
def test_a_torn_last_record_is_reported_and_the_rest_synced(tmp_path, capsys):
    """A crash in the middle of writing a record leaves a torn last line: sync reports it once,
    skips it, uploads what came before, and the journal stays usable after it."""
    from launch.trial_log import TrialLog
    from pipeline.config import absolutize, load_config
    from pipeline.distributed import DistInfo

    out = tmp_path / "out"
    cfg = absolutize(load_config(DEMO, [f"output_dir={out}", f"registry.tracking_uri=http://127.0.0.1:{free_port()}",
                                        *TINY]))
    log = TrialLog(cfg, DistInfo(0, 1, 0, torch.device("cpu")), "torn")
    assert not log.online and len(unreachable_lines(capsys.readouterr().out)) == 1
    log.metrics({"val_top1": 0.25, "epoch": 1}, step=1)
    log.metrics({"val_top1": 0.5, "epoch": 2}, step=2)
    log.journal.close()  # the process dies here, half-way through its next record:
    with open(out / JOURNAL, "ab") as f:
        f.write(b'{"seq": 3, "kind": "metrics", "t": 1.0, "metrics": {"val_top1": 0.')
    store = f"sqlite:///{tmp_path / 'db.db'}"
    client = registry.connect(RegistryConfig(tracking_uri=store, experiment="sync"))
    held = Journal(out).open()  # a trial still running holds its journal: sync leaves it alone
    assert "in use by a running trial" in sync(capsys, out, "--tracking-uri", store)
    assert client.search_runs([client.get_experiment_by_name("sync").experiment_id]) == []
    held.close()

    shown = sync(capsys, out, "--tracking-uri", store)
    assert shown.count("line 4: a truncated or corrupt record") == 1, shown
    run = the_run(client)
    assert [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val_top1"), key=lambda m: m.step)] \
        == [0.25, 0.5]
    assert run.info.status == "KILLED"  # the trial never ended its run: sync says how it ended
    assert run.data.params["prune.method"] == "l1"
    # the journal goes on after the torn line: every later record is whole, and it is reported once
    records, problems = read_journal(out / JOURNAL)
    assert [line for line, _ in problems] == [4]
    assert all(s.synced_upto == s.last_seq for s in segments(records))
    again = sync(capsys, out, "--tracking-uri", store)
    assert "nothing to sync" in again and "line 4" not in again


@pytest.mark.timeout(60)
def test_sync_refuses_a_folder_without_trials(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for folder, needle in ((tmp_path / "empty", "no trial journal"), (tmp_path / "missing", "no such folder")):
        assert cli.main(["sync", str(folder)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("prunepipe: error: ") and str(folder) in err[0], err
        assert needle in err[0]
    assert cli.main(["sync", str(tmp_path), "--tracking-uri", "sqlite:///nowhere/x.db"]) == 2
    assert "--tracking-uri sqlite:///nowhere/x.db" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_a_search_ending_with_no_store_keeps_its_results_for_sync(tmp_path, capsys):
    """The search's own run: ending it with the store down costs a line each, not a traceback;
    its results table, rows, best metrics and status reach the store with `sync`."""
    from launch import search_log
    from pipeline.config import absolutize, load_config

    cfg = absolutize(load_config(DEMO, [f"output_dir={tmp_path / 'search'}",
                                        f"registry.tracking_uri=http://127.0.0.1:{free_port()}", *TINY]))
    rows = [{"trial": "a", "status": "done", "val_top1": 0.75, "run_id": "r1"}]
    result = {"rows": rows, "best": {"run_id": "r1", "val_top1": 0.75, "speedup": 1.5}, "plot": None}
    assert search_log.close_trial_runs(cfg, "PARENT", rows) == 0
    search_log.finish_parent(cfg, "PARENT", result, "THE TABLE", "FINISHED")
    assert len(unreachable_lines(capsys.readouterr().out)) == 2
    store = f"sqlite:///{tmp_path / 'db.db'}"
    registry.connect(RegistryConfig(tracking_uri=store, experiment="sync"))
    shown = sync(capsys, tmp_path / "search", "--tracking-uri", store)
    assert "search demo" in shown, shown
    client = MlflowClient(store)
    run = the_run(client)
    assert run.info.status == "FINISHED" and run.data.metrics == {"best_val_top1": 0.75, "best_speedup": 1.5}
    assert run.data.tags["prunepipe.best_run"] == "r1" and run.data.tags["prunepipe.kind"] == "search"
    table = client.download_artifacts(run.info.run_id, "search/results.md", str(tmp_path))
    assert Path(table).read_text() == "THE TABLE\n"
    assert {f.path for f in client.list_artifacts(run.info.run_id, "search")} == {"search/results.md",
                                                                                  "search/results.json"}
