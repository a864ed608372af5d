"""The training engine: a phase's optimizer, schedule and backend (DDP or DeepSpeed), one epoch
of training through it, evaluation, atomic checkpoints. No trainer framework and no callbacks:
the recipe owns each phase's epoch loop and evaluates, logs and checkpoints inline in it.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from pipeline.backends import TrainingBackend, make_backend
from pipeline.data.contract import BatchLoader
from pipeline.data.errors import BadDataError
from pipeline.distributed import DistInfo, all_reduce_sum, control_group
from pipeline.progress import progress
from pipeline.textfiles import write_atomically

if TYPE_CHECKING:
    from pipeline.config import TrainConfig


class TrainHooks(Protocol):
    """The part of a pruning method the training loop calls (``methods.base.Method`` has it);
    named here so that the core never imports a method."""

    def loss_term(self, model: nn.Module) -> torch.Tensor | None: ...

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None: ...

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None: ...

    def optimizer_overrides(self) -> dict[str, Any]: ...

    def lr_scales(self, model: nn.Module) -> dict[nn.Parameter, float]: ...


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU by default; CPU trains in float32 (CPU autocast is slow for convs)."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "fp16":
        return torch.float16
    return torch.bfloat16


def use_channels_last(mode: str, device: torch.device) -> bool:
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def round_to_warning(round_to: int, device: torch.device) -> str | None:
    """A warning when a trial on a GPU may cut channel counts its tensor cores run badly."""
    if device.type != "cuda" or round_to % 8 == 0:
        return None
    # measured on an H100 in bf16 (docs/benchmarks.md §9): odd widths made the pruned model slower
    return (f"prune.round_to = {round_to} on a GPU: widths that are not multiples of 8 leave tensor cores idle "
            "(ResNet-101 with 50 % fewer MACs ran at 0.75x the dense speed with round_to 1, 1.07x with 8, on an "
            "H100 in bf16); set prune.round_to to 8 or a multiple of it")


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
    """Linear warm-up over ``warmup_steps``, then a half cosine to 0 at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step_factor(epoch: int, milestones: list[int], gamma: float, cycle_epochs: int | None = None) -> float:
    """The step schedule's LR multiplier in ``epoch`` (0-based): ``gamma`` once per milestone
    reached. With ``cycle_epochs`` the schedule restarts every that many epochs (AutoPruner's
    stage-wise phase: each stage runs its own ×0.1 step)."""
    e = epoch % cycle_epochs if cycle_epochs else epoch
    return gamma ** sum(1 for m in milestones if e >= m)


def lr_schedule(
    optimizer: torch.optim.Optimizer, train: TrainConfig, steps_per_epoch: int, total_epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule ``train`` names, stepped once per optimizer step.

    ``cosine``: linear warm-up, then a half cosine over the phase. ``step``: linear warm-up, then
    ×``gamma`` at each epoch in ``milestones`` (SFP: ×0.1 every 30 epochs, torchvision's
    reference recipe), changing at epoch boundaries.
    """
    warmup = train.warmup_epochs * steps_per_epoch
    if train.schedule == "cosine":
        return cosine_schedule(optimizer, steps_per_epoch * total_epochs, warmup)
    per_epoch = max(1, steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return step_factor(step // per_epoch, train.milestones, train.gamma, train.cycle_epochs)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fast_forward(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> None:
    """Advance ``scheduler`` by ``steps`` optimizer steps (a phase resumed mid-way)."""
    with warnings.catch_warnings():
        # stepping the schedule with no optimizer step is the point here (the steps were taken
        # before the restart); torch's "scheduler.step() before optimizer.step()" would alarm a
        # user resuming a trial for nothing
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        for _ in range(steps):
            scheduler.step()


def optimizer_steps(batches: int, grad_accum: int) -> int:
    """Optimizer steps of an epoch of ``batches`` micro-batches: the last, short group steps too."""
    return math.ceil(batches / grad_accum)


class TrainPhase:
    """One phase of training (a pruning phase, a fine-tune, the dense baseline): its optimizer,
    schedule and backend, for the recipe's own epoch loop::

        with TrainPhase(model, cfg.train.for_phase("finetune"), info, loader, batch, epochs) as phase:
            for epoch in range(first, epochs):
                stats = phase.train_epoch(epoch)
                ...  # evaluate phase.module, log, checkpoint phase.state_dict()
        model = phase.module

    The same SGD groups and schedule (:func:`lr_schedule`) on every backend. ``train`` is the
    phase's own settings (``TrainConfig.for_phase``), ``micro_batch`` the loader's batch size per
    rank, ``total_epochs`` the phase's length (the schedule spans it). ``optimizer_state`` (from
    :meth:`state_dict`) resumes a phase; the schedule is then fast-forwarded to ``first_epoch``.
    ``method`` is the pruning method's training hooks, or None.
    """

    def __init__(
        self,
        model: nn.Module,
        train: TrainConfig,
        info: DistInfo,
        loader: BatchLoader,
        micro_batch: int,
        total_epochs: int,
        first_epoch: int = 0,
        method: TrainHooks | None = None,
        optimizer_state: dict[str, Any] | None = None,
        desc: str = "train",
    ) -> None:
        self.train, self.info, self.loader, self.method = train, info, loader, method
        self.total_epochs, self.desc = total_epochs, desc
        self.channels_last = use_channels_last(train.channels_last, info.device)
        self.amp = amp_dtype(train.amp, info.device)
        sgd = {"momentum": train.momentum, "nesterov": train.nesterov, "weight_decay": train.weight_decay}
        if method is not None:
            sgd.update(method.optimizer_overrides())
        model = model.to(info.device)
        opt = make_optimizer(model, train.lr, lr_scales=method.lr_scales(model) if method is not None else None, **sgd)
        per_epoch = optimizer_steps(max(1, len(loader)), train.grad_accum)
        self.scheduler = lr_schedule(opt, train, per_epoch, total_epochs)
        self.backend = make_backend(train, info, micro_batch, self.amp, self.channels_last)
        # the engine, not the backend, steps the schedule: after the method's post-step hook, so a
        # proximal step (ISTA) sees the learning rate of the step it follows
        self.backend.wrap(model, opt, None)
        if optimizer_state is not None:
            self.backend.load_state_dict(optimizer_state)
        fast_forward(self.scheduler, first_epoch * per_epoch)

    @property
    def module(self) -> nn.Module:
        """The plain model being trained (not the backend's wrapper): evaluate and save this."""
        return self.backend.module

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """Epoch ``epoch`` (0-based) of the phase, then the method's ``on_epoch_end``; its stats."""
        self.loader.set_epoch(epoch)
        stats = train_epoch(self.backend, self.loader, self.info, method=self.method, amp=self.amp,
                            label_smoothing=self.train.label_smoothing, channels_last=self.channels_last,
                            grad_accum=self.train.grad_accum, desc=f"{self.desc} {epoch + 1}/{self.total_epochs}",
                            scheduler=self.scheduler)
        if self.method is not None:
            self.method.on_epoch_end(self.backend.module, epoch)
            self.backend.params_edited()
        return stats

    def state_dict(self) -> dict[str, Any]:
        """The optimizer (and schedule) state to checkpoint; ``optimizer_state`` resumes it."""
        return self.backend.state_dict()

    def close(self) -> nn.Module:
        """Release the backend; the trained plain module."""
        self.backend.close()
        return self.backend.module

    def __enter__(self) -> TrainPhase:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # only on success: after a failure a backend's teardown (DeepSpeed's destroy) may wait on
        # ranks that are gone; the process is ending anyway
        if exc_type is None:
            self.close()


def train_epoch(
    backend: TrainingBackend,
    loader: BatchLoader,
    info: DistInfo,
    method: TrainHooks | None = None,
    amp: torch.dtype | None = None,
    label_smoothing: float = 0.0,
    channels_last: bool = False,
    grad_accum: int = 1,
    desc: str = "train",
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns the mean loss and top-1 over all ranks, the steps taken
    and the bad samples skipped.

    The optimizer steps every ``grad_accum`` micro-batches and after the epoch's last one. After
    each step the method's ``after_step`` hook runs on the module (the optimizer's ``lr`` is still
    the one the step used), the backend makes the optimizer see what it edited, and only then
    ``scheduler`` steps. No per-step host synchronisation: loss and accuracy accumulate
    on the device and are read once at the end (an ``.item()`` per step would stall a GPU's queue).
    """
    net = backend.module
    net.train()
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    stats = torch.zeros(3, dtype=torch.float64, device=info.device)  # loss sum, correct, count
    expected = len(loader)
    _check_equal_steps(expected, info)
    bad_before = loader.errors.total
    bar = progress(show=info.is_main, total=expected, desc=desc, leave=False, dynamic_ncols=True)
    steps = 0
    started = time.perf_counter()
    for (images, labels), last in _mark_last(lockstep(loader, info)):
        steps += 1
        boundary = last or steps % grad_accum == 0
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with backend.accumulate(boundary):
            with torch.autocast(info.device.type, dtype=amp, enabled=amp is not None):
                logits = backend.forward(images)
                loss = criterion(logits, labels)
                extra = method.loss_term(net) if method is not None else None
                total = loss + extra if extra is not None else loss
            backend.backward_step(total, boundary)
        if boundary and method is not None:
            method.after_step(net, backend.optimizer)
            backend.params_edited()
        if boundary and scheduler is not None:
            scheduler.step()
        n = labels.numel()
        with torch.no_grad():
            stats[0] += loss.detach().double() * n
            stats[1] += (logits.argmax(1) == labels).sum()
            stats[2] += n
        bar.update(1)
    bar.close()
    backend.sync_buffers()
    local_samples = stats[2].item()  # one host sync per epoch, after the last step
    img_s_per_worker = local_samples / max(1e-9, time.perf_counter() - started)
    bad = torch.tensor([loader.errors.total - bad_before], dtype=torch.float64,
                       device=info.device)
    all_reduce_sum(stats, info)
    all_reduce_sum(bad, info)
    count = max(1.0, stats[2].item())
    if steps < expected and info.is_main:
        print(f"[prunepipe] warning: {desc}: the epoch ended after {steps} of {expected} batches: a reader ran "
              "short of what the manifest declares (bad samples or a truncated shard)", flush=True)
    _check_bad_fraction(int(bad.item()), int(stats[2].item()), loader.max_bad_fraction)
    # rank 0's own rate: what one worker (GPU) trains, loading and stepping included
    return {"train_loss": stats[0].item() / count, "train_top1": stats[1].item() / count, "steps": steps,
            "bad_samples": int(bad.item()), "train_img_s_per_worker": img_s_per_worker}


def _mark_last(items: Iterable) -> Iterator[tuple[Any, bool]]:
    """``(item, is_last)`` pairs, one item ahead: the last micro-batch of an epoch must step even
    when the epoch ends early (``lockstep`` ends it on every rank at once, so all agree)."""
    it = iter(items)
    try:
        current = next(it)
    except StopIteration:
        return
    for nxt in it:
        yield current, False
        current = nxt
    yield current, True


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


def _check_bad_fraction(bad: int, good: int, limit: float | None) -> None:
    """Skipping a few bad files is fine; skipping a large part of an epoch is a broken dataset."""
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
    model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], info: DistInfo, amp: torch.dtype | None = None, channels_last: bool = False
) -> dict[str, float]:
    """Top-1, top-5 and loss over the whole split (each rank evaluates its share; all-reduced).
    As in :func:`train_epoch`, the sums stay on the device until the end: no per-batch sync."""
    net = model  # the plain module, no DDP forward: ranks may hold different batch counts
    net.eval()
    stats = torch.zeros(4, dtype=torch.float64, device=info.device)  # loss sum, top1, top5, count
    for images, labels in loader:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(info.device.type, dtype=amp, enabled=amp is not None):
            logits = net(images).float()
        k = min(5, logits.shape[1])
        hit = logits.topk(k, dim=1).indices == labels[:, None]
        stats[:3] += torch.stack([nn.functional.cross_entropy(logits, labels, reduction="sum").double(),
                                  hit[:, 0].sum().double(), hit.any(1).sum().double()])
        stats[3] += labels.numel()
    all_reduce_sum(stats, info)
    count = max(1.0, stats[3].item())
    return {"val_loss": stats[0].item() / count, "val_top1": stats[1].item() / count, "val_top5": stats[2].item() / count}


def save_checkpoint(path: str | Path, payload: dict[str, Any], info: DistInfo) -> None:
    """Rank 0 writes ``payload`` atomically (temp file + rename): a crash never leaves half a file."""
    if not info.is_main:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: torch.save(payload, tmp))


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
    net = model
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
