"""Width allocators: how many channels each group keeps, apart from which ones.

A method scores the channels of every group by its own criterion (:meth:`Method.scores`); a
*width allocator*, named by ``prune.allocate``, turns the groups and a :class:`Budget` into a
kept count per group; one shared top-k (``pipeline.surgery.structured_topk``, group-structured
for ResNeXt) makes the masks. A training-aware method that needs its budget during the pruning
phase (AutoPruner's per-layer target, ABP's budget term, ISTA's exact budget) is given the
counts before that phase (:meth:`Method.set_counts`) and fills each group to its count.

Allocators are registered by name, as methods are (docs/architecture.md, "Scores apart from
allocation"): ``uniform`` is the uniform ``prune_ratio`` every method had before, ``round_to``
included; ``loss`` is the loss-variation allocator of lossvar (methods/lossvar.py, registered
there beside the search it runs). A latency allocator fits the same seam.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

from methods.base import NoOptions, keep_count

if TYPE_CHECKING:
    from torch import nn

    from methods.base import SelectContext
    from pipeline.surgery import ChannelGroup

_ALLOCATORS: dict[str, type[Allocator]] = {}


@dataclass(frozen=True)
class Budget:
    """What the trial asks of the widths: the uniform ratio (the target every allocator
    compares with when it has none of its own) and the multiple kept widths are rounded to."""

    prune_ratio: float
    round_to: int = 1
    target_speedup: float | None = None  # a measured speed-up to reach (the latency allocator)


def register_allocator(cls: type[Allocator]) -> type[Allocator]:
    """Class decorator: make an allocator available under ``cls.name``."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} needs a class attribute `name`")
    if cls.name in _ALLOCATORS and _ALLOCATORS[cls.name] is not cls:
        raise ValueError(f"allocator name {cls.name!r} is registered twice")
    _ALLOCATORS[cls.name] = cls
    return cls


def get_allocator_class(name: str) -> type[Allocator]:
    return _ALLOCATORS[name]


def allocator_names() -> list[str]:
    return sorted(_ALLOCATORS)


class Allocator(ABC):
    """Base class of every width allocator. Subclass, set ``name``, decorate with @register_allocator."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: dict[str, Any] | BaseModel | None = None) -> None:
        self.options = options if isinstance(options, BaseModel) else self.Options(**(options or {}))

    def calibration_samples(self) -> int:
        """Size of the calibration set :meth:`allocate` needs (0: none)."""
        return 0

    @abstractmethod
    def allocate(self, model: nn.Module, groups: list[ChannelGroup], budget: Budget,
                 ctx: SelectContext | None = None) -> dict[str, int]:
        """Kept channels per group, ``{group.name: count}`` with 1 ≤ count ≤ group.size.
        Every rank must get the same counts (batch-dependent allocators all-reduce)."""

    def summary(self) -> dict[str, Any]:
        """Numbers worth reporting about the allocation (δ found, loss evaluations, rates)."""
        return {}


@register_allocator
class Uniform(Allocator):
    """Every group loses ``floor(N · prune_ratio)`` channels, rounded as :func:`keep_count` says:
    the widths every method had before allocators were apart from methods."""

    name = "uniform"

    def allocate(self, model: nn.Module, groups: list[ChannelGroup], budget: Budget,
                 ctx: SelectContext | None = None) -> dict[str, int]:
        return {g.name: keep_count(g.size, budget.prune_ratio, budget.round_to, g.channel_groups) for g in groups}


def check_counts(groups: list[ChannelGroup], counts: dict[str, int], who: str) -> None:
    """Counts name known groups and keep between one channel and the whole group."""
    sizes = {g.name: g.size for g in groups}
    for name, k in counts.items():
        if name not in sizes:
            raise ValueError(f"{who}: a count for unknown channel group {name!r}")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= sizes[name]:
            raise ValueError(f"{who}: group {name!r} keeps {k!r} of {sizes[name]} channels")
