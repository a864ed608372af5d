"""``prunepipe bench``: a dense model and pruned ones timed in one run, interleaved.

For every setting (batch size × precision × channels_last × eager/compiled) all models are
timed in the same rounds, in rotating order, so a load that comes and goes hits them alike.
Reported per model and setting: images/s (median over rounds), the speed-up over the dense
model (median of per-round ratios, with its interquartile range and a reliability flag), and
at batch 1 the latency p50/p90 over all timed calls.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.measure import ForeignCPU, count_macs, count_params, fold_batchnorm, interleaved_times, make_timer


@dataclass
class BenchModel:
    label: str
    model: nn.Module
    macs: int = 0
    params: int = 0


@dataclass
class BenchRow:
    label: str
    batch: int
    precision: str
    channels_last: bool
    compiled: bool
    img_s: float
    speedup: float
    speedup_low: float
    speedup_high: float
    reliable: bool
    macs_reduction: float
    latency_p50_ms: float | None = None
    latency_p90_ms: float | None = None
    foreign_cpu: float = 0.0  # share of the CPUs other processes used while this setting was timed
    extra: dict[str, Any] = field(default_factory=dict)


_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def run_bench(
    models: list[BenchModel],
    image_size: int,
    batch_sizes: list[int],
    precisions: list[str],
    channels_last: list[bool],
    compiled: list[bool],
    rounds: int = 12,
    per_round: int = 2,
    warmup: int = 3,
    max_spread: float = 0.10,
    device: torch.device | str = "cpu",
    fold_bn: bool = True,
    timer=None,
) -> list[BenchRow]:
    """Time every model in every setting; ``models[0]`` is the dense reference."""
    device = torch.device(device)
    for p in precisions:
        if p not in _PRECISIONS:
            raise ValueError(f"precision {p!r}: allowed values are {', '.join(_PRECISIONS)}")
    if device.type == "cpu" and "fp16" in precisions:
        raise ValueError("precision fp16 needs a GPU; use fp32 or bf16 on a CPU")
    for m in models:
        m.macs, m.params = count_macs(m.model, image_size), count_params(m.model)
    rows: list[BenchRow] = []
    for cl in channels_last:
        fmt = torch.channels_last if cl else torch.contiguous_format
        prepared = [(fold_batchnorm(m.model) if fold_bn else m.model).to(device, memory_format=fmt) for m in models]
        for comp in compiled:
            nets = [torch.compile(n) if comp else n for n in prepared]
            for precision in precisions:
                clock = timer or make_timer(device, _PRECISIONS[precision])
                for batch in batch_sizes:
                    x = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(memory_format=fmt)
                    for n in nets:
                        for _ in range(warmup):
                            clock(n, x)
                    probe = ForeignCPU()
                    times = interleaved_times(nets, x, rounds, per_round, clock)
                    # an injected clock does not run on the cores: no contention to check
                    foreign = probe.fraction() if device.type == "cpu" and timer is None else 0.0
                    rows += _rows(models, times, batch, precision, cl, comp, max_spread, foreign)
    return rows


def _rows(models, times, batch, precision, cl, comp, max_spread, foreign: float = 0.0,
          max_foreign: float = 0.15) -> list[BenchRow]:
    out = []
    dense_t = times[0]
    for m, t in zip(models, times, strict=True):
        ratios = [d / p for d, p in zip(dense_t, t, strict=True)]
        q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
        mid = statistics.median(ratios)
        row = BenchRow(m.label, batch, precision, cl, comp, batch / statistics.median(t), mid, q[0], q[2],
                       reliable=(q[2] - q[0]) / mid <= max_spread and foreign <= max_foreign,
                       macs_reduction=1 - m.macs / models[0].macs, foreign_cpu=foreign)
        if batch == 1:
            ordered = sorted(t)
            row.latency_p50_ms = 1000 * statistics.median(ordered)
            row.latency_p90_ms = 1000 * ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        out.append(row)
    return out


def distinct_labels(sources: list[str]) -> list[str]:
    """A short name per model that tells it from the others: a ``models:/`` URI as given, a
    folder by as few trailing path parts as make every name distinct (a search saves every
    trial's model as ``<trial>/model``, so the folder's own name says nothing)."""
    parts = [(s,) if s.startswith("models:/") else Path(s).resolve().parts for s in sources]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return list(sources)  # the same model given twice: as given


def format_rows(rows: list[BenchRow]) -> str:
    head = ("| model | batch | precision | channels_last | compiled | MACs red. | img/s | speed-up [IQR] | "
            "p50 ms | p90 ms |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        flag = "" if r.reliable else " (noisy)"
        lat = (f"{r.latency_p50_ms:.2f} | {r.latency_p90_ms:.2f}" if r.latency_p50_ms is not None else "- | -")
        lines.append(f"| {r.label} | {r.batch} | {r.precision} | {'on' if r.channels_last else 'off'} | "
                     f"{'yes' if r.compiled else 'no'} | {r.macs_reduction:.1%} | {r.img_s:.1f} | "
                     f"{r.speedup:.2f}x [{r.speedup_low:.2f}-{r.speedup_high:.2f}]{flag} | {lat} |")
    return "\n".join(lines)


def plot_speedups(rows: list[BenchRow], path: str | Path) -> Path:
    """Measured speed-up against MACs reduction, one point per model and setting, with the
    MACs-ratio line (what a speed-up 'should' be) for reference."""
    from pipeline.plots import plt, save_figure  # plots selects the headless backend first

    fig, ax = plt.subplots(figsize=(6, 4.5))
    xs = [r.macs_reduction for r in rows]
    top = max(xs) if xs else 0.5
    grid = [i / 100 * top for i in range(101)]
    ax.plot([100 * g for g in grid], [1 / (1 - g) for g in grid], "k--", lw=1, label="MACs ratio (efficiency 1.0)")
    settings = sorted({(r.batch, r.precision, r.channels_last, r.compiled) for r in rows})
    for st in settings:
        pts = [r for r in rows if (r.batch, r.precision, r.channels_last, r.compiled) == st]
        ax.errorbar([100 * r.macs_reduction for r in pts], [r.speedup for r in pts],
                    yerr=[[r.speedup - r.speedup_low for r in pts], [r.speedup_high - r.speedup for r in pts]],
                    fmt="o", capsize=3,
                    label=f"batch {st[0]} {st[1]}{' CL' if st[2] else ''}{' compiled' if st[3] else ''}")
        for r in pts:
            ax.annotate(r.label, (100 * r.macs_reduction, r.speedup), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("MACs reduction (%)")
    ax.set_ylabel("measured speed-up over dense (median, IQR)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
