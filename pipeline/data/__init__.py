"""Datasets as WebDataset shards, and the one loader contract every backend follows.

Exports are imported lazily: ``prunepipe data`` must not pay for importing torch's data stack
(or DALI) before it has validated its arguments.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BatchLoader": "pipeline.data.contract",
    "build_loader": "pipeline.data.loaders",
    "read_manifest": "pipeline.data.manifest",
    "DatasetError": "pipeline.data.manifest",
    "write_digits": "pipeline.data.convert",
    "write_synthetic": "pipeline.data.convert",
    "convert_imagenet": "pipeline.data.imagenet",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
