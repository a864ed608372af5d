"""What each DataLoader worker start method (``data.worker_start``) costs, side by side.

    python benchmarks/worker_start.py --rounds 3 --epochs 6

Each measurement is a fresh process (a forkserver is started once per process, so its cost only
shows in a new one) that builds the webdataset train and val loaders with 1 worker and reads
``--epochs`` epochs of both. Rounds alternate the methods (A B C A B C ...) so that load from other
processes hits them alike. The table gives, as median [min–max] over rounds: the wait for the
first batch of the first epoch (a forkserver's start and imports are paid here), the wait for the
first batch of a later epoch (each epoch starts new workers), and a later epoch's whole time.
The data is a synthetic shard set written once (``--root`` reads another).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("fork", "forkserver", "spawn")


def one(root: str, start: str, epochs: int) -> dict[str, float]:
    """Run in the child: the three figures of one measurement."""
    import torch

    from pipeline.config import DataConfig
    from pipeline.data.loaders import build_loader

    cfg = DataConfig(root=root, image_size=32, batch_size=16, num_workers=1, augment="imagenet", worker_start=start)
    loaders = [build_loader(cfg, split, 0, 1, torch.device("cpu")) for split in ("train", "val")]
    firsts, epoch_s = [], []
    for _ in range(epochs):
        started = time.perf_counter()
        for loader in loaders:
            t = time.perf_counter()
            it = iter(loader)
            next(it)
            firsts.append(time.perf_counter() - t)
            for _ in it:
                pass
        epoch_s.append(time.perf_counter() - started)
    return {"first": firsts[0], "later_first": statistics.median(firsts[2:]), "epoch": statistics.median(epoch_s[1:])}


def _cell(values: list[float], unit: str = "s") -> str:
    return f"{statistics.median(values):.3f} {unit} [{min(values):.3f}–{max(values):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--root", help="a webdataset folder (dataset.json); default: a synthetic set written here")
    args = parser.parse_args()
    if args.epochs < 3:
        parser.error("--epochs: at least 3 (the first is start-up, later ones are the steady figure)")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            from pipeline.data.convert import write_synthetic

            root = str(Path(tmp) / "synthetic")
            write_synthetic(root, num_classes=10, image_size=64, train_samples=512, val_samples=128, per_shard=64)
        results: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
        for _ in range(args.rounds):
            for method in METHODS:
                code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.worker_start import one\n"
                        f"if __name__ == '__main__': print(json.dumps(one({root!r}, {method!r}, {args.epochs})))")
                out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
                results[method].append(json.loads(out.stdout.splitlines()[-1]))
    print("| worker start | first batch, first epoch | first batch, later epoch | later epoch (train+val) |")
    print("|---|---|---|---|")
    for method, rows in results.items():
        print(f"| {method} | {_cell([r['first'] for r in rows])} | {_cell([r['later_first'] for r in rows])} | "
              f"{_cell([r['epoch'] for r in rows])} |")


if __name__ == "__main__":
    main()
