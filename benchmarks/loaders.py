"""Decode + augment throughput: the DALI loader (CPU pipeline) against the PyTorch loader.

    python benchmarks/loaders.py --images 384 --rounds 5 --workers 1 2

Generates an ImageNet-like shard set once (JPEG quality 90, ImageNet's typical sizes around
500×375, smooth content plus noise), then times whole training epochs through each backend's
`build_dali_loader` / `build_loader` (imagenet train transforms at 224: random resized crop,
flip, normalise to float32): DALI with N CPU threads against a PyTorch DataLoader with N
worker processes. Rounds alternate the configurations (A B A B ...) so that load from other
processes hits them alike; the table gives the median images/s, the spread (min–max over
rounds), images/s per core, images per CPU-second (this process's threads plus its worker
processes: robust to load from other processes, unlike wall time) and the load average seen.
Both are steady-state rates: from the first batch of an epoch to its last-but-one, so pipeline
build, worker start-up and shut-down are left out alike.
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import DataConfig  # noqa: E402
from pipeline.data.convert import write_manifest  # noqa: E402
from pipeline.data.loaders import build_loader  # noqa: E402
from pipeline.data.shards import index_path, write_shard  # noqa: E402

# (height, width) pairs common in ImageNet (most images are 500 wide, 333..375 high)
_SIZES = [(375, 500), (333, 500), (500, 375), (500, 333), (400, 500), (281, 500), (500, 500), (366, 500)]


def make_imagenet_like(root: Path, images: int, per_shard: int = 64, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    entries = []
    bar = tqdm(total=images, desc="writing JPEGs", unit="img", leave=False)
    for s, start in enumerate(range(0, images, per_shard)):
        samples = []
        for i in range(start, min(images, start + per_shard)):
            h, w = _SIZES[i % len(_SIZES)]
            small = rng.uniform(0, 255, (h // 12 + 2, w // 12 + 2, 3)).astype(np.uint8)
            img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).astype(np.float32)
            img = (img + rng.normal(0, 10, img.shape)).clip(0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=90)
            samples.append({"__key__": f"img{i:06d}", "jpg": buf.getvalue(), "cls": str(i % 1000)})
            bar.update(1)
        rel = f"train/train-{s:04d}.tar"
        write_shard(root / rel, samples)
        entries.append({"path": rel, "count": len(samples), "index": index_path(rel).as_posix()})
    bar.close()
    write_manifest(root, {"name": "imagenet-like", "num_classes": 1000, "image_size": 224,
                          "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                          "splits": {"train": entries, "val": entries}})
    return root


def _cpu_seconds() -> float:
    """CPU seconds of this process (all its threads) and of its live child processes (the
    DataLoader workers), from /proc: Linux only."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    total, tick, pid = me.ru_utime + me.ru_stime, os.sysconf("SC_CLK_TCK"), os.getpid()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a process that just ended
        if int(fields[1]) == pid:  # fields[1] is the parent pid; utime, stime are fields 11, 12
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def epoch_rate(cfg: DataConfig, epoch: int, device: torch.device) -> tuple[float, float]:
    """One training epoch, steady state (from the first batch to the last-but-one: no start-up,
    no worker shut-down): (images per second of wall time, images per CPU-second)."""
    loader = build_loader(cfg, "train", 0, 1, device, seed=0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    loader.set_epoch(epoch)
    it = iter(loader)
    next(it)
    sync()
    n, t0, c0 = 0, time.perf_counter(), _cpu_seconds()
    for i, (images, _) in enumerate(it, start=2):
        if i == len(loader):  # measure before the last batch: workers exit after it
            sync()  # batches handed over on a GPU may still be in flight
            wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
            break
        n += images.shape[0]
    del it, loader
    gc.collect()
    return n / wall, n / cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="folder for the generated set (default: a temp folder)")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: batches delivered to the GPU, DALI decoding there ('mixed') beside its CPU pipeline")
    args = ap.parse_args()
    device = torch.device(args.device)
    for name, v, lo in (("--images", args.images, 4 * args.batch), ("--rounds", args.rounds, 1), ("--batch", args.batch, 1)):
        if v < lo:
            ap.error(f"{name} {v}: must be at least {lo}")
    torch.set_num_threads(1)  # the main process only receives batches; the workers/threads do the work
    tmp = None
    if args.data is None:
        tmp = tempfile.TemporaryDirectory(prefix="loaders-bench-")
        args.data = tmp.name
    root = Path(args.data)
    if not (root / "dataset.json").is_file():
        make_imagenet_like(root, args.images)
    base = DataConfig(root=str(root), image_size=args.size, batch_size=args.batch, augment="imagenet",
                      shuffle_buffer=256)
    # (backend, data.dali_device): DALI's CPU pipeline is "dali"/"cpu"; on a GPU also "mixed" decoding
    kinds = [("dali", "gpu"), ("dali", "cpu"), ("webdataset", "auto")] if device.type == "cuda" else \
        [("dali", "cpu"), ("webdataset", "auto")]
    labels = {("dali", "gpu"): "DALI mixed (GPU decode)", ("dali", "cpu"): "DALI CPU",
              ("webdataset", "auto"): "PyTorch DataLoader"}
    configs = [(*k, w) for w in args.workers for k in kinds]
    rates: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    per_cpu: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    load = [os.getloadavg()[0]]
    for r in tqdm(range(args.rounds + 1), desc="rounds", leave=False):
        for c in configs if r % 2 == 0 else configs[::-1]:
            cfg = base.model_copy(update={"backend": c[0], "dali_device": c[1], "num_workers": c[2]})
            rate, cpu_rate = epoch_rate(cfg, r, device)
            if r > 0:  # round 0 warms the page cache and the allocators
                rates[c].append(rate)
                per_cpu[c].append(cpu_rate)
        load.append(os.getloadavg()[0])
    print(f"# {args.images} JPEGs (q90, ~500x375), imagenet train transforms at {args.size}, batch {args.batch}, "
          f"{args.rounds} rounds (alternating), {os.cpu_count()} cores, batches delivered to {device}, "
          f"1-min load average {min(load):.2f}..{max(load):.2f}")
    print("| loader | workers/threads | img/s (median) | spread (min–max) | img/s per core | img per CPU-s (median) "
          "| ÷ PyTorch per core | ÷ PyTorch per CPU-s |")
    print("|---|---|---|---|---|---|---|---|")
    for w in args.workers:
        med = {k: statistics.median(rates[(*k, w)]) for k in kinds}
        cpu = {k: statistics.median(per_cpu[(*k, w)]) for k in kinds}
        ref = ("webdataset", "auto")
        for k in kinds:
            v = rates[(*k, w)]
            ratios = f"{med[k] / med[ref]:.2f}x | {cpu[k] / cpu[ref]:.2f}x" if k != ref else " | "
            print(f"| {labels[k]} | {w} | {med[k]:.1f} | {min(v):.1f}–{max(v):.1f} | {med[k] / w:.1f} | {cpu[k]:.1f} "
                  f"| {ratios} |")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
