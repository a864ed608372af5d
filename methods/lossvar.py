"""Balanced filter pruning at a preset loss variation — Li et al., 2020 (arXiv 2010.06821),
docs/method_specs.md §lossvar. One-shot, layer-wise rates, no prune-retrain loop.

Only the abstract is available; the project's reconstruction:

- A fixed calibration set (``calib_samples`` training images drawn with the run's seed from
  all the training shards, no augmentation) and
  its dense loss L0, the model in eval mode.
- Per channel group, independently: channels ranked by the criterion (L1 norm of the
  producing filters by default); binary search of the largest k such that masking the k
  weakest channels of that group alone raises the calibration loss by at most δ:
  L(k) − L0 ≤ δ. k / N is the group's rate. The binary search assumes L(k) grows with k; it
  need not, but for larger δ every comparison can only turn true, so the rate found is
  monotone in δ whatever the curve (tested).
- With neither δ nor a target, the target is the MACs reduction that the uniform
  ``prune_ratio`` gives (so it compares with the uniform baselines at equal MACs).
- Given ``target_macs_reduction`` instead of δ: a search for the δ whose rates give that MACs
  reduction within ``tolerance`` (MACs reduction is monotone in δ; see "Cost" for how).
  Loss evaluations are cached by (group, k), and the number of real evaluations is reported,
  with δ and the per-group rates.
- Loss evaluations are data-parallel: each rank sums the loss over its share of the
  calibration set and the sums are all-reduced (float64), so every rank takes the same
  decisions and one rank or two give the same rates.
- ``round_to`` is honoured: k moves in steps that keep the kept width a multiple of
  ``round_to`` (and of the conv groups of a grouped conv), as every uniform method's widths.
All rates are applied at once, then the recipe cuts and fine-tunes once.

The rates are the ``loss`` width allocator's (:class:`LossAllocator`, docs/architecture.md
"Scores apart from allocation"): the recipe runs this search before the pruning phase, for
lossvar or for any other method with ``prune.allocate: loss``; lossvar itself only scores (its
criterion's rank, so the shared top-k drops exactly the channels the search masked, ties
included). Called without counts (a script, a test), :meth:`LossVariation.keep_masks` runs the
search itself.

Cost (what makes it usable on ResNet-101): a probe recomputes only from the block holding the
masked channels (:mod:`methods.staged`), not from the image; groups are probed in network
order so one cached activation walks down the network. During the δ search, k is monotone in
δ, so a group's search at δ is bounded by the k found at the nearest smaller and larger δ
tried: once the bisection brackets δ, most groups need no probe at all. (With a loss curve that
is not monotone in k, the bounded search may stop at another local threshold than an
unbounded one would; the rate is still monotone in δ.) The cost is reported as probes,
seconds, and full-forward equivalents (probe work ÷ one forward of the calibration set).

The δ search for a MACs target does not re-run every group's search at each δ tried (that
cost ~600 FFE on ResNet-101). A coarse pass probes each group at ``coarse_points`` evenly
spaced k on the first ``coarse_fraction`` of every calibration batch (cheap, noisy); the
interpolated curves predict δ and every group's k there; exact thresholds on the full set are
then found from the predictions by an interpolation search through the nearest full-set probes
(every one made so far is kept), and if the MACs reduction misses, the curves' error at that δ
corrects the next δ (bisection whenever that does not halve the bracket).
Every k returned satisfies the same threshold invariant as in the fixed-δ mode, on the full
calibration set; the coarse estimates only choose where to look.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from tqdm import tqdm

from methods.allocate import Allocator, Budget, register_allocator
from methods.base import Knob, Method, SelectContext, register_method
from methods.staged import StagedForward
from pipeline.progress import progress
from pipeline.surgery import ChannelGroup, filter_norms, macs_after, macs_profile, structured_topk


class LossVarOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    delta: float | None = Field(None, gt=0)  # δ: allowed rise of the calibration loss per group
    target_macs_reduction: float | None = Field(None, gt=0, lt=1)  # or: search δ for this
    calib_samples: int = Field(256, ge=1)
    criterion: str = Field("l1", pattern="^(l1|l2)$")
    tolerance: float = Field(0.01, gt=0, lt=1)  # |reduction − target| accepted
    max_iters: int = Field(40, ge=1)
    min_keep: int = Field(1, ge=1)
    # the δ search's coarse pass: probes per group, on this share of the calibration set
    coarse_points: int = Field(4, ge=1, le=64)
    coarse_fraction: float = Field(0.25, gt=0, le=1)

    @model_validator(mode="after")
    def _one_knob(self) -> LossVarOptions:
        if self.delta is not None and self.target_macs_reduction is not None:
            raise ValueError("give one of delta, target_macs_reduction, not both")
        return self


@register_method
class LossVariation(Method):
    name = "lossvar"
    Options = LossVarOptions
    uniform_rate = False
    # its rates are the loss allocator's; under `uniform` it would be the l1 baseline by another
    # name. Under `latency` (a speed target) its criterion's norms value the widths.
    allocators = ("loss", "latency")
    default_allocator = "loss"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cache: dict[tuple, float] = {}
        self._found: dict[str, dict[float, int]] = {}  # group → {δ: k} of the searches done
        self._last_fraction = 0.5  # the previous group's rate: the first guess for the next
        self.evaluations = 0
        self.delta_found: float | None = None
        self.rates: dict[str, float] = {}
        self.reduction: float | None = None
        self.cost: dict[str, float] = {}
        self._staged: StagedForward | None = None
        self._bar: tqdm | None = None

    @classmethod
    def budget_knob(cls, options: BaseModel, prune: Mapping[str, Any]) -> Knob:
        """δ when one is given: the loss budget then decides every rate and ``prune_ratio`` is
        ignored. Without δ, the uniform ratio sets the MACs target (or a target of its own is
        searched for) and the ratio is what the trial is named by."""
        assert isinstance(options, LossVarOptions)
        if options.delta is not None:
            return Knob("δ", options.delta, option="delta", symbol="δ", fmt=".3g")
        return super().budget_knob(options, prune)

    def calibration_samples(self) -> int:
        return self.options.calib_samples

    # --- the calibration loss ----------------------------------------------------------------
    @torch.no_grad()
    def _loss_masked(self, model: nn.Module, ctx: SelectContext, g: ChannelGroup, order: torch.Tensor, k: int,
                     fraction: float = 1.0) -> float:
        """Calibration loss with the k weakest channels of ``g`` masked (filters, γ, β), restored
        after; on the first ``fraction`` of the calibration set (the coarse pass) or all of it."""
        key = (g.name, k) if fraction == 1.0 else (g.name, k, fraction)
        if key not in self._cache:
            assert self._staged is not None
            start = self._staged.start_of(g.producers + g.norms)
            self._staged.prepare(start)  # before masking: the cache holds the unmasked activations
            drop = order[:k]
            saved = []
            for name in g.producers + g.norms:
                m = model.get_submodule(name)
                for p in (m.weight, m.bias):
                    if p is not None:
                        saved.append((p, p[drop].clone()))
                        p[drop] = 0
            try:
                self.evaluations += 1
                self._cache[key] = self._staged.loss_from(start, fraction)
            finally:
                for p, old in saved:
                    p[drop] = old
        return self._cache[key]

    def _orders(self, model: nn.Module) -> dict[str, torch.Tensor]:
        p = 1 if self.options.criterion == "l1" else 2
        out = {}
        for g in self.groups:
            # weakest first; for grouped convs whole positions go together (group-structured)
            scores = filter_norms(model, g, p)
            if g.channel_groups > 1:
                pos = scores.view(g.channel_groups, -1).sum(0)
                w = pos.numel()
                pos_order = torch.argsort(pos, stable=True)
                out[g.name] = torch.stack([pos_order + gi * w for gi in range(g.channel_groups)], 1).flatten()
            else:
                out[g.name] = torch.argsort(scores, stable=True)
        return out

    def _step(self, g: ChannelGroup) -> int:
        """Channels removed per unit: whole positions of a grouped conv, and widths that stay
        multiples of ``round_to`` when the group's width is one."""
        step = math.lcm(self.round_to, g.channel_groups)
        return step if g.size % step == 0 else g.channel_groups

    def _rates_for(self, model, ctx, orders, delta: float, base: float,
                   guesses: dict[str, int] | None = None) -> dict[str, int]:
        # network order: the cached activation only ever walks forward within one pass
        staged = self._staged
        out = {}
        for g in self._network_order():
            units = max(1, self._max_units(g))
            # without predictions (a fixed δ), the previous group's rate is the first guess
            guess = guesses[g.name] if guesses is not None else round(self._last_fraction * units) * self._step(g)
            out[g.name] = self._threshold(model, ctx, g, orders[g.name], delta, base, guess)
            self._last_fraction = out[g.name] / self._step(g) / units
            if self._bar is not None:
                self._bar.update(1)
                self._bar.set_postfix(delta=f"{delta:.3g}", probes=self.evaluations,
                                      ffe=f"{staged.full_forward_equivalents:.0f}" if staged else "-")
        return out

    # --- the decision ------------------------------------------------------------------------
    def allocator_options(self) -> dict[str, Any] | None:
        """The loss allocator runs this method's own δ search: its options are this method's."""
        return self.options.model_dump()

    def starting_scores(self, model: nn.Module, ctx: SelectContext | None = None) -> dict[str, torch.Tensor]:
        # the criterion's norms, not its ranks: a width's worth needs the magnitudes
        p = 1 if self.options.criterion == "l1" else 2
        return {g.name: filter_norms(model, g, p) for g in self.groups}

    def scores(self, model: nn.Module, ctx: SelectContext | None = None) -> dict[str, torch.Tensor]:
        """The criterion's rank of each channel (0 = weakest): the shared top-k keeping the
        strongest ``n_keep`` then drops exactly the weakest the search masked, ties included."""
        out = {}
        for g, order in self._orders(model).items():
            rank = torch.empty(order.numel(), dtype=torch.float64)
            rank[order] = torch.arange(order.numel(), dtype=torch.float64)
            out[g] = rank
        return out

    def keep_masks(self, model: nn.Module, ctx: SelectContext | None = None) -> dict[str, torch.Tensor]:
        """The shared top-k at the loss allocator's counts; a caller that gave none (a test, a
        script) gets this method's own search run first, as the recipe's allocator would."""
        if self.counts:
            return super().keep_masks(model, ctx)
        found = self.search_counts(model, ctx)
        scores = self.scores(model, ctx)
        return {g.name: structured_topk(scores[g.name], found[g.name], g.channel_groups) for g in self.groups}

    def search_counts(self, model: nn.Module, ctx: SelectContext | None) -> dict[str, int]:
        """Kept channels per group at δ (or at the δ found for the MACs target)."""
        if ctx is None or not ctx.calib:
            raise ValueError("lossvar needs a calibration set (SelectContext.calib)")
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        self._staged = StagedForward(model, ctx.calib, ctx.image_size, ctx.info)
        main = ctx.info is None or ctx.info.is_main
        self._bar = progress(show=main, desc="lossvar probes", unit="group", leave=False, dynamic_ncols=True)
        try:
            self._staged.prepare(0)
            base = self._staged.loss_from(0)
            self.evaluations += 1
            orders = self._orders(model)
            if self.options.delta is not None:
                delta = self.options.delta
                pruned = self._rates_for(model, ctx, orders, delta, base)
            else:
                delta, pruned = self._search_delta(model, ctx, orders, base)
        finally:
            model.train(was_training)
            self._bar.close()
            self.cost = {"select_seconds": time.perf_counter() - t0,
                         "full_forward_equivalents": self._staged.full_forward_equivalents,
                         "probes": float(self._staged.probes)}
            self._staged = None
        self.delta_found = delta
        self.rates = {g.name: pruned[g.name] / g.size for g in self.groups}
        return {g.name: g.size - pruned[g.name] for g in self.groups}

    def _reduction(self, profile, dense: float, pruned: dict[str, int]) -> float:
        kept = {g.name: g.size - pruned[g.name] for g in self.groups}
        return 1.0 - macs_after(profile, self.groups, kept) / dense

    def _search_delta(self, model, ctx, orders, base) -> tuple[float, dict[str, int]]:
        """δ whose rates remove ``target`` of the MACs, in four moves (cost: see the module doc).

        1. Coarse curves: every group's loss rise at ``coarse_points`` evenly spaced k, on the
           first ``coarse_fraction`` of the calibration set (one pass in network order).
        2. From the interpolated curves, the δ that would hit the target (arithmetic, no probe);
           one full-set probe per group at its predicted k rescales that group's curve (the
           subset's loss differs from the full set's by a factor that varies between groups).
        3. δ again from the rescaled curves; at it, each group's exact threshold on the full
           set by an interpolation search from its prediction (two probes when it is right).
        4. If the MACs reduction misses by more than ``tolerance``: every group's curve is
           rescaled through its exact threshold; the next δ is a secant in log δ through the
           two measured reductions nearest the target (the rescaled curves' answer while only
           one is measured), bisection whenever that does not halve the bracket of δs tried,
           and at most a doubling (or halving) while the target is not yet bracketed; the
           searches restart from the k just found.
        """
        tol = self.options.tolerance
        profile = macs_profile(model, ctx.image_size)
        dense = float(sum(profile.values()))
        target = self.options.target_macs_reduction
        if target is None:  # the uniform prune_ratio's reduction
            uniform = {g.name: self.n_keep(g) for g in self.groups}
            target = 1.0 - macs_after(profile, self.groups, uniform) / dense
        self.target = target
        ordered = self._network_order()
        curves = self._coarse_curves(model, ctx, orders, ordered)
        scale = {g.name: 1.0 for g in self.groups}  # full-set rise ÷ coarse rise, per group
        rises = [r for c in curves.values() for _, r in c if r > 0] or [1e-6]
        span = (min(rises) * 1e-3, max(rises) * 1e3)

        def predict(delta: float) -> dict[str, int]:
            return {g.name: _k_on_curve(curves[g.name], delta / scale[g.name]) * self._step(g) for g in self.groups}

        def solve() -> float:
            return _solve_increasing(lambda d: self._reduction(profile, dense, predict(d)), target, *span)

        delta = solve()
        predicted = predict(delta)
        for g in ordered:  # move 2: one full-set point per group where the threshold should be
            u = predicted[g.name] // self._step(g)
            if 0 < u:
                full = self._loss_masked(model, ctx, g, orders[g.name], u * self._step(g)) - base
                coarse = _rise_on_curve(curves[g.name], u)
                if full > 0 and coarse > 0:
                    scale[g.name] = full / coarse
        tried: list[tuple[float, float, dict[str, int]]] = []
        delta = solve()
        guesses = predict(delta)
        lo_d, hi_d = 0.0, math.inf  # δs known to fall short of / reach the target
        width = math.inf  # log(hi_d / lo_d) before the last step
        for _ in range(self.options.max_iters):
            pruned = self._rates_for(model, ctx, orders, delta, base, guesses)
            red = self._reduction(profile, dense, pruned)
            tried.append((delta, red, pruned))
            if abs(red - target) <= tol:
                break
            if red < target:
                lo_d = max(lo_d, delta)
            else:
                hi_d = min(hi_d, delta)
            if hi_d < math.inf and hi_d / max(lo_d, 1e-300) < 1 + 1e-9:
                break  # the target falls between two adjacent k: take the closest
            for g in self.groups:  # rescale through the full-set probes at the threshold
                step, u = self._step(g), pruned[g.name] // self._step(g)
                ratios = [(self._cache[(g.name, v * step)] - base) / _rise_on_curve(curves[g.name], v)
                          for v in (u, u + 1) if (g.name, v * step) in self._cache and v > 0
                          and self._cache[(g.name, v * step)] > base and _rise_on_curve(curves[g.name], v) > 0]
                if ratios:
                    scale[g.name] = sum(ratios) / len(ratios)
            # the next δ: a secant (in log δ) through the two measured reductions nearest the
            # target once there are two, else the rescaled curves' answer
            nxt = _secant(tried, target) if len(tried) >= 2 else None
            nxt = nxt if nxt is not None else solve()
            bracketed = lo_d > 0 and hi_d < math.inf
            now = math.log(hi_d / lo_d) if bracketed else math.inf
            if bracketed:
                # bisect when the guess leaves the bracket, or when guesses creep up on one side
                # without halving it (as regula falsi can)
                if not lo_d < nxt < hi_d or now > width / 2:
                    nxt = math.sqrt(lo_d * hi_d)
            else:  # still looking for the other side: at most ×2 per step, and in the right direction
                nxt = min(max(nxt, lo_d * 1.01), lo_d * 2) if lo_d > 0 else max(min(nxt, hi_d / 1.01), hi_d / 2)
            width = now
            after = predict(nxt)
            # start from the k just found, moved as the rescaled curves say δ's change moves it
            before = predict(delta)
            guesses = {n: pruned[n] + after[n] - before[n] for n in pruned}
            delta = nxt
        delta, red, pruned = min(tried, key=lambda t: abs(t[1] - target))
        self.reduction = red
        return delta, pruned

    def _network_order(self) -> list[ChannelGroup]:
        staged = self._staged
        return sorted(self.groups, key=lambda g: staged.start_of(g.producers + g.norms) if staged else 0)

    def _coarse_curves(self, model, ctx, orders, ordered) -> dict[str, list[tuple[int, float]]]:
        """Per group: (units masked, loss rise) at evenly spaced points, on a share of the
        calibration set; made non-decreasing (the running maximum), as the search assumes."""
        frac, points = self.options.coarse_fraction, self.options.coarse_points
        assert self._staged is not None
        self._staged.prepare(0)
        base = self._staged.loss_from(0, frac)
        self.evaluations += 1
        curves = {}
        for g in ordered:
            step, top = self._step(g), self._max_units(g)
            units = sorted({max(1, round(top * i / points)) for i in range(1, points + 1)} - {0}) if top else []
            curve, peak = [(0, 0.0)], 0.0
            for u in units:
                peak = max(peak, self._loss_masked(model, ctx, g, orders[g.name], u * step, frac) - base)
                curve.append((u, peak))
            curves[g.name] = curve
            if self._bar is not None:
                self._bar.update(1)
                self._bar.set_postfix(stage="coarse", probes=self.evaluations)
        return curves

    def _max_units(self, g: ChannelGroup) -> int:
        step = self._step(g)
        return max(0, (g.size - max(self.options.min_keep, step)) // step)

    def _threshold(self, model, ctx, g, order, delta: float, base: float, guess: int) -> int:
        """Largest k with L(k) − L0 ≤ δ (and L(k + step) − L0 > δ, or k is the most the group
        may lose), searched from a predicted ``guess``. Bounded by the k found at the nearest
        smaller and larger δ already searched, so k stays monotone in δ.

        Every full-set probe already made for the group (the rescaling probe, earlier δs) narrows
        the bracket, and the next k is where the line through the two known points nearest the
        threshold — the bracket's ends, or the last two fitting points while no violating one is
        known — crosses δ: on the locally smooth curves of real networks that lands on the
        threshold or next to it, so most groups cost two probes (k fits, k + 1 does not). A
        bisection step follows any probe that did not halve the bracket, so a rough curve costs
        at most about twice a binary search."""
        step = self._step(g)
        found = self._found.setdefault(g.name, {})
        lo = max([k // step for d, k in found.items() if d <= delta], default=0)
        hi = min([k // step for d, k in found.items() if d >= delta], default=self._max_units(g))
        known = {0: 0.0}  # units masked → full-set rise, for every probe already made
        for key, loss in self._cache.items():
            if len(key) == 2 and key[0] == g.name and key[1] % step == 0:
                known[key[1] // step] = loss - base
        for u, r in known.items():  # narrow the bracket with them
            if r <= delta and lo < u <= hi:
                lo = u
            elif r > delta and lo < u <= hi + 1:
                hi = u - 1

        def fits(u: int) -> bool:
            if u not in known:
                known[u] = self._loss_masked(model, ctx, g, order, u * step) - base
            return known[u] <= delta

        def crossing() -> int:
            """Largest u in (lo, hi] that the line through the nearest known points says fits."""
            below = sorted(u for u, r in known.items() if r <= delta and u <= lo)
            over = [u for u, r in known.items() if r > delta and u > lo]
            if over:
                (u0, u1) = (below[-1], min(over))
            elif len(below) >= 2:
                (u0, u1) = below[-2:]  # extrapolate the last fitting slope
            else:
                return round(guess / step)
            r0, r1 = known[u0], known[u1]
            if r1 <= r0:
                return (lo + hi + 1) // 2
            return u0 + math.floor((delta - r0) / (r1 - r0) * (u1 - u0))

        t, bisect_next = round(guess / step), False
        while lo < hi:
            width = hi - lo
            t = min(hi, max(lo + 1, t))
            if fits(t):
                lo = t
            else:
                hi = t - 1
            bisect_next = not bisect_next and (hi - lo) * 2 > width  # this probe did not halve it
            t = (lo + hi + 1) // 2 if bisect_next else crossing()
        found[delta] = lo * step
        return lo * step

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"loss_evaluations": self.evaluations, "rates": self.rates, **self.cost}
        if self.delta_found is not None:
            out["delta"] = self.delta_found
        if self.reduction is not None:
            out["macs_reduction_found"] = self.reduction
        return out


def _k_on_curve(curve: list[tuple[int, float]], delta: float) -> int:
    """Units masked where a non-decreasing piecewise-linear curve of (units, rise) reaches δ."""
    for (u0, r0), (u1, r1) in zip(curve, curve[1:], strict=False):
        if delta < r1:
            return u0 + int((delta - r0) / (r1 - r0) * (u1 - u0)) if r1 > r0 else u0
    return curve[-1][0]


def _rise_on_curve(curve: list[tuple[int, float]], units: float) -> float:
    """The curve's rise at ``units`` masked, by linear interpolation (flat past its last point)."""
    for (u0, r0), (u1, r1) in zip(curve, curve[1:], strict=False):
        if units <= u1:
            return r0 + (r1 - r0) * (units - u0) / max(1e-12, u1 - u0)
    return curve[-1][1]


def _secant(tried: list[tuple[float, float, Any]], target: float) -> float | None:
    """δ where the line through the two tried (δ, reduction) pairs nearest the target, in log δ,
    reaches it; None when they cannot define one."""
    (d1, r1, _), (d2, r2, _) = sorted(tried, key=lambda t: abs(t[1] - target))[:2]
    if r1 == r2 or d1 <= 0 or d2 <= 0 or d1 == d2:
        return None
    return math.exp(math.log(d1) + (target - r1) * (math.log(d2) - math.log(d1)) / (r2 - r1))


def _solve_increasing(f, target: float, lo: float, hi: float) -> float:
    """The smallest δ in [lo, hi] (to a part in 10⁶, bisection in log δ) with f(δ) ≥ target,
    for a non-decreasing f; ``hi`` when none reaches it."""
    if f(hi) < target:
        return hi
    while hi / lo > 1 + 1e-6:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if f(mid) >= target else (mid, hi)
    return hi


@register_allocator
class LossAllocator(Allocator):
    """``prune.allocate: loss``: every group's rate from the calibration loss it may raise (δ),
    or the δ whose rates meet a MACs target — lossvar's search (above), for any method. The
    search ranks channels by its own criterion (filter norms) on the model before the pruning
    phase; the method then fills each group to its count with its own scores. Its options are
    lossvar's (``prune.allocator_options``, or lossvar's own options when lossvar is the method)."""

    name = "loss"
    Options = LossVarOptions

    def __init__(self, options: dict[str, Any] | BaseModel | None = None) -> None:
        super().__init__(options)
        self.search: LossVariation | None = None

    def calibration_samples(self) -> int:
        return self.options.calib_samples

    def allocate(self, model: nn.Module, groups: list[ChannelGroup], budget: Budget,
                 ctx: SelectContext | None = None) -> dict[str, int]:
        self.search = LossVariation(groups, budget.prune_ratio, budget.round_to, self.options.model_dump(),
                                    image_size=ctx.image_size if ctx is not None else 224)
        return self.search.search_counts(model, ctx)

    def summary(self) -> dict[str, Any]:
        return self.search.summary() if self.search is not None else {}
