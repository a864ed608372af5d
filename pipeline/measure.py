"""What a pruned model is worth: MACs, parameters and *measured* throughput.

MACs count multiply-accumulates of convs and linears (the convention of the ResNet paper's
"FLOPs": ResNet-50 = 4.1 G at 224²). Throughput is timed, never derived: the dense model and
pruned ones are timed in many short interleaved rounds in one process (:func:`time_models`,
under one :class:`TimingConfig`), and each speed-up is the median of the per-round ratios with
its interquartile range; a noisy result is re-measured and, if it stays noisy, flagged
``speed_reliable = 0`` rather than reported as a plain number. Every caller gets the same
record, :class:`SpeedResult`, and logs it through :meth:`SpeedResult.metrics`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from pipeline.config import MeasureConfig


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


PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TimingConfig:
    """How models are timed against each other: one object, so every measurement in a run (a
    trial's cut, a finalist's re-measurement, a bench setting) follows the same protocol."""

    batch_size: int = 64
    rounds: int = 12  # interleaved rounds of the first attempt; each later attempt doubles them
    per_round: int = 2  # calls per model per round; the round keeps their median
    warmup: int = 3  # untimed calls per model before the first round
    max_spread: float = 0.10  # a relative IQR of the per-round speed-ups above this is noisy
    attempts: int = 2  # measurements tried before a noisy result is returned flagged unreliable
    max_foreign_cpu: float = 0.15  # CPU runs: other processes' share of the cores that makes it unreliable
    fold_bn: bool = False  # time inference copies with BatchNorm folded into the convs
    device: torch.device = torch.device("cpu")
    amp_dtype: torch.dtype | None = None  # autocast dtype; None: float32
    channels_last: bool = False
    compile: bool = False  # torch.compile every model before timing
    threads: int = 0  # torch CPU threads while timing; 0: leave the current setting
    # time each model in the faster of its two memory formats (contiguous, channels_last), as a
    # deployment would run it, instead of ``channels_last`` for all (see :func:`time_models`)
    fastest_format: bool = False
    # CPU: glibc keeps freed memory for the next forward (:func:`cached_allocator`), as an
    # inference server's caching allocator (jemalloc, tcmalloc) does, instead of page-faulting
    # every large activation in again on every call
    cached_allocator: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))  # "cpu", "cuda:0" accepted
        for name in ("batch_size", "rounds", "per_round", "attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)}: must be >= 1")
        if self.amp_dtype not in PRECISIONS.values():
            raise ValueError(f"amp_dtype {self.amp_dtype}: allowed values are None, torch.bfloat16, torch.float16")

    @classmethod
    def from_config(cls, measure: MeasureConfig, device: torch.device | str, amp_dtype: torch.dtype | None = None,
                    channels_last: bool = False) -> TimingConfig:
        """The protocol of the config's ``measure`` section on ``device``, in the precision and
        memory format the model trained with (both models are timed alike)."""
        return cls(batch_size=measure.batch_size, rounds=measure.rounds, warmup=measure.warmup,
                   max_spread=measure.max_spread, attempts=measure.attempts, max_foreign_cpu=measure.max_foreign_cpu,
                   fold_bn=measure.fold_bn, device=torch.device(device), amp_dtype=amp_dtype,
                   channels_last=channels_last, fastest_format=measure.memory_format == "fastest",
                   cached_allocator=measure.cpu_allocator == "cached",
                   compile=measure.compile == "on",
                   # 0 means every core: a Ray worker is pinned to one thread, and timing with
                   # it would measure a machine nobody deploys on
                   threads=measure.threads or os.cpu_count() or 1)

    def replace(self, **changes: Any) -> TimingConfig:
        """A copy with ``changes`` (field names; an unknown one is a TypeError)."""
        return dataclasses.replace(self, **changes)

    @property
    def precision(self) -> str:
        return next(name for name, dtype in PRECISIONS.items() if dtype == self.amp_dtype)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


# The figures a search row carries (and a re-measurement replaces), in the row's column order.
SPEED_KEYS = ("img_s", "dense_img_s", "speedup", "speedup_low", "speedup_high", "speed_reliable", "speedup_efficiency")


@dataclass(frozen=True)
class SpeedResult:
    """One model's measured speed beside the dense reference, timed in the same interleaved
    rounds; the speed-up is the median of the per-round ratios (the reference's own is 1.0)."""

    label: str
    img_s: float  # batch / median seconds per batch
    dense_img_s: float  # the reference's, in the same rounds
    speedup: float
    speedup_low: float  # 25th percentile of the per-round speed-ups
    speedup_high: float  # 75th percentile
    reliable: bool
    reason: str  # why it is not reliable; empty when it is
    rounds: int  # of the attempt reported
    attempts: int
    foreign_cpu: float  # share of the CPUs other processes used while timing (CPU runs)
    protocol: TimingConfig
    macs: int = 0  # 0: unknown (a callable that hides its weights, e.g. an ONNX Runtime session)
    params: int = 0
    dense_macs: int = 0
    dense_params: int = 0
    latency_p50_ms: float | None = None  # batch 1 only: over the rounds' per-call medians
    latency_p90_ms: float | None = None
    # the memory formats this model and the reference ran in (they differ when each was timed
    # in its fastest); None: the protocol's
    in_channels_last: bool | None = None
    dense_in_channels_last: bool | None = None

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median: 0.05 = the middle half within ±2.5 %."""
        return (self.speedup_high - self.speedup_low) / self.speedup if self.speedup > 0 else math.inf

    @property
    def macs_reduction(self) -> float:
        return 1 - self.macs / self.dense_macs

    @property
    def params_reduction(self) -> float:
        return 1 - self.params / self.dense_params

    @property
    def macs_speedup(self) -> float:
        return self.dense_macs / self.macs

    # the setting it was timed in (a bench times several)
    @property
    def batch(self) -> int:
        return self.protocol.batch_size

    @property
    def precision(self) -> str:
        return self.protocol.precision

    @property
    def channels_last(self) -> bool:
        return self.protocol.channels_last if self.in_channels_last is None else self.in_channels_last

    @property
    def compiled(self) -> bool:
        return self.protocol.compile

    def metrics(self, prefix: str = "", keys: Iterable[str] | None = None) -> dict[str, float]:
        """The record as the flat numbers runs log and versions are tagged with (every key, or
        ``keys``), each name prefixed. ``speed_reliable`` is 1.0 or 0.0, a number, so MLflow
        keeps it as a metric; when it is 0 the speed figures must not be read as plain numbers.
        The size keys need the MACs and parameters of both models."""
        every: dict[str, float] = {}
        if self.macs and self.dense_macs:
            every |= {"dense_macs": self.dense_macs, "macs": self.macs, "macs_reduction": self.macs_reduction,
                      "dense_params": self.dense_params, "params": self.params,
                      "params_reduction": self.params_reduction}
        every |= {"dense_img_s": self.dense_img_s, "img_s": self.img_s, "speedup": self.speedup,
                  "speedup_low": self.speedup_low, "speedup_high": self.speedup_high, "speed_spread": self.spread,
                  "speed_rounds": self.rounds, "speed_reliable": float(self.reliable),
                  "speed_foreign_cpu": self.foreign_cpu, "channels_last": float(self.channels_last),
                  "dense_channels_last": float(self.protocol.channels_last if self.dense_in_channels_last is None
                                               else self.dense_in_channels_last)}
        if self.macs and self.dense_macs:
            # 1.0 = every MAC removed turned into speed; pruning tools are often far below
            every |= {"macs_speedup": self.macs_speedup, "speedup_efficiency": self.speedup / self.macs_speedup}
        return {prefix + k: every[k] for k in (every if keys is None else keys)}


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
    models: list[nn.Module], x: torch.Tensor | Sequence[torch.Tensor], rounds: int, per_round: int, timer: Timer
) -> list[list[float]]:
    """Seconds per batch of each model in each round (median of ``per_round`` calls); the
    order rotates every round, so no model always runs first (or right after another). ``x``:
    one input for all, or one per model (models in different memory formats)."""
    xs = [x] * len(models) if isinstance(x, torch.Tensor) else list(x)
    times: list[list[float]] = [[] for _ in models]
    for r in range(rounds):
        k = r % len(models)
        order = list(range(k, len(models))) + list(range(k))
        if r % 2 and len(models) > 2:
            order.reverse()
        for i in order:
            times[i].append(statistics.median(timer(models[i], xs[i]) for _ in range(per_round)))
    return times


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def prepare(models: Sequence[nn.Module], protocol: TimingConfig) -> list[nn.Module]:
    """The modules that are timed: each in eval mode on the protocol's device and memory format,
    as an inference copy with BatchNorm folded (``fold_bn``) and compiled (``compile``). All
    models get the same treatment, so a speed-up stays a fair comparison."""
    nets = []
    for m in models:
        net = (fold_batchnorm(m) if protocol.fold_bn else m.eval()).to(protocol.device,
                                                                        memory_format=protocol.memory_format)
        nets.append(torch.compile(net) if protocol.compile else net)
    return nets


def fastest_formats(models: Sequence[nn.Module], x: torch.Tensor, protocol: TimingConfig, timer: Timer
                    ) -> tuple[list[nn.Module], list[bool]]:
    """Each model prepared in its faster memory format: both formats timed interleaved (a third
    of the protocol's rounds, at least 3), the lower median kept; (modules, channels_last each).
    On a CPU which format wins depends on the widths: a pruned model's odd channel counts can
    flip it (docs/benchmarks.md §2.2), so dense and pruned may end in different formats."""
    nets, last = [], []
    rounds = max(3, protocol.rounds // 3)
    for m in models:
        # copies: without BN folding, prepare converts the module itself, in place
        both = [prepare([copy.deepcopy(m)], protocol.replace(channels_last=cl, fastest_format=False))[0]
                for cl in (False, True)]
        inputs = [x.contiguous(memory_format=f) for f in (torch.contiguous_format, torch.channels_last)]
        for net, xi in zip(both, inputs, strict=True):
            for _ in range(protocol.warmup):
                timer(net, xi)
        t = interleaved_times(both, inputs, rounds, 1, timer)
        cl = statistics.median(t[1]) < statistics.median(t[0])
        nets.append(both[int(cl)])
        last.append(cl)
    return nets, last


_CACHED_ALLOCATOR: bool | None = None  # None: not asked yet in this process
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def cached_allocator() -> bool:
    """Make this process's glibc malloc keep freed memory: large blocks from the heap instead of
    ``mmap`` (M_MMAP_THRESHOLD 1 GiB) and no trimming back to the system (M_TRIM_THRESHOLD).

    Why: by default every activation above glibc's mmap threshold (128 KiB, rising with use to
    32 MiB) is a fresh ``mmap`` on every forward, and its pages fault in, zeroed by the kernel,
    each time. At ResNet-50, batch 32, 224² on this CPU that was ~40 % of a forward (3.0 s
    against 1.74 s), and its share depended on the process's history (the threshold moves), so
    one pair of models measured 2.9× in one process and 3.5× in another. A server with a caching
    allocator pays it once. Process-wide and not undone (the setting cannot be handed back to
    glibc's own adjustment); the cost is that the process keeps its peak memory. Returns whether
    it holds: False off glibc (macOS, musl), where nothing is changed."""
    global _CACHED_ALLOCATOR
    if _CACHED_ALLOCATOR is None:
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            _CACHED_ALLOCATOR = bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
                                     and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
        except (OSError, AttributeError):
            _CACHED_ALLOCATOR = False
    return _CACHED_ALLOCATOR


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sizes(model: nn.Module, image_size: int) -> tuple[int, int]:
    """MACs and parameters; (0, 0) for a callable with no parameters to count."""
    if next(iter(model.parameters()), None) is None:
        return 0, 0
    return count_macs(model, image_size), count_params(model)


def time_models(
    models: Sequence[nn.Module],
    image_size: int,
    protocol: TimingConfig,
    *,
    labels: Sequence[str] | None = None,
    timer: Timer | None = None,
    check_contention: bool | None = None,
    prepared: Sequence[nn.Module] | None = None,
) -> list[SpeedResult]:
    """Time ``models`` (``models[0]`` is the dense reference) in many short interleaved rounds
    and return one record per model, in order.

    Another process stealing the cores slows whichever model runs at that moment: one number
    from one long run each can be off by any factor, in either direction. So every round times
    every model, in rotating order (ABBA for two: a trend in the machine's speed cancels), and a
    model's speed-up is the median of its per-round ratios to the reference: a few hit rounds
    show as spread, not as a wrong median. When any record's interquartile range exceeds
    ``max_spread`` (relative), all are measured again with twice the rounds, up to ``attempts``
    times; what stays noisy is returned with ``reliable=False``, never as a plain number. On a
    CPU, a measurement during which other processes used more than ``max_foreign_cpu`` of the
    machine is unreliable however tight it looks (see :class:`ForeignCPU`).

    ``timer`` is injectable so decisions built on this can be tested; the contention check then
    applies only when ``check_contention`` asks for it (an injected clock does not run on the
    machine's cores). ``prepared``: the modules to time when the caller already made them with
    :func:`prepare` (a bench reuses its compiled copies across batch sizes and precisions);
    MACs and parameters are always counted on ``models``.
    """
    labels = list(labels) if labels is not None else ["dense", *(f"model {i}" for i in range(1, len(models)))]
    if not models or len(labels) != len(models):
        raise ValueError(f"{len(models)} models and {len(labels)} labels: give at least one model, a label each")
    if check_contention is None:
        check_contention = timer is None and protocol.device.type == "cpu"
    timer = timer or make_timer(protocol.device, protocol.amp_dtype)
    sizes = [_sizes(m, image_size) for m in models]
    batch = protocol.batch_size
    if protocol.cached_allocator and protocol.device.type == "cpu":
        cached_allocator()
    with torch_threads(protocol.threads):
        x = torch.randn(batch, 3, image_size, image_size, device=protocol.device)
        if protocol.fastest_format and prepared is None:
            nets, formats = fastest_formats(models, x, protocol, timer)
        else:
            nets = list(prepared) if prepared is not None else prepare(models, protocol)
            formats = [protocol.channels_last] * len(nets)
        xs = [x.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format) for cl in formats]
        for net, xi in zip(nets, xs, strict=True):
            for _ in range(protocol.warmup):
                timer(net, xi)
        rounds = protocol.rounds
        for attempt in range(1, protocol.attempts + 1):
            probe = ForeignCPU()
            times = interleaved_times(nets, xs, rounds, protocol.per_round, timer)
            foreign = probe.fraction() if check_contention else 0.0
            records = [_record(label, t, times[0], size, sizes[0], rounds, attempt, foreign, protocol,
                               (cl, formats[0]))
                       for label, t, size, cl in zip(labels, times, sizes, formats, strict=True)]
            if all(r.reliable for r in records):
                break
            rounds *= 2
    return records


def _record(label: str, t: list[float], dense_t: list[float], size: tuple[int, int], dense_size: tuple[int, int],
            rounds: int, attempt: int, foreign: float, protocol: TimingConfig,
            formats: tuple[bool, bool]) -> SpeedResult:
    low, mid, high = _quartiles([d / p for d, p in zip(dense_t, t, strict=True)])
    spread = (high - low) / mid if mid > 0 else math.inf
    why = []
    if not spread <= protocol.max_spread:
        why.append(f"per-round speed-ups spread {spread:.0%} (IQR) > {protocol.max_spread:.0%}")
    if foreign > protocol.max_foreign_cpu:
        why.append(f"other processes used {foreign:.0%} of the CPUs > {protocol.max_foreign_cpu:.0%}")
    p50 = p90 = None
    if protocol.batch_size == 1:
        ordered = sorted(t)
        p50 = 1000 * statistics.median(ordered)
        p90 = 1000 * ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    batch = protocol.batch_size
    return SpeedResult(label, batch / statistics.median(t), batch / statistics.median(dense_t), mid, low, high,
                       reliable=not why, reason="; ".join(why), rounds=rounds, attempts=attempt, foreign_cpu=foreign,
                       protocol=protocol, macs=size[0], params=size[1], dense_macs=dense_size[0],
                       dense_params=dense_size[1], latency_p50_ms=p50, latency_p90_ms=p90,
                       in_channels_last=formats[0], dense_in_channels_last=formats[1])


def compare(dense: nn.Module, pruned: nn.Module, image_size: int, protocol: TimingConfig | None = None, *,
            timer: Timer | None = None, **changes: Any) -> dict[str, float]:
    """What the pruned model is worth beside the dense one, as the flat metrics a run logs:
    MACs, params and measured speed (:func:`time_models`) under ``protocol`` (default: the
    defaults of :class:`TimingConfig`) with ``changes`` to its fields."""
    protocol = (protocol or TimingConfig()).replace(**changes)
    return time_models([dense, pruned], image_size, protocol, labels=("dense", "pruned"), timer=timer)[1].metrics()
