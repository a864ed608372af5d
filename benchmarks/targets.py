"""Speed targets hit, and what the latency allocator buys over a uniform ratio at the same speed.

For every (method, target) cell this runs the trial's own decision (``launch.speed_target``:
the cached latency table of this device, the method's starting scores, the probe loop that
corrects the aim on measured speed) on a dense torchvision model, cuts it, and times the cut
model against the dense one once more, apart from the probes (``pipeline.measure.compare``).
The row ``uniform`` is the baseline the issue asks for: one ratio for every group, bisected on
the same table to the aim and corrected by the same loop on measured speed (l1 scores), so
``latency`` and ``uniform`` are compared at the same *measured* speed-up. No training: the
decision happens before any pruning-phase epoch, so for a one-shot or training-aware method the
widths, and so the speed, are what the trial would cut (a training-aware method then fills them
with its own channels). Run it alone (nothing else on the cores)::

    python benchmarks/targets.py --arch resnet50 --image-size 224 --batch 32 --targets 1.5 2.0 2.5
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch.checks import make_allocator  # noqa: E402
from launch.recipe import build_method, timing_protocol  # noqa: E402
from launch.speed_target import TOLERANCE, latency_counts, probe, trial_table  # noqa: E402
from methods import Budget, SelectContext, keep_count  # noqa: E402
from pipeline.config import absolutize, load_config  # noqa: E402
from pipeline.distributed import DistInfo  # noqa: E402
from pipeline.latency import TargetResult, hit_target  # noqa: E402
from pipeline.measure import compare  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.surgery import filter_norms, find_groups  # noqa: E402


def uniform_ratio(table, groups, aim: float, round_to: int) -> float:
    """One ratio for every group (the ``uniform`` allocator's widths), bisected on the table
    until its predicted speed-up is ``aim``."""
    lo, hi = 0.0, 0.95
    for _ in range(30):
        mid = (lo + hi) / 2
        if table.dense_s / table.predict_counts(groups, ratio_counts(groups, mid, round_to)) < aim:
            lo = mid
        else:
            hi = mid
    return hi


def ratio_counts(groups, ratio: float, round_to: int) -> dict[str, int]:
    return {g.name: keep_count(g.size, ratio, round_to, g.channel_groups) for g in groups}


def uniform_at_speed(table, dense, groups, target: float, image_size: int, protocol, round_to: int,
                     corrections: int) -> tuple[float, TargetResult]:
    """One ratio for every group whose cut (l1 scores) *measures* ``target`` against ``dense``:
    bisected on the table, then corrected on measured speed by the trial's loop (``hit_target``);
    (the ratio, what the loop did)."""
    scores = {g.name: filter_norms(dense, g, 1) for g in groups}
    ratio_of: dict[tuple, float] = {}

    def allocate(aim: float) -> tuple[dict[str, int], float]:
        ratio = uniform_ratio(table, groups, aim, round_to)
        counts = ratio_counts(groups, ratio, round_to)
        ratio_of[tuple(sorted(counts.items()))] = ratio
        return counts, table.dense_s / table.predict_counts(groups, counts)

    def measured(counts: dict[str, int]) -> float:
        cut = probe(dense, groups, scores, counts, image_size)
        return compare(copy.deepcopy(dense), cut, image_size, protocol)["speedup"]

    hit = hit_target(target, allocate, measured, tolerance=TOLERANCE, max_corrections=corrections)
    return ratio_of[tuple(sorted(hit.counts.items()))], hit


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--scope", default="all", choices=["inner", "all"])
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0, 2.5])
    ap.add_argument("--methods", nargs="+", default=["l1", "lossvar", "sfp", "uniform"])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--corrections", type=int, default=3)
    args = ap.parse_args()

    cfg = absolutize(load_config(ROOT / "configs" / "demo.yaml", {
        "model.arch": args.arch, "data.image_size": args.image_size, "measure.batch_size": args.batch,
        "measure.rounds": args.rounds, "measure.warmup": 1, "prune.scope": args.scope,
        "prune.round_to": args.round_to, "prune.target_corrections": args.corrections, "search.space": {},
        "measure.latency_table.cache_dir": str(ROOT / "runs" / "latency-tables")}))
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    torch.manual_seed(0)
    dense = build_model(args.arch, 1000).eval()
    groups = find_groups(dense, args.image_size, args.scope)
    protocol = timing_protocol(cfg, info.device)
    t0 = time.perf_counter()
    table, path, built = trial_table(cfg, dense, protocol, 1000)
    print(table.summary())
    print(f"table {'built' if built else 'read'} in {time.perf_counter() - t0:.0f} s ({path})\n", flush=True)

    rows = []
    for target in args.targets:
        for name in args.methods:
            t1 = time.perf_counter()
            if name == "uniform":
                scores = {g.name: filter_norms(dense, g, 1) for g in groups}
                _, hit = uniform_at_speed(table, dense, groups, target, args.image_size, protocol, args.round_to,
                                          args.corrections)
                counts, said = hit.counts, hit.summary()
            else:
                c = cfg.model_copy(deep=True)
                c.prune.method, c.prune.target_speedup = name, target
                method = build_method(c, groups)
                allocator = make_allocator(c, method)
                ctx = SelectContext(info=info, image_size=args.image_size)
                budget = Budget(c.prune.prune_ratio, c.prune.round_to, target)
                counts, said = latency_counts(c, info, dense, dense, groups, method, allocator, budget, ctx, protocol,
                                              1000)
                scores = ctx.scores
            cut = probe(dense, groups, scores, counts, args.image_size)
            final = compare(copy.deepcopy(dense), cut, args.image_size, protocol)
            rows.append((args.arch, name, target, said, final, time.perf_counter() - t1))
            print(f"{name} target {target}: probe {said['target_measured_speedup']:.2f}x, again {final['speedup']:.2f}x",
                  flush=True)

    print(f"\n{args.arch} at {args.image_size}², batch {args.batch}, fp32, scope {args.scope}, round_to {args.round_to}")
    print("| allocator / method | target | probe measured | measured again [IQR] | error | MACs removed | "
          "params removed | corrections | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for _, name, target, said, final, secs in rows:
        label = "uniform ratio (l1)" if name == "uniform" else f"latency ({name})"
        print(f"| {label} | {target:.2f}× | {said['target_measured_speedup']:.2f}× | {final['speedup']:.2f}× "
              f"[{final['speedup_low']:.2f}–{final['speedup_high']:.2f}] | {final['speedup'] / target - 1:+.1%} | "
              f"{final['macs_reduction']:.1%} | {final['params_reduction']:.1%} | {int(said['target_corrections'])} | "
              f"{secs:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
