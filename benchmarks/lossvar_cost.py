"""What `lossvar`'s selection costs on a real-size network: probes, seconds, full-forward equivalents.

    python benchmarks/lossvar_cost.py --arch resnet101 --image-size 64 --calib 128 --target 0.42

The model has random weights, its classifier scaled ×``--logit-scale`` so that it is as confident
in its calibration labels — its own predictions — as a trained network is in the true ones;
without that a random deep ResNet's loss hardly moves when channels are masked and any δ prunes
nearly everything (seen: ResNet-101 at δ 4e-9 → 87 %). BatchNorm statistics are estimated on
the calibration images first (a fresh BN's unit variance lets 33 random residual branches grow
without bound), as a trained network's BNs match its data. The δ search runs for the
target MACs reduction, exactly as in a trial. "Full-forward equivalents" (FFE) = probe work ÷
one forward of the calibration set: the cost figure that compares across hardware. The last
column is what the same probes would cost if each were a full forward (the old way).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from methods import SelectContext, get_method_class  # noqa: E402
from pipeline.engine import recalibrate_bn  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.surgery import find_groups, macs_after, macs_profile  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet101")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--target", type=float, default=0.42, help="MACs reduction the δ search aims at")
    ap.add_argument("--delta", type=float, default=None,
                    help="fixed-δ mode (no search): the selection's cost at this δ instead of a target")
    ap.add_argument("--round-to", type=int, default=1)
    ap.add_argument("--coarse-points", type=int, default=None, help="lossvar option coarse_points")
    ap.add_argument("--coarse-fraction", type=float, default=None, help="lossvar option coarse_fraction")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--logit-scale", type=float, default=100.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.arch, args.classes).eval().to(dev)
    with torch.no_grad():
        model.fc.weight.mul_(args.logit_scale)
        model.fc.bias.mul_(args.logit_scale)
    x = torch.randn(args.calib, 3, args.image_size, args.image_size).to(dev)
    recalibrate_bn(model, [(x[i:i + args.batch], None) for i in range(0, args.calib, args.batch)])
    model.eval()
    with torch.no_grad():
        y = torch.cat([model(x[i:i + args.batch]).argmax(1) for i in range(0, args.calib, args.batch)])
    calib = [(x[i:i + args.batch], y[i:i + args.batch]) for i in range(0, args.calib, args.batch)]
    groups = find_groups(model, args.image_size, "inner")
    with torch.no_grad():
        model(calib[0][0])  # warm-up: the first CUDA forward also picks its kernels
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        for xb, _ in calib:
            model(xb)
    sync()
    forward_s = time.perf_counter() - t0
    options = {"delta": args.delta} if args.delta is not None else {"target_macs_reduction": args.target}
    for knob in ("coarse_points", "coarse_fraction"):
        if getattr(args, knob) is not None:
            options[knob] = getattr(args, knob)
    method = get_method_class("lossvar")(groups, 0.0, round_to=args.round_to,
                                         options=options, image_size=args.image_size)
    masks = method.keep_masks(model, SelectContext(calib=calib, image_size=args.image_size))
    profile = macs_profile(model, args.image_size)
    found = 1 - macs_after(profile, groups, {g.name: int(masks[g.name].sum()) for g in groups}) / sum(profile.values())
    s = method.summary()
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"# {args.arch} at {args.image_size}px, {args.calib} calibration images, {len(groups)} groups, "
          f"{where}, float32, one forward of the set {forward_s:.3f} s")
    print("| target MACs red. | found | δ | probes | seconds | full-forward equiv. | FFE if every probe were a full forward |")
    print("|---|---|---|---|---|---|---|")
    target = "fixed δ" if args.delta is not None else f"{args.target:.0%}"
    print(f"| {target} | {found:.1%} | {s['delta']:.3g} | "
          f"{int(s['probes'])} | {s['select_seconds']:.1f} | {s['full_forward_equivalents']:.0f} | {int(s['probes'])} |")


if __name__ == "__main__":
    main()
