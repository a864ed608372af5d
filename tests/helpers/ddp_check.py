"""Run under `torchrun --standalone --nproc_per_node=2`: trains a few DDP steps and writes what
each rank holds (parameter checksums, gradients, every method's masks) for the test to compare."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from methods import SelectContext, get_method_class, method_names  # noqa: E402
from pipeline.backends.ddp import DDPBackend  # noqa: E402
from pipeline.config import DataConfig, TrainConfig  # noqa: E402
from pipeline.data.loaders import build_loader, calibration_set  # noqa: E402
from pipeline.distributed import assert_same_on_all_ranks, init_distributed  # noqa: E402
from pipeline.engine import make_optimizer, train_epoch  # noqa: E402
from pipeline.surgery import find_groups  # noqa: E402
from tests.helpers.factories import LoaderView  # noqa: E402


class _Counting(LoaderView):
    """A loader that counts the samples it hands out (what this rank really trained on)."""

    def __init__(self, loader) -> None:
        super().__init__(loader)
        self.samples = 0

    def __iter__(self):
        for images, labels in self.loader:
            self.samples += labels.numel()
            yield images, labels


class _First(LoaderView):
    """The first ``n`` batches of a loader, cycling when it holds fewer (the same count on every rank)."""

    def __init__(self, loader, n):
        super().__init__(loader)
        self.n = n

    def __len__(self):
        return self.n

    def __iter__(self):
        seen = 0
        while seen < self.n:
            before = seen
            for batch in self.loader:
                if seen == self.n:
                    return
                seen += 1
                yield batch
            if seen == before:
                return  # an empty loader: nothing to cycle


def ddp_backend(model, info, lr_scales=None) -> DDPBackend:
    """The engine's DDP backend around ``model`` with the recipe's SGD (no schedule)."""
    backend = DDPBackend(TrainConfig(), info, micro_batch=16)
    backend.wrap(model, make_optimizer(model, 0.05, 0.9, True, 1e-4, lr_scales=lr_scales), None)
    return backend


def lossvar_model(image_size: int = 16):
    """The model the lossvar 1-vs-2-rank comparison decides on (the test builds it too)."""
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def _lifecycle_under_ddp(name: str, info, data_root: str) -> dict:
    """prepare → 2 DDP steps on this rank's data → keep_masks → finalize, as the recipe does."""
    cfg = DataConfig(root=data_root, image_size=16, batch_size=16, augment="none")
    if name == "lossvar":
        model = lossvar_model()
    else:
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10)
    groups = find_groups(model, 16, "inner")
    method = get_method_class(name)(groups, 0.5, seed=0, image_size=16)
    method.prepare(model)
    if method.training_aware:
        loader = _First(build_loader(cfg, "train", info.rank, info.world, info.device, seed=0), 2)
        method.on_train_start(model, steps_per_epoch=2, epochs=1)
        backend = ddp_backend(model, info, lr_scales=method.lr_scales(model))
        train_epoch(backend, loader, info, method=method)
        model = backend.module
    ctx = SelectContext(info=info, image_size=16)
    if method.calibration_samples():
        ctx.calib = calibration_set(cfg, 64, info.rank, info.world, info.device)
    masks = method.keep_masks(model, ctx)
    assert_same_on_all_ranks(masks, info)  # raises if ranks disagree
    method.finalize(model, masks)
    return masks


def main(out: str, data_root: str) -> None:
    info = init_distributed()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    cfg = DataConfig(root=data_root, image_size=16, batch_size=16, augment="none")
    initial = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    loader = build_loader(cfg, "train", info.rank, info.world, info.device, seed=0)
    counting = _Counting(loader)
    backend = ddp_backend(model, info)
    stats = train_epoch(backend, counting, info)
    net = backend.module
    flat = torch.cat([p.detach().flatten() for p in net.parameters()])
    per_rank: list = [None] * info.world
    dist.all_gather_object(per_rank, {"samples_seen": counting.samples, "declared": loader._dataset.rank_count(),
                                      "steps": stats["steps"], "batches": len(loader),
                                      "train_top1": stats["train_top1"], "train_loss": stats["train_loss"]})
    grads = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
    gathered = [torch.zeros_like(flat) for _ in range(info.world)]
    dist.all_gather(gathered, flat)
    ggrads = [torch.zeros_like(grads) for _ in range(info.world)]
    dist.all_gather(ggrads, grads)
    masks_ok, lossvar_masks = {}, {}
    for name in method_names():
        masks = _lifecycle_under_ddp(name, info, data_root)
        flat_m = torch.cat([masks[k].to(torch.float32) for k in sorted(masks)])
        gm = [torch.zeros_like(flat_m) for _ in range(info.world)]
        dist.all_gather(gm, flat_m)
        masks_ok[name] = all(torch.equal(gm[0], g) for g in gm)
        if name == "lossvar":
            lossvar_masks = {k: v.int().tolist() for k, v in masks.items()}
    if info.is_main:
        Path(out).write_text(json.dumps({
            "world": info.world,
            "weights_equal": all(torch.equal(gathered[0], g) for g in gathered),
            "grads_equal": all(torch.allclose(ggrads[0], g, atol=1e-7) for g in ggrads),
            # against this rank's own weights before the first step (not a model built later)
            "trained": not torch.equal(flat, initial),
            "ranks": per_rank,
            "masks_equal": masks_ok,
            "lossvar_masks": lossvar_masks,
        }))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
