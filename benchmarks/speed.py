"""Is the pruned model really faster? Dense vs pruned, measured side by side, with a peer.

    python benchmarks/speed.py --archs resnet101 --targets 0.42 0.5 --batch 8 --rounds 8

For every architecture and MACs-reduction target: prunepipe's L1 pruning (ratio found by
bisection so the MACs reduction hits the target; inner bottleneck channels, and optionally
`round_to`), and Torch-Pruning's own MagnitudePruner (its own groups, its own cut, every
prunable group as its default) at the same MACs, as a peer row. Each row is timed interleaved
against the dense model (ABBA rounds, BatchNorm folded into the convs for both), reporting the
median per-round speed-up with its IQR and the speed-up efficiency (speed-up ÷ MACs ratio).
Weights are random: speed does not depend on them. On a GPU: bf16 + channels_last.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from methods import get_method_class  # noqa: E402
from pipeline.measure import compare, count_macs  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.surgery import apply_masks, find_groups, macs_after, macs_profile, prune_model  # noqa: E402


def l1_at(dense, size: int, target: float, scope: str, round_to: int):
    """L1-pruned copy whose MACs reduction is closest to ``target`` (bisection on the ratio)."""
    groups = find_groups(dense, size, scope)
    profile = macs_profile(dense, size)
    total = float(sum(profile.values()))
    lo, hi = 0.0, 0.95
    for _ in range(30):
        mid = (lo + hi) / 2
        method = get_method_class("l1")(groups, mid, round_to=round_to)
        kept = {g.name: method.n_keep(g) for g in groups}
        if 1 - macs_after(profile, groups, kept) / total < target:
            lo = mid
        else:
            hi = mid
    model = copy.deepcopy(dense)
    masks = get_method_class("l1")(groups, hi, round_to=round_to).keep_masks(model)
    apply_masks(model, groups, masks)
    return prune_model(model, groups, masks, size), hi


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
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    amp = torch.bfloat16 if dev.type == "cuda" else None
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {dev}, batch {args.batch}, {args.image_size}², {'bf16 + channels_last' if amp else 'float32'}, "
          f"BN folded, {args.rounds} interleaved rounds")
    print("| arch | pruner | round_to | MACs red. | dense img/s | pruned img/s | speed-up [IQR] | efficiency |")
    print("|" + "---|" * 8)
    for arch in args.archs:
        dense = build_model(arch, 1000).eval()
        for target in args.targets:
            for round_to in args.round_to:
                rows = [("prunepipe l1 (inner)", l1_at(dense, args.image_size, target, "inner", round_to)[0])]
                if not args.no_peer:
                    rows.append(("Torch-Pruning MagnitudePruner", torch_pruning_at(dense, args.image_size, target,
                                                                                  round_to)[0]))
                for name, model in rows:
                    m = compare(dense, model, args.image_size, batch_size=args.batch, rounds=args.rounds, warmup=2,
                                device=dev, amp_dtype=amp, channels_last=dev.type == "cuda", fold_bn=True)
                    flag = "" if m["speed_reliable"] else " (noisy)"
                    print(f"| {arch} | {name} | {round_to} | {m['macs_reduction']:.1%} | {m['dense_img_s']:.1f} | "
                          f"{m['img_s']:.1f} | {m['speedup']:.2f}x [{m['speedup_low']:.2f}-{m['speedup_high']:.2f}]"
                          f"{flag} | {m['speedup_efficiency']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
