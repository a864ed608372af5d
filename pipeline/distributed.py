"""Distributed state from the environment: torchrun, Ray Train or a single process.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a Ray Train worker already has a process group.
Either way the same recipe runs; rank 0 alone logs, checkpoints and registers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


_control_group: Any = None
_owned = False  # this process created the default group (torchrun), so it must tear it down


def init_distributed() -> DistInfo:
    """Join (or reuse) the process group: nccl on GPUs, gloo on CPU."""
    global _owned
    cuda = torch.cuda.is_available()
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        _owned = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count() or 1)))
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return DistInfo(rank, world, local_rank, device)


def is_main_process() -> bool:
    """Rank 0 of the joined process group, or a process outside any group (asks, joins nothing)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def shutdown_distributed() -> None:
    """Destroy the process group this process created, before the interpreter exits.

    Left to interpreter teardown, gloo's worker threads are sometimes destroyed while still
    joinable and the rank dies with SIGABRT ("terminate called without an active exception")
    after its work is done, which torchrun reports as a failed job. A group that Ray Train or a
    caller created is theirs to close and is left alone.
    """
    global _owned, _control_group
    if _owned and dist.is_initialized():
        dist.destroy_process_group()
    _owned, _control_group = False, None


def control_group(info: DistInfo) -> Any:
    """A gloo group for small host-side decisions (has every rank a batch?) that must not wait
    on the GPU stream: under nccl, a flag on the default group would sync the device."""
    global _control_group
    if not info.distributed:
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    if _control_group is None:
        _control_group = dist.new_group(backend="gloo")  # collective: every rank gets here together
    return _control_group


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's object on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, as a list on rank 0 (an empty list elsewhere)."""
    if not info.distributed:
        return [obj]
    box: list[Any] | None = [None] * info.world if info.is_main else None
    dist.gather_object(obj, box, dst=0)
    return box or []


def assert_same_on_all_ranks(masks: dict[str, torch.Tensor], info: DistInfo) -> None:
    """Every mask decision must agree across ranks; a silent disagreement corrupts DDP."""
    if not info.distributed:
        return
    flat = torch.cat([masks[k].flatten().to(torch.float64) for k in sorted(masks)]).to(info.device)
    lo, hi = flat.clone(), flat.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError("keep-masks differ between ranks: a method decision is not rank-consistent")
