"""Do the residual streams and whole blocks buy real speed? Widths alone, streams too, blocks too.

    python benchmarks/streams.py                       # ResNet-101, 224², batch 32, float32, CPU; run alone
    python benchmarks/streams.py --arch resnet18 --batch 2 --image-size 64 --rounds 2 --warmup 1   # a smoke test

Rows, every pruned one at the same MACs reduction (``--target``, default 0.5: 2× fewer MACs),
each found by bisection of the uniform ratio on the MACs of the widths the method plans
(``benchmarks/speed.py`` ``ratio_at``, as ``l1_at`` always did):

- ``dense``;
- ``l1`` at ``prune.scope: inner`` (bottleneck-inner channels only) and at ``all`` (the residual
  streams and the stem too);
- every method of ``--methods`` (default sfp, autopruner, abp, ista) at scope ``all``, built
  through its real life cycle without training (uniform widths via ``set_counts`` →
  ``prepare`` → ``keep_masks`` → ``finalize`` → ``apply_masks`` → ``prune_model``;
  ``speed.py`` ``pruned_by``). Weights are random: speed depends on the shapes only. A method
  whose ``Method.scopes`` lacks ``all``, or whose life cycle fails, gets a row saying so.
  ``lossvar`` is not timed: it needs calibration data to choose its per-group widths, and its
  models are plain per-group widths like any other (a shape, not a mechanism, to time);
- ``l1`` with ``--blocks`` (default 4 and 8) identity-shortcut blocks removed
  (``pipeline/blocks.py``; docs/architecture.md, "Removing whole blocks") from the dense model
  first, then widths at scope ``all`` bisected so that the *total* reduction, against the dense
  model's MACs, is the same target. Which blocks: ``--choose scores`` (default) ranks them as
  the recipe does (``block_scores`` → ``choose_blocks``), on one fixed random calibration batch
  (seed 0, random labels) through the random-weight model (seed 0), so the choice is arbitrary but
  reproducible; ``--choose last`` takes the last identity blocks of the deepest stages (layer3
  of ResNet-101 first). In torchvision's ResNets every identity block of a net has the same
  MACs (a stage halves the map and doubles the width), so the rule changes *where* the MACs go
  (map size, width), not how many.

Protocol (docs/benchmarks.md): every model is timed in the same interleaved rounds, in rotating
order, BatchNorm folded, one attempt (``pipeline.bench.run_bench`` with ``BENCH_PROTOCOL``,
i.e. ``pipeline.measure.time_models`` under one ``TimingConfig``); the speed-up is the median of
the per-round ratios to the dense model with its IQR; efficiency = speed-up ÷ MACs ratio
(1.0: every MAC removed became speed). "vs l1 (all)" divides a row's efficiency by the
widths-only ``l1`` scope-all row's: for the block rows it is the speed-up per MAC removed
relative to widths-only pruning (> 1: blocks buy more speed per MAC), for the method rows the
project's target: **every gated method's scope-all row within 5 % of l1's scope-all row** (the
same uniform widths give the same shapes, so the same speed; "shapes" says whether they are
identical). A row marked noisy (IQR > 10 % or other processes on the CPUs) is not a result:
run the script alone.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.speed import pruned_by, ratio_at  # noqa: E402
from methods import get_method_class, method_names  # noqa: E402
from pipeline.bench import BenchModel, run_bench  # noqa: E402
from pipeline.blocks import block_scores, choose_blocks, identity_blocks, remove_blocks  # noqa: E402
from pipeline.measure import count_macs  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.spec import layer_shapes  # noqa: E402

GATED = ["sfp", "autopruner", "abp", "ista"]
NEEDS_DATA = {"lossvar": "not timed: needs calibration data to choose its widths; its shapes are per-group "
                         "widths like any other"}
TOLERANCE = 0.05  # the project's target: a gated method's scope-all row within 5 % of l1's


@dataclass
class Row:
    label: str
    scope: str = "-"
    blocks: tuple[str, ...] = ()
    n_blocks: int = 0  # asked for (a row not timed has no ``blocks``)
    ratio: float | None = None
    model: torch.nn.Module | None = None  # None: not timed, ``note`` says why
    note: str = ""
    kind: str = "widths"  # "dense", "widths", "method", "blocks"


def choose(dense, n: int, rule: str, scores: dict[str, float] | None) -> list[str]:
    """The ``n`` identity blocks a block row removes (see the module docstring)."""
    if rule == "scores":
        return choose_blocks(scores, n)
    by_stage: dict[str, list[str]] = {}
    for name in identity_blocks(dense):
        by_stage.setdefault(name.split(".")[0], []).append(name)
    # the deepest blocks of the stages with the most, layer3 of a ResNet-101 first
    ranked = [b for stage in sorted(by_stage, key=lambda s: -len(by_stage[s])) for b in reversed(by_stage[stage])]
    return sorted(ranked[:n], key=identity_blocks(dense).index)


def build_rows(args) -> list[Row]:
    size = args.image_size
    torch.manual_seed(0)  # the random weights, so that --choose scores picks the same blocks every run
    dense = build_model(args.arch, 1000).eval()
    dense_macs = count_macs(dense, size)
    rows = [Row("dense", kind="dense", model=dense)]
    for scope in ("inner", "all"):
        ratio = ratio_at(dense, size, args.target, scope=scope)
        rows.append(Row(f"l1 ({scope})", scope, ratio=ratio, model=pruned_by(dense, size, "l1", ratio, scope=scope)))
    for method in args.methods:
        row = Row(f"{method} (all)", "all", kind="method")
        rows.append(row)
        if method in NEEDS_DATA:
            row.note = NEEDS_DATA[method]
            continue
        scopes = get_method_class(method).scopes
        if "all" not in scopes:
            row.note = f"not timed: {method} cannot take prune.scope all yet (Method.scopes = {scopes})"
            continue
        try:
            row.ratio = ratio_at(dense, size, args.target, method=method, scope="all")
            row.model = pruned_by(dense, size, method, row.ratio, scope="all")
        except Exception as err:  # a method being written: say so in its row, time the others
            row.note = f"not timed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
    candidates = identity_blocks(dense)
    scores = None
    if args.choose == "scores" and any(0 < n <= len(candidates) for n in args.blocks):
        g = torch.Generator().manual_seed(0)
        calib = [(torch.randn(args.calib, 3, size, size, generator=g), torch.randint(0, 1000, (args.calib,), generator=g))]
        scores = block_scores(dense, candidates, calib)
    for n in args.blocks:
        row = Row(f"l1 (all) + {n} blocks", "all", kind="blocks", n_blocks=n)
        rows.append(row)
        if not 0 < n <= len(candidates):
            row.note = f"not timed: {args.arch} has {len(candidates)} identity-shortcut blocks"
            continue
        row.blocks = tuple(choose(dense, n, args.choose, scores))
        reduced = remove_blocks(copy.deepcopy(dense), row.blocks)
        row.ratio = ratio_at(reduced, size, args.target, scope="all", dense_macs=dense_macs)
        if row.ratio == 0.0:
            row.note = f"the blocks alone remove {1 - count_macs(reduced, size) / dense_macs:.1%} of the MACs"
        row.model = pruned_by(reduced, size, "l1", row.ratio, scope="all")
    return rows


def format_table(rows: list[Row], results: dict, arch: str) -> str:
    ref = results.get("l1 (all)")
    ref_shapes = layer_shapes(next(r.model for r in rows if r.label == "l1 (all)"))
    lines = ["| arch | row | scope | blocks removed | ratio | MACs red. | params red. | img/s | speed-up [IQR] | "
             "efficiency | vs l1 (all), per MAC | shapes = l1 (all) | note |", "|" + "---|" * 13]
    for row in rows:
        ratio = "-" if row.ratio is None else f"{row.ratio:.3f}"
        blocks = ", ".join(row.blocks) or ("-" if row.kind == "dense" else str(row.n_blocks))
        r = results.get(row.label)
        if r is None:
            lines.append(f"| {arch} | {row.label} | {row.scope} | {blocks} | {ratio} | - | - | - | - | - | - | - | "
                         f"{row.note} |")
            continue
        eff = r.speedup * (1 - r.macs_reduction)  # speed-up ÷ MACs speed-up
        rel = check = same = "-"
        note = [row.note] if row.note else []
        if ref is not None and row.kind in ("method", "blocks"):
            ratio_to_ref = eff / (ref.speedup * (1 - ref.macs_reduction))
            rel = f"{ratio_to_ref:.3f}"
            if row.kind == "method":
                check = "within 5 %" if abs(ratio_to_ref - 1) <= TOLERANCE else f"off by {ratio_to_ref - 1:+.1%}"
                note.append(f"target: {check}")
                same = "yes" if layer_shapes(row.model) == ref_shapes else "no"
        if not r.reliable:
            note.append(f"noisy: {r.reason}")
        speed = f"{r.speedup:.2f}x [{r.speedup_low:.2f}-{r.speedup_high:.2f}]"
        lines.append(f"| {arch} | {row.label} | {row.scope} | {blocks} | {ratio} | {r.macs_reduction:.1%} | "
                     f"{r.params_reduction:.1%} | {r.img_s:.1f} | {speed} | {eff:.2f} | {rel} | {same} | "
                     f"{'; '.join(note)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet101")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds (one attempt)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per model before the first round")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads while timing; 0: every core")
    ap.add_argument("--target", type=float, default=0.5, help="MACs reduction of every pruned row (0.5: 2x fewer)")
    ap.add_argument("--methods", nargs="*", default=GATED, help="methods timed at scope all besides l1")
    ap.add_argument("--blocks", nargs="*", type=int, default=[4, 8], help="identity blocks removed, one row each")
    ap.add_argument("--choose", choices=["scores", "last"], default="scores",
                    help="which blocks: block_scores on a fixed random batch, or the deepest of the longest stages")
    ap.add_argument("--calib", type=int, default=8, help="images in the random calibration batch (--choose scores)")
    args = ap.parse_args()
    unknown = sorted(set(args.methods) - set(method_names()))
    if unknown:
        ap.error(f"--methods: unknown {unknown}; allowed: {', '.join(method_names())}")
    if not 0 < args.target < 1:
        ap.error("--target: a MACs reduction in (0, 1)")
    threads = args.threads or torch.get_num_threads()
    rows = build_rows(args)
    timed = [r for r in rows if r.model is not None]
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {threads} threads, cpu, "
          f"batch {args.batch}, {args.image_size}², float32, BN folded, {args.rounds} interleaved rounds of "
          f"{len(timed)} models (one attempt), target {args.target:.0%} fewer MACs, blocks chosen by "
          f"{args.choose}", flush=True)
    results = run_bench([BenchModel(r.label, r.model) for r in timed], args.image_size, [args.batch], ["fp32"],
                        [False], [False], rounds=args.rounds, warmup=args.warmup, threads=threads,
                        device=torch.device("cpu"))
    print(format_table(rows, {r.label: r for r in results}, args.arch), flush=True)


if __name__ == "__main__":
    main()
