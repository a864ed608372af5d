"""AutoPruner — Luo & Wu, Pattern Recognition 2020 (docs/method_specs.md §AutoPruner), after the authors' code
(github.com/Roll920/AutoPruner, ``ResNet50/50``: ``main.py``, ``src_code/my_op.py``,
``src_code/Network_FT.py``; read, not copied).

A gate after the ReLU of every inner channel group (bottleneck conv1/conv2, BasicBlock conv1):
the activations X (N, C, H, W) are averaged over the batch (backward spreads grad/N to every
sample), max-pooled 2×2 (not pooled in the last stage), mapped C·h·w → C by a fully connected
layer with bias, multiplied by α and squashed by a sigmoid: v ∈ (0, 1)^C; the output is X ⊙ v.
The gate sits on the input of the group's consuming conv, i.e. after BN and ReLU
(``methods.gates``). Loss: cross-entropy + Σ_l λ_l · (mean(v_l) − keep_l)², keep_l =
``n_keep(l) / size(l)``, the width allocator's count for the layer (with the uniform allocator
this is the paper's keep = 1 − ratio up to ``keep_count``'s rounding to whole channels and to
``round_to``; λ's update and the collapse guard's floor still read the uniform ratio, as the
authors' code does).

Where this follows the authors' code:
- **FC initialisation**: weights ~ N(0, (10·√(2/n))²) with n = C·h·w its fan-in, bias PyTorch's
  default U(±1/√n); so v starts spread over (0, 1), not at 0.5.
- **Pooling**: 2×2 max-pooling except in the last stage (their ``max_ks = 1`` where the map
  is 7×7 at 224 px, which includes layer4's first conv1 output at 14×14).
- **α schedule**: α follows ``linspace(alpha_start, alpha_end, K)`` (1 → 100), one point per
  ``alpha_window`` = 100 steps, K = ⌊steps / alpha_window⌋ — a *linear* ramp over the phase,
  held at its end. On top, each layer has an additive offset raised by ``alpha_boost`` (+1)
  at the close of a vote window (below) whose v is not yet binary (fraction of v outside
  [0.2, 0.8] at the window's first step below ``binary_fraction`` = 0.9), only once an epoch's
  worth of α points has passed (their ``alpha_index >= K / num_epochs``); and +1 when the
  window's code prunes at least a threshold share of the layer (95 %, lowered by 5 points each
  time, not below the pruning ratio).
- **Votes and λ**: every ``vote_window`` = 20 steps (non-overlapping windows) the binary code
  is the majority of ``v > 0.5`` over the window, with v averaged over the ranks first (their
  DataParallel averages over the GPUs), so the code is the same on every rank; λ_l starts at
  ``lambda_init`` = 10 and at each window becomes 100·|pruned fraction of the code − ratio|.
- **Stage-wise** (``stagewise: true``, the default: their ResNet-50 is pruned one stage at a
  time): the pruning steps are split evenly over the stages; a stage's gates start fresh
  (new FC draw, α, λ, thresholds and offsets restart, as each of their per-stage runs does),
  train in its share, then freeze at their code; later stages pass activations through.
- **The last block is never gated** (``skip_last_block: true``): their layer4[2] has no gate,
  so its channels are all kept (ResNet-50 at keep 0.5: 52.1 % fewer MACs, the paper's 51 %).
- **Validation during pruning uses the binary code**: in eval mode an active gate multiplies
  by its last window's code (binarised v before the first window closes).

Where it does not, and why:
- The pruning phase is one run of ``prune.epochs`` split over the stages, not one run of
  ``num_epochs`` per stage: set ``prune.epochs`` to stages × their epochs to match.
  The "after an epoch" rule counts steps of the stage, so a stage shorter than one epoch
  never gets the non-binary boost.
- α moves along its line by a step counter of the stage; their ``i % 100`` restarts with each
  epoch, which adds at most one extra point per epoch when an epoch is not a multiple of 100.
- A tied vote (10 of 20) prunes the channel; their sign() gives it 0.5.
- ``exact_budget: true`` (default, a project choice shared with ABP and ISTA) keeps exactly
  the configured count per gated layer, ranked by the last window's vote share then its v, so
  that methods compare at equal MACs; ``false`` keeps the majority-vote code as it is (their
  adaptive per-layer rates).
- ``skip_last_block: false`` gates the last block too (uniform rates over every inner group).

Residual streams (``prune.scope: all``) — beyond the authors, whose code gates only the inner
layers (conv1/conv2 of a bottleneck): a stream's channel is written by every block of the
stage and read by many consumers (each block's conv1, the next stage's conv1 and downsample,
or ``fc``), so it gets ONE gate and ONE v per step, shared by all its consumers. The gate sits
in front of the consumer that runs first in a forward (found by tracing one forward in
:meth:`AutoPruner.prepare`): the stage's second block's conv1 reads the first block's output,
and its FC is sized from that map (C·h·w, pooled as its stage is). Every other consumer holds a
``methods.gates.SharedLayer`` and multiplies by the factor the owner used in this very forward
(v in training, binarised v or the code in eval mode, the code when frozen, nothing when idle),
so the next stage's conv1/downsample (same map size) and ``fc`` (a pooled (N, C) vector) need
no FC of their own and see the same values. The gradient of v is the sum over all reads. One
set of gate parameters per group means one set of keys in the state dict and no parameter
that DDP sees twice. A stream belongs to the stage of its name (``layer2.0.downsample.0`` →
layer2); the stem's group (conv1 → bn1 → ReLU → max-pool, read by layer1; in a BasicBlock net
the same group is layer1's stream) has no stage in its name and goes with the stage of its
consumers (layer1). ``skip_last_block: true`` leaves ungated every group the last block writes
(a producer in it): the inner groups as before and the last stage's stream, which the last
block adds into, so the last block keeps all its channels as in the authors' code (and the
last stage's 7×7 stream, unpooled, would need an FC of C²·49 weights); with
``skip_last_block: false`` the last stream is gated too. ``stagewise``: a stream is trained
with its stage and frozen at its code after it, so the next stage already reads the pruned
stream.

Distributed: frozen and not-yet-active gates take no part in a stage-wise forward, so their
gates declare ``leaves_parameters_unused`` and the DDP backend searches for unused parameters
(a graph walk per step, paid only then). DeepSpeed gives parameters without gradient a zero
gradient, so weight decay would shrink a waiting stage's FC: a stage's gates are redrawn when
it starts, which undoes that. A gate's mode and code are in its state dict (extra state and
buffers), and the vote accumulator, offsets, thresholds and λ in :meth:`AutoPruner.state`, so
a run resumed mid-phase continues exactly where it stopped.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from methods import gates
from methods.base import Method, SelectContext, register_method
from pipeline.surgery import ChannelGroup, example_input

IDLE, ACTIVE, FROZEN = 0, 1, 2
_THRESHOLD_START, _THRESHOLD_STEP = 95.0, 5.0  # authors' collapse guard, in % of pruned channels


class AutoPrunerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stagewise: bool = True
    alpha_start: float = Field(1.0, gt=0)
    alpha_end: float = Field(100.0, gt=0)
    alpha_window: int = Field(100, ge=1)  # steps per point of the α line (authors' alpha_range)
    alpha_boost: float = Field(1.0, ge=0)  # additive, per vote window whose v is not binary
    lambda_init: float = Field(10.0, ge=0)
    lambda_scale: float = Field(100.0, ge=0)
    binary_fraction: float = Field(0.9, gt=0, le=1)
    vote_window: int = Field(20, ge=1)  # steps per vote window (authors' channel_index_range)
    skip_last_block: bool = True
    exact_budget: bool = True


class AutoPrunerGate(nn.Module):
    """v = sigmoid(α · FC(maxpool(mean_batch(x)))); output x ⊙ v (x: activations after the ReLU).

    Modes: ``IDLE`` passes x through, ``ACTIVE`` gates by v (by ``code`` in eval mode once a
    code exists), ``FROZEN`` multiplies by the fixed binary ``code``.
    """

    def __init__(self, channels: int, height: int, width: int, pool: int) -> None:
        super().__init__()
        self.pool = pool if min(height, width) >= pool else 1
        h, w = height // self.pool, width // self.pool
        self.fc = nn.Linear(channels * h * w, channels)
        self.register_buffer("alpha", torch.tensor(1.0))
        self.register_buffer("code", torch.ones(channels))
        self.mode, self.coded = ACTIVE, False  # in the state dict as extra state
        self.leaves_parameters_unused = False  # read by the DDP backend (find_unused_parameters)
        self.v: torch.Tensor | None = None
        self.factor: torch.Tensor | None = None  # the soft / binarised v of the last forward (followers)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """The authors' draw: W ~ N(0, (10·√(2/n))²), b ~ U(±1/√n) (PyTorch's default bias)."""
        n = self.fc.in_features
        w = torch.empty(self.fc.weight.shape).normal_(0.0, 10 * math.sqrt(2.0 / n), generator=generator)
        b = torch.empty(self.fc.bias.shape).uniform_(-1 / math.sqrt(n), 1 / math.sqrt(n), generator=generator)
        self.fc.weight.copy_(w)
        self.fc.bias.copy_(b)

    def freeze(self, code: torch.Tensor) -> None:
        """Fix the gate at a binary ``code`` (True/1 = keep)."""
        self.code.copy_(code.to(self.code))
        self.mode, self.coded = FROZEN, True

    def get_extra_state(self) -> dict[str, int]:
        return {"mode": int(self.mode), "coded": int(self.coded)}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.mode, self.coded = int(state["mode"]), bool(state["coded"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == IDLE:
            return x
        if self.mode == FROZEN or (not self.training and self.coded):
            return x * gates.channel_view(self.code, x).to(x.dtype)
        a = x.mean(0, keepdim=True)  # batch-mean pooling (x is already after the ReLU)
        if self.pool > 1:
            a = F.max_pool2d(a, self.pool)
        v = torch.sigmoid(self.alpha * self.fc(a.flatten(1))).view(-1)
        if not self.training:
            self.factor = (v > 0.5).to(x.dtype)  # no code yet: binarised v
            return x * gates.channel_view(self.factor, x)
        self.v = self.factor = v
        return x * gates.channel_view(v, x)

    def follow(self, x: torch.Tensor) -> torch.Tensor:
        """At another consumer of a residual stream: the factor this gate used in this forward."""
        if self.mode == IDLE:
            return x
        if self.mode == FROZEN or (not self.training and self.coded):
            return x * gates.channel_view(self.code, x).to(x.dtype)
        if self.factor is None:
            raise RuntimeError("a residual stream's gate was read before its first consumer ran in this forward")
        return x * gates.channel_view(self.factor, x)


def _stage_of(group_name: str) -> str:
    return group_name.split(".")[0]


def _stage(group: ChannelGroup) -> str:
    """The stage a group belongs to: the one in its name; the stem's group (no stage in its
    name) goes with its consumers' stage."""
    if "." in group.name:
        return _stage_of(group.name)
    inside = [c for c in group.consumers if "." in c]
    return _stage_of(inside[0]) if inside else group.name


def _block_of(group: ChannelGroup) -> str:
    return group.producers[0].rpartition(".")[0]


def _blocks(group: ChannelGroup) -> set[str]:
    """Blocks with a producer of the group (an inner group: its own block; a stream: every block of its stage)."""
    return {p.rpartition(".")[0] for p in group.producers}


@register_method
class AutoPruner(Method):
    name = "autopruner"
    scopes = ("inner", "all")  # all: one gate per residual stream, shared by its consumers
    training_aware = True
    uniform_rate = False  # the last block keeps every channel (skip_last_block)
    Options = AutoPrunerOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        inner = [g for g in self.groups if not g.residual] or self.groups
        last = _block_of(inner[-1]) if inner else ""
        self.gated = [g for g in self.groups if not (self.options.skip_last_block and last in _blocks(g))]
        self._gated_names = {g.name for g in self.gated}
        stages: list[str] = []
        for g in self.gated:
            if _stage(g) not in stages:
                stages.append(_stage(g))
        self.stages = stages if self.options.stagewise else ["all"]
        self.step = self.total_steps = self.steps_per_epoch = self.stage = self.window_fill = 0
        self.hits: dict[str, torch.Tensor] = {}  # per group: steps of this window with v > 0.5
        self.first_v: dict[str, torch.Tensor] = {}  # v at the window's first step (binary test)
        self.last_v: dict[str, torch.Tensor] = {}  # the last rank-averaged v (tie-break)
        self.share: dict[str, torch.Tensor] = {}  # vote share of the last closed window
        self.offset: dict[str, float] = {}
        self.threshold: dict[str, float] = {}
        self.lambdas: dict[str, float] = {}

    # --- stages ------------------------------------------------------------------------------
    def _stage_pos(self, g: ChannelGroup) -> int:
        return self.stages.index(_stage(g)) if self.options.stagewise else 0

    def _bounds(self, stage: int) -> tuple[int, int]:
        """First step of ``stage`` and of the next one (the steps are split evenly, ceil)."""
        n, t = len(self.stages), max(1, self.total_steps)
        return -(-stage * t // n), -(-(stage + 1) * t // n)

    def _stage_at(self, step: int) -> int:
        return min(len(self.stages) - 1, step * len(self.stages) // max(1, self.total_steps))

    def _code(self, g: ChannelGroup) -> torch.Tensor:
        share = self.share.get(g.name)
        return share > 0.5 if share is not None else torch.ones(g.size, dtype=torch.bool)

    def _enter_stage(self, model: nn.Module, stage: int) -> None:
        """Freeze earlier stages at their code, start ``stage`` afresh, leave later ones idle."""
        self.stage, self.window_fill = stage, 0
        for i, (g, gate) in enumerate(gates.layers(model, self.gated)):
            pos = self._stage_pos(g)
            if pos < stage:
                if gate.mode != FROZEN:
                    gate.freeze(self._code(g))
            elif pos == stage:
                gate.reset_parameters(torch.Generator().manual_seed(self.seed * 100_003 + i))
                gate.mode, gate.coded = ACTIVE, False
                gate.alpha.fill_(self.options.alpha_start)
                self.offset[g.name], self.threshold[g.name] = 0.0, _THRESHOLD_START
                self.lambdas[g.name] = self.options.lambda_init
                self.hits[g.name] = torch.zeros(g.size)
            else:
                gate.mode = IDLE

    # --- set-up ------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> None:
        # the gate's input is its consuming conv's input; a stream's gate goes in front of the
        # consumer that runs first, and its FC is sized from that consumer's input
        first: dict[str, tuple[str, tuple[int, ...]]] = {}
        hooks = [
            model.get_submodule(c).register_forward_hook(
                lambda m, i, o, name=g.name, c=c: None if name in first else first.update({name: (c, tuple(i[0].shape[1:]))})
            )
            for g in self.gated for c in g.consumers
        ]
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(example_input(self.image_size, device=next(model.parameters()).device))
        model.train(was_training)
        for h in hooks:
            h.remove()
        last_stage = _stage(self.gated[-1]) if self.gated else ""
        for g in self.gated:
            consumer, shape = first[g.name]
            if len(shape) != 3:
                raise ValueError(f"{self.name}: the first consumer of group {g.name!r}, {consumer}, reads a "
                                 f"{len(shape) + 1}-d tensor; its gate needs a (N, C, H, W) map")
            gate = AutoPrunerGate(*shape, pool=1 if _stage(g) == last_stage else 2)
            gate.leaves_parameters_unused = self.options.stagewise and len(self.stages) > 1
            gates.insert(model, g, gate, self.name, first=consumer)
        self._enter_stage(model, 0)

    def on_train_start(self, model: nn.Module, steps_per_epoch: int = 0, epochs: int = 0) -> None:
        self.total_steps = max(1, steps_per_epoch * epochs)
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.step = 0

    # --- the schedule ------------------------------------------------------------------------
    def _line(self, stage: int) -> tuple[int, int]:
        """(K points of the α line, the α index from which the non-binary boost applies)."""
        start, end = self._bounds(stage)
        stage_steps = max(1, end - start)
        k = max(1, stage_steps // self.options.alpha_window)
        return k, int(k * self.steps_per_epoch / stage_steps)  # authors: int(K / num_epochs)

    def alpha_at(self, local_step: int) -> float:
        """The scheduled α (without a layer's offset) at 0-based ``local_step`` of the stage."""
        k, _ = self._line(self.stage)
        idx = min(k - 1, local_step // self.options.alpha_window)
        lo, hi = self.options.alpha_start, self.options.alpha_end
        return lo if k == 1 else lo + (hi - lo) * idx / (k - 1)

    # --- training ----------------------------------------------------------------------------
    def _active(self, model: nn.Module) -> list[tuple[ChannelGroup, AutoPrunerGate]]:
        return [(g, gate) for g, gate in gates.layers(model, self.gated) if gate.mode == ACTIVE]

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        terms = [self.lambdas[g.name] * (gate.v.mean() - self.n_keep(g) / g.size) ** 2
                 for g, gate in self._active(model) if gate.v is not None]
        return torch.stack(terms).sum() if terms else None

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        active = [(g, gate) for g, gate in self._active(model) if gate.v is not None]
        local = self.step - self._bounds(self.stage)[0]  # 0-based index of this step in the stage
        self.step += 1
        if active:
            flat = torch.cat([gate.v.detach().float() for _, gate in active])
            if dist.is_available() and dist.is_initialized():  # batch-dependent: agree first
                dist.all_reduce(flat)
                flat /= dist.get_world_size()
            for (g, _), v in zip(active, flat.cpu().split([g.size for g, _ in active]), strict=True):
                if self.window_fill == 0:
                    self.first_v[g.name] = v.clone()
                self.hits[g.name] += (v > 0.5).float()
                self.last_v[g.name] = v.clone()
            self.window_fill += 1
            if self.window_fill == self.options.vote_window:
                for g, gate in active:
                    self._close_window(g, gate, local)
                self.window_fill = 0
            scheduled = self.alpha_at(local + 1)
            for g, gate in active:
                gate.alpha.fill_(scheduled + self.offset[g.name])
        stage = self._stage_at(self.step)
        if self.options.stagewise and stage != self.stage and self.step < self.total_steps:
            self._enter_stage(model, stage)

    def _close_window(self, g: ChannelGroup, gate: AutoPrunerGate, local: int) -> None:
        """The window's code, λ and α offsets, in the authors' order."""
        self.share[g.name] = self.hits[g.name] / self.options.vote_window
        self.hits[g.name] = torch.zeros(g.size)
        code = self._code(g)
        gate.code.copy_(code.to(gate.code))
        gate.coded = True
        pruned = 1.0 - float(code.float().mean())
        if 100 * pruned >= self.threshold[g.name]:  # a collapsing layer: sharpen it
            self.offset[g.name] += 1.0
            self.threshold[g.name] = max(self.threshold[g.name] - _THRESHOLD_STEP, 100 * self.prune_ratio)
        first = self.first_v[g.name]
        two_side = float(((first < 0.2) | (first > 0.8)).float().mean())
        _, boost_from = self._line(self.stage)
        if two_side < self.options.binary_fraction and local // self.options.alpha_window + 1 >= boost_from:
            self.offset[g.name] += self.options.alpha_boost
        self.lambdas[g.name] = self.options.lambda_scale * abs(pruned - self.prune_ratio)

    # --- decision ----------------------------------------------------------------------------
    def n_keep(self, group: ChannelGroup) -> int:
        """The configured width of a gated group; an ungated one (the last block) keeps all."""
        return super().n_keep(group) if group.name in self._gated_names else group.size

    def starting_scores(self, model: nn.Module, ctx: SelectContext | None = None) -> dict[str, torch.Tensor]:
        # before the pruning phase there are no gates to read: the filters' L1 norms instead
        return gates.filter_l1(model, self.groups)

    def kept_whole(self) -> frozenset[str]:
        return frozenset(g.name for g in self.groups if g.name not in self._gated_names)

    def scores(self, model: nn.Module, ctx: SelectContext | None = None) -> dict[str, torch.Tensor]:
        """The last window's vote share, then the last mean v as a tie-break in [0, 1); an
        ungated group (the last block) scores alike and keeps every channel (``n_keep``)."""
        out = {g.name: torch.ones(g.size, dtype=torch.float64) for g in self.groups}
        for g in self.gated:
            share = self.share.get(g.name, torch.ones(g.size)).double()
            out[g.name] = share + 1e-3 * self.last_v.get(g.name, torch.zeros(g.size)).double()
        return out

    def kept(self, group: ChannelGroup, scores: torch.Tensor) -> int:
        # exact budget: the allocator's count; else the majority-vote code's own count
        # (structured_topk keeps at least one channel per conv group if the code is empty)
        if self.options.exact_budget or group.name not in self._gated_names:
            return self.n_keep(group)
        return int(self._code(group).sum())

    def finalize(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        gates.remove(model, self.groups)

    _PER_GROUP = ("hits", "first_v", "last_v", "share", "offset", "threshold", "lambdas")

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step, "total_steps": self.total_steps,
                               "steps_per_epoch": self.steps_per_epoch, "stage": self.stage,
                               "window_fill": self.window_fill}
        for field in self._PER_GROUP:
            for name, value in getattr(self, field).items():
                out[f"{field}.{name}"] = value.clone() if isinstance(value, torch.Tensor) else float(value)
        return out

    def load_state(self, state: dict[str, Any]) -> None:
        """Counters and per-group accumulators; the gates' modes, codes and α come back with the
        model's state dict (loaded before this), so the first resumed step trains the right gates."""
        for key in ("step", "total_steps", "steps_per_epoch", "stage", "window_fill"):
            setattr(self, key, int(state[key]))
        for key, value in state.items():
            field, _, name = key.partition(".")
            if name and field in self._PER_GROUP:
                getattr(self, field)[name] = value.clone() if isinstance(value, torch.Tensor) else float(value)

    def summary(self) -> dict[str, Any]:
        codes = {g.name: int(self._code(g).sum()) for g in self.gated}
        return {"binary_kept": codes, "mean_lambda": sum(self.lambdas.values()) / max(1, len(self.lambdas)),
                "gated_groups": len(self.gated)}
