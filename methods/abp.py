"""Adding Before Pruning (ABP) — Tian et al., IEEE TNNLS 2021 (docs/method_specs.md §ABP).

Only the abstract is available; this is the project's reconstruction. After the BN (and ReLU)
of every inner channel group, an attention layer with one learnable score s_c per channel
multiplies channel c by the hard binary b_c = 1[s_c > 0]. It sits on the input of the group's
consuming conv: placed before the ReLU, an off channel would meet ReLU's zero gradient at 0
and could never come back (``methods.gates``).

Straight-through estimator: the forward uses the hard b; the backward uses the gradient of the
smooth surrogate σ(s/τ), i.e. ∂L/∂s_c = ∂L/∂b_c · σ(s_c/τ)(1 − σ(s_c/τ)) / τ. Because
∂L/∂b_c = Σ (∂L/∂y ⊙ x_c) does not vanish when b_c = 0, a switched-off channel keeps getting
gradient and can switch back on ("recoverability").

Budget: Σ_l ``budget_weight`` · (mean_c b_c − keep_l)², keep_l = ``n_keep(l) / size(l)`` (the
width allocator's count for the group; with the uniform allocator that is 1 − prune_ratio up to
``keep_count``'s rounding to whole channels and to ``round_to``), on the hard b with
the same straight-through gradient, pushes each layer's kept fraction towards the target. (A
budget on mean σ(s/τ) instead is met with every score at 0⁺ and every channel still on: seen in
the tests, and why the hard mean is used.) Scores start at ``init`` plus a small seeded spread
(``init_noise``): from an exactly symmetric start every channel gets the same budget gradient. Scores train with their own learning
rate (``score_lr_scale`` × the base lr): a score's gradient is divided by the channel count
through the mean, and without a larger step the budget would take far longer than a
fine-tuning budget allows.

Project choice, as for AutoPruner: ``exact_budget: true`` (default) keeps exactly the configured
count per layer, ranked by score, so methods compare at equal MACs; ``false`` keeps b = 1.
At the end the attention layers are removed and channels with b = 0 are cut.

Residual streams (``prune.scope: all``; the reconstruction goes beyond the abstract here). A
stream group has one :class:`BinaryAttention` (one score per channel) shared by every consumer
of the stream (each block's conv1 in the stage, the next stage's conv1 and downsample, or the
final ``fc`` on the pooled (N, C) vector): it sits in front of the group's first consumer and
the others apply the same b through ``methods.gates.SharedLayer``. The score's gradient is the
sum over all reads of the stream; the group has one budget term, like an inner group. With
b_c = 0 no layer reads channel c anywhere, so the masked model is the cut one. The stem's
output (conv1 → bn1 → ReLU → max-pool, read by layer1; in a BasicBlock net the stem's group is
layer1's stream) is gated the same way: ABP has no per-stage schedule to leave it out of.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from methods import gates
from methods.base import Method, SelectContext, register_method


class ABPOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tau: float = Field(0.5, gt=0)
    init: float = Field(0.5)  # initial score: > 0, every channel starts on
    init_noise: float = Field(0.05, ge=0)
    budget_weight: float = Field(20.0, ge=0)
    score_lr_scale: float = Field(100.0, gt=0)
    exact_budget: bool = True


class _HardBinary(torch.autograd.Function):
    """b = 1[s > 0]; backward through σ(s/τ) (straight-through estimator)."""

    @staticmethod
    def forward(ctx, score: torch.Tensor, tau: float) -> torch.Tensor:
        ctx.save_for_backward(score)
        ctx.tau = tau
        return (score > 0).to(score.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (score,) = ctx.saved_tensors
        sig = torch.sigmoid(score / ctx.tau)
        return grad * sig * (1 - sig) / ctx.tau, None


class BinaryAttention(nn.Module):
    def __init__(self, channels: int, tau: float, init: float, noise: float = 0.0) -> None:
        super().__init__()
        # the global generator: seeded alike on every rank, and DDP broadcasts rank 0's anyway
        self.score = nn.Parameter(torch.full((channels,), float(init)) + noise * torch.randn(channels))
        self.tau = tau

    def mask(self) -> torch.Tensor:
        return _HardBinary.apply(self.score, self.tau)

    def surrogate(self) -> torch.Tensor:
        return torch.sigmoid(self.score / self.tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * gates.channel_view(self.mask(), x).to(x.dtype)

    def follow(self, x: torch.Tensor) -> torch.Tensor:
        """The same b at another consumer of a residual stream (``methods.gates.SharedLayer``)."""
        return self.forward(x)


@register_method
class AddingBeforePruning(Method):
    name = "abp"
    scopes = ("inner", "all")  # all: one attention layer per stream, shared by its consumers
    training_aware = True
    Options = ABPOptions

    def prepare(self, model: nn.Module) -> None:
        for g in self.groups:
            att = BinaryAttention(g.size, self.options.tau, self.options.init, self.options.init_noise)
            gates.insert(model, g, att, self.name)

    def lr_scales(self, model: nn.Module) -> dict[nn.Parameter, float]:
        return {att.score: self.options.score_lr_scale for _, att in gates.layers(model, self.groups)}

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        terms = [(att.mask().mean() - self.n_keep(g) / g.size) ** 2 for g, att in gates.layers(model, self.groups)]
        return self.options.budget_weight * torch.stack(terms).sum() if terms else None

    def starting_scores(self, model: nn.Module, ctx: SelectContext | None = None) -> dict[str, torch.Tensor]:
        # before the pruning phase there are no gates to read: the filters' L1 norms instead
        return gates.filter_l1(model, self.groups)

    def scores(self, model: nn.Module, ctx: SelectContext | None = None) -> dict[str, torch.Tensor]:
        """Each channel's attention score s (b = 1 where s > 0)."""
        out = {g.name: att.score.detach().double().cpu() for g, att in gates.layers(model, self.groups)}
        self.on_fraction = {name: float((s > 0).double().mean()) for name, s in out.items()}
        return out

    def kept(self, group, scores: torch.Tensor) -> int:
        # exact budget: the allocator's count; else the channels left on (b = 1)
        return self.n_keep(group) if self.options.exact_budget else max(group.channel_groups, int((scores > 0).sum()))

    def finalize(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        gates.remove(model, self.groups)

    def summary(self) -> dict[str, Any]:
        on = getattr(self, "on_fraction", {})
        # the fraction of channels with b = 1 at the end, against the budget keep = 1 - ratio
        return {"mean_b": sum(on.values()) / len(on)} if on else {}
