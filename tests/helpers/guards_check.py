"""Run under `torchrun --standalone --nproc_per_node=2`: the rank-dependent behaviours that only
two real ranks can show. Writes one JSON (rank 0) for tests/test_guards_ddp.py to check:

- which sample keys each rank's real WebDataset loader yields (train and val, 0 and 2
  DataLoader workers, two epochs), gathered from both ranks;
- ``evaluate`` on a known table model over an uneven split of a known set;
- ``_check_equal_steps`` / ``train_epoch`` when the ranks' loaders disagree on their length;
- ``recalibrate_bn`` under DDP against the average of per-rank estimates made by hand.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.config import DataConfig  # noqa: E402
from pipeline.data import loaders  # noqa: E402
from pipeline.data.loaders import ShardedSamples, build_loader  # noqa: E402
from pipeline.distributed import DistInfo, init_distributed, shutdown_distributed  # noqa: E402
from pipeline.engine import _check_equal_steps, evaluate, recalibrate_bn, train_epoch  # noqa: E402
from tests.helpers.ddp_check import ddp_backend  # noqa: E402
from tests.helpers.factories import ListLoader  # noqa: E402
from tests.helpers.known_eval import KNOWN_SPLIT, known_batches, known_model  # noqa: E402

_KEY_BYTES = 48


def _key_tensor(shard: str, key: str) -> torch.Tensor:
    raw = f"{shard}/{key}".encode()
    if len(raw) > _KEY_BYTES:
        raise ValueError(f"sample id {raw!r} longer than {_KEY_BYTES} bytes")
    return torch.tensor(list(raw.ljust(_KEY_BYTES, b"\0")), dtype=torch.float32)


def _key_of(row: torch.Tensor) -> str:
    return bytes(int(v) for v in row.tolist()).rstrip(b"\0").decode()


class KeyTaggedSamples(ShardedSamples):
    """The real reader, each sample's identity in place of its pixels. A subclass, not a patch:
    DataLoader workers come from a forkserver (data.worker_start), which imports this module
    again and never sees a patch made in the rank."""

    def _decode(self, sample):
        image, label, bad = super()._decode(sample)
        if bad is not None:
            return image, label, bad
        return _key_tensor(sample["__shard__"], str(sample["__key__"])), label, None


def _tag_samples_with_their_keys() -> None:
    """Make the real loader carry each sample's identity instead of its pixels.

    Only ``_decode`` changes, in the reader (a DataLoader worker when there are workers);
    everything else (the rank/worker split, the shuffle buffer, the equal quota, collation,
    ``Loader.__iter__``) is the production path.
    """
    loaders.ShardedSamples = KeyTaggedSamples


def _loader_keys(data_root: str, info: DistInfo) -> dict:
    """{split/workers/epoch: [keys of rank 0, keys of rank 1]} as each rank's loader yields them."""
    out = {}
    for workers in (0, 2):
        cfg = DataConfig(root=data_root, image_size=16, batch_size=16, augment="none", num_workers=workers)
        for split in ("train", "val"):
            loader = build_loader(cfg, split, info.rank, info.world, info.device, seed=3)
            for epoch in (0, 1):
                loader.set_epoch(epoch)
                mine, batches = [], 0
                for images, _labels in loader:
                    mine += [_key_of(row) for row in images]
                    batches += 1
                box: list = [None] * info.world
                dist.all_gather_object(box, {"keys": mine, "batches": batches, "len": len(loader)})
                out[f"{split}/w{workers}/e{epoch}"] = box
    return out


def _evaluate_known(info: DistInfo) -> dict:
    lo, hi = KNOWN_SPLIT[info.rank]
    return evaluate(known_model(), known_batches(lo, hi, batch=5 if info.rank == 0 else 4), info)


def _equal_steps(info: DistInfo) -> dict:
    out = {}
    try:
        _check_equal_steps(3 + info.rank, info)
        out["unequal_check"] = None
    except RuntimeError as err:
        out["unequal_check"] = str(err)
    _check_equal_steps(3, info)  # agreeing ranks: must not raise
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    net(torch.zeros(1, 3, 8, 8))  # materialise the lazy layer before DDP sees it
    backend = ddp_backend(net, info)
    try:
        stats = train_epoch(backend, ListLoader(2 + info.rank, batch=4, size=8, classes=3, seed=7), info)
        out["unequal_epoch"] = f"no error: {stats['steps']} steps"
    except RuntimeError as err:
        out["unequal_epoch"] = str(err)
    return out


def _bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))


def _bn_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # ranks see differently distributed data, so their own estimates differ
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(6, 3, 8, 8, generator=g) * (1 + rank) + 2.0 * rank, torch.zeros(6, dtype=torch.int64))
            for _ in range(3 + rank)]


def _bn_recalibration(info: DistInfo) -> dict:
    model = _bn_model()
    recalibrate_bn(model, _bn_batches(info.rank), info)
    bn = model[1]
    mine = torch.cat([bn.running_mean, bn.running_var])
    # by hand: each rank's own estimate (one process, no DDP), then their plain average
    alone = []
    for r in range(info.world):
        m = _bn_model()
        recalibrate_bn(m, _bn_batches(r), None)
        alone.append(torch.cat([m[1].running_mean, m[1].running_var]))
    box: list = [None] * info.world
    dist.all_gather_object(box, mine.tolist())
    return {"ranks": box, "expected": torch.stack(alone).mean(0).tolist(),
            "rank_estimates": [a.tolist() for a in alone]}


def main(out: str, data_root: str) -> None:
    info = init_distributed()
    _tag_samples_with_their_keys()
    result = {"world": info.world, "loader": _loader_keys(data_root, info)}
    ev: list = [None] * info.world
    dist.all_gather_object(ev, _evaluate_known(info))
    result["evaluate"] = ev
    steps: list = [None] * info.world
    dist.all_gather_object(steps, _equal_steps(info))
    result["equal_steps"] = steps
    result["bn"] = _bn_recalibration(info)
    if info.is_main:
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
