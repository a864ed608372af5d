"""Doctor a shard folder the way real data goes bad: for the bad-data tests of every backend."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from pipeline.data.shards import index_path, read_index, write_shard


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def manifest(root: Path) -> dict[str, Any]:
    return json.loads((root / "dataset.json").read_text())


def write_manifest_raw(root: Path, value: Any) -> None:
    text = value if isinstance(value, str) else json.dumps(value)
    (root / "dataset.json").write_text(text)


def rewrite_sample(root: Path, shard_rel: str, position: int, **changes: bytes | None) -> str:
    """Rewrite one sample of a shard (component → new bytes, or None to drop it); returns its key."""
    tar = root / shard_rel
    from pipeline.data.shards import iter_members

    samples = []
    for i, (entry, comps) in enumerate(iter_members(tar, read_index(index_path(tar)))):
        sample: dict[str, Any] = {"__key__": entry.key, **comps}
        if i == position:
            key = entry.key
            for ext, value in changes.items():
                if value is None:
                    sample.pop(ext, None)
                else:
                    sample[ext] = value
        samples.append(sample)
    write_shard(tar, samples)
    return key


def truncate_shard(root: Path, shard_rel: str, keep_fraction: float = 0.5, drop_index: bool = False) -> int:
    """Cut a shard's tar (not its index) to a fraction of its size; returns the new size."""
    tar = root / shard_rel
    size = int(tar.stat().st_size * keep_fraction)
    with open(tar, "r+b") as f:
        f.truncate(size)
    if drop_index:
        os.unlink(index_path(tar))
    return size
