"""The root of every error prunepipe raises for a person to read.

A :class:`PrunepipeError` carries one line that names what was wrong (a config key, a file, a
registered model) and says what to do; the CLI prints that line and exits with the error's
``exit_code`` instead of a traceback. Each module keeps its own subclass (``ConfigError``,
``SpecError``, ...) so a caller can catch one kind; the second base each subclass keeps
(``ValueError``, ``RuntimeError``) is what Python code outside the CLI already catches.
"""

from __future__ import annotations


class PrunepipeError(Exception):
    """An error with a one-line, user-facing message."""

    #: the CLI's exit status: 2 for a bad input (argparse's convention), 1 for a run that failed
    exit_code: int = 2
