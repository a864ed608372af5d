"""The ``latency`` width allocator: the most importance kept within a predicted latency.

Given every group's channel scores (the method's own criterion) and the device's latency table
(pipeline/latency.py), each group's candidate widths are multiples of its step (lcm of
``round_to`` and its conv groups) from ``min_keep`` of its width up to all of it, at most
``max_choices`` of them. Keeping ``k`` channels of a group is worth the sum of its ``k`` best
scores divided by the group's total (``normalize: share``, the default: every whole group is
worth 1, and a cut costs the share of its group's importance it removes, however wide the group
or large its weights), times the group's producing convs (a residual stream's channel is a
filter in every block that writes it). ``mean`` divides by the group's mean score instead (one
channel of average importance is worth 1 in every layer): a channel of a 64-wide early layer is
then worth one of a 512-wide late layer, the knapsack strips the early, time-heavy layers, and
on the digits that lost 28 points of top-1 right after the cut at 2× measured speed-up against
``share`` (docs/benchmarks.md §12.3). ``none`` takes the scores as they are.
Each table piece is a cost term over the group its conv reads and the group it writes; the
residual streams are the knapsack's hubs (methods/knapsack.py, whose docstring states the
bound on the solution's gap). The budget is the dense model's measured latency ÷
``Budget.target_speedup``, or, without a target, the predicted latency of the uniform widths at
``prune_ratio``: the same predicted speed, with the widths moved where they cost least.

Not yet here (docs/architecture.md, "Pruning to a measured speed-up"): blocks are not chosen by
this allocator (``prune.blocks`` removes them before it runs, and the table then costs them at 0).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from methods.allocate import Allocator, Budget, register_allocator
from methods.base import keep_count
from methods.knapsack import Choice, InfeasibleBudget, Term, solve
from pipeline.errors import PrunepipeError
from pipeline.spec import removed_blocks

if TYPE_CHECKING:
    from torch import nn

    from methods.base import SelectContext
    from pipeline.latency import LatencyTable
    from pipeline.surgery import ChannelGroup


class TargetUnreachable(PrunepipeError, ValueError):
    """A speed-up beyond what the narrowest allowed model reaches on the table."""


class LatencyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_choices: int = Field(16, ge=2, le=256)  # candidate widths per group
    min_keep: float = Field(0.1, gt=0.0, le=1.0)  # the narrowest share of a group a candidate keeps
    normalize: Literal["share", "mean", "none"] = "share"
    bins: int = Field(2000, ge=10, le=100_000)  # the knapsack's cost resolution


def candidates(group: ChannelGroup, round_to: int, min_keep: float, max_choices: int) -> tuple[int, ...]:
    """Widths a group may keep: multiples of its step from ``min_keep`` of it to all of it, thinned
    evenly to ``max_choices`` (both ends kept); the whole width even when it is not a multiple."""
    step = math.lcm(round_to, group.channel_groups)
    lo = min(group.size, max(step, math.ceil(min_keep * group.size / step) * step))
    widths = sorted({*range(lo, group.size + 1, step), group.size})
    if len(widths) > max_choices:
        picks = np.unique(np.round(np.linspace(0, len(widths) - 1, max_choices)).astype(int))
        widths = [widths[i] for i in picks]
    return tuple(widths)


@register_allocator
class LatencyAllocator(Allocator):
    name = "latency"
    Options: ClassVar[type[BaseModel]] = LatencyOptions

    def __init__(self, options: dict[str, Any] | BaseModel | None = None) -> None:
        super().__init__(options)
        self._summary: dict[str, Any] = {}

    def allocate(self, model: nn.Module, groups: list[ChannelGroup], budget: Budget,
                 ctx: SelectContext | None = None) -> dict[str, int]:
        table: LatencyTable | None = getattr(ctx, "latency_table", None)
        scores: dict[str, torch.Tensor] | None = getattr(ctx, "scores", None)
        if table is None or scores is None:
            raise ValueError("the latency allocator needs the context's latency_table and the method's scores")
        o = self.options
        removed = removed_blocks(model)
        whole = getattr(ctx, "whole", frozenset())  # groups the method never cuts: one candidate
        cands = {g.name: (g.size,) if g.name in whole else candidates(g, budget.round_to, o.min_keep, o.max_choices)
                 for g in groups}
        narrowest = table.predict_counts(groups, {n: c[0] for n, c in cands.items()}, removed)
        reachable = table.dense_s / narrowest
        if budget.target_speedup is not None:
            if budget.target_speedup > reachable:
                raise TargetUnreachable(
                    f"prune.target_speedup = {budget.target_speedup:g} is beyond what this model reaches on the "
                    f"latency table: at most {reachable:.2f}× (every group at its narrowest allowed width, "
                    f"min_keep {o.min_keep:g})")
            limit = table.dense_s / budget.target_speedup
        else:
            uniform = {g.name: keep_count(g.size, budget.prune_ratio, budget.round_to, g.channel_groups)
                       for g in groups}
            limit = table.predict_counts(groups, uniform, removed)
        choices = [Choice(g.name, cands[g.name], self._values(g, scores[g.name], cands[g.name])) for g in groups]
        terms = self._terms(table, groups, cands, removed)
        a, b = table.line
        # the table predicts a + b · Σ pieces: the knapsack budgets Σ pieces
        try:
            solution = solve(choices, terms, (limit - a) / b, hubs=[g.name for g in groups if g.residual],
                             bins=o.bins, start={g.name: cands[g.name][-1] for g in groups if g.residual})
        except InfeasibleBudget:
            raise TargetUnreachable(f"latency budget {1000 * limit:.3g} ms is below what this model reaches on the "
                                    f"latency table ({1000 * narrowest:.3g} ms at its narrowest)") from None
        predicted = table.predict_counts(groups, solution.widths, removed)
        self._summary = {"predicted_speedup": table.dense_s / predicted, "budget_speedup": table.dense_s / limit,
                         "reachable_speedup": reachable, "knapsack_evaluations": solution.evaluations,
                         "knapsack_hubs_exact": float(solution.hubs_exact)}
        return dict(solution.widths)

    def _values(self, group: ChannelGroup, scores: torch.Tensor, widths: tuple[int, ...]) -> tuple[float, ...]:
        s = scores.double().flatten()
        if self.options.normalize == "mean":
            s = s / s.mean().clamp_min(1e-12)
        elif self.options.normalize == "share":
            s = s / s.sum().clamp_min(1e-12)
        kept = torch.sort(s, descending=True).values.cumsum(0)
        weight = max(1, len(group.producers))
        return tuple(weight * float(kept[k - 1]) for k in widths)

    @staticmethod
    def _terms(table: LatencyTable, groups: list[ChannelGroup], cands: dict[str, tuple[int, ...]],
               removed: list[str]) -> list[Term]:
        reads = {c: g.name for g in groups for c in g.consumers}
        writes = {p: g.name for g in groups for p in g.producers}
        gone = set(removed)
        terms = []
        for name in table.names():
            t = table.piece(name)
            if t.piece.block in gone:
                continue
            a, b = reads.get(name), writes.get(name)
            cin = cands[a] if a else (t.piece.dense_in,)
            cout = cands[b] if b else (t.piece.dense_out,)
            cost = t.cost(np.array(cin), np.array(cout))
            if a is not None and a == b:  # a conv reading and writing one group: the diagonal
                terms.append(Term(a, None, np.diag(cost)[:, None].copy()))
            else:
                terms.append(Term(a, b, cost))
        return terms

    def summary(self) -> dict[str, Any]:
        return dict(self._summary)
