"""Run under `torchrun --standalone --nproc_per_node=2` (tests/test_dali.py): evaluates a fixed
model over the DALI val loader, then trains through one epoch of a set with an undecodable
sample and writes, per rank, what the next epoch's plan looks like."""

import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.config import DataConfig  # noqa: E402
from pipeline.data.dali import build_dali_loader  # noqa: E402
from pipeline.distributed import DistInfo, init_distributed  # noqa: E402
from pipeline.engine import evaluate  # noqa: E402


def evaluate_once(root: str, rank: int, world: int, info: DistInfo | None = None) -> dict[str, float]:
    """The metrics of a fixed small CNN over the DALI val loader of ``root`` (10 classes)."""
    info = info or DistInfo(rank, world, 0, torch.device("cpu"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10))
    cfg = DataConfig(backend="dali", root=root, image_size=16, batch_size=8, augment="imagenet", num_workers=1)
    return evaluate(model, build_dali_loader(cfg, "val", rank, world, info.device), info)


def main() -> None:
    root, bad_root, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    info = init_distributed()
    metrics = evaluate_once(root, info.rank, info.world, info)
    # 30 samples, 2 ranks, batch 5: each rank reads its whole chunk of 15 in epoch 0
    cfg = DataConfig(backend="dali", root=bad_root, image_size=16, batch_size=5, augment="light", num_workers=1)
    loader = build_dali_loader(cfg, "train", info.rank, info.world, info.device, seed=1)
    loader.set_epoch(0)
    assert sum(1 for _ in loader) == len(loader)
    bad_records = loader.errors.total
    loader.set_epoch(1)
    loader.trace = []
    assert sum(1 for _ in loader) == len(loader)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{info.rank}.json").write_text(json.dumps({
        "metrics": metrics, "agreed": sorted(loader._agreed), "len": len(loader), "keys": loader.trace,
        "bad_records": bad_records}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
