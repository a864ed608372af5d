"""Ctrl-C and SIGTERM: a clean way out, and a bounded one.

The first signal raises in the main thread (``KeyboardInterrupt``, or :class:`Terminated` for
SIGTERM) so that ``finally`` blocks run, the recipe ends its MLflow run as KILLED and the CLI
prints one line. That cleanup, or the interpreter's shutdown waiting on a thread that never
ends, must not keep the process alive for ever: the signal also arms a watchdog, and if the
process is still there ``grace_s`` later the watchdog prints every thread's stack and a line
saying so, then exits with the signal's status. A second Ctrl-C exits at once.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

GRACE_S = 60.0  # the recipe's own cleanup takes seconds; a minute means it is stuck


class Terminated(SystemExit):
    """SIGTERM (torchrun, SLURM or a user ending the job), raised in the main thread so that a
    running trial ends its MLflow run as KILLED on the way out."""

    def __init__(self) -> None:
        super().__init__(143)


_armed = threading.Event()


def arm_watchdog(code: int, what: str, grace_s: float) -> None:
    """Exit with ``code`` in ``grace_s`` seconds unless the process has ended by then (once)."""
    if _armed.is_set():
        return
    _armed.set()

    def watch() -> None:
        time.sleep(grace_s)
        alive = sorted(t.name for t in threading.enumerate() if t is not threading.current_thread())
        sys.stderr.write(f"prunepipe: still not exited {grace_s:.0f} s after {what}; stopping now "
                         f"(threads alive: {', '.join(alive) or 'none'})\n")
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(code)

    threading.Thread(target=watch, name="prunepipe-exit-watchdog", daemon=True).start()


@contextmanager
def bounded_exit(grace_s: float = GRACE_S) -> Iterator[None]:
    """While inside: SIGINT → KeyboardInterrupt and SIGTERM → :class:`Terminated` in this process
    (forked DataLoader workers take the default action), each arming the watchdog. The previous
    handlers come back on the way out, so an in-process caller (the tests) keeps its own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    main_pid = os.getpid()

    def handler(exc: Callable[[], BaseException], code: int, what: str) -> Callable[[int, object], None]:
        def on_signal(signum: int, frame: object) -> None:
            if os.getpid() != main_pid:  # a forked worker: what it would have done without us
                signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)
                os.kill(os.getpid(), signum)
                return
            if _armed.is_set() and signum == signal.SIGINT:
                sys.stderr.write("prunepipe: interrupted twice; stopping now\n")
                os._exit(code)
            arm_watchdog(code, what, grace_s)
            raise exc()

        return on_signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, handler(KeyboardInterrupt, 130, "Ctrl-C"))
    signal.signal(signal.SIGTERM, handler(Terminated, 143, "SIGTERM"))
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
