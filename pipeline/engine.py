"""The training engine: DDP (gloo on CPU, nccl on GPU), one epoch of training, evaluation,
atomic checkpoints. No trainer framework: the recipe calls these in order.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from pipeline.data.errors import BadDataError
from pipeline.distributed import DistInfo, all_reduce_sum, control_group

if TYPE_CHECKING:
    from methods.base import Method
    from pipeline.data.loaders import Loader


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU by default; CPU trains in float32 (CPU autocast is slow for convs)."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "fp16":
        return torch.float16
    return torch.bfloat16


def use_channels_last(mode: str, device: torch.device) -> bool:
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def wrap_ddp(model: nn.Module, info: DistInfo, channels_last: bool = False) -> nn.Module:
    model = model.to(info.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if not info.distributed:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    # syncing buffers keeps BN running statistics identical on every rank (rank 0's)
    return DDP(model, device_ids=ids, forward_sync_buffers=True)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DDP) else model


def make_optimizer(
    model: nn.Module,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    lr_scales: dict[nn.Parameter, float] | None = None,
) -> torch.optim.SGD:
    """SGD with weight decay on conv/linear weights only (not on BN scales and biases).

    ``lr_scales`` gives some parameters (a method's gate scores) their own learning rate;
    schedules scale every group alike, so the ratio holds.
    """
    lr_scales = lr_scales or {}
    decay, no_decay, scaled = [], [], {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p in lr_scales:
            scaled.setdefault(lr_scales[p], []).append(p)
        else:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups += [{"params": ps, "weight_decay": 0.0, "lr": lr * k} for k, ps in scaled.items()]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_epoch(
    model: nn.Module,
    loader: Loader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    info: DistInfo,
    method: Method | None = None,
    amp: torch.dtype | None = None,
    label_smoothing: float = 0.0,
    channels_last: bool = False,
    desc: str = "train",
) -> dict[str, float]:
    """One pass over ``loader``; returns the mean loss and top-1 over all ranks, the steps taken
    and the bad samples skipped.

    No per-step host synchronisation: loss and accuracy accumulate on the device and are read
    once at the end (an ``.item()`` per step would stall a GPU's queue every step).
    """
    model.train()
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    scaler = torch.amp.GradScaler(info.device.type, enabled=amp is torch.float16)
    stats = torch.zeros(3, dtype=torch.float64, device=info.device)  # loss sum, correct, count
    expected = len(loader)
    _check_equal_steps(expected, info)
    errors = getattr(loader, "errors", None)
    bad_before = errors.total if errors is not None else 0
    bar = tqdm(total=expected, desc=desc, disable=not info.is_main, leave=False, dynamic_ncols=True)
    steps = 0
    for images, labels in lockstep(loader, info):
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(info.device.type, dtype=amp, enabled=amp is not None):
            logits = model(images)
            loss = criterion(logits, labels)
            extra = method.loss_term(unwrap(model)) if method is not None else None
            total = loss + extra if extra is not None else loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        if method is not None:
            method.after_step(unwrap(model), optimizer)
        n = labels.numel()
        with torch.no_grad():
            stats[0] += loss.detach().double() * n
            stats[1] += (logits.argmax(1) == labels).sum()
            stats[2] += n
        steps += 1
        bar.update(1)
    bar.close()
    bad = torch.tensor([(errors.total if errors is not None else 0) - bad_before], dtype=torch.float64,
                       device=info.device)
    all_reduce_sum(stats, info)
    all_reduce_sum(bad, info)
    count = max(1.0, stats[2].item())
    if steps < expected and info.is_main:
        print(f"[prunepipe] warning: {desc}: the epoch ended after {steps} of {expected} batches: a reader ran "
              "short of what the manifest declares (bad samples or a truncated shard)", flush=True)
    _check_bad_fraction(int(bad.item()), int(stats[2].item()), loader)
    return {"train_loss": stats[0].item() / count, "train_top1": stats[1].item() / count, "steps": steps,
            "bad_samples": int(bad.item())}


def lockstep(batches: Iterable, info: DistInfo) -> Iterator:
    """The batches of ``batches`` while *every* rank still has one.

    Under DDP a rank whose reader ends early (a truncated shard, a manifest that overstates a
    count, bad samples) would leave the others waiting in the next gradient all-reduce for
    ever. Before each step the ranks agree on a flag over a host-side group — 1: I have a
    batch, 0: my reader ended, -1: my reader failed — and stop together; a failure on one rank
    stops all of them with an error instead of a hang.
    """
    it = iter(batches)
    group = control_group(info)
    while True:
        failure: BaseException | None = None
        try:
            batch, state = next(it), 1
        except StopIteration:
            batch, state = None, 0
        except Exception as err:  # any reader failure must reach the other ranks, not hang them
            batch, state, failure = None, -1, err
        if info.distributed:
            flag = torch.tensor([state], dtype=torch.int64)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=group)
            state_all = int(flag.item())
        else:
            state_all = state
        if failure is not None:
            raise failure
        if state_all < 0:
            raise BadDataError("another rank's data loader failed; its log names the shard and sample")
        if state_all == 0:
            return
        yield batch


def _check_bad_fraction(bad: int, good: int, loader: Any) -> None:
    """Skipping a few bad files is fine; skipping a large part of an epoch is a broken dataset."""
    limit = getattr(loader, "max_bad_fraction", None)
    if limit is None or bad == 0:
        return
    fraction = bad / max(1, bad + good)
    if fraction > limit:
        raise BadDataError(f"{bad} of {bad + good} samples of this epoch were bad ({fraction:.1%} > "
                           f"data.max_bad_fraction = {limit}): the dataset is broken, see the skipped samples above")


def _check_equal_steps(steps: int, info: DistInfo) -> None:
    """Every rank must take the same number of steps, or DDP hangs or its states drift apart."""
    if not info.distributed:
        return
    t = torch.tensor([steps, -steps], dtype=torch.int64, device=info.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    if int(t[0]) != -int(t[1]):
        raise RuntimeError(f"ranks disagree on the steps of this epoch ({-int(t[1])}..{int(t[0])}): "
                           "the training loader must give every rank the same number of batches")


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Loader, info: DistInfo, amp: torch.dtype | None = None, channels_last: bool = False
) -> dict[str, float]:
    """Top-1, top-5 and loss over the whole split (each rank evaluates its share; all-reduced)."""
    net = unwrap(model)  # no DDP forward: ranks may hold different batch counts
    net.eval()
    stats = torch.zeros(4, dtype=torch.float64, device=info.device)  # loss sum, top1, top5, count
    for images, labels in loader:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(info.device.type, dtype=amp, enabled=amp is not None):
            logits = net(images).float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == labels[:, None]
        stats += torch.tensor(
            [
                nn.functional.cross_entropy(logits, labels, reduction="sum").item(),
                hit[:, 0].sum().item(),
                hit.any(1).sum().item(),
                labels.numel(),
            ],
            dtype=torch.float64,
            device=info.device,
        )
    all_reduce_sum(stats, info)
    count = max(1.0, stats[3].item())
    return {"val_loss": stats[0].item() / count, "val_top1": stats[1].item() / count, "val_top5": stats[2].item() / count}


def save_checkpoint(path: str | Path, payload: dict[str, Any], info: DistInfo) -> None:
    """Rank 0 writes ``payload`` atomically (temp file + rename): a crash never leaves half a file."""
    if not info.is_main:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any] | None:
    path = Path(path)
    if not path.is_file():
        return None
    # our own checkpoints hold only tensors, numbers and strings: weights_only suffices
    return torch.load(path, map_location="cpu", weights_only=True)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches, info: DistInfo | None = None, max_batches: int | None = None) -> None:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (no gradient step).

    After a cut the surviving channels see different inputs; their BN statistics go stale.
    A cumulative average (momentum=None) over a few training batches fixes them. Under DDP
    every rank sees its own batches; averaging the estimates keeps the ranks identical.
    """
    net = unwrap(model)
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was_training = net.training
    net.train()
    for i, (images, _labels) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        net(images)
    net.train(was_training)
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
        if info is not None and info.distributed:
            for buf in (m.running_mean, m.running_var):
                all_reduce_sum(buf, info)
                buf /= info.world
