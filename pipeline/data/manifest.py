"""``dataset.json``: the manifest of a shard folder, validated and checked against the shards.

The manifest is input like any other: a careless or hostile one must not open files outside
``data.root``, make a loader believe counts the shards do not hold, or reach a traceback.
So it is validated against a schema, every shard path must stay inside the root, and the
declared counts are verified when the dataset is opened, cheaply: from each shard's index file
(a header line and the end offset of the last sample), or from the tar headers when a shard
has no index. A count that disagrees with the shard is an error (the manifest is wrong); a
shard that ends early (truncated) is bad data, handled by ``data.on_error``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.data.shards import ShardError, index_path, read_index, scan_tar
from pipeline.errors import PrunepipeError

MANIFEST = "dataset.json"
_MAX_MANIFEST_BYTES = 256 << 20  # ImageNet's manifest is ~0.2 MB; anything near this is not a manifest


class DatasetError(PrunepipeError, ValueError):
    """A dataset folder that is missing, incomplete or inconsistent (one line, naming it)."""


class ShardEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1)  # relative to the dataset root
    count: int = Field(ge=0, le=100_000_000)
    index: str | None = None  # DALI index file, relative to the root (default: beside the tar)


class Splits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train: list[ShardEntry] = Field(min_length=1)
    val: list[ShardEntry] = Field(min_length=1)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # tools may add notes; what is read is checked
    name: str = "dataset"
    num_classes: int = Field(ge=2, le=1_000_000)
    image_size: int = Field(ge=8, le=4096)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classes: list[str] | None = None  # class names (wnids), position = label
    splits: Splits

    @field_validator("mean")
    @classmethod
    def _mean(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not all(math.isfinite(x) and 0.0 <= x <= 1.0 for x in v):
            raise ValueError("each channel mean must be in [0, 1]")
        return v

    @field_validator("std")
    @classmethod
    def _std(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not all(math.isfinite(x) and 1e-4 <= x <= 1.0 for x in v):
            raise ValueError("each channel std must be in [1e-4, 1]")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.classes is not None and len(self.classes) != self.num_classes:
            raise ValueError(f"classes lists {len(self.classes)} names for num_classes {self.num_classes}")
        for split in ("train", "val"):
            paths = [s.path for s in getattr(self.splits, split)]
            if len(set(paths)) != len(paths):
                raise ValueError(f"splits.{split} lists a shard twice")
            if sum(s.count for s in getattr(self.splits, split)) == 0:
                raise ValueError(f"splits.{split} holds no samples")
        return self


def _inside(root: Path, rel: str, what: str) -> Path:
    """``root/rel``, refusing anything that resolves outside the root (``..``, absolute, links)."""
    if os.path.isabs(rel) or "\x00" in rel:
        raise DatasetError(f"data.root = {str(root)!r}: {what} {rel!r} must be a path relative to the root")
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise DatasetError(f"data.root = {str(root)!r}: {what} {rel!r} points outside the dataset folder")
    return path


def _load_json(root: Path) -> Any:
    path = root / MANIFEST
    if not path.is_file():
        hint = f"make one with `prunepipe data digits --out {root}` or `prunepipe data imagenet --src ... --out {root}`"
        raise DatasetError(f"data.root = {str(root)!r}: no {MANIFEST} there ({hint})")
    if path.stat().st_size > _MAX_MANIFEST_BYTES:
        raise DatasetError(f"{path}: larger than {_MAX_MANIFEST_BYTES >> 20} MB, not a manifest")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise DatasetError(f"{path}: not valid JSON ({str(err).splitlines()[0][:120]})") from None


def _schema_error(path: Path, err: ValidationError) -> DatasetError:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    given = f" = {e['input']!r}"[:80] if loc and not isinstance(e.get("input"), dict | list) else ""
    return DatasetError(f"{path}: {loc or 'manifest'}{given}: {msg}")


def verify_shard(root: Path, shard: dict[str, Any]) -> dict[str, Any]:
    """How many samples the shard really holds, from its index (cheap) or its tar headers.

    Returns the shard entry with ``readable`` (complete samples that can be read) and
    ``problem`` (why some cannot, or None). Raises :class:`DatasetError` when the shard is
    missing or its count disagrees with the manifest's.
    """
    tar = _inside(root, shard["path"], "shard")
    if not tar.is_file():
        raise DatasetError(f"data.root = {str(root)!r}: shard {shard['path']} is listed in {MANIFEST} but missing")
    idx = _inside(root, shard["index"], "index") if shard.get("index") else index_path(tar)
    size = tar.stat().st_size
    problem = None
    if idx.is_file():
        try:
            entries = read_index(idx)
        except ShardError as err:
            raise DatasetError(str(err)) from None
        readable = sum(1 for e in entries if e.end() <= size)
        if readable < len(entries):
            problem = f"truncated: {len(entries) - readable} of {len(entries)} samples lie past the end of the tar"
        found = len(entries)
    else:
        entries, problem = scan_tar(tar)
        readable = found = len(entries)
        if problem is not None:
            found = shard["count"]  # a broken tar cannot prove the manifest wrong
    if size == 0 and problem is not None:
        problem = "the tar is empty (0 bytes)"
    if found != shard["count"]:
        raise DatasetError(
            f"{MANIFEST}: shard {shard['path']} is declared with {shard['count']} samples but holds {found}: "
            "the manifest does not describe these shards (re-create it with `prunepipe data`)"
        )
    return {**shard, "readable": readable, "problem": problem, "index_file": str(idx) if idx.is_file() else None}


_verified: dict[tuple, dict[str, Any]] = {}


def read_manifest(root: str | Path, verify: bool = True) -> dict[str, Any]:
    """The validated manifest of a dataset folder as a dict; with ``verify``, every shard is
    checked to exist inside the root and to hold its declared count (cached per process)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data.root = {str(root)!r}: not a folder")
    stat = (root / MANIFEST).stat() if (root / MANIFEST).is_file() else None
    key = (str(root.resolve()), stat.st_mtime_ns if stat else None, stat.st_size if stat else None, verify)
    if key in _verified:
        return _verified[key]
    raw = _load_json(root)
    if not isinstance(raw, dict):
        raise DatasetError(f"{root / MANIFEST}: must hold a JSON object at the top level")
    try:
        manifest = Manifest.model_validate(raw).model_dump()
    except ValidationError as err:
        raise _schema_error(root / MANIFEST, err) from None
    for split in ("train", "val"):
        shards = manifest["splits"][split]
        for i, shard in enumerate(shards):
            _inside(root, shard["path"], "shard")
            shards[i] = verify_shard(root, shard) if verify else {**shard, "readable": shard["count"], "problem": None}
    _verified[key] = manifest
    return manifest
