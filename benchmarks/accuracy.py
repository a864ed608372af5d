"""Accuracy at equal MACs, on real data: every method against the baselines and Torch-Pruning's peers.

    python benchmarks/accuracy.py                      # the full protocol (make bench-accuracy)
    python benchmarks/accuracy.py --seeds 0 --methods l1 sfp --targets 0.5   # a quick look
    python benchmarks/accuracy.py --variants l1@all abp@all ista@all autopruner@all l1+b2 lossvar+b2

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

Variants (``--variants``, instead of ``--methods``): ``METHOD[@SCOPE][+bN]``, e.g. ``abp@all``
(``prune.scope: all``, the residual streams too), ``l1+b2`` (``prune.blocks: 2``: the 2
identity-shortcut blocks whose bypass raises the calibration loss least are removed first,
docs/architecture.md "Removing whole blocks"), ``lossvar@all+b2``. A plain ``l1`` is today's
row (scope inner, no block removed), and without ``--variants`` the rows are today's. ResNet-18
has 5 identity blocks (layer1.0, layer1.1, layer2.1, layer3.1, layer4.1). Every variant is held
to the same MACs targets, measured against the *dense* model: the ratio is bisected on the
widths the method plans at the variant's scope, on the model without N blocks; lossvar, whose
``target_macs_reduction`` is relative to the model it sees (the one without the blocks), gets
``1 − (1 − target) · dense MACs / MACs without the blocks``. In torchvision's ResNets every
identity block of a net has the same MACs, so that arithmetic does not depend on which blocks
the trial's scores choose (only rounding does).

At equal *measured* speed instead (``--speedups 2 3``): two rows per speed-up, both ``l1`` at
``--scope`` (default ``all``): ``latency`` is a trial with ``prune.target_speedup`` (the latency
allocator on this device's table, corrected on measured speed by the trial itself), and
``uniform`` is a trial whose one ratio was bisected on the same table and corrected on measured
speed by the same loop (``benchmarks/targets.py``) before the trial runs; both trials time
their own cut, which the table reports.

The table is printed, written to ``--out`` and logged to MLflow (one run per target × row).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import targets  # noqa: E402
from benchmarks.speed import ratio_at  # noqa: E402
from launch.recipe import baseline_path, run_pretrain, run_trial, timing_protocol  # noqa: E402
from launch.speed_target import trial_table  # noqa: E402
from methods import get_method_class, method_names  # noqa: E402
from methods.latency_alloc import TargetUnreachable  # noqa: E402
from pipeline import registry  # noqa: E402
from pipeline.blocks import identity_blocks, remove_blocks  # noqa: E402
from pipeline.config import absolutize, build_config  # noqa: E402
from pipeline.data.convert import write_digits  # noqa: E402
from pipeline.measure import count_macs  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.surgery import find_groups  # noqa: E402

SEED_METHODS = ["sfp", "autopruner", "lossvar", "abp", "ista"]
BASELINES = ["l1", "l2", "random"]
PEERS = ["tp_magnitude", "tp_bnscale"]


@dataclass(frozen=True)
class Variant:
    """One row of the table: a method at a ``prune.scope``, after ``prune.blocks`` blocks are removed."""

    method: str
    scope: str = "inner"
    blocks: int = 0

    SYNTAX = re.compile(r"(?P<method>[a-z0-9_]+)(?:@(?P<scope>inner|all))?(?:\+b(?P<blocks>\d+))?")

    @classmethod
    def parse(cls, text: str) -> Variant:
        m = cls.SYNTAX.fullmatch(text.strip())
        if m is None:
            raise ValueError(f"{text!r}: expected METHOD[@inner|@all][+bN], e.g. abp@all, l1+b2, lossvar@all+b2")
        return cls(m["method"], m["scope"] or "inner", int(m["blocks"] or 0))

    @property
    def label(self) -> str:
        """``l1`` (today's rows unchanged), ``abp@all``, ``l1+b2``, ``lossvar@all+b2``."""
        return self.method + ("" if self.scope == "inner" else f"@{self.scope}") + (f"+b{self.blocks}" if self.blocks else "")

    @property
    def slug(self) -> str:
        """The label as a folder name part: ``abp-all``, ``l1-b2``."""
        return self.method + ("" if self.scope == "inner" else f"-{self.scope}") + (f"-b{self.blocks}" if self.blocks else "")


def blocks_macs(arch: str, image_size: int, n: int) -> tuple[int, int]:
    """The dense model's MACs and its MACs with ``n`` identity blocks removed. Which ones the
    trial removes is decided in the trial (its calibration scores); every identity block of a
    torchvision ResNet has the same MACs, so the last ``n`` stand in for them (checked)."""
    model = build_model(arch, 10)
    dense = count_macs(model, image_size)
    names = identity_blocks(model)
    if n > len(names):
        raise ValueError(f"+b{n}: {arch} has {len(names)} identity-shortcut blocks")
    cost = {dense - count_macs(remove_blocks(copy.deepcopy(model), [b]), image_size) for b in names}
    if len(cost) > 1:
        print(f"warning: {arch}'s identity blocks differ in MACs ({sorted(cost)}); the targets assume the "
              "last blocks are removed", flush=True)
    return dense, count_macs(remove_blocks(model, names[-n:] if n else []), image_size)


def uniform_ratio_for(arch: str, image_size: int, target: float, round_to: int = 1, method: str = "l1",
                      scope: str = "inner", blocks: int = 0) -> float:
    """The prune_ratio whose widths, as ``method`` plans them (``n_keep``) at ``scope``, give
    ``target`` MACs reduction against the dense model (bisection, ``benchmarks/speed.py``
    ``ratio_at``), on the model without ``blocks`` identity blocks (the last ones: see
    :func:`blocks_macs`): AutoPruner never gates the last block, so its ratio must be higher
    for the same MACs (with the l1 ratio it removed 43 % where 50 % was asked)."""
    model = build_model(arch, 10)
    dense = count_macs(model, image_size)
    if blocks:
        remove_blocks(model, identity_blocks(model)[-blocks:])
    return ratio_at(model, image_size, target, method=method, scope=scope, round_to=round_to, dense_macs=dense,
                    hi=0.99, iters=40)


def lossvar_target(arch: str, image_size: int, target: float, blocks: int) -> float:
    """lossvar's ``target_macs_reduction``, relative to the model it sees (without ``blocks``
    blocks), for a total reduction ``target`` against the dense model."""
    if not blocks:
        return target
    dense, without = blocks_macs(arch, image_size, blocks)
    inner = 1 - (1 - target) * dense / without
    if inner <= 0:
        raise ValueError(f"+b{blocks}: the blocks alone remove {1 - without / dense:.1%} of the MACs, "
                         f"target {target:.0%}")
    return inner


def one_run(base: dict, variant: Variant, ratio: float, target: float, seed: int, budget: int, out: Path,
            lossvar_macs: float | None = None, speedup: float | None = None, allocator_options: dict | None = None
            ) -> dict:
    """One trial; ``speedup``: ``target`` is a measured speed-up the trial prunes to itself
    (``prune.target_speedup``, the latency allocator), not a MACs reduction."""
    method = variant.method
    aware = get_method_class(method).training_aware
    overrides = {
        "seed": seed,
        "prune.method": method,
        "prune.prune_ratio": ratio,
        "prune.epochs": 1 if aware else 0,
        "train.budget_epochs": budget,
        # named by the arch too: a folder holding another arch's checkpoint is refused, not resumed
        "output_dir": str(out / (base["model"]["arch"] + (f"-x{speedup:g}-" if speedup else f"-t{int(target * 100)}-")
                                 + f"{variant.slug}-s{seed}"
                                 + "".join(f"-{k}-{val}" for k, val in (allocator_options or {}).items()))),
        "registry.enabled": False,
    }
    if speedup:
        overrides["prune.target_speedup"] = speedup
    if allocator_options:
        overrides["prune.allocator_options"] = allocator_options
    if variant.scope != "inner":  # today's rows keep today's overrides exactly
        overrides["prune.scope"] = variant.scope
    if variant.blocks:
        overrides["prune.blocks"] = variant.blocks
    if method == "lossvar":
        overrides["prune.options"] = {"lossvar": {"target_macs_reduction": lossvar_macs or target}}
    cfg = build_config(base, overrides)
    epochs: dict[int, float] = {}

    def capture(m: dict) -> None:
        if m.get("phase") in ("finetune", "final"):
            epochs[int(m["epoch"])] = m["val_top1"]

    t0 = time.perf_counter()
    final = run_trial(cfg, report=capture)
    if variant.blocks and final.get("blocks_removed") != variant.blocks:
        raise SystemExit(f"{variant.label}: the trial removed {final.get('blocks_removed', 0)} blocks, not "
                         f"{variant.blocks}: does launch.recipe honour prune.blocks yet?")
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
        "corrections": final.get("target_corrections", float("nan")),
    }


def uniform_at_speed(base: dict, scope: str, speedup: float) -> tuple[float, float, int]:
    """The ``l1`` uniform ratio whose cut *measures* ``speedup`` under the benchmark's measure
    protocol, on this device's latency table (the trial's own cache): (ratio, measured, corrections)."""
    cfg = build_config(base, {"prune.scope": scope})
    dense = build_model(cfg.model.arch, 10).eval()  # speed depends on shapes, not on weights
    groups = find_groups(dense, cfg.data.image_size, scope)
    protocol = timing_protocol(cfg, torch.device("cpu"))
    table, _, _ = trial_table(cfg, dense, protocol, 10)
    ratio, hit = targets.uniform_at_speed(table, dense, groups, speedup, cfg.data.image_size, protocol,
                                          cfg.prune.round_to, cfg.prune.target_corrections)
    return ratio, hit.measured, hit.corrections


def mean_std(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{100 * xs[0]:.1f}"
    return f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.stdev(xs):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description="Accuracy at equal MACs on the digits data, every method.")
    rows_of = ap.add_mutually_exclusive_group()
    rows_of.add_argument("--methods", nargs="+", default=BASELINES + PEERS + SEED_METHODS,
                         help="one row each, at scope inner with every block (today's rows)")
    rows_of.add_argument("--variants", nargs="+", type=Variant.parse, default=None,
                         help="rows as METHOD[@inner|@all][+bN] instead, e.g. abp@all l1+b2 lossvar+b2")
    ap.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.75])
    ap.add_argument("--speedups", nargs="+", type=float, default=None,
                    help="instead of MACs targets: measured speed-ups, latency allocator against one uniform ratio")
    ap.add_argument("--scope", default="all", choices=["inner", "all"], help="prune.scope of the --speedups rows")
    ap.add_argument("--allocator-options", type=json.loads, default=None,
                    help='the latency rows\' prune.allocator_options, as JSON, e.g. \'{"normalize": "share"}\'')
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--budget", type=int, default=3, help="total epochs after the baseline, pruning epochs included")
    ap.add_argument("--baseline-epochs", type=int, default=8)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench"))
    ap.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    args = ap.parse_args()
    variants = args.variants or [Variant(m) for m in args.methods]
    flag = "--variants" if args.variants else "--methods"
    unknown = sorted({v.method for v in variants} - set(method_names()))
    if unknown:
        ap.error(f"{flag}: unknown {unknown}; allowed: {', '.join(method_names())}")
    available = len(identity_blocks(build_model(args.arch, 10)))
    for v in variants:
        scopes = get_method_class(v.method).scopes
        if v.scope not in scopes:
            ap.error(f"--variants {v.label}: {v.method} takes prune.scope {' or '.join(scopes)}")
        if v.blocks > available:
            ap.error(f"--variants {v.label}: {args.arch} has {available} identity-shortcut blocks")
    if args.budget < 2:
        ap.error("--budget: at least 2 (a pruning epoch and a fine-tune epoch)")
    if args.speedups and (args.variants or min(args.speedups) <= 1):
        ap.error("--speedups: speed-ups above 1, with the two l1 rows (no --variants)")
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
    for speedup in args.speedups or []:
        v = Variant("l1", args.scope)
        try:
            first = one_run(base, v, 0.5, speedup, args.seeds[0], args.budget, work / "runs", speedup=speedup,
                            allocator_options=args.allocator_options)
        except TargetUnreachable as err:  # the table's reach on this device, at this size
            print(f"speed-up {speedup:.2f}x: {err}", flush=True)
            continue
        ratio, measured, corrections = uniform_at_speed(base, args.scope, speedup)
        print(f"uniform ratio {ratio:.3f} measured {measured:.2f}x for {speedup:.2f}x ({corrections} corrections)",
              flush=True)
        for label, r, target in (("latency", 0.5, speedup), ("uniform", ratio, None)):
            runs = [first if target and s == args.seeds[0] else
                    one_run(base, v, r, speedup, s, args.budget, work / "runs", speedup=target,
                            allocator_options=args.allocator_options if target else None) for s in args.seeds]
            if target is None:
                for run in runs:  # the ratio's own correction, before the trial
                    run["corrections"] = corrections
            if target and args.allocator_options:
                label += " " + ",".join(f"{k}={val}" for k, val in args.allocator_options.items())
            rows.append({"target": speedup, "method": f"{label} (l1@{args.scope})", "variant": v,
                         "ratio": r if target is None else float("nan"), "runs": runs, "speed": True})
            print(f"speed-up {speedup:.2f}x {label:<8} cut {mean_std([x['cut'] for x in runs]):>12} "
                  f"full {mean_std([x['full'] for x in runs]):>12} MACs -{runs[0]['macs_reduction']:.1%} "
                  f"{statistics.mean(x['speedup'] for x in runs):.2f}x", flush=True)
    for target in [] if args.speedups else args.targets:
        for v in variants:
            ratio = uniform_ratio_for(args.arch, args.image_size, target, method=v.method, scope=v.scope,
                                      blocks=v.blocks)
            inner = lossvar_target(args.arch, args.image_size, target, v.blocks) if v.method == "lossvar" else None
            runs = [one_run(base, v, ratio, target, s, args.budget, work / "runs", inner) for s in args.seeds]
            row = {"target": target, "method": v.label, "variant": v, "ratio": ratio, "runs": runs}
            rows.append(row)
            r0 = runs[0]
            print(f"target {target:.0%} {v.label:<12} cut {mean_std([r['cut'] for r in runs]):>12} "
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
    speed = bool(rows and rows[0].get("speed"))
    if speed:
        lines[2] = lines[2].replace("MACs target", "measured speed-up target") + " corrections |"
        lines[3] += "---|"
    for row in rows:
        runs = row["runs"]
        macs = statistics.mean(r["macs_reduction"] for r in runs)
        params = statistics.mean(r["params_reduction"] for r in runs)
        target = f"{row['target']:.2f}×" if speed else f"{row['target']:.0%}"
        lines.append(
            f"| {target} | {row['method']} | {'-' if math.isnan(row['ratio']) else format(row['ratio'], '.3f')} | "
            f"{mean_std([r['cut'] for r in runs])} | "
            f"{mean_std([r['ft1'] for r in runs])} | {mean_std([r['full'] for r in runs])} | {macs:.1%} | {params:.1%} | "
            f"{statistics.mean(r['img_s'] for r in runs):.0f} ({statistics.mean(r['dense_img_s'] for r in runs):.0f}) | "
            f"{statistics.mean(r['speedup'] for r in runs):.2f}x | {statistics.mean(r['efficiency'] for r in runs):.2f} | "
            f"{statistics.mean(r['wall_s'] for r in runs):.0f} |"
            + (f" {statistics.mean(r['corrections'] for r in runs):.1f} |" if speed else "")
        )
    return "\n".join(lines)


def log_to_mlflow(cfg, rows: list[dict], table: str) -> None:
    registry.connect(cfg.registry)
    for row in rows:
        with registry.mlflow.start_run(run_name=f"{row['method']}-{int(row['target'] * 100)}"):
            v = row["variant"]
            registry.log_params({"method": v.method, "scope": v.scope, "blocks": v.blocks,
                                 "target_speedup" if row.get("speed") else "target_macs_reduction": row["target"],
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
