"""Run a multi-process command (torchrun and its ranks, their DataLoader workers) so that a hang
fails the test with every process's Python stack instead of a bare timeout, and leaves nothing
behind.

Why: ``subprocess.run(timeout=...)`` kills only the process it started, and torchrun starts each
rank in a session of its own, so a hung job's ranks and workers would outlive the test and the
failure would say only that it timed out. Here, on timeout, every process of the tree gets
SIGABRT first: with ``PYTHONFAULTHANDLER=1`` in its environment (set below) a Python process
prints each thread's stack to the stderr the test captures. Then whatever is left is killed.

Also the launchers the multi-process tests share: :func:`torchrun` and :func:`free_port`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the name (state, ppid, …); None once it has gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # the name may hold spaces
    except OSError:
        return None


def alive(pid: int) -> bool:
    """Running or sleeping; a zombie has ended (only its parent's wait is missing)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children first), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        fields = _stat(entry) if entry.isdigit() else None
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(0), [])
        found += kids
        todo += kids
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def run_tree(cmd: list[str], timeout: float, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)``; on timeout the test fails with the
    stacks of every process in the tree and the output so far, and no process of it survives."""
    env = {**(env if env is not None else os.environ), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs)
    tree: list[int] = []
    try:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            tree = descendants(proc.pid)
            # one at a time (stacks written at once interleave character by character), from the
            # top: a process signalled after its parent died is still where it hung (torchrun's
            # ranks have sessions of their own; a DataLoader worker notices its parent's death
            # only after seconds), while a parent signalled after its worker died would have
            # moved on to the worker's death
            for pid in [proc.pid, *tree]:
                _signal_all([pid], signal.SIGABRT)
                time.sleep(0.3)
            time.sleep(2)
            _signal_all([*tree, proc.pid], signal.SIGKILL)
            out, err = proc.communicate(timeout=60)
            pytest.fail(f"{' '.join(cmd[:8])} … still running after {timeout:.0f} s; {len(tree) + 1} processes "
                        f"were sent SIGABRT for their stacks.\n--- stdout (end) ---\n{out[-3000:]}\n"
                        f"--- stderr (end: stacks) ---\n{err[-20000:]}")
    finally:
        if proc.poll() is None or tree:
            _signal_all([*descendants(proc.pid), *tree, proc.pid], signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def free_port() -> int:
    """A loopback TCP port nobody listens on now (a rendezvous, a server under test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, cwd: Path, timeout: float = 600, nproc: int = 2, **env: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=NPROC ARGS`` through :func:`run_tree`, one CPU
    thread per rank (equal arithmetic whatever the machine), the repository importable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(cwd), **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return run_tree(cmd, timeout=timeout, cwd=cwd, env=env)


def wait_for(check: Callable[[], bool], what: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode} (see its log in tmp_path)")
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what}: not ready after {timeout:.0f} s")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False
