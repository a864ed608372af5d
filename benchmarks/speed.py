"""Is the pruned model really faster? Dense vs L1-pruned throughput, measured side by side.

    python benchmarks/speed.py --archs resnet50 resnet101 --ratios 0.3 0.5 --image-size 224 --batch 8

Prints one table: MACs and params reduction, dense and pruned images/s (median of timed
batches, alternated over rounds), measured speed-up and speed-up efficiency
(= measured speed-up ÷ MACs speed-up). Weights are random: speed does not depend on them.
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
from pipeline.measure import compare  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.surgery import apply_masks, find_groups, prune_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["resnet50", "resnet101"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5])
    ap.add_argument("--scope", default="inner", choices=["inner", "all"])
    ap.add_argument("--round-to", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    amp = torch.bfloat16 if dev.type == "cuda" else None
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {dev}, batch {args.batch}, {args.image_size}², {'bf16 + channels_last' if amp else 'float32'}")
    head = "| arch | ratio | MACs (G) | MACs red. | params red. | dense img/s | pruned img/s | speed-up | efficiency |"
    print(head)
    print("|" + "---|" * 9)
    for arch in args.archs:
        dense = build_model(arch, 1000).eval()
        for ratio in args.ratios:
            model = copy.deepcopy(dense)
            groups = find_groups(model, args.image_size, args.scope)
            masks = get_method_class("l1")(groups, ratio, round_to=args.round_to).keep_masks(model)
            apply_masks(model, groups, masks)
            prune_model(model, groups, masks, args.image_size)
            m = compare(dense, model, args.image_size, rounds=args.rounds, batch_size=args.batch, warmup=2,
                        device=dev, amp_dtype=amp, channels_last=dev.type == "cuda")
            print(f"| {arch} | {ratio:.2f} | {m['macs'] / 1e9:.2f} | {m['macs_reduction']:.1%} | "
                  f"{m['params_reduction']:.1%} | {m['dense_img_s']:.1f} | {m['img_s']:.1f} | {m['speedup']:.2f}x | "
                  f"{m['speedup_efficiency']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
