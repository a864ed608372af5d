"""Is the pruned model really faster? Dense vs pruned, measured side by side, with a peer.

    python benchmarks/speed.py --archs resnet101 --targets 0.42 0.5 --batch 8 --rounds 8

For every architecture and MACs-reduction target: prunepipe's L1 pruning (ratio found by
bisection so the MACs reduction hits the target; inner bottleneck channels, and optionally
`round_to`), and Torch-Pruning's own MagnitudePruner (its own groups, its own cut, every
prunable group as its default) at the same MACs, as a peer row. The dense model and every
pruned one are timed in the same interleaved rounds (`pipeline.bench.run_bench`: rotating order,
BatchNorm folded into the convs), reporting the median per-round speed-up with its IQR and the
speed-up efficiency (speed-up ÷ MACs ratio). Weights are random: speed does not depend on them.
On a GPU: bf16 + channels_last; `--compile off on` adds torch.compile rows.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from methods import Budget, SelectContext, get_method_class  # noqa: E402
from methods.allocate import Uniform  # noqa: E402
from pipeline.bench import BenchModel, run_bench  # noqa: E402
from pipeline.measure import count_macs  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.surgery import apply_masks, find_groups, macs_after, macs_profile, prune_model  # noqa: E402


def ratio_at(model, size: int, target: float, *, method: str = "l1", scope: str = "inner", round_to: int = 1,
             options: dict | None = None, dense_macs: int | None = None, hi: float = 0.95, iters: int = 30) -> float:
    """The uniform ``prune_ratio`` whose widths, as ``method`` plans them on ``model`` (the
    uniform allocator's counts, then the method's ``n_keep``: AutoPruner keeps its last block
    whole), give ``target`` MACs reduction, by bisection. The reduction is measured against
    ``dense_macs`` (default: ``model``'s own MACs): pass the dense model's MACs when ``model``
    already lost whole blocks, so a target means the same for every row. 0 when the blocks
    alone already remove ``target``."""
    groups = find_groups(model, size, scope)
    profile = macs_profile(model, size)
    total = float(dense_macs or sum(profile.values()))
    cls = get_method_class(method)

    def reduction(r: float) -> float:
        planned = cls(groups, r, round_to, options, image_size=size)
        planned.set_counts(Uniform().allocate(model, groups, Budget(r, round_to)))
        return 1 - macs_after(profile, groups, {g.name: planned.n_keep(g) for g in groups}) / total

    if reduction(0.0) >= target:
        return 0.0
    lo = 0.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if reduction(mid) < target:
            lo = mid
        else:
            hi = mid
    return hi


def pruned_by(dense, size: int, method: str, ratio: float, *, scope: str = "inner", round_to: int = 1,
              options: dict | None = None, seed: int = 0):
    """A copy of ``dense`` cut by ``method`` through its life cycle, as ``launch.recipe`` runs
    it minus the training: uniform widths (``set_counts``) → ``prepare`` → ``keep_masks`` →
    ``finalize`` → ``apply_masks`` → ``prune_model``. With random weights the choice of
    channels is arbitrary, but the shapes, and so the speed, are the method's."""
    model = copy.deepcopy(dense).eval()
    groups = find_groups(model, size, scope)
    m = get_method_class(method)(groups, ratio, round_to, options, seed=seed, image_size=size)
    m.set_counts(Uniform().allocate(model, groups, Budget(ratio, round_to)))
    m.prepare(model)
    masks = m.keep_masks(model, SelectContext(image_size=size))
    m.finalize(model, masks)
    apply_masks(model, groups, masks)
    return prune_model(model, groups, masks, size).eval()


def l1_at(dense, size: int, target: float, scope: str, round_to: int):
    """L1-pruned copy whose MACs reduction is closest to ``target`` (bisection on the ratio)."""
    ratio = ratio_at(dense, size, target, scope=scope, round_to=round_to)
    return pruned_by(dense, size, "l1", ratio, scope=scope, round_to=round_to), ratio


def torch_pruning_at(dense, size: int, target: float, round_to: int):
    """Torch-Pruning's MagnitudePruner (L2 group magnitude) at the same MACs reduction."""
    import torch_pruning as tp

    example = torch.randn(1, 3, size, size)
    base = count_macs(dense, size)

    def pruned(ratio: float):
        model = copy.deepcopy(dense)
        pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                           pruning_ratio=ratio, ignored_layers=[model.fc],
                                           round_to=round_to if round_to > 1 else None)
        pruner.step()
        return model

    lo, hi = 0.0, 0.9
    for _ in range(12):
        mid = (lo + hi) / 2
        if 1 - count_macs(pruned(mid), size) / base < target:
            lo = mid
        else:
            hi = mid
    return pruned(hi), hi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["resnet101"])
    ap.add_argument("--targets", nargs="+", type=float, default=[0.42, 0.5], help="MACs reductions")
    ap.add_argument("--round-to", type=int, nargs="+", default=[1])
    ap.add_argument("--scopes", nargs="+", choices=["inner", "all"], default=["inner"],
                    help="prunepipe's groups: bottleneck-inner channels, or the residual stream's too")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--compile", nargs="+", choices=["off", "on"], default=["off"],
                    help="eager and/or torch.compile (each model compiled once per setting)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    print(f"# {torch.cuda.get_device_name(dev) if gpu else platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {dev}, batch {args.batch}, "
          f"{args.image_size}², {'bf16 + channels_last' if gpu else 'float32'}, BN folded, "
          f"{args.rounds} interleaved rounds of every model")
    print("| arch | pruner | round_to | compiled | MACs red. | dense img/s | pruned img/s | speed-up [IQR] | "
          "efficiency |")
    print("|" + "---|" * 9)
    for arch in args.archs:
        dense = build_model(arch, 1000).eval()
        models = [BenchModel("dense", dense)]
        rows_of = {}
        for target in args.targets:
            for round_to in args.round_to:
                for scope in args.scopes:
                    models.append(BenchModel(f"prunepipe l1 ({scope})|{round_to}",
                                             l1_at(dense, args.image_size, target, scope, round_to)[0]))
                if not args.no_peer:
                    models.append(BenchModel(f"Torch-Pruning MagnitudePruner|{round_to}",
                                             torch_pruning_at(dense, args.image_size, target, round_to)[0]))
        # every model in the same interleaved rounds: a load that comes and goes hits them alike
        rows = run_bench(models, args.image_size, [args.batch], ["bf16" if gpu else "fp32"], [gpu],
                         [c == "on" for c in args.compile], rounds=args.rounds, device=dev, fold_bn=True)
        for r in rows:
            rows_of.setdefault(r.compiled, []).append(r)
        for compiled, group in rows_of.items():
            dense_row = group[0]
            for r in group[1:]:
                name, round_to = r.label.split("|")
                flag = "" if r.reliable else " (noisy)"
                eff = r.speedup * (1 - r.macs_reduction)  # speed-up ÷ MACs speed-up
                print(f"| {arch} | {name} | {round_to} | {'yes' if compiled else 'no'} | {r.macs_reduction:.1%} | "
                      f"{dense_row.img_s:.1f} | {r.img_s:.1f} | {r.speedup:.2f}x [{r.speedup_low:.2f}-"
                      f"{r.speedup_high:.2f}]{flag} | {eff:.2f} |", flush=True)


if __name__ == "__main__":
    main()
