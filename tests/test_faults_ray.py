"""Faults that lose nothing, on Ray, by really killing processes (a killed worker or driver costs no
finished work).

* A Ray Train worker of a running trial is SIGKILLed: the worker group restarts (Ray Train's
  ``FailureConfig(max_failures)``), the trial resumes after its last checkpointed epoch and its
  result counts in the search; the killed attempt's MLflow run does not stay RUNNING.
* A ``prunepipe search`` driver is SIGKILLed as its first trial finishes; the resumed search is
  interrupted (SIGINT) while the second trial is mid-training; ``search --resume`` continues it
  without running the finished trial again and registers the best of all trials.

Each search is a subprocess (``python -m launch.cli``) on tiny synthetic data; the processes a
killed driver leaves are waited for and, if still there, ended by pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from launch.outputs import CHECKPOINT
from launch.resume import RESULT
from pipeline.registry import TRIAL_TAG
from tests.conftest import DEMO, ROOT

pytestmark = pytest.mark.ray

SAMPLES, BATCH, WORKERS = 256, 32, 2  # demo: 2 DDP workers per trial
TINY = ("data.backend=synthetic", "data.image_size=16", f"data.synthetic_samples={SAMPLES}", f"data.batch_size={BATCH}",
        "train.budget_epochs=null", "prune.epochs=0", "train.bn_recalib_batches=0", "baseline.epochs=0",
        "measure.warmup=0", "measure.attempts=1", "measure.rounds=2", "search.num_samples=1", "search.grace_period=1",
        "search.objective.min_speedup=null", "registry.experiment=faults", "registry.model_name=faults")


def _args(tmp: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "launch.cli", "search", str(DEMO), *TINY, f"output_dir={tmp / 'out'}",
            f"registry.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", *overrides]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    # the progress bar stays on: it tells rank 0's log from the others (tqdm runs on rank 0 only)
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    with open(log, "w") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)


def _wait_for(what: str, check, proc: subprocess.Popen, timeout: float = 150):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        assert proc.poll() is None, f"{what}: the search ended first (exit {proc.returncode})"
        time.sleep(0.2)
    raise AssertionError(f"{what}: not seen within {timeout:.0f} s")


def _finish(proc: subprocess.Popen, timeout: float = 240) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def _checkpoint_epoch(trial_dir: Path) -> int | None:
    try:
        return int(torch.load(trial_dir / CHECKPOINT, weights_only=True)["epoch"])
    except (OSError, RuntimeError, EOFError, KeyError):
        return None  # not written yet


def _trial_dirs(tmp: Path) -> list[Path]:
    return sorted((tmp / "out" / "trials").glob("_trial_driver_*"))


def _runs(tmp: Path) -> list:
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("faults").experiment_id], max_results=1000)


def _epochs(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    """Per-epoch values of ``key`` (logged at step = epoch; the final summary logs at step 0)."""
    return {m.step: m.value for m in client.get_metric_history(run_id, key) if m.step >= 1}


@pytest.mark.timeout(400)
@pytest.mark.parametrize("victim", [0, 1])
def test_a_killed_worker_restarts_and_the_trial_resumes_from_its_checkpoint(tmp_path, victim):
    epochs = 5
    log = tmp_path / "console.log"
    proc = _start(_args(tmp_path, f"train.epochs={epochs}", "search.space={prune.method: {grid: [l1]}}"), log)
    try:
        trial_dir = _wait_for("a trial folder", lambda: (_trial_dirs(tmp_path) or [None])[0], proc)
        seen = _wait_for("a checkpoint after epoch 2",
                         lambda: (e := _checkpoint_epoch(trial_dir)) is not None and e >= 2 and e, proc)
        pids = [int(p.stem) for p in (trial_dir / "logs").glob("*.log")]  # each worker tees into logs/<pid>.log
        assert len(pids) == WORKERS, pids
        rank0 = [p for p in pids if "finetune " in (trial_dir / "logs" / f"{p}.log").read_text(errors="replace")]
        assert len(rank0) == 1, pids
        killed = rank0[0] if victim == 0 else next(p for p in pids if p != rank0[0])
        os.kill(killed, signal.SIGKILL)
        code = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert code == 0, out[-3000:]
    # the worker group restarted inside the one Tune trial, which finished and counted
    assert out.count("[search] start") == 1 and out.count(": done") == 1, out[-3000:]
    assert "* chosen: faults v1 @challenger" in out
    new_pids = {int(p.stem) for p in (trial_dir / "logs").glob("*.log")} - set(pids)
    assert len(new_pids) == WORKERS and killed not in new_pids

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = _runs(tmp_path)
    trial = [r for r in runs if r.data.tags.get(TRIAL_TAG)]
    assert len(trial) == 2, [(r.info.run_name, r.info.status) for r in runs]
    final = next(r for r in trial if r.info.status == "FINISHED")
    earlier = next(r for r in trial if r is not final)
    if victim == 0:
        # nobody was left to end it: the next attempt's rank 0 marked it (trial_log.end_stale_runs, from the journal),
        # not the search's clean-up at the end
        assert earlier.info.status == "KILLED" and "prunepipe.ended_by" not in earlier.data.tags
    else:
        assert earlier.info.status in ("FAILED", "KILLED")  # rank 0 saw its peer go, or was stopped
    assert all(r.info.status != "RUNNING" for r in runs)
    assert client.get_model_version_by_alias("faults", "challenger").run_id == final.info.run_id
    assert final.data.metrics["epochs"] == epochs and "val_top1" in final.data.metrics

    # resumed after the checkpoint, not from epoch 0: every epoch trained once in what the model
    # is made of, as many optimizer steps as an uninterrupted trial takes
    before, after = _epochs(client, earlier.info.run_id, "steps"), _epochs(client, final.info.run_id, "steps")
    first = min(after)
    assert first > seen >= 2 and sorted(after) == list(range(first, epochs + 1))
    assert sorted(before)[: first - 1] == list(range(1, first))  # epochs 1..first-1 ran before the kill
    lineage = [before[e] for e in range(1, first)] + [after[e] for e in range(first, epochs + 1)]
    assert sum(lineage) == epochs * (SAMPLES // (BATCH * WORKERS))


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _reap(procs: list[psutil.Process], timeout: float = 20) -> None:
    """A SIGKILLed driver's Ray workers end on their own within seconds (seen: 3 s), its
    dashboard and runtime-env agents after about a minute; whatever this test started that
    still runs after ``timeout`` is ended by pid."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=10)


def _stamps(trial_dir: Path) -> dict[str, int]:
    return {p: (trial_dir / p).stat().st_mtime_ns for p in (CHECKPOINT, RESULT, "model/model.safetensors")}


@pytest.mark.timeout(720)
def test_an_interrupted_search_resumes_without_rerunning_finished_trials(tmp_path):
    """One search stopped twice, as a cluster job that loses its node and is later cancelled:

    1. SIGKILL the moment the first trial's driver saved its result: Tune's saved state (written
       every few seconds) then still has that trial running; the resume must not train it again.
    2. That resumed search gets SIGINT once the second trial has a new checkpoint: it stops
       gracefully (exit 130), decides nothing from the trials that happened to end, says --resume.
    3. Resumed again, the second trial continues after its checkpoint and the best of all trials
       is registered; the first trial never trained again.

    (Two searches, one per signal, cost a Ray start-up and two trial start-ups more: the suite's
    time on 2 cores is kept well under 30 minutes.)"""
    # a SIGKILLed driver's workers were seen to finish one or two more epochs before they
    # noticed (their next report fails): room for that before the last epoch
    epochs = 4
    args = _args(tmp_path, f"train.epochs={epochs}", "search.space={prune.method: {grid: [l1, l2]}}")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    # 1. SIGKILL
    proc = _start(args, tmp_path / "first.log")
    try:
        done = _wait_for("the first trial's end", lambda: [d for d in _trial_dirs(tmp_path) if (d / RESULT).is_file()],
                         proc)
        kids = _descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        code = _finish(proc, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == -signal.SIGKILL
    _reap(kids)  # before reading the checkpoint: an orphaned worker could still write one
    [finished] = done
    finished_id = finished.name.removeprefix("_trial_driver_")
    second_id = finished_id[:-1] + ("1" if finished_id.endswith("0") else "0")  # grid order: _00000, _00001
    second = finished.parent / f"_trial_driver_{second_id}"
    stamps = _stamps(finished)
    before = _checkpoint_epoch(second) or 0

    # 2. SIGINT, in the resumed search
    log2 = tmp_path / "second.log"
    proc = _start([*args, "--resume"], log2)
    try:
        _wait_for("the second trial's next checkpoint", lambda: (_checkpoint_epoch(second) or 0) > before, proc)
        proc.send_signal(signal.SIGINT)
        code = _finish(proc, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out2 = log2.read_text()
    seen = _checkpoint_epoch(second) or 0
    assert code == 130 and before < seen < epochs, (seen, out2[-3000:])
    assert "--resume" in out2 and "chosen" not in out2
    assert client.search_registered_models() == []
    assert [r.info.status for r in _runs(tmp_path) if not r.data.tags.get(TRIAL_TAG)] == ["KILLED"]

    # 3. the last resume
    log3 = tmp_path / "third.log"
    code = _finish(_start([*args, "--resume"], log3))
    out3 = log3.read_text()
    assert code == 0, out3[-3000:]
    # the finished trial did not train again: its files untouched, one MLflow run, and if Tune
    # started its driver again, it reported the saved final result and no epoch
    assert _stamps(finished) == stamps
    assert not any(f"[{finished_id}] epoch {e} " in out for out in (out2, out3) for e in range(epochs)), out3[-3000:]
    runs = _runs(tmp_path)
    per_trial: dict[str | None, list] = {}
    for r in runs:
        per_trial.setdefault(r.data.tags.get(TRIAL_TAG), []).append(r)
    assert [r.info.status for r in per_trial[finished_id]] == ["FINISHED"]
    # the interrupted trial resumed after its checkpoint
    resumed = [r for r in per_trial[second_id] if r.info.status == "FINISHED"]
    assert len(resumed) == 1
    assert min(_epochs(client, resumed[0].info.run_id, "steps")) == seen + 1
    [parent] = per_trial[None]
    assert parent.info.status == "FINISHED"
    assert all(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in runs if r is not parent)
    assert all(r.info.status != "RUNNING" for r in runs)
    # the best of all trials, old and new, registered
    mv = client.get_model_version_by_alias("faults", "challenger")
    finals = per_trial[finished_id] + resumed
    assert client.get_run(mv.run_id).data.metrics["val_top1"] == max(r.data.metrics["val_top1"] for r in finals)
    assert "* chosen: faults v1 @challenger" in out3


@pytest.mark.timeout(600)
def test_a_search_too_noisy_to_decide_is_decided_later_by_resume(tmp_path):
    """Every finalist's speed is 'noisy' (an IQR limit no timing meets): nothing is registered and
    the output says --resume. Resumed with a sane limit, the finished trial is re-measured, not
    trained again, and registered; after that a resume has nothing left to do."""
    args = _args(tmp_path, "train.epochs=1", "search.space={prune.method: {grid: [l1]}}",
                 "search.objective.min_speedup=0.5")  # a pure reliability check: any real figure passes
    log = tmp_path / "first.log"
    code = _finish(_start([*args, "measure.max_spread=1e-9"], log))
    out = log.read_text()
    assert code == 1, out[-3000:]
    assert "only because their speed could not be measured reliably" in out and "--resume" in out, out[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.search_registered_models() == []
    [trial] = _trial_dirs(tmp_path)
    stamps = {p: (trial / p).stat().st_mtime_ns for p in (RESULT, "model/model.safetensors")}
    trial_id = trial.name.removeprefix("_trial_driver_")

    log2 = tmp_path / "resume.log"
    code = _finish(_start([*args, "measure.max_spread=0.5", "--resume"], log2))
    out = log2.read_text()
    assert code == 0, out[-3000:]
    assert "* chosen: faults v1 @challenger" in out, out[-3000:]
    assert {p: (trial / p).stat().st_mtime_ns for p in stamps} == stamps  # not trained again
    assert not any(f"[{trial_id}] epoch {e} " in out for e in range(2)), out[-3000:]
    mv = client.get_model_version_by_alias("faults", "challenger")
    assert mv.tags["speed_reliable"] in ("1", "1.0") and float(mv.tags["speedup"]) > 0.5
    assert all(r.info.status != "RUNNING" for r in _runs(tmp_path))

    log3 = tmp_path / "again.log"
    assert _finish(_start([*args, "--resume"], log3)) == 2
    assert "already finished (registered v1)" in log3.read_text()
