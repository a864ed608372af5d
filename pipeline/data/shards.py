"""WebDataset shards on disk: atomic writing, DALI index files, cheap verification.

A shard is a plain POSIX tar whose members are ``<key>.<ext>``; the members of one sample are
adjacent. Beside every shard lies its index in DALI's ``v1.2`` text format::

    v1.2 <samples>
    <ext> <data offset> <size> <member name> <ext> <offset> <size> <name> ...   (one line a sample)

DALI's webdataset reader needs the index (without it, it scans every tar at start-up); the
PyTorch loader does not, but prunepipe uses it everywhere to count samples and to notice a
truncated shard without reading it.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PrunepipeError
from pipeline.textfiles import write_atomically

INDEX_VERSION = "v1.2"


class ShardError(PrunepipeError, ValueError):
    """A shard or index file that cannot be read as what it claims to be."""


@dataclass(frozen=True)
class Component:
    ext: str
    offset: int  # of the member's data in the tar
    size: int
    name: str


@dataclass(frozen=True)
class IndexEntry:
    """One sample of a shard: its key and the byte ranges of its components."""

    key: str
    components: tuple[Component, ...]

    def end(self) -> int:
        return max(c.offset + c.size for c in self.components)

    def line(self) -> str:
        return " ".join(f"{c.ext} {c.offset} {c.size} {c.name}" for c in self.components)


def split_name(name: str) -> tuple[str, str]:
    """``dir/abc.cls.txt`` → (``dir/abc``, ``cls.txt``): the extension starts at the first dot
    of the base name, as WebDataset and DALI both define it."""
    base = name.rfind("/") + 1
    dot = name.find(".", base)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


def index_path(tar_path: str | Path) -> Path:
    tar_path = Path(tar_path)
    return tar_path.with_suffix(".idx")


def write_shard(tar_path: str | Path, samples: Iterable[dict[str, bytes | str]]) -> list[IndexEntry]:
    """Write ``samples`` (``{"__key__": key, ext: bytes, ...}``) as a tar plus its index, atomically.

    Both files are written under temporary names and renamed at the end, index last: a crash
    leaves either nothing or a complete pair, never a shard that looks finished and is not.
    """
    tar_path = Path(tar_path)
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    entries: list[IndexEntry] = []
    fd, tmp_tar = tempfile.mkstemp(dir=tar_path.parent, prefix=f".{tar_path.name}.")
    os.close(fd)
    tmp_idx = tmp_tar + ".idx"
    try:
        with tarfile.open(tmp_tar, "w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                key = str(sample["__key__"])
                if not key or "." in key.rsplit("/", 1)[-1] or key.startswith("."):
                    raise ShardError(f"sample key {key!r}: must be non-empty, without dots in its base name")
                comps = []
                for ext, value in sample.items():
                    if ext.startswith("__"):
                        continue
                    data = value.encode() if isinstance(value, str) else bytes(value)
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mode, info.mtime = len(data), 0o444, 0
                    info.uname = info.gname = "prunepipe"
                    tar.addfile(info, io.BytesIO(data))
                    # tar.offset now sits after the data, padded to whole 512-byte blocks
                    data_offset = tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                    comps.append(Component(ext, data_offset, len(data), info.name))
                entries.append(IndexEntry(key, tuple(comps)))
        _write_index_file(tmp_idx, entries)
        os.replace(tmp_tar, tar_path)
        os.replace(tmp_idx, index_path(tar_path))
    finally:
        for leftover in (tmp_tar, tmp_idx):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return entries


def _write_index_file(path: str | Path, entries: list[IndexEntry]) -> None:
    with open(path, "w") as f:
        f.write(f"{INDEX_VERSION} {len(entries)}\n")
        for e in entries:
            f.write(e.line() + "\n")


def write_index(path: str | Path, entries: list[IndexEntry]) -> None:
    """Write an index (of a whole shard or of a subset of its samples: DALI reads either)."""
    write_atomically(path, lambda tmp: _write_index_file(tmp, entries))


def read_index(path: str | Path, max_bytes: int = 1 << 30) -> list[IndexEntry]:
    """Parse an index file; anything malformed is a :class:`ShardError` naming the file and line."""
    path = Path(path)
    try:
        if path.stat().st_size > max_bytes:
            raise ShardError(f"index {path}: larger than {max_bytes} bytes")
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as err:
        raise ShardError(f"index {path}: cannot be read ({type(err).__name__})") from None
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise ShardError(f"index {path}: first line must be '{INDEX_VERSION} <samples>'")
    entries = []
    for n, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if not parts or len(parts) % 4:
            raise ShardError(f"index {path} line {n}: expected groups of '<ext> <offset> <size> <name>'")
        comps = []
        for i in range(0, len(parts), 4):
            ext, off, size, name = parts[i:i + 4]
            if not (off.isdigit() and size.isdigit()):
                raise ShardError(f"index {path} line {n}: offset and size must be non-negative integers")
            comps.append(Component(ext, int(off), int(size), name))
        entries.append(IndexEntry(split_name(comps[0].name)[0], tuple(comps)))
    if len(entries) != int(head[1]):
        raise ShardError(f"index {path}: header says {head[1]} samples, the file lists {len(entries)}")
    return entries


def scan_tar(tar_path: str | Path) -> tuple[list[IndexEntry], str | None]:
    """Index a tar by reading its headers only (data is skipped, not read).

    Returns the complete samples found and, if the tar ends mid-way (truncated or corrupt),
    the reason: the samples before the break are still usable.
    """
    entries: list[IndexEntry] = []
    current: list[Component] = []
    current_key: str | None = None
    problem = None
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, ext = split_name(member.name)
                if not key or key.rsplit("/", 1)[-1].startswith("."):
                    continue
                if key != current_key and current:
                    entries.append(IndexEntry(current_key or "", tuple(current)))
                    current = []
                current_key = key
                current.append(Component(ext, member.offset_data, member.size, member.name))
            end = tar.offset  # just past the last member's (padded) data
        size = os.path.getsize(tar_path)
        if current and max(c.offset + c.size for c in current) > size:
            problem = "the tar ends inside its last member (truncated)"
            current = []
        elif not _has_end_marker(tar_path, end, size):
            # tarfile stops quietly at a cut header: only the missing end-of-archive blocks tell
            problem = f"truncated after {len(entries) + bool(current)} samples (no end-of-archive marker)"
    except (tarfile.TarError, OSError, EOFError) as err:
        problem = f"unreadable after {len(entries)} samples ({type(err).__name__}: {err})".rstrip(": ")
        current = []  # the sample being read when it broke may be incomplete
    if current:
        entries.append(IndexEntry(current_key or "", tuple(current)))
    return entries, problem


def _has_end_marker(tar_path: str | Path, end: int, size: int) -> bool:
    """A complete tar ends with two zero blocks after its last member."""
    if size < end + 2 * tarfile.BLOCKSIZE:
        return False
    with open(tar_path, "rb") as f:
        f.seek(end)
        return f.read(2 * tarfile.BLOCKSIZE) == bytes(2 * tarfile.BLOCKSIZE)


def iter_members(tar_path: str | Path, entries: list[IndexEntry]) -> Iterator[tuple[IndexEntry, dict[str, bytes]]]:
    """Read the given samples of a tar by offset (sequentially when ``entries`` are in order)."""
    with open(tar_path, "rb") as f:
        for e in entries:
            comps = {}
            for c in e.components:
                f.seek(c.offset)
                comps[c.ext] = f.read(c.size)
            yield e, comps
