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


class LoaderView:
    """Base of a test's view of a real loader (the first ``n`` batches, a counting pass-through):
    the contract's attributes and ``set_epoch`` are the wrapped loader's, so the engine sees the
    same bad-sample log and limit through the view."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.num_classes = loader.num_classes
        self.errors, self.max_bad_fraction = loader.errors, loader.max_bad_fraction

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)
