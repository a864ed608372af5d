"""PyTorch DDP (gloo on CPU, nccl on GPU); a single process trains the bare model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline.backends import broadcast_buffers

if TYPE_CHECKING:
    from pipeline.config import TrainConfig
    from pipeline.distributed import DistInfo


def wrap_ddp(model: nn.Module, info: DistInfo, channels_last: bool = False) -> nn.Module:
    model = model.to(info.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if not info.distributed:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    # syncing buffers keeps BN running statistics identical on every rank (rank 0's)
    return DDP(model, device_ids=ids, forward_sync_buffers=True,
               find_unused_parameters=leaves_parameters_unused(model))


def leaves_parameters_unused(model: nn.Module) -> bool:
    """True if a submodule declares ``leaves_parameters_unused = True``: some steps give its
    parameters no gradient (a pruning method's gates of a stage not being trained). DDP must
    then search the graph for unused parameters after each forward, or its reducer waits for
    their gradients forever ("Expected to have finished reduction..."); the search costs a graph
    walk per step, so only models that declare it pay for it."""
    return any(getattr(m, "leaves_parameters_unused", False) for m in model.modules())


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DDP) else model


class DDPBackend:
    """DDP with torch's GradScaler (fp16 only), optional clipping and gradient accumulation.

    The module's parameters *are* the optimizer's, so a hook's in-place edit needs nothing more.
    """

    name = "ddp"

    def __init__(
        self, train: TrainConfig, info: DistInfo, micro_batch: int, amp: torch.dtype | None = None,
        channels_last: bool = False,
    ) -> None:
        self.info, self.accum, self.clip = info, train.grad_accum, train.grad_clip
        self.amp, self.channels_last = amp, channels_last
        self._model: nn.Module | None = None
        self._fresh = True  # the next backward starts a new accumulation

    def wrap(self, model, optimizer, scheduler) -> None:
        self._model = wrap_ddp(model, self.info, self.channels_last)
        self._opt, self._sched = optimizer, scheduler
        self._scaler = torch.amp.GradScaler(self.info.device.type, enabled=self.amp is torch.float16)
        self._fresh = True

    @property
    def module(self) -> nn.Module:
        return unwrap(self._model)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._opt

    @contextmanager
    def accumulate(self, boundary: bool) -> Iterator[None]:
        # Between boundaries gradients accumulate locally: DDP decides in forward whether the
        # coming backward all-reduces, so forward and backward both run inside no_sync.
        if boundary or not isinstance(self._model, DDP):
            yield
        else:
            with self._model.no_sync():
                yield

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._model(images)

    def backward_step(self, loss: torch.Tensor, boundary: bool) -> None:
        if self._fresh:
            # zeroed before the first backward rather than after the step, so that the last
            # step's gradients stay readable after an epoch (the DDP test compares them)
            self._opt.zero_grad(set_to_none=True)
            self._fresh = False
        self._scaler.scale(loss / self.accum).backward()
        if not boundary:
            return
        if self.clip > 0:
            self._scaler.unscale_(self._opt)
            # tensors only: no host synchronisation
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self._scaler.step(self._opt)
        self._scaler.update()
        if self._sched is not None:
            self._sched.step()
        self._fresh = True

    def params_edited(self) -> None:
        """Nothing to do: the optimizer holds the module's own parameters."""

    def sync_buffers(self) -> None:
        broadcast_buffers(self.module, self.info)

    def state_dict(self) -> dict[str, Any]:
        return self._opt.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._opt.load_state_dict(state)

    def close(self) -> None:
        self._model = self.module  # the DDP wrapper (and its gradient hooks) goes with it
