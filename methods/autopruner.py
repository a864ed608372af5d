"""AutoPruner — Luo & Wu, Pattern Recognition 2020 (METHODS.md §2).

A gate after the ReLU of every inner channel group (bottleneck conv1/conv2, BasicBlock conv1):
the activations X (N, C, H, W) are averaged over the batch (backward spreads grad/N to every
sample), max-pooled 2×2 (1×1 where the map is 7×7 or smaller), mapped C·h·w → C by a fully
connected layer with bias, multiplied by α and squashed by a sigmoid: v ∈ (0, 1)^C; the output
is X ⊙ v. The gate sits on the input of the group's consuming conv, i.e. after BN and ReLU
(see ``methods.gates``).

Loss: cross-entropy + Σ_l λ_l · (mean(v_l) − keep)², keep = 1 − prune_ratio.
Schedules (authors' code): α grows geometrically from ``alpha_start`` to ``alpha_end`` over the
pruning phase, and a layer whose v is not yet binary (fraction outside [0.2, 0.8] below
``binary_fraction``) gets its α raised by ``alpha_boost`` per step on top; λ_l starts at
``lambda_init`` and is then 100·|pruned fraction − prune_ratio| of the layer's current code.
The binary code is a majority vote of ``v > 0.5`` over the last ``vote_window`` steps, with v
averaged over the ranks first, so the code is the same on every rank.

Stage-wise (``stagewise: true``): the pruning steps are split evenly over the four ResNet
stages; a stage's gates are trained in its share, then frozen at their binary code, and the
gates of later stages pass activations through until their turn.

Project choice: with ``exact_budget: true`` (default) the final code keeps exactly the
configured count per layer, ranked by vote share then mean v, so that methods can be compared
at equal MACs; ``false`` keeps the majority-vote code as it is (adaptive per-layer rates).
At the end the gates are removed; channels of code 0 are cut; fine-tuning follows.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from methods import gates
from methods.base import Method, SelectContext, register_method
from pipeline.surgery import example_input, structured_topk


class AutoPrunerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stagewise: bool = False
    alpha_start: float = Field(1.0, gt=0)
    alpha_end: float = Field(100.0, gt=0)
    alpha_boost: float = Field(1.02, ge=1.0)
    lambda_init: float = Field(10.0, ge=0)
    lambda_scale: float = Field(100.0, ge=0)
    binary_fraction: float = Field(0.9, gt=0, le=1)
    vote_window: int = Field(20, ge=1)
    exact_budget: bool = True


class AutoPrunerGate(nn.Module):
    """v = sigmoid(α · FC(maxpool(mean_batch(x)))); output x ⊙ v (x: activations after the ReLU)."""

    def __init__(self, channels: int, height: int, width: int) -> None:
        super().__init__()
        self.pool = 2 if min(height, width) > 7 else 1
        h, w = max(1, height // self.pool), max(1, width // self.pool)
        self.fc = nn.Linear(channels * h * w, channels)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)  # v starts at 0.5, as in the paper's set-up
        self.register_buffer("alpha", torch.tensor(1.0))  # in the state dict: a resumed run keeps it
        self.active = True  # False: pass-through (a later stage in stage-wise mode)
        self.register_buffer("hard", torch.empty(0), persistent=False)  # fixed binary code
        self.v: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hard.numel():
            return x * self.hard.view(1, -1, 1, 1).to(x.dtype)
        if not self.active:
            return x
        a = x.mean(0, keepdim=True)  # batch-mean pooling (x is already after the ReLU)
        if self.pool > 1:
            a = F.max_pool2d(a, self.pool)
        v = torch.sigmoid(self.alpha * self.fc(a.flatten(1))).view(-1)
        self.v = v
        return x * v.view(1, -1, 1, 1)


def _stage_of(group_name: str) -> str:
    return group_name.split(".")[0]


@register_method
class AutoPruner(Method):
    name = "autopruner"
    training_aware = True
    Options = AutoPrunerOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for g in self.groups:
            gates.single_consumer(g, self.name)
        self.stages = sorted({_stage_of(g.name) for g in self.groups})
        self.votes: dict[str, deque] = {g.name: deque(maxlen=self.options.vote_window) for g in self.groups}
        self.vsum: dict[str, torch.Tensor] = {}
        self.lambdas = {g.name: self.options.lambda_init for g in self.groups}
        self.step, self.total_steps, self.stage = 0, 1, 0

    # --- set-up ------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> None:
        shapes: dict[str, tuple[int, int, int]] = {}
        hooks = [  # the gate's input is the consuming conv's input
            model.get_submodule(g.consumers[0]).register_forward_hook(
                lambda m, i, o, name=g.name: shapes.__setitem__(name, tuple(i[0].shape[1:]))
            )
            for g in self.groups
        ]
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(example_input(self.image_size, device=next(model.parameters()).device))
        model.train(was_training)
        for h in hooks:
            h.remove()
        for g in self.groups:
            gates.insert(model, g, AutoPrunerGate(*shapes[g.name]), self.name)
        self._set_stage(model, 0)

    def on_train_start(self, model: nn.Module, steps_per_epoch: int = 0, epochs: int = 0) -> None:
        self.total_steps = max(1, steps_per_epoch * epochs)
        for _, gate in gates.layers(model, self.groups):
            gate.alpha.fill_(self.options.alpha_start)

    def _set_stage(self, model: nn.Module, stage: int) -> None:
        """Freeze finished stages at their code; activate the current one (stage-wise only)."""
        self.stage = stage
        if not self.options.stagewise:
            return
        for g, gate in gates.layers(model, self.groups):
            pos = self.stages.index(_stage_of(g.name))
            gate.active = pos == stage
            if pos < stage and not gate.hard.numel():
                gate.hard = self._code(g).float().to(gate.fc.weight.device)

    # --- training ----------------------------------------------------------------------------
    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        keep = 1.0 - self.prune_ratio
        terms = [
            self.lambdas[g.name] * (gate.v.mean() - keep) ** 2
            for g, gate in gates.layers(model, self.groups)
            if gate.active and not gate.hard.numel() and gate.v is not None
        ]
        return torch.stack(terms).sum() if terms else None

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.step += 1
        scheduled = self.options.alpha_start * (self.options.alpha_end / self.options.alpha_start) ** min(
            1.0, self.step / self.total_steps
        )
        for g, gate in gates.layers(model, self.groups):
            if not gate.active or gate.hard.numel() or gate.v is None:
                continue
            v = gate.v.detach().float().clone()
            if dist.is_available() and dist.is_initialized():  # batch-dependent: agree first
                dist.all_reduce(v)
                v /= dist.get_world_size()
            self.votes[g.name].append((v > 0.5).cpu())
            self.vsum[g.name] = v.cpu()
            binary = float(((v < 0.2) | (v > 0.8)).float().mean())
            boost = self.options.alpha_boost if binary < self.options.binary_fraction else 1.0
            gate.alpha.fill_(min(10 * self.options.alpha_end, max(scheduled, float(gate.alpha) * boost)))
            pruned = 1.0 - float(self._code(g).float().mean())
            self.lambdas[g.name] = self.options.lambda_scale * abs(pruned - self.prune_ratio)
        if self.options.stagewise:
            stage = min(len(self.stages) - 1, self.step * len(self.stages) // self.total_steps)
            if stage != self.stage:
                self._set_stage(model, stage)

    # --- decision ----------------------------------------------------------------------------
    def _vote_share(self, g) -> torch.Tensor:
        votes = self.votes[g.name]
        if not votes:
            return torch.ones(g.size)
        return torch.stack(list(votes)).float().mean(0)

    def _code(self, g) -> torch.Tensor:
        return self._vote_share(g) > 0.5

    def keep_masks(self, model: nn.Module, ctx: SelectContext | None = None) -> dict[str, torch.Tensor]:
        masks = {}
        for g in self.groups:
            share = self._vote_share(g).double()
            # rank by vote share, then by the last mean v (a tie-break inside [0, 1))
            score = share + 1e-3 * self.vsum.get(g.name, torch.zeros(g.size)).double()
            # exact budget: the configured count; else the majority-vote code's own count
            # (structured_topk keeps at least one channel per conv group if the code is empty)
            k = self.n_keep(g) if self.options.exact_budget else int(self._code(g).sum())
            masks[g.name] = structured_topk(score, k, g.channel_groups)
        return masks

    def finalize(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        gates.remove(model, self.groups)

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step, "total_steps": self.total_steps, "stage": self.stage}
        for name, votes in self.votes.items():
            if votes:
                out[f"votes.{name}"] = torch.stack(list(votes))
        out.update({f"lambda.{k}": float(v) for k, v in self.lambdas.items()})
        return out

    def load_state(self, state: dict[str, Any]) -> None:
        self.step, self.total_steps = int(state["step"]), int(state["total_steps"])
        self.stage = -1  # the next step re-applies the stage: frozen codes are rebuilt from the votes
        for k, v in state.items():
            if k.startswith("votes."):
                self.votes[k.removeprefix("votes.")].extend(list(v))
            elif k.startswith("lambda."):
                self.lambdas[k.removeprefix("lambda.")] = float(v)

    def summary(self) -> dict[str, Any]:
        codes = {g.name: int(self._code(g).sum()) for g in self.groups}
        return {"binary_kept": codes, "mean_lambda": sum(self.lambdas.values()) / max(1, len(self.lambdas)),
                "log10_alpha_scheduled": math.log10(max(1e-9, self.options.alpha_start * (
                    self.options.alpha_end / self.options.alpha_start) ** min(1.0, self.step / self.total_steps)))}
