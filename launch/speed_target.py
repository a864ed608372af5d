"""Widths from the latency allocator, and a measured speed-up target met before the pruning phase.

The recipe's :func:`launch.recipe.allocate` comes here when the trial's allocator is ``latency``
(docs/architecture.md, "Pruning to a measured speed-up"). Rank 0 reads (or builds and caches)
the latency table of this device in the trial's timing mode, gives the allocator the method's
*starting* scores, and, with ``prune.target_speedup``, runs the correction loop
(:func:`pipeline.latency.hit_target`): the allocator aims at a predicted speed-up, a *probe*
(a cut copy of the model as it is now) is timed against the dense model with
:func:`pipeline.measure.compare`, and a miss of more than 3 % corrects the aim. The decision and
what it cost reach every rank in one broadcast; an error on rank 0 (a target beyond the table's
reach) is raised on every rank, so no worker waits forever for a decision that never comes.

Why probes, before the pruning phase, and not the cut model after it: speed depends on the
widths alone, not on which channels a method keeps, so a probe at the same counts *is* the cut
model's architecture. Measuring it first lets a training-aware method (AutoPruner, ABP, ISTA,
SFP) spend its pruning phase on the corrected counts; a correction never moves a learned
decision, because none has been made yet. The cost: the counts are chosen on the starting
scores (filter norms for gated methods), not on what the pruning phase learns; which channels
fill each count is still the method's own, learned decision. A method that keeps its own count
(``exact_budget: false``) may then end faster or slower than the target; the cut model is
measured again after the cut (``speedup``) beside the probe's figure (``target_measured_speedup``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from methods import Allocator, Budget, Method, SelectContext
from methods.latency_alloc import TargetUnreachable
from pipeline.config import Config
from pipeline.distributed import DistInfo, broadcast_object
from pipeline.latency import LatencyTable, hit_target, load_or_build, table_key
from pipeline.measure import TimingConfig, compare
from pipeline.progress import progress
from pipeline.surgery import ChannelGroup, apply_masks, find_groups, prune_model, structured_topk

# a measured speed-up within this of the target needs no correction
TOLERANCE = 0.03


def trial_table(cfg: Config, dense: nn.Module, protocol: TimingConfig, num_classes: int, *,
                rebuild: bool = False) -> tuple[LatencyTable, str, bool]:
    """The latency table of ``dense`` (the whole dense model) under ``protocol``: read from the
    cache when one was built for this key, else built with a progress bar and cached;
    (table, its file, whether it was built now)."""
    opts = cfg.measure.latency_table
    groups = find_groups(dense, cfg.data.image_size, cfg.prune.scope)
    key = table_key(protocol, cfg.model.arch, cfg.data.image_size, num_classes, cfg.prune.scope, cfg.prune.round_to,
                    opts.levels)
    with progress(desc="latency table", unit="point") as shown:
        def advance(done: int, total: int) -> None:
            shown.total = total
            shown.update(done - shown.n)

        table, path, built = load_or_build(dense, groups, protocol, key, opts.cache_dir, rebuild=rebuild,
                                           reps=opts.reps, warmup=opts.warmup, progress=advance)
    return table, str(path), built


def probe(model: nn.Module, groups: list[ChannelGroup], scores: dict[str, torch.Tensor], counts: dict[str, int],
          image_size: int) -> nn.Module:
    """A cut copy of ``model`` keeping ``counts`` channels per group (the best-scored ones): the
    architecture the trial will have, to time before it is trained toward."""
    net = copy.deepcopy(model).eval()
    masks = {g.name: structured_topk(scores[g.name], counts.get(g.name, g.size), g.channel_groups) for g in groups}
    apply_masks(net, groups, masks)
    return prune_model(net, groups, masks, image_size)


def _decide(cfg: Config, model: nn.Module, dense: nn.Module, groups: list[ChannelGroup], allocator: Allocator,
            budget: Budget, ctx: SelectContext, protocol: TimingConfig, num_classes: int) -> tuple[dict[str, int], dict]:
    """Rank 0's decision: (counts, what to report)."""
    table, path, built = trial_table(cfg, dense, protocol, num_classes)
    print(f"[prunepipe] latency table {'built in ' + format(table.build_s, '.0f') + ' s, written to' if built else 'read from'} "
          f"{path}", flush=True)
    ctx.latency_table = table
    report: dict[str, Any] = {"latency_table_built": float(built)}
    if budget.target_speedup is None:
        counts = allocator.allocate(model, groups, budget, ctx)
        return counts, {**report, **allocator.summary()}
    size = cfg.data.image_size
    said: dict[str, dict[str, Any]] = {}  # the allocator's summary of every try, by its counts

    def aim(speedup: float) -> tuple[dict[str, int], float]:
        for _ in range(5):
            try:
                counts = allocator.allocate(model, groups, replace(budget, target_speedup=speedup), ctx)
                break
            except TargetUnreachable:
                if not said:
                    raise  # the target itself: the user's error, with the reachable maximum
                # a correction aimed at the very edge: the knapsack's rounded-up costs can put the
                # narrowest model just past it
                speedup = 1 + 0.99 * (speedup - 1)
        else:
            raise TargetUnreachable(f"no widths reach a predicted {speedup:.2f}x on the latency table")
        said[json.dumps(counts, sort_keys=True)] = summary = allocator.summary()
        return counts, summary["predicted_speedup"]

    def measured(counts: dict[str, int]) -> float:
        timed = compare(copy.deepcopy(dense), probe(model, groups, ctx.scores or {}, counts, size), size, protocol)
        print(f"[prunepipe] probe: predicted {said[json.dumps(counts, sort_keys=True)]['predicted_speedup']:.2f}x, "
              f"measured {timed['speedup']:.2f}x (target {budget.target_speedup:.2f}x)", flush=True)
        return timed["speedup"]

    aim(budget.target_speedup)  # a target beyond the table's reach stops here, naming the reachable maximum
    reachable = next(iter(said.values()))["reachable_speedup"]
    hit = hit_target(budget.target_speedup, aim, measured, tolerance=TOLERANCE,
                     max_corrections=cfg.prune.target_corrections, max_aim=reachable)
    return hit.counts, {**report, **said[json.dumps(hit.counts, sort_keys=True)], **hit.summary()}


def latency_counts(cfg: Config, info: DistInfo, model: nn.Module, dense: nn.Module, groups: list[ChannelGroup],
                   method: Method, allocator: Allocator, budget: Budget, ctx: SelectContext, protocol: TimingConfig,
                   num_classes: int) -> tuple[dict[str, int], dict[str, Any]]:
    """Kept channels per group from the latency allocator (and the correction loop when the
    budget has a target), decided on rank 0 and the same on every rank; (counts, summary)."""
    ctx.scores = method.starting_scores(model, ctx)  # every rank: a method's scores may all-reduce
    ctx.whole = method.kept_whole()
    outcome: tuple[dict[str, int] | None, dict[str, Any], str | None] = (None, {}, None)
    if info.is_main:
        try:
            outcome = (*_decide(cfg, model, dense, groups, allocator, budget, ctx, protocol, num_classes), None)
        except Exception as err:
            if not info.distributed:
                raise
            outcome = (None, {}, f"{type(err).__name__}: {err}")
            broadcast_object(outcome, info)
            raise
    counts, summary, failed = broadcast_object(outcome, info)
    if failed is not None:
        raise RuntimeError(f"rank 0 could not allocate the widths: {failed}")
    return counts, summary
