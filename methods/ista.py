"""ISTA on BatchNorm scales — Ye et al., ICLR 2018, "Rethinking the smaller-norm-less-
informative assumption" (docs/method_specs.md §ISTA).

After every optimizer step, a proximal (ISTA) step on each penalised γ. An inner group has one
BN and gets the paper's soft threshold:

    γ ← sign(γ) · max(|γ| − lr · ρ · λ_l, 0)

with ``lr`` the learning rate *of that step* (the engine steps the LR schedule after this
hook, as the authors' optimizer shrinks with the same ``learning_rate`` tensor it steps with).

Scope. The authors penalise the BNs inside a block only (``prune.scope: inner``, residual widths
stay). ``prune.scope: all`` is a project extension: it also penalises the residual streams and
the stem group. Channel c of a residual stream is written by m BNs (the downsample BN and the
last BN of every block of the stage; for the stem group, bn1 and, on BasicBlock nets, layer1's
last BNs), so the penalty is a group lasso on the vector v_c = (γ_1c, …, γ_mc), whose proximal
step shrinks its L2 norm:

    v_c ← v_c · max(1 − lr · ρ · λ_l / ‖v_c‖₂, 0)

All m scales reach 0 in the same step, and only then is the stream channel a constant in the
whole stage. For m = 1 this is the soft threshold above, and the code runs the scalar form then
(bit for bit what scope ``inner`` always did). A channel's score is ‖v_c‖₂ (|γ| for m = 1).

λ_l, the group's cost weight, follows the authors' code (bobye/batchnorm_prune,
``Transformer.conv2d_layer``, "memory" priority): for one channel of the group,

    λ_l = (Σ_prod k_p² · c_in,p  +  Σ_next k_next² · c_out,next  +  Σ_prod H_p · W_p) / (image H · W)

— the producing convs' parameters per output filter, the consuming convs' parameters per input
channel (the paper's "next conv's parameters"; no spatial factor on either; a linear consumer
counts its ``out_features``), and the memory of the channel's feature maps, one per producer.
An inner group has one producer, so the sums are the authors' per-layer cost; a residual group
sums what removing its channel saves in every conv and map of the stage (a project extension).
It is not normalised: the authors' ρ values apply as they are. ``cost_weighted: false`` sets
λ_l = 1. (An earlier version weighed by per-channel MACs, which multiplies by H·W and so
reverses the order across stages: early stages were hit hardest.)

ρ has two stages, as in the authors' CIFAR recipe (README of ``src/python/cifar10``): a
warm-up at ``rho_warmup`` (0.001) for ``warmup_fraction`` of the pruning phase's steps (30k of
their 80k), then ``rho`` (0.005) until the end. The step count is checkpointed (resume keeps
the stage). The pruning phase uses plain SGD without momentum, as the authors do
(``momentum`` option); the fine-tune after the cut is the authors' ρ = 0 stage.

α rescaling (``alpha`` ≠ 1): before training γ and β of every penalised BN (all m of a residual
group) are multiplied by α and every consuming conv's or linear's input weights by 1/α. ReLU,
max-pooling, average pooling and the residual adds are positively homogeneous, and every BN
writing a stream is scaled alike, so the network computes the same function; the penalty then
acts on α-times larger γ, which changes the sparsification speed from a pretrained model.
``finalize`` undoes it.

Folding (``finalize``). An inner channel with γ = 0 outputs the constant ReLU(β); it is folded
into the BN after the consuming conv (its running mean): exact where the consumer is 1×1
(bottleneck conv3); where it is k×k with zero padding (conv2 of a bottleneck) the fold is exact
away from the border and off by the missing taps on the border rows/columns (measured in
tests/test_learned_methods.py). A residual channel whose m scales are all 0 is a constant at
every position of the stage (each writer outputs its β, and adds, ReLUs and pools are
elementwise or keep constants), but a different constant for each consumer (each block adds its
own β). ``finalize`` reads those constants from one forward pass of a zero image (eval mode)
with hooks on every consumer's input, after setting the dropped channels' γ to 0, and folds
each into the BN after the consumer (1×1: exact — bottleneck conv1, downsample conv; k×k zero-
padded: interior-exact — BasicBlock conv1) or into the bias of a linear consumer (the fc:
exact). A consumer conv with neither a BN after it nor a bias is left to fine-tuning. In
training mode BN re-estimates its mean anyway, so fine-tuning absorbs any shift.

Project choice, as for the other learned methods: ``exact_budget: true`` (default) prunes
exactly the configured count per layer (the width allocator's count, ``n_keep``: with
``prune.allocate: loss`` each group its own), smallest score first (zeros first); the penalty
itself knows no count, as in the authors' method: ρ decides how many reach 0, the count which
go; a pruned channel
whose γ is not yet 0 is folded as if it were (its constant with γ = 0), and the fine-tune
absorbs the rest. ``false`` prunes exactly the channels whose score reached 0.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from methods.base import Method, SelectContext, register_method
from pipeline.surgery import ChannelGroup, macs_profile


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
    scopes = ("inner", "all")  # all: a group lasso over the BNs writing each residual stream
    training_aware = True
    Options = IstaOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for g in self.groups:
            if not g.norms:
                raise ValueError(f"ista penalises BatchNorm scales; group {g.name!r} has no BatchNorm")
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
            for name in g.norms:  # every BN writing a residual stream, so the sum scales alike
                bn = model.get_submodule(name)
                bn.weight.mul_(factor)
                bn.bias.mul_(factor)
            for c in g.consumers:  # convs and a linear fc alike: their input weights
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
            shrink = lr * rho * self.weights[g.name]
            if len(g.norms) == 1:  # the paper's soft threshold, exactly as scope inner always ran it
                gamma = model.get_submodule(g.norms[0]).weight
                gamma.copy_(gamma.sign() * (gamma.abs() - shrink).clamp_min(0))
            else:
                group_prox(model, g.norms, shrink)
        self.step += 1

    @staticmethod
    def channel_scores(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
        """|γ| of an inner group; ‖(γ_1c, …, γ_mc)‖₂ over the m BNs writing a residual channel."""
        gammas = [model.get_submodule(n).weight.detach().double().cpu() for n in group.norms]
        if len(gammas) == 1:
            return gammas[0].abs()
        return torch.stack(gammas).norm(dim=0)

    def scores(self, model: nn.Module, ctx: SelectContext | None = None) -> dict[str, torch.Tensor]:
        out = {g.name: self.channel_scores(model, g) for g in self.groups}
        self.zeros = {name: int((s == 0).sum()) for name, s in out.items()}
        return out

    def kept(self, group: ChannelGroup, scores: torch.Tensor) -> int:
        # exact budget: the allocator's count; else every channel whose scale has not reached 0
        return self.n_keep(group) if self.options.exact_budget else max(group.channel_groups, int((scores > 0).sum()))

    @torch.no_grad()
    def finalize(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        if self.rescaled:
            self._rescale(model, 1.0 / self.options.alpha)
            self.rescaled = False
        inner = [g for g in self.groups if len(g.norms) == 1 and not g.residual]
        fold_constant_channels(model, inner, masks)
        fold_stream_channels(model, [g for g in self.groups if g not in inner and g.name in masks], masks,
                             self.image_size)

    def summary(self) -> dict[str, Any]:
        zeros = getattr(self, "zeros", {})
        total = sum(g.size for g in self.groups)
        return {"gamma_zero_fraction": sum(zeros.values()) / total} if zeros else {}


@torch.no_grad()
def channel_costs(model: nn.Module, groups, image_size: int) -> dict[str, float]:
    """The authors' per-channel memory cost λ_l of every group (see the module docstring).

    Read from the traced convs: each producer's ``(c_in / groups) · k²`` per output filter, each
    consumer's ``(c_out / groups) · k²`` per input channel (a linear's ``out_features``), and each
    producer's output map ``H · W`` (its MACs ÷ its weights), all over the image's pixels. An
    inner group has one producer; a residual group sums over the convs writing its stream.
    """
    profile = macs_profile(model, image_size)
    pixels = float(image_size * image_size)
    costs = {}
    for g in groups:
        own = next_params = 0.0
        hw = 0.0
        for p in g.producers:  # one for an inner group; every conv writing a residual stream
            conv = model.get_submodule(p)
            own += conv.weight[0].numel()  # (c_in / groups) · k_h · k_w
            hw += profile[p] / conv.weight.numel()  # its output map: MACs = H·W · weights
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


@torch.no_grad()
def group_prox(model: nn.Module, norms: list[str], shrink: float) -> None:
    """Group-lasso proximal step on the scales of BNs ``norms`` that write the same channels.

    Per channel c, v_c = (γ_1c, …, γ_mc) ← v_c · max(1 − shrink / ‖v_c‖₂, 0): the norm shrinks
    by ``shrink`` and every γ_ic reaches 0 in the same step (one factor for all m scales).
    """
    gammas = [model.get_submodule(n).weight for n in norms]
    norm = torch.stack([g.detach().to(torch.float64) for g in gammas]).norm(dim=0)
    factor = torch.where(norm > shrink, 1 - shrink / norm.clamp_min(torch.finfo(torch.float64).tiny),
                         torch.zeros_like(norm))
    for g in gammas:
        g.mul_(factor.to(device=g.device, dtype=g.dtype))


@torch.no_grad()
def consumer_inputs(model: nn.Module, consumers: list[str], image_size: int) -> dict[str, torch.Tensor]:
    """Every consumer's input at its first position (sample 0; a linear's whole input), read from
    one eval-mode forward pass of a zero image: no random draw, no running statistics updated."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name in consumers:
        def hook(_mod, inp, name=name):
            x = inp[0].detach()
            seen[name] = x[0].flatten(1)[:, 0] if x.dim() > 2 else x[0]
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        model(torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return seen


@torch.no_grad()
def fold_stream_channels(model: nn.Module, groups: list[ChannelGroup], masks: dict[str, torch.Tensor],
                         image_size: int) -> None:
    """Fold the dropped channels of residual (several-BN) groups into what follows each consumer.

    Every writer's γ of a dropped channel is set to 0 first (``exact_budget``: a channel not yet
    at 0 is folded as if it were). The channel is then a constant throughout its stage, a
    different one at each consumer's input, read by :func:`consumer_inputs`. Without the channel
    a consumer's output drops by ``shift`` = the consumer applied to that constant (Σ over taps
    of W[:, c] · v_c, away from the border): a following BN (eval mode) gets μ ← μ − shift, a
    linear or a BN-less conv with a bias gets bias ← bias + shift. Exact for 1×1 convs and
    linears; interior-exact for zero-padded k×k convs.
    """
    drops = {g.name: ~masks[g.name].to(torch.bool) for g in groups}
    groups = [g for g in groups if bool(drops[g.name].any())]
    if not groups:
        return
    for g in groups:
        for name in g.norms:
            gamma = model.get_submodule(name).weight
            gamma[drops[g.name].to(gamma.device)] = 0
    seen = consumer_inputs(model, [c for g in groups for c in g.consumers], image_size)
    for g in groups:
        for c in g.consumers:
            mod = model.get_submodule(c)
            const = seen[c] * drops[g.name].to(seen[c].device)  # the dropped channels' constants only
            if isinstance(mod, nn.Linear):
                if mod.bias is None:
                    continue  # nothing to fold into: left to fine-tuning
                mod.bias.add_(mod.weight @ const.to(mod.weight.dtype))
                continue
            if c in g.next_norm:
                target, sign = model.get_submodule(g.next_norm[c]).running_mean, -1.0
            elif mod.bias is not None:
                target, sign = mod.bias, 1.0
            else:
                continue  # BN-less, bias-less consumer: left to fine-tuning
            # the consumer's interior response to the constant: one k×k patch of it, no padding
            k_h, k_w = ((k - 1) * d + 1 for k, d in zip(mod.kernel_size, mod.dilation, strict=True))
            patch = const.to(mod.weight.dtype).view(1, -1, 1, 1).expand(1, const.numel(), k_h, k_w)
            shift = torch.nn.functional.conv2d(patch, mod.weight, None, 1, 0, mod.dilation, mod.groups).flatten()
            target.add_(sign * shift.to(target.dtype))
