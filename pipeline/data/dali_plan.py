"""Which samples one rank's DALI pipeline reads in an epoch: prunepipe's own sharding.

DALI's ``num_shards`` splits by sample count inside one fixed file list and knows nothing of
prunepipe's bad-sample quarantine, so the DALI backend does not use it. Instead, every epoch:

1. the global sample list is the verified shards' usable samples (train: the shard order is
   permuted by ``(seed, epoch)``, the same permutation on every rank; val: manifest order)
   concatenated, minus the quarantine (samples found bad earlier, agreed on by all ranks);
2. rank ``r`` takes a contiguous chunk of it (:func:`epoch_plan`);
3. the chunk is written as index files listing subsets of the shards' samples (DALI's
   webdataset reader reads exactly the samples an index lists, which need not be all of a
   tar's: checked in tests/test_dali.py) and one pipeline with ``num_shards=1`` reads them.

Train chunks all hold exactly ``quota = floor(N / world)`` samples, so every rank takes the
same number of steps by construction; the ``N mod world`` left over are dropped at a random
place (seeded by the epoch), so a different few each epoch. Val chunks differ by at most one
sample and cover every sample exactly once.

Nothing here imports DALI: plans and scans are plain Python, testable without it.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.data.errors import BadSampleLog
from pipeline.data.manifest import DatasetError
from pipeline.data.shards import IndexEntry, ShardError, read_index, scan_tar, write_index
from pipeline.progress import progress

# the two components every sample must have; anything else in a sample is ignored
IMAGE_EXT, LABEL_EXT = "jpg", "cls"
_SCAN_BLOCK = 256  # images held in memory at once by the decode scan


@dataclass(frozen=True)
class Shard:
    """One tar: its manifest name (used in bad-sample records), its path, its usable samples."""

    rel: str
    path: Path
    entries: tuple[IndexEntry, ...]


@dataclass(frozen=True)
class Segment:
    """A run of consecutive samples of one shard inside a rank's chunk."""

    shard: Shard
    entries: tuple[IndexEntry, ...]


def _note(errors: BadSampleLog, owner: bool, shard: str, key: str, reason: str, count: int = 1) -> None:
    # Every rank sees the plan-time bad samples; under skip only one rank records each, so the
    # ranks' logs add up to the true count. Under fail every rank raises (none is left waiting).
    if owner or errors.policy == "fail":
        errors.record(shard, key, reason, count=count)


def load_shards(root: Path, manifest_shards: list[dict[str, Any]], errors: BadSampleLog, rank: int, world: int) -> list[Shard]:
    """The usable samples of each verified manifest shard (see :func:`read_manifest`).

    Samples past the end of a truncated tar (one record per shard, with the count) and samples
    without a ``.jpg`` or ``.cls`` component (known from the index, before anything is read)
    are recorded in ``errors`` and left out. A shard without an index file is indexed from its
    tar headers (:func:`scan_tar`).
    """
    shards = []
    for i, s in enumerate(manifest_shards):
        owner = i % world == rank
        tar = (root / s["path"]).resolve()
        if s.get("index_file"):
            try:
                entries = read_index(s["index_file"])
            except ShardError as err:
                raise DatasetError(str(err)) from None
        else:
            entries, _ = scan_tar(tar)
        size = tar.stat().st_size
        readable = [e for e in entries if e.end() <= size]
        lost = s["count"] - len(readable)
        if lost > 0:
            first = entries[len(readable)].key if len(entries) > len(readable) else f"(after {readable[-1].key})" if readable else "(all)"
            reason = s.get("problem") or "truncated shard"
            _note(errors, owner, s["path"], first, f"{lost} sample(s) from here on unreadable: {reason}", count=lost)
        usable = []
        for e in readable:
            exts = {c.ext for c in e.components}
            missing = [x for x in (IMAGE_EXT, LABEL_EXT) if x not in exts]
            if missing:
                _note(errors, owner, s["path"], e.key, f"no .{missing[0]} component")
                continue
            usable.append(e)
        shards.append(Shard(s["path"], tar, tuple(usable)))
    return shards


def epoch_plan(
    shards: list[Shard], exclude: set[tuple[str, str]], train: bool, seed: int, epoch: int, rank: int, world: int
) -> tuple[list[Segment], int]:
    """This rank's chunk of the epoch's global sample list, and the list's length.

    ``exclude`` holds ``(shard, key)`` pairs (the quarantine). It must be the same on every
    rank, or chunks overlap. Train: exactly ``len // world`` samples per rank; val: every
    sample on exactly one rank.
    """
    order = list(range(len(shards)))
    rng = random.Random(f"prunepipe-dali/{seed}/{epoch}")  # str seeds are hashed deterministically
    if train:
        rng.shuffle(order)
    good: list[tuple[Shard, tuple[IndexEntry, ...]]] = []
    for i in order:
        sh = shards[i]
        entries = sh.entries if not exclude else tuple(e for e in sh.entries if (sh.rel, e.key) not in exclude)
        good.append((sh, entries))
    n = sum(len(e) for _, e in good)
    if train:
        quota = n // world
        start = rng.randrange(n - quota * world + 1) + rank * quota  # the leftover moves every epoch
        stop = start + quota
    else:
        base, extra = divmod(n, world)
        start = rank * base + min(rank, extra)
        stop = start + base + (rank < extra)
    segments, pos = [], 0
    for sh, entries in good:
        lo, hi = max(start, pos), min(stop, pos + len(entries))
        if lo < hi:
            segments.append(Segment(sh, entries[lo - pos:hi - pos]))
        pos += len(entries)
    return segments, n


def drop_samples(segments: list[Segment], exclude: set[tuple[str, str]], skip: int = 0) -> list[Segment]:
    """``segments`` without the first ``skip`` samples and without those in ``exclude``."""
    out = []
    for seg in segments:
        entries = seg.entries[skip:]
        skip = max(0, skip - len(seg.entries))
        entries = tuple(e for e in entries if (seg.shard.rel, e.key) not in exclude)
        if entries:
            out.append(Segment(seg.shard, entries))
    return out


def write_indexes(segments: list[Segment], folder: Path) -> tuple[list[str], list[str]]:
    """One index file per segment in ``folder``; returns DALI's ``(paths, index_paths)``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, indexes = [], []
    for j, seg in enumerate(segments):
        idx = folder / f"{j:05d}.idx"
        write_index(idx, list(seg.entries))
        paths.append(str(seg.shard.path))
        indexes.append(str(idx))
    return paths, indexes


def _decode_problem(data: bytes) -> str | None:
    """Why PIL cannot decode ``data`` as an image, or None."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            # JPEG: decode at 1/8 scale (libjpeg's DCT scaling, several times faster); every
            # entropy-coded block is still parsed, so truncated or corrupt streams still fail
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except Exception as err:  # noqa: BLE001 - any failure to decode makes the sample bad
        return f"undecodable image ({type(err).__name__})"
    return None


def _images(segments: list[Segment]) -> Iterator[tuple[str, str, bytes]]:
    for seg in segments:
        with open(seg.shard.path, "rb") as f:
            for e in seg.entries:
                comp = next(c for c in e.components if c.ext == IMAGE_EXT)
                f.seek(comp.offset)
                yield seg.shard.rel, e.key, f.read(comp.size)


def find_undecodable(segments: list[Segment], threads: int, first_only: bool = False, desc: str = "scan") -> list[tuple[str, str, str]]:
    """``(shard, key, reason)`` of every sample in ``segments`` whose image PIL cannot decode.

    Used after DALI's decoder failed on a batch: DALI's error does not say which sample, so the
    rank's chunk is read again and decoded by PIL in ``threads`` threads (its decoder releases
    the GIL). ``first_only`` stops at the first bad block (``on_error: fail``).
    """
    found: list[tuple[str, str, str]] = []
    total = sum(len(s.entries) for s in segments)
    it = _images(segments)
    with ThreadPoolExecutor(max(1, threads)) as pool, progress(total=total, desc=desc, unit="img", leave=False) as bar:
        while True:
            block = [x for _, x in zip(range(_SCAN_BLOCK), it, strict=False)]
            if not block:
                break
            for (shard, key, _), why in zip(block, pool.map(_decode_problem, [b for _, _, b in block]), strict=True):
                if why is not None:
                    found.append((shard, key, why))
            bar.update(len(block))
            if found and first_only:
                break
    return found
