"""Small objects many tests build: kept here once, not re-written per test module."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pipeline.data.errors import BadSampleLog


class ListLoader:
    """A :class:`~pipeline.data.contract.BatchLoader` over fixed batches: ``n`` seeded batches of
    ``batch`` random ``size``² images and labels below ``classes``, the same every epoch."""

    max_bad_fraction = None

    def __init__(self, n: int = 3, batch: int = 4, size: int = 8, classes: int = 3, seed: int = 0,
                 device: torch.device | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        self.batches = [(torch.randn(batch, 3, size, size, generator=g).to(device or "cpu"),
                         torch.randint(0, classes, (batch,), generator=g).to(device or "cpu")) for _ in range(n)]
        self.num_classes = classes
        self.errors = BadSampleLog()

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.batches)
