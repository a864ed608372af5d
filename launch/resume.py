"""Continuing an interrupted search: ``prunepipe search CONFIG --resume``.

Ray Tune keeps a search's state in ``<output_dir>/tune/<name>`` (``tuner.pkl``, the newest
``experiment_state-*.json``) and ``tune.Tuner.restore`` continues it: finished trials keep their
results, unfinished (and errored) ones start again and resume from their own ``checkpoint.pt``,
so an interrupted trial loses at most the epoch it was in. Beside Tune's files prunepipe keeps
``prunepipe-search.json``: a fingerprint of the config the search ran with, the search's MLflow
parent run, and whether the search finished. Tune restores the *pickled* search space and base
config, so a resume under another config would run the old settings and decide with the new
ones: :func:`check` refuses that with one line naming the keys that differ.

Two guards that Tune alone does not give:

* Tune writes its experiment state every few seconds, not when a trial ends; a driver killed
  just after a trial finished leaves it recorded RUNNING, and the restored search would run it
  again. Each trial's driver therefore writes its final result to ``<trial folder>/result.json``
  (:func:`save_result`) and a restarted driver that finds one reports it instead of training.
* On Ctrl-C Tune stops gracefully and ``Tuner.fit`` *returns*, as if the search had ended;
  :class:`SigintWatch` tells the two apart so that an interrupted search is not decided and
  registered from the trials that happened to finish.

A search that ended with nothing registered *only* because its finalists' speed could not be
measured reliably (another job shared the machine) is marked ``remeasure`` and may be resumed
too: every trial is finished, so Tune returns them at once, and the driver re-measures the
finalists and decides again, without training anything (``measure.*`` may differ then, say more
rounds).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import threading
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError, config_to_dict, flatten
from pipeline.textfiles import write_atomically

STATE = "prunepipe-search.json"
RESULT = "result.json"
# What the driver reads after the trials (the objective that picks the winner, how the finalists
# are re-measured, the local Ray's logical CPUs): these may change between a search and its
# resumption. Everything else is pickled into Tune's state and used by the trials as it was when
# the search started (so are the measure.* settings of the trials' own speed figures).
_MAY_CHANGE = ("search.objective.", "search.ray_num_cpus", "measure.")


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the trials; Tune saved the search's state for ``--resume``."""


def experiment_dir(cfg: Config) -> Path:
    """Where Tune keeps this search's state (``RunConfig(storage_path=<output_dir>/tune, name=<name>)``)."""
    return Path(cfg.output_dir) / "tune" / cfg.name


def fingerprint(cfg: Config) -> dict[str, Any]:
    """The config as flat dotted keys, less :data:`_MAY_CHANGE`; ``model.weights`` is the weights
    every trial starts from (the dense baseline's file when ``ensure_baseline`` trains one), so
    the config before and after the baseline step fingerprints the same."""
    from launch.recipe import baseline_path

    flat = flatten(config_to_dict(cfg))
    if cfg.model.weights is None and cfg.baseline.epochs > 0:
        flat["model.weights"] = str(baseline_path(cfg))
    return {k: v for k, v in flat.items() if not k.startswith(_MAY_CHANGE)}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a driver killed mid-write leaves the old file or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=1, sort_keys=True, default=str)
    write_atomically(path, lambda tmp: Path(tmp).write_text(text))


def _read_state(cfg: Config) -> dict[str, Any] | None:
    path = experiment_dir(cfg) / STATE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"search --resume: {str(path)!r} is unreadable ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("fingerprint"), dict):
        raise ConfigError(f"search --resume: {str(path)!r} is not a prunepipe search state")
    return data


def record(cfg: Config, parent_run_id: str | None) -> None:
    """A fresh search: save its fingerprint and parent run beside Tune's state. An earlier
    search in the same folder whose parent run was left RUNNING (its driver was killed) is
    ended KILLED first: the new search replaces it (today's rerun behaviour, kept)."""
    old = _read_state(cfg) if (experiment_dir(cfg) / STATE).is_file() else None
    if old and old.get("parent_run_id") and old["parent_run_id"] != parent_run_id and cfg.registry.enabled:
        _end_if_running(cfg, old["parent_run_id"])
    _write_json(experiment_dir(cfg) / STATE, {"fingerprint": fingerprint(cfg), "parent_run_id": parent_run_id,
                                              "finished": False})


def mark_finished(cfg: Config, version: int | None, remeasure: bool = False) -> None:
    """The search decided: a later ``--resume`` has nothing left to do, unless ``remeasure``
    (nothing was chosen only because the finalists' speed was too noisy to trust): then it
    restores the finished trials, re-measures and decides again."""
    state = _read_state(cfg)
    if state is not None:
        _write_json(experiment_dir(cfg) / STATE, {**state, "finished": True, "version": version,
                                                  "remeasure": remeasure})


def check(cfg: Config, trust_state: bool = False) -> dict[str, Any]:
    """The saved state of the search ``cfg`` names, if it can be resumed under ``cfg``;
    otherwise a one-line :class:`ConfigError` (nothing there, finished, other settings, or a
    folder others could write unless ``trust_state``)."""
    from ray import tune

    where = experiment_dir(cfg)
    if not where.is_dir() or not tune.Tuner.can_restore(str(where)):
        raise ConfigError(f"search --resume: nothing to resume in {str(where)!r} (no search named {cfg.name!r} was "
                          "started in this output_dir); run it without --resume")
    refuse_untrusted(where, trust_state)
    state = _read_state(cfg)
    if state is None:
        raise ConfigError(f"search --resume: {str(where)!r} has no {STATE} (not started by this prunepipe); "
                          "run it without --resume to start afresh")
    if state.get("finished") and not state.get("remeasure"):
        raise ConfigError(f"search --resume: the search in {str(where)!r} already finished"
                          f"{' (registered v' + str(state['version']) + ')' if state.get('version') else ''}; "
                          "nothing to resume")
    old, new = state["fingerprint"], fingerprint(cfg)
    differ = sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))
    if differ:
        shown = ", ".join(f"{k} {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise ConfigError(f"search --resume: the config differs from the interrupted search's ({shown}{more}); "
                          "resume with the same config and overrides, or run without --resume to start a new search")
    return state


def refuse_untrusted(where: Path, trust_state: bool = False) -> None:
    """Refuse to resume from state that someone else could have written. ``Tuner.restore``
    unpickles ``tuner.pkl`` and the trials pickled into ``experiment_state-*.json``: running
    whatever code a planted file names. So, as ssh does for its keys, the folder, the two above
    it and every file in it must belong to this user (or root) and be writable by no one else.
    Group-writable counts as foreign too: a shared project folder (umask 002) lets every member
    of the group plant a pickle. A sticky folder (``/tmp``) only lets owners replace entries.
    ``trust_state`` (``--trust-state``) is for a team that shares its output_dir on purpose
    (a teammate's search, a group-writable project folder): the risk is named on stderr and taken."""
    why = untrusted(where)
    if why is None:
        return
    if trust_state:
        print(f"prunepipe: warning: search --resume --trust-state: {why}; its pickled state is loaded anyway",
              file=sys.stderr)
        return
    raise ConfigError(f"search --resume: {why}; Ray Tune's resume unpickles this search's state, which runs "
                      f"code, so it must be yours alone: `chmod -R go-w {str(where)!r}` (and its two parents) if "
                      "you trust its contents, --trust-state if you trust everyone who can write there (a team's "
                      "shared folder), or start the search afresh without --resume")


def untrusted(where: Path) -> str | None:
    """Why someone other than this user (or root) could have written the search's state, or None."""
    me = os.getuid()
    paths = [where.parent.parent, where.parent, where, *sorted(p for p in where.iterdir() if p.is_file())]
    for path in paths:
        st = path.stat()
        sticky_dir = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
        if st.st_uid not in (me, 0):
            return f"{str(path)!r} belongs to uid {st.st_uid}, not to you (uid {me})"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_dir:
            who = "others" if st.st_mode & stat.S_IWOTH else "its group"
            return f"{str(path)!r} is writable by {who} (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def reopen_parent(cfg: Config, parent_run_id: str | None) -> None:
    """The interrupted search's MLflow run (ended KILLED on Ctrl-C) runs again: the resumed
    trials nest under it, as the restored search space says."""
    if not parent_run_id or not cfg.registry.enabled:
        return
    from mlflow.exceptions import MlflowException

    from pipeline import registry

    client = registry.connect(cfg.registry)
    try:
        client.update_run(parent_run_id, status="RUNNING")
    except MlflowException as err:
        raise ConfigError(f"search --resume: the search's MLflow run {parent_run_id} is not in "
                          f"{cfg.registry.tracking_uri} ({registry.first_line(err)})") from None


def _end_if_running(cfg: Config, run_id: str) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.registry import end_if_running

    try:
        end_if_running(MlflowClient(cfg.registry.tracking_uri), run_id)
    except MlflowException:
        pass  # deleted, or in another store: nothing to end


def finished_result(trial_dir: Path) -> dict[str, Any] | None:
    """The final metrics a trial's driver saved when it finished, or None."""
    try:
        data = json.loads((trial_dir / RESULT).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("final") else None


def save_result(trial_dir: Path, metrics: dict[str, Any]) -> None:
    _write_json(trial_dir / RESULT, metrics)


class SigintWatch:
    """Whether Ctrl-C (or SIGUSR1) stopped ``Tuner.fit``.

    Tune (``ray.tune.tune._setup_signal_catching``) installs its own SIGINT handler for the run
    and, on the first signal, puts back the handler it found and lets ``fit`` return normally.
    So a marker handler installed before ``fit`` is back in place afterwards exactly when that
    happened. Without a signal Tune's handler stays installed: it is removed here, or a Ctrl-C
    during the finalists' re-measurement would be swallowed."""

    def __enter__(self) -> SigintWatch:
        self.interrupted = False
        # Tune installs no SIGINT handler off the main thread or when told not to: nothing to tell
        self._active = threading.current_thread() is threading.main_thread() and \
            not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0"))
        if not self._active:
            return self
        self._before = signal.getsignal(signal.SIGINT)

        def marker(signum: int, frame: object) -> None:
            raise KeyboardInterrupt  # a second Ctrl-C, after Tune gave the handler back

        self._marker = marker
        signal.signal(signal.SIGINT, marker)
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._active:
            return
        self.interrupted = signal.getsignal(signal.SIGINT) is self._marker
        signal.signal(signal.SIGINT, self._before)
