"""How well the latency table predicts whole models: predicted vs measured over random cuts.

Builds the table of ARCH on this device (``pipeline.latency.build_table``, the measure
section's protocol: BN folded, float32 on a CPU), cuts N models with random per-group widths
(each group keeps a uniform-random share in [0.15, 1], rounded to ``--round-to``) and, with
``--blocks``, a random number of identity blocks removed, then times every
cut one against the dense model in its own interleaved :func:`pipeline.measure.time_models` run
(as a trial measures its cut), and prints one row per model and the median and 90th percentile of
|predicted − measured| / measured, for the latency and for the speed-up (the figure a target
is), with the table's build time. Run it alone (nothing else on the cores)::

    python benchmarks/latency.py --arch resnet50 --image-size 224 --batch 32 --models 20
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from methods.base import keep_count  # noqa: E402
from pipeline.blocks import identity_blocks, remove_blocks  # noqa: E402
from pipeline.latency import build_table, table_key  # noqa: E402
from pipeline.measure import TimingConfig, time_models  # noqa: E402
from pipeline.spec import removed_blocks  # noqa: E402
from pipeline.surgery import apply_masks, find_groups, prune_model, structured_topk  # noqa: E402


def random_cut(dense, size, scope, round_to, rng, blocks):
    model = copy.deepcopy(dense)
    if blocks:
        candidates = identity_blocks(model)
        remove_blocks(model, sorted(rng.sample(candidates, rng.randint(0, min(blocks, len(candidates))))))
    groups = find_groups(model, size, scope)
    counts = {g.name: keep_count(g.size, rng.uniform(0.0, 0.85), round_to, g.channel_groups) for g in groups}
    masks = {g.name: structured_topk(torch.rand(g.size), counts[g.name], g.channel_groups) for g in groups}
    apply_masks(model, groups, masks)
    return prune_model(model, groups, masks, size)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--scope", default="all", choices=["inner", "all"])
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--models", type=int, default=20)
    ap.add_argument("--blocks", type=int, default=4, help="remove up to this many identity blocks per model")
    ap.add_argument("--levels", type=float, nargs="+", default=[0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu-allocator", default="cached", choices=["cached", "system"],
                    help="measure.cpu_allocator: system leaves glibc's malloc as it is (docs/benchmarks.md §12)")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    dense = getattr(torchvision.models, args.arch)(num_classes=1000).eval()
    size = args.image_size
    protocol = TimingConfig(batch_size=args.batch, rounds=args.rounds, per_round=1, warmup=1, fold_bn=True,
                            threads=torch.get_num_threads(), cached_allocator=args.cpu_allocator == "cached")
    groups = find_groups(dense, size, args.scope)
    key = table_key(protocol, args.arch, size, 1000, args.scope, args.round_to, args.levels)
    table = build_table(dense, groups, protocol, key, reps=args.reps, warmup=1)
    print(table.summary(), flush=True)
    rng = random.Random(args.seed)
    cuts = [random_cut(dense, size, args.scope, args.round_to, rng, args.blocks) for _ in range(args.models)]
    predicted = [table.predict_model(m) for m in cuts]
    t1 = time.perf_counter()
    # each cut against the dense model in its own interleaved run, as a trial measures its cut
    # (twenty models in one run would each be timed in a memory state no deployment has)
    results = []
    for i, m in enumerate(cuts):
        results.append(time_models([copy.deepcopy(dense), m], size, protocol)[1])
        print(f"  model {i}: {results[-1].speedup:.2f}x measured, {table.dense_s / predicted[i]:.2f}x predicted",
              flush=True)
    print(f"table built in {table.build_s:.1f} s; the {args.models} models timed in {time.perf_counter() - t1:.1f} s")
    print("| model | blocks removed | measured ms | predicted ms | error | measured speed-up [IQR] | predicted | error |")
    print("|---|---|---|---|---|---|---|---|")
    errors, sp_errors = [], []
    for i, (m, p, r) in enumerate(zip(cuts, predicted, results, strict=True)):
        measured = args.batch / r.img_s
        errors.append(abs(p - measured) / measured)
        sp = table.dense_s / p
        sp_errors.append(abs(sp - r.speedup) / r.speedup)
        gone = len(removed_blocks(m))
        print(f"| {i} | {gone} | {1000 * measured:.1f} | {1000 * p:.1f} | {(p - measured) / measured:+.1%} | "
              f"{r.speedup:.2f}× [{r.speedup_low:.2f}–{r.speedup_high:.2f}] | {sp:.2f}× | {sp / r.speedup - 1:+.1%} |")

    def p90(values):
        values = sorted(values)
        return values[min(len(values) - 1, int(round(0.9 * (len(values) - 1))))]

    dense_ms = [1000 * args.batch / r.dense_img_s for r in results]
    print(f"\nlatency: median |error| {statistics.median(errors):.1%}, 90th percentile {p90(errors):.1%}; "
          f"speed-up: median |error| {statistics.median(sp_errors):.1%}, 90th percentile {p90(sp_errors):.1%} "
          f"over {len(errors)} models")
    print(f"the dense model across the runs: {min(dense_ms):.0f}–{max(dense_ms):.0f} ms (table: "
          f"{1000 * table.dense_s:.0f} ms); reliable timing in {sum(r.reliable for r in results)} of {len(results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
