"""Accuracy at equal MACs, on real data: every method against the baselines and Torch-Pruning's peers.

    python benchmarks/accuracy.py                      # the full protocol (make bench-accuracy)
    python benchmarks/accuracy.py --seeds 0 --methods l1 sfp --targets 0.5   # a quick look

Protocol, on scikit-learn's real handwritten digits (32×32):
- a dense ResNet-18 trained once to a baseline (``--baseline-epochs``), then pruned by every
  method to the same MACs reductions (``--targets``, default 50 % and 75 %). Uniform-rate and
  learned methods get the uniform ratio whose kept widths give that reduction; ``lossvar``
  searches its δ for the same target;
- three accuracies per run: right after the cut with BatchNorm statistics re-estimated on a
  few training batches (no gradient step), after one fine-tune epoch, after the full budget;
- the same total epoch budget for everyone (``--budget``): a training-aware method's
  pruning epoch counts against it (1 pruning + budget−1 fine-tune epochs);
- several seeds (data order, random choices, gate init): mean ± std; plus MACs and params
  reduction, measured CPU throughput (dense vs pruned side by side), speed-up efficiency and
  wall time. Single process: the protocol compares methods, DDP is tested elsewhere.

The table is printed, written to ``--out`` and logged to MLflow (one run per target × method).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch.recipe import baseline_path, run_pretrain, run_trial  # noqa: E402
from methods import get_method_class, method_names  # noqa: E402
from pipeline import registry  # noqa: E402
from pipeline.config import absolutize, build_config  # noqa: E402
from pipeline.data.convert import write_digits  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.surgery import find_groups, macs_after, macs_profile  # noqa: E402

SEED_METHODS = ["sfp", "autopruner", "lossvar", "abp", "ista"]
BASELINES = ["l1", "l2", "random"]
PEERS = ["tp_magnitude", "tp_bnscale"]


def uniform_ratio_for(arch: str, image_size: int, target: float, round_to: int = 1, method: str = "l1") -> float:
    """The prune_ratio whose widths, as ``method`` plans them (``n_keep``), give ``target`` MACs
    reduction (bisection): AutoPruner never gates the last block, so its ratio must be higher
    for the same MACs (with the l1 ratio it removed 43 % where 50 % was asked)."""
    model = build_model(arch, 10)
    groups = find_groups(model, image_size, "inner")
    profile = macs_profile(model, image_size)
    dense = sum(profile.values())
    cls = get_method_class(method)

    def reduction(r: float) -> float:
        planned = cls(groups, r, round_to)
        return 1 - macs_after(profile, groups, {g.name: planned.n_keep(g) for g in groups}) / dense

    lo, hi = 0.0, 0.99
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if reduction(mid) < target else (lo, mid)
    return hi


def one_run(base: dict, method: str, ratio: float, target: float, seed: int, budget: int, out: Path) -> dict:
    aware = get_method_class(method).training_aware
    overrides = {
        "seed": seed,
        "prune.method": method,
        "prune.prune_ratio": ratio,
        "prune.epochs": 1 if aware else 0,
        "train.budget_epochs": budget,
        "output_dir": str(out / f"t{int(target * 100)}-{method}-s{seed}"),
        "registry.enabled": False,
    }
    if method == "lossvar":
        overrides["prune.options"] = {"lossvar": {"target_macs_reduction": target}}
    cfg = build_config(base, overrides)
    epochs: dict[int, float] = {}

    def capture(m: dict) -> None:
        if m.get("phase") in ("finetune", "final"):
            epochs[int(m["epoch"])] = m["val_top1"]

    t0 = time.perf_counter()
    final = run_trial(cfg, report=capture)
    first_ft = (1 if aware else 0) + 1
    return {
        "cut": final.get("recal_val_top1", final["pruned_val_top1"]),
        "ft1": epochs.get(first_ft, float("nan")),
        "full": final["val_top1"],
        "macs_reduction": final["macs_reduction"],
        "params_reduction": final["params_reduction"],
        "img_s": final["img_s"],
        "dense_img_s": final["dense_img_s"],
        "speedup": final["speedup"],
        "efficiency": final["speedup_efficiency"],
        "wall_s": time.perf_counter() - t0,
        "dense_top1": final["dense_val_top1"],
    }


def mean_std(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{100 * xs[0]:.1f}"
    return f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.stdev(xs):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description="Accuracy at equal MACs on the digits data, every method.")
    ap.add_argument("--methods", nargs="+", default=BASELINES + PEERS + SEED_METHODS)
    ap.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.75])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--budget", type=int, default=3, help="total epochs after the baseline, pruning epochs included")
    ap.add_argument("--baseline-epochs", type=int, default=8)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench"))
    ap.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    args = ap.parse_args()
    unknown = sorted(set(args.methods) - set(method_names()))
    if unknown:
        ap.error(f"--methods: unknown {unknown}; allowed: {', '.join(method_names())}")
    if args.budget < 2:
        ap.error("--budget: at least 2 (a pruning epoch and a fine-tune epoch)")
    work = Path(args.work)
    data = ROOT / "data" / f"digits-{args.image_size}"
    if not (data / "dataset.json").is_file():
        write_digits(data, image_size=args.image_size)
    base_cfg = absolutize(build_config({}, {
        "name": "bench", "output_dir": str(work), "model.arch": args.arch, "data.root": str(data),
        "data.image_size": args.image_size, "data.batch_size": 64, "baseline.epochs": args.baseline_epochs,
        "train.lr": 0.02, "measure.rounds": 6, "measure.warmup": 2,
        "registry.tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "registry.experiment": "benchmark-accuracy",
    }))
    weights = baseline_path(base_cfg)
    if not weights.is_file():
        print(f"training the dense baseline ({args.baseline_epochs} epochs) ...", flush=True)
        run_pretrain(base_cfg)
    base = base_cfg.model_copy(update={"model": base_cfg.model.model_copy(update={"weights": str(weights)})})
    base = base.model_dump(mode="json")

    rows = []
    t_all = time.perf_counter()
    for target in args.targets:
        for method in args.methods:
            ratio = uniform_ratio_for(args.arch, args.image_size, target, method=method)
            runs = [one_run(base, method, ratio, target, s, args.budget, work / "runs") for s in args.seeds]
            row = {"target": target, "method": method, "ratio": ratio, "runs": runs}
            rows.append(row)
            r0 = runs[0]
            print(f"target {target:.0%} {method:<12} cut {mean_std([r['cut'] for r in runs]):>12} "
                  f"ft1 {mean_std([r['ft1'] for r in runs]):>12} full {mean_std([r['full'] for r in runs]):>12} "
                  f"MACs -{r0['macs_reduction']:.1%} {r0['speedup']:.2f}x", flush=True)
    table = format_table(rows, args, time.perf_counter() - t_all)
    print()
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    log_to_mlflow(base_cfg, rows, table)


def format_table(rows: list[dict], args, wall: float) -> str:
    dense = rows[0]["runs"][0]["dense_top1"] if rows else float("nan")
    lines = [
        f"Dense {args.arch} baseline: top-1 {100 * dense:.1f} % on the digits val split ({args.image_size}×{args.image_size}); "
        f"budget {args.budget} epochs per run; seeds {args.seeds}; total wall time {wall / 60:.1f} min.",
        "",
        "| MACs target | method | ratio | top-1 after cut + BN recal. | after 1 fine-tune epoch | after full budget "
        "| MACs red. | params red. | img/s (dense) | speed-up | efficiency | wall s/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        runs = row["runs"]
        macs = statistics.mean(r["macs_reduction"] for r in runs)
        params = statistics.mean(r["params_reduction"] for r in runs)
        lines.append(
            f"| {row['target']:.0%} | {row['method']} | {row['ratio']:.3f} | {mean_std([r['cut'] for r in runs])} | "
            f"{mean_std([r['ft1'] for r in runs])} | {mean_std([r['full'] for r in runs])} | {macs:.1%} | {params:.1%} | "
            f"{statistics.mean(r['img_s'] for r in runs):.0f} ({statistics.mean(r['dense_img_s'] for r in runs):.0f}) | "
            f"{statistics.mean(r['speedup'] for r in runs):.2f}x | {statistics.mean(r['efficiency'] for r in runs):.2f} | "
            f"{statistics.mean(r['wall_s'] for r in runs):.0f} |"
        )
    return "\n".join(lines)


def log_to_mlflow(cfg, rows: list[dict], table: str) -> None:
    registry.connect(cfg.registry)
    for row in rows:
        with registry.mlflow.start_run(run_name=f"{row['method']}-{int(row['target'] * 100)}"):
            registry.log_params({"method": row["method"], "target_macs_reduction": row["target"],
                                 "prune_ratio": row["ratio"], "seeds": len(row["runs"])})
            for key in ("cut", "ft1", "full", "macs_reduction", "params_reduction", "img_s", "speedup", "efficiency",
                        "wall_s"):
                vals = [r[key] for r in row["runs"]]
                registry.log_metrics({f"{key}_mean": statistics.mean(vals),
                                      f"{key}_std": statistics.stdev(vals) if len(vals) > 1 else 0.0})
    with registry.mlflow.start_run(run_name="table"):
        registry.mlflow.log_text(table, "accuracy_table.md")


if __name__ == "__main__":
    main()
