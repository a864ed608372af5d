"""One-shot baselines at a uniform rate: L1-norm and L2-norm filters (Li et al. 2017 style),
and random channels (the sanity floor every method must beat).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from methods.base import Method, SelectContext, register_method
from pipeline.surgery import filter_norms


class _NormMethod(Method):
    p: int = 2

    def scores(self, model: nn.Module, ctx: SelectContext | None = None) -> dict[str, torch.Tensor]:
        return {g.name: filter_norms(model, g, self.p) for g in self.groups}


@register_method
class L1Norm(_NormMethod):
    """Keep the filters of largest L1 norm (summed over the group's producing convs)."""

    name = "l1"
    p = 1


@register_method
class L2Norm(_NormMethod):
    """Keep the filters of largest L2 norm (summed over the group's producing convs)."""

    name = "l2"
    p = 2


class RandomOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int | None = None  # None: the run's seed


@register_method
class RandomChannels(Method):
    """Random channels at the same rate. The generator is seeded, so every rank agrees."""

    name = "random"
    Options = RandomOptions

    def scores(self, model: nn.Module, ctx: SelectContext | None = None) -> dict[str, torch.Tensor]:
        seed = self.options.seed if self.options.seed is not None else self.seed
        gen = torch.Generator().manual_seed(seed)
        return {g.name: torch.rand(g.size, generator=gen) for g in self.groups}
