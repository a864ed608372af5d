"""ISTA on BatchNorm scales — Ye et al., ICLR 2018, "Rethinking the smaller-norm-less-
informative assumption" (docs/method_specs.md §ISTA).

Only the BNs of inner channel groups carry the penalty; residual widths stay. After every
optimizer step, a proximal (ISTA) step on each penalised γ:

    γ ← sign(γ) · max(|γ| − lr · ρ · λ_l, 0)

with ``lr`` the learning rate *of that step* (the engine steps the LR schedule after this
hook, as the authors' optimizer shrinks with the same ``learning_rate`` tensor it steps with).

λ_l, the layer's cost weight, follows the authors' code (bobye/batchnorm_prune,
``Transformer.conv2d_layer``, "memory" priority): for one channel of the group,

    λ_l = (k_l² · c_in,l  +  Σ_next k_next² · c_out,next  +  H_l · W_l) / (image H · W)

— the producing conv's parameters per output filter, the consuming convs' parameters per input
channel (the paper's "next conv's parameters"; no spatial factor on either), and the memory of
the channel's own feature map. It is not normalised: the authors' ρ values apply as they are.
``cost_weighted: false`` sets λ_l = 1. (An earlier version weighed by per-channel MACs, which
multiplies by H·W and so reverses the order across stages: early stages were hit hardest.)

ρ has two stages, as in the authors' CIFAR recipe (README of ``src/python/cifar10``): a
warm-up at ``rho_warmup`` (0.001) for ``warmup_fraction`` of the pruning phase's steps (30k of
their 80k), then ``rho`` (0.005) until the end. The step count is checkpointed (resume keeps
the stage). The pruning phase uses plain SGD without momentum, as the authors do
(``momentum`` option); the fine-tune after the cut is the authors' ρ = 0 stage.

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
    rho: float = Field(0.005, ge=0)  # ρ of the main stage (authors' CIFAR recipe: 0.005)
    rho_warmup: float = Field(0.001, ge=0)  # ρ of the warm-up stage (authors: 0.001)
    warmup_fraction: float = Field(0.375, ge=0, le=1)  # of the pruning phase's steps (authors: 30k of 80k)
    alpha: float = Field(1.0, gt=0)  # rescaling trick; 1 = off
    cost_weighted: bool = True  # λ_l: the authors' per-channel memory cost; False: λ_l = 1
    momentum: float = Field(0.0, ge=0, lt=1)  # authors: plain SGD during the ISTA phase
    exact_budget: bool = True


@register_method
class IstaBN(Method):
    name = "ista"
    scopes = ("inner",)  # it penalises one inner BN per group: no residual streams
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
        self.step = 0  # optimizer steps taken in the pruning phase
        self.warmup_steps = 0  # set by on_train_start from the phase's length

    def on_train_start(self, model: nn.Module, steps_per_epoch: int = 0, epochs: int = 0) -> None:
        self.warmup_steps = round(self.options.warmup_fraction * steps_per_epoch * epochs)

    @property
    def rho(self) -> float:
        """ρ of the coming step: the warm-up value for the first ``warmup_steps``, then the main one."""
        return self.options.rho_warmup if self.step < self.warmup_steps else self.options.rho

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "warmup_steps": self.warmup_steps}

    def load_state(self, state: dict[str, Any]) -> None:
        self.step = int(state.get("step", 0))
        self.warmup_steps = int(state.get("warmup_steps", 0))

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
            self.weights = channel_costs(model, self.groups, self.image_size)
        if self.options.alpha != 1.0:
            self._rescale(model, self.options.alpha)
            self.rescaled = True

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        # the engine steps the schedule after this hook: this is the lr the step just used. Every
        # group but a method's own lr-scaled ones (ISTA has none) shares it; under ZeRO the
        # groups hold flat partitions, so γ's own group cannot be looked up by parameter.
        lr = optimizer.param_groups[0]["lr"]
        rho = self.rho
        for g in self.groups:
            gamma = model.get_submodule(g.norms[0]).weight
            shrink = lr * rho * self.weights[g.name]
            gamma.copy_(gamma.sign() * (gamma.abs() - shrink).clamp_min(0))
        self.step += 1

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
def channel_costs(model: nn.Module, groups, image_size: int) -> dict[str, float]:
    """The authors' per-channel memory cost λ_l of every group (see the module docstring).

    Read from the traced convs: the producer's ``(c_in / groups) · k²`` per output filter, each
    consumer's ``(c_out / groups) · k²`` per input channel (a linear's ``out_features``), and the
    producer's output map ``H · W`` (its MACs ÷ its weights), all over the image's pixels.
    """
    profile = macs_profile(model, image_size)
    pixels = float(image_size * image_size)
    costs = {}
    for g in groups:
        own = next_params = 0.0
        hw = 0.0
        for p in g.producers:
            conv = model.get_submodule(p)
            own += conv.weight[0].numel()  # (c_in / groups) · k_h · k_w
            hw = max(hw, profile[p] / conv.weight.numel())  # MACs = H·W · weights
        for c in g.consumers:
            mod = model.get_submodule(c)
            if isinstance(mod, nn.Conv2d):
                next_params += mod.out_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
            else:
                next_params += mod.out_features
        costs[g.name] = (own + next_params + hw) / pixels
    return costs


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
