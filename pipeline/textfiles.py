"""Small text files given by users (configs, specs, manifests): read with a size cap, and every
way a path can be wrong (missing, a folder, a device, binary, not UTF-8) as one line; and the
one way files are written so that a crash never leaves half of one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def check_regular_file(path: Path, what: str, error: type[Exception]) -> None:
    """``path`` is an existing regular file: a missing path, a folder or a device (``/dev/null``)
    is ``error`` with one line naming ``what``."""
    if not path.exists():
        raise error(f"{what} does not exist")
    if path.is_dir():
        raise error(f"{what} is a folder, not a file")
    if not path.is_file():
        raise error(f"{what} is not a regular file")


def read_text_file(path: Path, what: str, limit: int, error: type[Exception]) -> str:
    """A small UTF-8 text file given by a user; a missing path, a folder, a device, an oversized,
    binary or non-UTF-8 file is ``error`` with one line naming ``what``."""
    check_regular_file(path, what, error)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as err:
        raise error(f"{what} cannot be read: {err.strerror}") from None
    if len(data) > limit:
        raise error(f"{what} is larger than {limit // 1024} KiB")
    if b"\0" in data:
        raise error(f"{what} is a binary file, not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{what} is not UTF-8 text (byte {err.start})") from None


def write_atomically(path: str | Path, write: Callable[[str], object]) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``, which then replaces ``path`` in one
    rename: a crash (even SIGKILL) leaves the old file or the new one, never half of one. The
    temporary file is named ``.<name>.<random>``, which start-up cleanup knows to remove."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
