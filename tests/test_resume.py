"""`prunepipe search --resume` without running a search: what it refuses (one line each), the
config fingerprint it compares, and the two guards it adds to Tune (launch/resume.py). The real
interruptions are in tests/test_faults_ray.py."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from launch import cli, resume
from launch.recipe import baseline_path
from launch.search_log import ConsoleView
from pipeline.config import ConfigError
from tests.conftest import DEMO
from tests.helpers.factories import demo_config


@pytest.fixture(autouse=True)
def _keep_signals():
    # cli.main installs a SIGTERM handler; the SIGINT tests install and raise handlers
    saved = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGUSR1)
    yield
    signal.signal(signal.SIGTERM, saved[0])
    signal.signal(signal.SIGINT, saved[1])
    signal.signal(signal.SIGUSR1, saved[2])


def _overrides(tmp_path: Path, *extra: str) -> list[str]:
    return [f"output_dir={tmp_path / 'out'}", "registry.enabled=false", *extra]


def _cfg(tmp_path: Path, *extra: str):
    return demo_config(tmp_path, *extra)


def _saved_search(tmp_path: Path, *extra: str):
    """The folder an interrupted search leaves: Tune's tuner.pkl (never unpickled by the check)
    and prunepipe's state, written for the config ``extra`` makes."""
    cfg = _cfg(tmp_path, *extra)
    resume.record(cfg, None)
    where = resume.experiment_dir(cfg)
    (where / "tuner.pkl").write_bytes(b"")
    for path in (where.parent.parent, where.parent, where, *where.iterdir()):
        path.chmod(path.stat().st_mode & ~0o022)  # as under umask 022, whatever this machine's umask
    return cfg


def _resume_cli(tmp_path: Path, capsys, *extra: str) -> str:
    code = cli.main(["search", str(DEMO), *_overrides(tmp_path, *extra), "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_resume_with_nothing_to_resume_says_so_in_one_line(tmp_path, capsys):
    line = _resume_cli(tmp_path, capsys)
    assert line.startswith("prunepipe: error: search --resume: nothing to resume in") and "demo" in line
    assert not (tmp_path / "out").exists()  # nothing was started, not even a baseline


def test_resume_refuses_a_changed_config_naming_the_keys(tmp_path, capsys):
    _saved_search(tmp_path, "prune.prune_ratio=0.5")
    line = _resume_cli(tmp_path, capsys, "prune.prune_ratio=0.3", "train.epochs=4")
    assert "prune.prune_ratio 0.5 -> 0.3" in line and "train.epochs" in line
    # the objective is read by the driver after the trials only: it may change
    assert resume.check(_cfg(tmp_path, "prune.prune_ratio=0.5", "search.objective.min_speedup=1.5")) is not None
    # and so is how the finalists are re-measured
    assert resume.check(_cfg(tmp_path, "prune.prune_ratio=0.5", "measure.rounds=30")) is not None
    with pytest.raises(ConfigError, match="search.space"):
        resume.check(_cfg(tmp_path, "search.space={prune.method: {grid: [l1]}}"))


def test_resume_of_a_finished_search_has_nothing_to_do(tmp_path, capsys):
    cfg = _saved_search(tmp_path)
    resume.mark_finished(cfg, 3)
    assert "already finished (registered v3)" in _resume_cli(tmp_path, capsys)
    # nothing registered only because every finalist's speed was noise: resumable, to re-measure
    resume.mark_finished(cfg, None, remeasure=True)
    assert resume.check(cfg)["remeasure"] is True
    resume.mark_finished(cfg, None)  # nothing registered for another reason: nothing to resume
    assert "already finished; nothing to resume" in _resume_cli(tmp_path, capsys)


def test_a_state_file_that_is_not_ours_is_refused(tmp_path, capsys):
    cfg = _saved_search(tmp_path)
    (resume.experiment_dir(cfg) / resume.STATE).write_text("[1, 2]")
    assert "is not a prunepipe search state" in _resume_cli(tmp_path, capsys)
    (resume.experiment_dir(cfg) / resume.STATE).unlink()
    assert f"has no {resume.STATE}" in _resume_cli(tmp_path, capsys)


def test_state_that_another_user_could_have_written_is_not_unpickled(tmp_path, capsys, monkeypatch):
    cfg = _saved_search(tmp_path)
    where, pkl = resume.experiment_dir(cfg), resume.experiment_dir(cfg) / "tuner.pkl"
    pkl.chmod(0o666)
    line = _resume_cli(tmp_path, capsys)
    assert f"{str(pkl)!r} is writable by others (mode 666)" in line and "chmod -R go-w" in line
    pkl.chmod(0o644)
    where.parent.chmod(0o775)  # a group-shared tune/ folder: any member could swap the search in
    assert f"{str(where.parent)!r} is writable by its group" in _resume_cli(tmp_path, capsys)
    where.parent.chmod(0o1777)  # sticky, as /tmp: only an entry's owner may replace it
    assert resume.check(cfg)["fingerprint"] == resume.fingerprint(cfg)
    where.parent.chmod(0o755)
    if os.getuid() == 0:
        os.chown(pkl, 12345, -1)  # a file another user wrote
        other = 12345
    else:  # only root may give a file away: the other user is the one we pretend to be
        other = os.getuid()
        monkeypatch.setattr(resume.os, "getuid", lambda: other + 1)
    assert f"{str(pkl)!r} belongs to uid {other}, not to you" in _resume_cli(tmp_path, capsys)


def test_trust_state_resumes_a_team_shared_search_folder_and_says_what_it_trusted(tmp_path, capsys):
    cfg = _saved_search(tmp_path)
    where = resume.experiment_dir(cfg)
    where.parent.parent.chmod(0o2775)  # a group-shared project output_dir (setgid, umask 002)
    assert "--trust-state if you trust" in _resume_cli(tmp_path, capsys)
    assert resume.check(cfg, trust_state=True)["fingerprint"] == resume.fingerprint(cfg)
    err = capsys.readouterr().err
    assert err.startswith("prunepipe: warning: search --resume --trust-state:") and "its group" in err
    assert str(where.parent.parent) in err
    # trusting is only for a resume: a plain search with it is a usage error, before any work
    assert cli.main(["search", str(DEMO), *_overrides(tmp_path), "--trust-state"]) == 2
    assert "--trust-state: only with --resume" in capsys.readouterr().err


def test_fingerprint_is_the_same_before_and_after_the_baseline_step(tmp_path):
    # cmd_search checks before ensure_baseline sets model.weights; run_search records after it
    before = _cfg(tmp_path, "baseline.epochs=2")
    after = before.model_copy(update={"model": before.model.model_copy(update={"weights": str(baseline_path(before))})})
    assert resume.fingerprint(before) == resume.fingerprint(after)
    other = _cfg(tmp_path, "baseline.epochs=3")  # another baseline: other starting weights
    assert resume.fingerprint(other)["model.weights"] != resume.fingerprint(before)["model.weights"]


def test_sigint_watch_tells_an_interrupted_tune_run_from_a_finished_one():
    """Against Tune's own signal set-up (the function Tuner.fit calls)."""
    from ray.tune.tune import _setup_signal_catching

    before = signal.getsignal(signal.SIGINT)
    with resume.SigintWatch() as watch:
        event = _setup_signal_catching()  # Tune's handler for the run
        signal.raise_signal(signal.SIGINT)  # Ctrl-C: Tune stops gracefully and fit returns
    assert event.is_set() and watch.interrupted
    assert signal.getsignal(signal.SIGINT) is before
    with resume.SigintWatch() as watch:
        _setup_signal_catching()
    assert not watch.interrupted
    # Tune's handler is gone: a Ctrl-C while the finalists are re-measured is not swallowed
    assert signal.getsignal(signal.SIGINT) is before


def test_a_finished_trials_result_is_read_back_and_a_partial_one_is_not(tmp_path):
    resume.save_result(tmp_path, {"final": 1, "val_top1": 0.5, "run_id": "r"})
    assert resume.finished_result(tmp_path) == {"final": 1, "val_top1": 0.5, "run_id": "r"}
    resume.save_result(tmp_path, {"epoch": 1, "val_top1": 0.5})
    assert resume.finished_result(tmp_path) is None
    assert resume.finished_result(tmp_path / "absent") is None


def test_console_prints_a_trials_final_result_once():
    lines = []
    view = ConsoleView("val_top1", print_fn=lambda s, **_: lines.append(s))
    trial = SimpleNamespace(trial_id="a", config={"__base__": {"prune": {"method": "l1", "prune_ratio": 0.5}}},
                            local_path=None)
    final = {"epoch": 2, "phase": "final", "val_top1": 0.8, "final": 1}
    view.on_trial_result(0, [], trial, final)  # from the workers
    view.on_trial_result(0, [], trial, final)  # handed over again by the trial's driver
    assert len(lines) == 1


def test_a_new_search_ends_the_left_over_parent_run_of_a_killed_one(tmp_path):
    """Without --resume a rerun starts afresh; the killed search's parent run does not stay RUNNING."""
    from mlflow.tracking import MlflowClient

    from pipeline import registry

    cfg = _cfg(tmp_path, "registry.enabled=true", f"registry.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    client = registry.connect(cfg.registry)
    exp = client.get_experiment_by_name(cfg.registry.experiment).experiment_id
    old, new = (client.create_run(exp).info.run_id for _ in range(2))
    resume.record(cfg, old)  # the search whose driver was SIGKILLed: its parent stays RUNNING
    resume.record(cfg, new)
    client = MlflowClient(cfg.registry.tracking_uri)
    assert client.get_run(old).info.status == "KILLED" and client.get_run(new).info.status == "RUNNING"
