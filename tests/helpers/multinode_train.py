"""Run under torchrun, on one "node" or several: train a few DDP steps with prunepipe's engine
and record what this rank holds.

Usage: ``torchrun ... tests/helpers/multinode_train.py OUT_DIR DATA_ROOT STEPS``. Every rank writes
``rank<R>.json`` (where it ran: torchrun's GROUP_RANK, LOCAL_RANK, LOCAL_WORLD_SIZE; SHA-256s
of its trained parameters and of its whole state); rank 0 also writes ``weights.npy`` (every
parameter and buffer, flattened) so that a test can compare two launches of the same global batch.

Parameters are equal on every rank after a DDP step; BatchNorm's running statistics are made
equal by the backend at the end of the epoch (rank 0's).
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.config import DataConfig  # noqa: E402
from pipeline.data.loaders import build_loader  # noqa: E402
from pipeline.distributed import barrier, init_distributed  # noqa: E402
from pipeline.engine import train_epoch  # noqa: E402
from tests.helpers.ddp_check import _First, ddp_backend  # noqa: E402

PER_RANK_BATCH = 16  # global batch = 16 x world size, the same for every launch shape compared


def flat_state(model: torch.nn.Module) -> np.ndarray:
    """Every float parameter and buffer (BN running statistics included), in state-dict order."""
    tensors = [t.detach().reshape(-1).to(torch.float32) for t in model.state_dict().values() if t.is_floating_point()]
    return torch.cat(tensors).numpy()


def sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def main(out: str, data_root: str, steps: int) -> None:
    info = init_distributed()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    initial = flat_state(model)
    cfg = DataConfig(root=data_root, image_size=16, batch_size=PER_RANK_BATCH, augment="none")
    loader = _First(build_loader(cfg, "train", info.rank, info.world, info.device, seed=0), steps)
    backend = ddp_backend(model, info)  # the engine's DDP backend, SGD lr 0.05, momentum 0.9, nesterov
    train_epoch(backend, loader, info)
    net = backend.module
    weights = flat_state(net)
    params = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).numpy()
    out_dir = Path(out)
    record = {
        "rank": info.rank,
        "world": info.world,
        "group_rank": int(os.environ["GROUP_RANK"]),
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "local_world_size": int(os.environ["LOCAL_WORLD_SIZE"]),
        "params_sha256": sha256(params),
        "state_sha256": sha256(weights),
        "changed": bool(np.any(weights != initial)),
        "steps": len(loader),
    }
    (out_dir / f"rank{info.rank}.json").write_text(json.dumps(record))
    if info.is_main:
        np.save(out_dir / "weights.npy", weights)
    barrier(info)
    if info.distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
