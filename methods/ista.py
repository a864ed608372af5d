"""ISTA on BatchNorm scales — Ye et al., ICLR 2018, "Rethinking the smaller-norm-less-
informative assumption" (METHODS.md §5).

Only the BNs of inner channel groups carry the penalty; residual widths stay. After every
optimizer step, a proximal (ISTA) step on each penalised γ:

    γ ← sign(γ) · max(|γ| − lr · ρ · λ_l, 0)

with λ_l the layer's cost weight: the MACs one channel of the group costs (its producing
conv's output filter plus the consuming conv's input slice), normalised to mean 1, so
expensive layers are sparsified harder (the authors weigh by a memory/compute cost).
The pruning phase uses plain SGD without momentum, as the authors do (``momentum`` option).

α rescaling (``alpha`` ≠ 1): before training γ and β of each penalised BN are multiplied by α
and the consuming conv's input weights by 1/α. ReLU is positively homogeneous, so the network
computes the same function; the penalty then acts on α-times larger γ, which changes the
sparsification speed from a pretrained model. ``finalize`` undoes it.

A channel with γ = 0 outputs the constant ReLU(β). ``finalize`` folds that constant into the
BN after the consuming conv (its running mean): exact where the consumer is 1×1 (bottleneck
conv3); where it is k×k with zero padding (conv2 of a bottleneck, BasicBlock conv2) the fold is
exact away from the border and off by the missing taps on the border rows/columns (measured in
tests/test_ista.py and docs/benchmarks.md). In training mode BN re-estimates its mean anyway,
so fine-tuning absorbs the shift.

Project choice, as for the other learned methods: ``exact_budget: true`` (default) prunes
exactly the configured count per layer, smallest |γ| first (zeros first); a pruned channel
whose γ is not yet 0 is folded as if it were (its constant ReLU(β)), and the fine-tune
absorbs the rest. ``false`` prunes exactly the channels whose γ reached 0.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from methods.base import Method, SelectContext, register_method
from pipeline.surgery import macs_profile, structured_topk


class IstaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rho: float = Field(0.001, ge=0)  # ρ: sparsity strength
    alpha: float = Field(1.0, gt=0)  # rescaling trick; 1 = off
    cost_weighted: bool = True  # λ_l from per-channel MACs; False: λ_l = 1
    momentum: float = Field(0.0, ge=0, lt=1)  # authors: plain SGD during the ISTA phase
    exact_budget: bool = True


@register_method
class IstaBN(Method):
    name = "ista"
    training_aware = True
    Options = IstaOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for g in self.groups:
            if len(g.norms) != 1 or g.residual:
                raise ValueError(f"ista penalises inner BNs only; group {g.name!r} is a residual stream: "
                                 "set prune.scope=inner")
        self.weights = {g.name: 1.0 for g in self.groups}
        self.rescaled = False

    def optimizer_overrides(self) -> dict[str, Any]:
        return {"momentum": self.options.momentum, "nesterov": False}

    @torch.no_grad()
    def _rescale(self, model: nn.Module, factor: float) -> None:
        for g in self.groups:
            bn = model.get_submodule(g.norms[0])
            bn.weight.mul_(factor)
            bn.bias.mul_(factor)
            for c in g.consumers:
                model.get_submodule(c).weight.div_(factor)

    def prepare(self, model: nn.Module) -> None:
        if self.options.cost_weighted:
            profile = macs_profile(model, self.image_size)
            cost = {}
            for g in self.groups:
                per_channel = sum(profile[p] for p in g.producers) / g.size
                per_channel += sum(profile[c] / g.size for c in g.consumers)
                cost[g.name] = per_channel
            mean = sum(cost.values()) / len(cost)
            self.weights = {k: v / mean for k, v in cost.items()}
        if self.options.alpha != 1.0:
            self._rescale(model, self.options.alpha)
            self.rescaled = True

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        lr = optimizer.param_groups[0]["lr"]
        for g in self.groups:
            gamma = model.get_submodule(g.norms[0]).weight
            shrink = lr * self.options.rho * self.weights[g.name]
            gamma.copy_(gamma.sign() * (gamma.abs() - shrink).clamp_min(0))

    def keep_masks(self, model: nn.Module, ctx: SelectContext | None = None) -> dict[str, torch.Tensor]:
        masks = {}
        self.zeros = {}
        for g in self.groups:
            gamma = model.get_submodule(g.norms[0]).weight.detach().double().cpu().abs()
            self.zeros[g.name] = int((gamma == 0).sum())
            k = self.n_keep(g) if self.options.exact_budget else max(g.channel_groups, int((gamma > 0).sum()))
            masks[g.name] = structured_topk(gamma, k, g.channel_groups)
        return masks

    @torch.no_grad()
    def finalize(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        if self.rescaled:
            self._rescale(model, 1.0 / self.options.alpha)
            self.rescaled = False
        fold_constant_channels(model, self.groups, masks)

    def summary(self) -> dict[str, Any]:
        zeros = getattr(self, "zeros", {})
        total = sum(g.size for g in self.groups)
        return {"gamma_zero_fraction": sum(zeros.values()) / total} if zeros else {}


@torch.no_grad()
def fold_constant_channels(model: nn.Module, groups, masks: dict[str, torch.Tensor]) -> None:
    """Fold ReLU(β) of every dropped channel into the BN after each consuming conv.

    The consumer adds Σ_taps W[:, c] · ReLU(β_c) at every position away from the border; the
    BN after it (eval mode) computes γ(y − μ)/σ + β; without the channel y drops by that shift, so
    μ ← μ − shift leaves the output
    unchanged once the channel is gone. Exact for 1×1 consumers; interior-exact for k×k.
    """
    for g in groups:
        drop = ~masks[g.name]
        if not bool(drop.any()):
            continue
        bn = model.get_submodule(g.norms[0])
        const = torch.relu(bn.bias.detach()) * drop.to(bn.bias.device)  # constant of each dropped channel
        for c in g.consumers:
            conv = model.get_submodule(c)
            if c not in g.next_norm or conv.groups != 1:
                continue  # grouped consumers (ResNeXt) and BN-less consumers: left to fine-tuning
            shift = (conv.weight.sum(dim=(2, 3)) * const.to(conv.weight.device)).sum(1)
            model.get_submodule(g.next_norm[c]).running_mean.sub_(shift)
