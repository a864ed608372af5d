"""Ctrl-C and SIGTERM end the process within a bound, even when cleanup or the interpreter's
shutdown would wait for ever (a thread that never ends). Real processes, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import ROOT

# a process whose way out is blocked: a non-daemon thread the interpreter's shutdown waits for,
# and (with CLEANUP_HANGS) a cleanup that sleeps in the main thread
SCRIPT = textwrap.dedent("""
    import os, sys, threading, time
    from launch.signals import bounded_exit
    never = threading.Event()
    with bounded_exit(grace_s=float(sys.argv[1])):
        threading.Thread(target=never.wait, name="stuck-worker").start()
        try:
            # "ready" inside the try: a signal the test sends the moment it reads the line may
            # be handled as print returns, and must land where the cleanup is
            print("ready", flush=True)
            time.sleep(120)
        except BaseException:
            print("cleanup", flush=True)
            if os.environ.get("CLEANUP_HANGS"):
                time.sleep(120)
    sys.exit(9)
""")


def _start(grace_s: float, **env: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(grace_s)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env})
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _finish(proc: subprocess.Popen, seconds: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running {seconds} s after the signal")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig, code, what", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_stuck_shutdown_ends_after_the_grace_period_with_the_signals_status(sig, code, what):
    proc = _start(2.0)
    t0 = time.monotonic()
    proc.send_signal(sig)
    out, err = _finish(proc, 60)
    assert proc.returncode == code, err
    assert "cleanup" in out  # the signal raised in the main thread first: cleanup ran
    assert f"prunepipe: still not exited 2 s after {what}; stopping now" in err
    assert "stuck-worker" in err  # names what it waited for
    assert time.monotonic() - t0 >= 2.0  # not before the grace period


@pytest.mark.timeout(120)
def test_a_second_ctrl_c_stops_at_once():
    proc = _start(100.0, CLEANUP_HANGS="1")
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline().strip() == "cleanup"
    proc.send_signal(signal.SIGINT)
    _, err = _finish(proc, 30)  # well before the 100 s grace period
    assert proc.returncode == 130
    assert "prunepipe: interrupted twice; stopping now" in err


def test_the_callers_handlers_are_back_after_the_block():
    # what lets an in-process caller (the tests' cli.main calls) run the CLI without losing its own
    from launch.signals import bounded_exit

    def mine(signum, frame):
        pass

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGTERM, mine)
        with bounded_exit(grace_s=5):
            assert signal.getsignal(signal.SIGTERM) is not mine
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is saved[signal.SIGINT]
        with pytest.raises(ValueError), bounded_exit(grace_s=5):  # also when the block raises
            raise ValueError
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
