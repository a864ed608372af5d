"""How fast is `prunepipe data imagenet`? Images/s of the converter with 1, 2, ... workers.

    python benchmarks/convert_speed.py --images 500 --workers 1 2 --repeats 3

Generates a miniature ImageNet tree (tests/helpers/mini_imagenet.py) of plain RGB JPEGs at a
fixed ImageNet-like size (default 500×375, quality 90, class colour + per-pixel noise), then
converts it into a fresh folder ``repeats`` times per worker count and prints one table:
median images/s of the shard-writing phase (read, check by decoding at 1/8 scale, write tar +
index) and of the whole command (scan, plan, write, verify, manifest). The source files were
just written, so they are in the page cache: this measures the converter, not the disk.
Noise-filled JPEGs take longer to decode than photos of the same size, so this is pessimistic.
The last column, CPU time per image (this process and the pool's workers), barely depends on
other load: 1000 / it is what one idle core would reach.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.imagenet import ConvertOptions, convert_imagenet  # noqa: E402
from tests.helpers.mini_imagenet import make_mini_imagenet  # noqa: E402


def measure(src: Path, workers: int, repeats: int, per_shard: int, devkit: Path) -> dict[str, float]:
    """Convert ``src`` ``repeats`` times with ``workers``; median rates and the last result's sizes."""
    rates, walls, cpus = [], [], []
    with tempfile.TemporaryDirectory(prefix="convert_speed_") as tmp:
        for r in range(repeats):
            out = Path(tmp) / f"out{r}"
            t0, c0 = time.perf_counter(), _cpu_seconds()
            result = convert_imagenet(ConvertOptions(src, out, per_shard=per_shard, workers=workers,
                                                     devkit=devkit, progress=False))
            walls.append(time.perf_counter() - t0)
            cpus.append(_cpu_seconds() - c0)
            rates.append(result.images_per_s)
            shutil.rmtree(out)
    images = result.images_this_run
    return {"images": images, "mb": result.bytes / 1e6, "rate": statistics.median(rates),
            "spread": (min(rates), max(rates)), "wall": statistics.median(walls),
            "wall_rate": images / statistics.median(walls), "cpu_ms": statistics.median(cpus) / images * 1e3}


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool's workers): unlike wall
    time, it hardly changes when other processes compete for the cores."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=500, help="about this many (10 classes, 4:1 train:val)")
    ap.add_argument("--size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"))
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--per-shard", type=int, default=64, help="small, so that 2 workers have shards to share")
    args = ap.parse_args()
    per_class = max(1, args.images // 10)
    with tempfile.TemporaryDirectory(prefix="mini_imagenet_") as tmp:
        t0 = time.perf_counter()
        mini = make_mini_imagenet(Path(tmp) / "src", classes=10, train_per_class=per_class * 4 // 5,
                                  val_per_class=per_class - per_class * 4 // 5, size=tuple(args.size),
                                  gray=0, cmyk=0, png=0, corrupt=0, labels=("devkit",))
        n = len(mini.train) + len(mini.val)
        print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
              f"{n} JPEGs {args.size[0]}x{args.size[1]} q90 generated in {time.perf_counter() - t0:.1f} s; "
              f"--per-shard {args.per_shard}, median of {args.repeats}")
        print("| workers | images | MB | write phase img/s (min–max) | whole command s | whole command img/s "
              "| CPU ms / image |")
        print("|---|---|---|---|---|---|---|")
        for w in args.workers:
            m = measure(mini.root, w, args.repeats, args.per_shard, mini.devkit)
            print(f"| {w} | {m['images']} | {m['mb']:.1f} | {m['rate']:.0f} ({m['spread'][0]:.0f}–{m['spread'][1]:.0f}) "
                  f"| {m['wall']:.2f} | {m['wall_rate']:.0f} | {m['cpu_ms']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
