"""The one loader contract every data backend keeps (webdataset, DALI, synthetic).

The engine and the recipe see only this: an iterable of device-resident ``(images, labels)``
batches whose ``len()`` is this epoch's batch count on this rank, re-planned by ``set_epoch``;
the dataset's class count; the rank's log of the bad samples it skipped; and the share of an
epoch that may be skipped before the engine calls the dataset broken. A backend satisfies it
structurally (no base class to inherit); ``tests/test_data.py`` checks every backend against it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from pipeline.data.errors import BadSampleLog


@runtime_checkable
class BatchLoader(Protocol):
    """One rank's loader of one split."""

    num_classes: int
    errors: BadSampleLog  # the bad samples this rank skipped (``data.on_error``)
    max_bad_fraction: float | None  # the engine stops an epoch that skips more; None: no limit

    def set_epoch(self, epoch: int) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
