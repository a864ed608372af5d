"""Training backends: the one seam where DDP and DeepSpeed differ.

The engine trains through a :class:`TrainingBackend` and never asks which one runs; the recipe
and every pruning method see only ``backend.module`` (the plain ``nn.Module`` whose parameters
are trained) and ``backend.optimizer``. A backend owns what differs between the two: wrapping
the model and optimizer, the gradient-accumulation details (DDP's ``no_sync``, DeepSpeed's
boundary flag), backward + step (+ loss scaling, clipping), making the
optimizer see parameters a method hook edited in place, and the optimizer state for checkpoints.

Backends are registered by name in :data:`BACKENDS` ("module:Class", imported on first use, so
a DDP run never imports DeepSpeed).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from pipeline.config import TrainConfig
    from pipeline.distributed import DistInfo

BACKENDS: dict[str, str] = {
    "ddp": "pipeline.backends.ddp:DDPBackend",
    "deepspeed": "pipeline.backends.deepspeed:DeepSpeedBackend",
}


def backend_names() -> list[str]:
    return sorted(BACKENDS)


class TrainingBackend(Protocol):
    """What the engine needs from a training backend.

    Life cycle: ``wrap`` once per training phase, then per micro-batch
    ``with accumulate(boundary): forward → backward_step``; after a hook edited parameters in
    place, ``params_edited``; at the end of an epoch ``sync_buffers``; ``close`` ends the phase.
    """

    name: str

    @property
    def module(self) -> nn.Module:
        """The plain model being trained (not a wrapper): hooks, evaluation and checkpoints use it."""

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """prunepipe's own optimizer; its ``param_groups`` carry the live learning rates."""

    def wrap(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler | None
    ) -> None:
        """Take over ``model``, ``optimizer`` and ``scheduler`` (the engine passes None: it steps the
        schedule itself, after the method's hook; a scheduler given here is stepped per optimizer step)."""

    def accumulate(self, boundary: bool) -> AbstractContextManager[None]:
        """Context for one micro-batch's forward and backward; ``boundary``: the optimizer steps after it."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The wrapped model's forward (DDP's or DeepSpeed's, which sync or gather as they need)."""

    def backward_step(self, loss: torch.Tensor, boundary: bool) -> None:
        """Backward of ``loss`` / grad_accum; at a boundary: clip, step, schedule, and start a new accumulation."""

    def params_edited(self) -> None:
        """A hook changed ``module``'s parameters in place: make the optimizer's copies agree (collective-free)."""

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BN running statistics)."""

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state, whole, in ``torch.optim`` format (a collective under ZeRO: call on every rank)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (after :meth:`wrap`)."""

    def close(self) -> None:
        """End the phase: remove what the backend hooked into ``module``, which stays usable."""


def make_backend(
    train: TrainConfig, info: DistInfo, micro_batch: int, amp: torch.dtype | None = None, channels_last: bool = False
) -> TrainingBackend:
    """The backend ``train.backend`` names, configured from the project config."""
    if train.backend not in BACKENDS:
        raise KeyError(f"train.backend = {train.backend!r}: allowed values are {', '.join(backend_names())}")
    module, _, cls = BACKENDS[train.backend].partition(":")
    return getattr(importlib.import_module(module), cls)(train, info, micro_batch, amp, channels_last)


def _buffers(module: nn.Module) -> Iterator[torch.Tensor]:
    return (b for b in module.buffers() if b.numel())


@torch.no_grad()
def broadcast_buffers(module: nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers on every rank, in one coalesced broadcast per dtype.

    BatchNorm's running statistics are updated locally by every rank's own batches; DDP's
    ``forward_sync_buffers`` overwrites them with rank 0's before each forward, which leaves
    rank 0's trajectory (its own batches) as the result. Broadcasting at the end of an epoch gives
    every rank that same state, so evaluation and checkpoints agree whatever the backend.
    """
    if not info.distributed:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in _buffers(module):
        by_dtype.setdefault(b.dtype, []).append(b)
    for bufs in by_dtype.values():
        flat = torch.cat([b.reshape(-1) for b in bufs])
        torch.distributed.broadcast(flat, src=0)
        offset = 0
        for b in bufs:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()
