"""The bad-data policy shared by every loader backend (``data.on_error``).

- ``fail``: the first bad sample stops the run with one line naming its shard and key.
- ``skip``: every bad sample is counted and remembered (shard, key, reason) and the epoch goes
  on without it; the recipe logs them to the console and MLflow. An epoch that skips more than
  ``data.max_bad_fraction`` of its samples stops: that is a broken dataset, not a few bad files.

Bad means: bytes that do not decode as an image, a sample without ``.cls``, a label that is not
an integer or is out of range, or samples lost to a truncated shard. A bad sample is never
replaced by a guess: a silently wrong label is worse than a missing sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.data.manifest import DatasetError


class BadDataError(DatasetError):
    """A bad sample under ``on_error: fail``, or too many under ``skip``; one line, naming it."""


@dataclass(frozen=True)
class BadSample:
    shard: str
    key: str
    reason: str

    def line(self) -> str:
        return f"shard {self.shard} key {self.key}: {self.reason}"


@dataclass
class BadSampleLog:
    """Bad samples seen by one rank's loader; ``take()`` hands over the new ones."""

    policy: str = "fail"
    records: list[BadSample] = field(default_factory=list)
    total: int = 0
    _taken: int = 0

    def record(self, shard: str, key: str, reason: str, count: int = 1) -> None:
        """Note ``count`` bad samples (several when a truncated shard loses its tail)."""
        bad = BadSample(shard, key, reason)
        if self.policy == "fail":
            raise BadDataError(f"bad sample ({bad.line()}); set data.on_error=skip to skip such samples")
        self.records.append(bad)
        self.total += count

    def take(self) -> list[BadSample]:
        new = self.records[self._taken:]
        self._taken = len(self.records)
        return new


def truncated_warning(shards: list[dict[str, Any]], split: str) -> str | None:
    """One line about the samples a split's truncated shards lost (found when the dataset is
    verified, before any step), or None: otherwise they are only counted at the epoch's end."""
    cut = [s for s in shards if s["count"] > s.get("readable", s["count"])]
    if not cut:
        return None
    lost = sum(s["count"] - s.get("readable", s["count"]) for s in cut)
    total = sum(s["count"] for s in shards)
    first = cut[0]
    return (f"[prunepipe] warning: {len(cut)} {split} shard(s) truncated (first: {first['path']}: "
            f"{first.get('problem') or 'truncated'}): {lost} of {total} {split} samples cannot be read "
            f"and are skipped every epoch (data.on_error=skip)")


def parse_label(raw: bytes | None, num_classes: int) -> tuple[int | None, str | None]:
    """A ``.cls`` payload → (label, None), or (None, why it is bad)."""
    if raw is None:
        return None, "no .cls component"
    text = raw.decode("ascii", errors="replace").strip()
    if not text.isdigit() or len(text) > 9:
        return None, f"label {text[:20]!r} is not a non-negative integer"
    label = int(text)
    if label >= num_classes:
        return None, f"label {label} out of range for {num_classes} classes"
    return label, None
