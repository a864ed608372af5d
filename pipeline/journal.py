"""A trial's durable log: append-only JSON lines in ``<output_dir>/journal.jsonl``.

Every MLflow call a trial makes is first written here as one record (a write-ahead log, the
way databases keep a commit log), so a store that is down, slow or gone when the trial ends
loses nothing: ``prunepipe sync`` replays the records that never reached it
(:mod:`launch.sync`). The journal knows no MLflow; it only keeps records safe.

Crash safety, by construction:

* a record is one line, written with one ``write`` on a descriptor opened ``O_APPEND`` and then
  ``fsync``-ed: bytes already in the file are never rewritten, and a record is on disk before
  the next one starts;
* a crash in the middle of a write leaves at most one torn last line: the reader reports it
  and skips it, and the next writer first ends it with a newline so the torn bytes can never
  run into a later record, then writes a ``torn`` record naming that line, so it stays
  reported and skipped once it has a line end (even when its bytes happen to be a whole record:
  the crash came before its newline, and a record is only written when it is whole);
* one writer at a time: the writer holds an exclusive ``flock`` on the file (the kernel drops
  it when the process dies, even on SIGKILL), so ``sync`` never replays a trial that is still
  running.

Records are grouped into *segments*: a ``start`` record (one per attempt of the trial, one MLflow
run) and everything after it up to the next ``start``. ``synced`` records say up to which
sequence number a segment is in the store.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PrunepipeError

JOURNAL = "journal.jsonl"
VERSION = 1


class JournalError(PrunepipeError, RuntimeError):
    """A journal that cannot be opened for writing (locked by another process too long, unwritable)."""


@dataclass
class Record:
    """One journal line: its sequence number, kind, wall-clock time and data."""

    seq: int
    kind: str
    t: float
    data: dict[str, Any]
    line: int  # 1-based line number in the file, for messages


@dataclass
class Segment:
    """One attempt of a trial: its ``start`` record and what followed it."""

    start: Record
    records: list[Record] = field(default_factory=list)  # after start, bookkeeping kinds excluded
    run_id: str | None = None  # the MLflow run the segment is bound to (a ``run`` record)
    synced_upto: int = -1

    @property
    def key(self) -> str:
        return str(self.start.data["key"])

    @property
    def last_seq(self) -> int:
        return max([self.start.seq, *(r.seq for r in self.records)])

    def pending(self) -> list[Record]:
        """The records not yet in the store, ``start`` included, in order."""
        return [r for r in (self.start, *self.records) if r.seq > self.synced_upto]

    def ended(self) -> bool:
        return any(r.kind == "end" for r in self.records)


# about the journal itself, never replayed: the run a segment is bound to, how far it is
# synced, bad lines already reported, a line a writer found torn
BOOKKEEPING = ("run", "synced", "skipped", "torn")


def read_journal(path: str | Path) -> tuple[list[Record], list[tuple[int, str]]]:
    """Every well-formed record of ``path``, and (line number, message) for each line that is
    not (a torn last line left by a crash mid-write, or a corrupted one): the caller reports it."""
    path = Path(path)
    records, problems = [], []
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        torn = i == len(lines)  # no newline after it: the write never finished
        try:
            obj = json.loads(line.decode("utf-8"))
            if not isinstance(obj, dict) or not isinstance(obj.get("seq"), int) or not isinstance(obj.get("kind"), str):
                raise ValueError("not a journal record")
            if torn:
                raise ValueError("no line end")
        except (ValueError, UnicodeDecodeError) as err:
            problems.append((i, f"{path}: line {i}: a truncated or corrupt record (a crash mid-write?): skipped "
                                f"({str(err)[:80]})"))
            continue
        seq, kind, t = obj.pop("seq"), obj.pop("kind"), float(obj.pop("t", 0.0))
        obj.pop("v", None)
        records.append(Record(seq=seq, kind=kind, t=t, data=obj, line=i))
    torn = {r.data.get("line") for r in records if r.kind == "torn"}
    for r in [r for r in records if r.line in torn]:
        records.remove(r)
        problems.append((r.line, f"{path}: line {r.line}: a truncated or corrupt record (a crash mid-write?): "
                                 "skipped (it had no line end)"))
    return records, sorted(problems)


def segments(records: list[Record]) -> list[Segment]:
    """Records grouped by attempt (records before any ``start`` belong to none and are dropped)."""
    out: list[Segment] = []
    by_key: dict[str, Segment] = {}
    for r in records:
        if r.kind == "start":
            out.append(Segment(start=r))
            by_key[str(r.data["key"])] = out[-1]
        elif r.kind in BOOKKEEPING:
            seg = by_key.get(str(r.data.get("key")))
            if seg is None:
                continue
            if r.kind == "run":
                seg.run_id = str(r.data["run_id"])
            else:
                seg.synced_upto = max(seg.synced_upto, int(r.data["upto"]))
        elif out:
            out[-1].records.append(r)
    return out


class Journal:
    """The writer: ``open`` takes the lock (waiting up to ``wait_s``), ``append`` writes a record."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / JOURNAL
        self._fd: int | None = None
        self._seq = 0

    def open(self, wait_s: float = 60.0, blocking: bool = True) -> Journal:
        """Lock and prepare the journal; :class:`JournalError` if another process holds it
        longer than ``wait_s`` (or at all, when not ``blocking``)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as err:
            raise JournalError(f"{self.path}: cannot open the journal ({err.strerror})") from None
        deadline = time.monotonic() + (wait_s if blocking else 0.0)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                    os.close(fd)
                    raise JournalError(f"{self.path}: in use by another process (a trial still running, "
                                       "or a sync)") from None
                time.sleep(0.2)
        self._fd = fd
        torn = self._end_torn_line()
        records, _ = read_journal(self.path)
        self._seq = max((r.seq for r in records), default=-1) + 1
        if torn:
            self.append("torn", line=torn)
        return self

    def _end_torn_line(self) -> int | None:
        """End a last line that has no newline (a crash mid-write) and return its number."""
        size = os.fstat(self._fd).st_size
        if not size or os.pread(self._fd, 1, size - 1) == b"\n":
            return None
        with open(self.path, "rb") as f:
            line = f.read().count(b"\n") + 1
        self._write(b"\n")  # a torn last record stays on a line of its own
        return line

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def append(self, kind: str, **data: Any) -> Record:
        """Write one record durably (one write, then fsync) and return it."""
        if self._fd is None:
            raise JournalError(f"{self.path}: not open")
        rec = Record(seq=self._seq, kind=kind, t=time.time(), data=data, line=0)
        line = json.dumps({"seq": rec.seq, "kind": kind, "t": rec.t, "v": VERSION, **data}, default=str)
        self._write(line.encode("utf-8") + b"\n")
        self._seq += 1
        return rec

    def _write(self, payload: bytes) -> None:
        view = memoryview(payload)
        while view:  # a regular file takes it whole; the loop only guards a short write
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None


def find_journals(root: str | Path) -> list[Path]:
    """Every journal under ``root`` (``root``'s own included), sorted."""
    root = Path(root)
    return sorted(p for p in root.rglob(JOURNAL) if p.is_file())
