"""What a pruned model is worth: MACs, parameters and *measured* throughput.

MACs count multiply-accumulates of convs and linears (the convention of the ResNet paper's
"FLOPs": ResNet-50 = 4.1 G at 224²). Throughput is timed, never derived: dense and pruned are
timed in many short interleaved rounds in one process, and the speed-up is the median of the
per-round ratios with its interquartile range; a noisy result is re-measured and, if it stays
noisy, flagged ``speed_reliable = 0`` rather than reported as a plain number.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn


def count_macs(model: nn.Module, image_size: int) -> int:
    """Multiply-accumulates of one image's forward pass (convs and linears)."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out):
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() // out.shape[0] * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp, out):
        nonlocal total
        total += out.numel() // out.shape[0] * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return int(total)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


Timer = Callable[[nn.Module, torch.Tensor], float]


def make_timer(device: torch.device, amp_dtype: torch.dtype | None = None) -> Timer:
    """Seconds of one forward pass: CUDA events on a GPU (the GPU's own clock, synchronised),
    ``perf_counter`` on a CPU."""
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else nullcontext

    if device.type == "cuda":
        def gpu_timer(model: nn.Module, x: torch.Tensor) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.inference_mode(), autocast():
                start.record()
                model(x)
                end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0

        return gpu_timer

    def cpu_timer(model: nn.Module, x: torch.Tensor) -> float:
        with torch.inference_mode(), autocast():
            t0 = time.perf_counter()
            model(x)
            return time.perf_counter() - t0

    return cpu_timer


class ForeignCPU:
    """How much of the machine's CPU *other* processes used while we timed (0..1).

    Interleaving protects a ratio against load that comes and goes, but not against load that
    stays: with another process on the cores, torch's OpenMP threads spin-wait and every forward
    takes the same long time whatever its size — a tight, confident, wrong ratio of 1.0 (seen
    here: 0.8 s for a forward that takes 0.012 s alone). The machine's busy time (/proc/stat)
    minus this process's CPU time, over the wall time of all cores, says whether we were alone.
    Linux only; elsewhere it reports 0 (no evidence either way).
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [float(v) for v in f.readline().split()[1:]]
        except OSError:
            return None
        tick = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / tick  # all but idle and iowait, no guest double count
        own = os.times()
        return time.monotonic(), busy, own.user + own.system

    def fraction(self) -> float:
        end = self._sample()
        if self._start is None or end is None:
            return 0.0
        wall = end[0] - self._start[0]
        foreign = (end[1] - self._start[1]) - (end[2] - self._start[2])
        return max(0.0, min(1.0, foreign / max(1e-9, wall * (os.cpu_count() or 1))))


@dataclass
class SpeedUp:
    """Dense vs pruned timed in interleaved rounds; the speed-up is the median of per-round ratios."""

    speedup: float
    low: float  # 25th percentile of the per-round speed-ups
    high: float  # 75th percentile
    dense_img_s: float
    img_s: float
    rounds: int
    attempts: int
    reliable: bool
    foreign_cpu: float = 0.0  # share of the CPUs other processes used while timing (CPU runs)

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median: 0.05 = the middle half within ±2.5 %."""
        return (self.high - self.low) / self.speedup if self.speedup > 0 else math.inf


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` with every BatchNorm that follows a conv folded into the
    conv's weights and bias (what a deployment does; exact in eval mode). Dense and pruned get
    the same treatment, so a speed-up stays a fair comparison."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    pairs = [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
    for _, module in model.named_modules():
        for conv_name, bn_name in pairs:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())
        if isinstance(module, nn.Sequential) and len(module) == 2 and isinstance(module[0], nn.Conv2d) \
                and isinstance(module[1], nn.BatchNorm2d):  # torchvision's downsample
            module[0] = fuse_conv_bn_eval(module[0], module[1])
            module[1] = nn.Identity()
    return model


def interleaved_times(
    models: list[nn.Module], x: torch.Tensor, rounds: int, per_round: int, timer: Timer
) -> list[list[float]]:
    """Seconds per batch of each model in each round (median of ``per_round`` calls); the
    order rotates every round, so no model always runs first (or right after another)."""
    times: list[list[float]] = [[] for _ in models]
    for r in range(rounds):
        k = r % len(models)
        order = list(range(k, len(models))) + list(range(k))
        if r % 2 and len(models) > 2:
            order.reverse()
        for i in order:
            times[i].append(statistics.median(timer(models[i], x) for _ in range(per_round)))
    return times


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def interleaved_speedup(
    dense: nn.Module,
    pruned: nn.Module,
    image_size: int,
    batch_size: int = 64,
    rounds: int = 12,
    per_round: int = 2,
    warmup: int = 3,
    max_spread: float = 0.10,
    attempts: int = 2,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    timer: Timer | None = None,
    max_foreign_cpu: float = 0.15,
    check_contention: bool | None = None,
) -> SpeedUp:
    """Time dense and pruned in many short interleaved rounds (ABBA: the order flips every
    round, so a trend in the machine's speed cancels) and take the speed-up per round.

    Another process stealing the cores slows whichever model runs at that moment: one number
    from one long run each can be off by any factor, in either direction. Per-round ratios
    show it as spread; the median ignores a few hit rounds. A result whose interquartile range
    exceeds ``max_spread`` (relative) is measured again with twice the rounds, up to
    ``attempts`` times; if it stays noisy it is returned with ``reliable=False`` — never as a
    plain number. On a CPU, a measurement during which other processes used more than
    ``max_foreign_cpu`` of the machine is unreliable however tight it looks (see
    :class:`ForeignCPU`). ``timer`` is injectable so decisions built on this can be tested; the
    contention check then applies only when ``check_contention`` asks for it (an injected clock
    does not run on the machine's cores).
    """
    device = torch.device(device)
    if check_contention is None:
        check_contention = timer is None and device.type == "cpu"
    timer = timer or make_timer(device, amp_dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    models = [m.eval().to(device, memory_format=fmt) for m in (dense, pruned)]
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=fmt)
    for m in models:
        for _ in range(warmup):
            timer(m, x)
    n = rounds
    for attempt in range(1, attempts + 1):
        probe = ForeignCPU()
        dense_t, pruned_t = interleaved_times(models, x, n, per_round, timer)
        foreign = probe.fraction() if check_contention else 0.0
        ratios = [d / p for d, p in zip(dense_t, pruned_t, strict=True)]
        low, mid, high = _quartiles(ratios)
        result = SpeedUp(mid, low, high, batch_size / statistics.median(dense_t), batch_size / statistics.median(pruned_t),
                         n, attempt, reliable=False, foreign_cpu=foreign)
        if result.spread <= max_spread and foreign <= max_foreign_cpu:
            result.reliable = True
            return result
        n *= 2
    return result


def compare(
    dense: nn.Module,
    pruned: nn.Module,
    image_size: int,
    batch_size: int = 64,
    rounds: int = 12,
    warmup: int = 3,
    max_spread: float = 0.10,
    attempts: int = 2,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    timer: Timer | None = None,
    fold_bn: bool = False,
    max_foreign_cpu: float = 0.15,
) -> dict[str, float]:
    """What the pruned model is worth beside the dense one: MACs, params and measured speed
    (of inference copies with BatchNorm folded into the convs when ``fold_bn``).

    ``speed_reliable`` is 1.0 or 0.0 (a number, so MLflow keeps it as a metric); when it is 0
    the speed figures are reported with their spread and must not be read as a plain number.
    """
    timed = (fold_batchnorm(dense), fold_batchnorm(pruned)) if fold_bn else (dense, pruned)
    s = interleaved_speedup(*timed, image_size, batch_size=batch_size, rounds=rounds, warmup=warmup,
                            max_spread=max_spread, attempts=attempts, device=device, amp_dtype=amp_dtype,
                            channels_last=channels_last, timer=timer, max_foreign_cpu=max_foreign_cpu)
    dense_macs, pruned_macs = count_macs(dense, image_size), count_macs(pruned, image_size)
    dense_params, pruned_params = count_params(dense), count_params(pruned)
    macs_speedup = dense_macs / pruned_macs
    return {
        "dense_macs": dense_macs,
        "macs": pruned_macs,
        "macs_reduction": 1 - pruned_macs / dense_macs,
        "dense_params": dense_params,
        "params": pruned_params,
        "params_reduction": 1 - pruned_params / dense_params,
        "dense_img_s": s.dense_img_s,
        "img_s": s.img_s,
        "speedup": s.speedup,
        "speedup_low": s.low,
        "speedup_high": s.high,
        "speed_spread": s.spread,
        "speed_rounds": s.rounds,
        "speed_reliable": float(s.reliable),
        "speed_foreign_cpu": s.foreign_cpu,
        "macs_speedup": macs_speedup,
        # 1.0 = every MAC removed turned into speed; pruning tools are often far below
        "speedup_efficiency": s.speedup / macs_speedup,
    }
