"""``prunepipe bench``: a dense model and pruned ones timed in one run, interleaved.

For every setting (batch size × precision × channels_last × eager/compiled) all models are
timed in the same rounds, in rotating order, so a load that comes and goes hits them alike.
Reported per model and setting: images/s (median over rounds), the speed-up over the dense
model (median of per-round ratios, with its interquartile range and a reliability flag), and
at batch 1 the latency p50/p90 over all timed calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.measure import PRECISIONS, SpeedResult, TimingConfig, prepare, time_models


@dataclass
class BenchModel:
    label: str
    model: nn.Module
    macs: int = 0  # filled in by run_bench
    params: int = 0


# A bench times many settings one after the other: each is measured once, and a noisy one is
# flagged in the table rather than re-measured (the table is read as a whole, re-run alone).
BENCH_PROTOCOL = TimingConfig(fold_bn=True, attempts=1)


def run_bench(
    models: list[BenchModel],
    image_size: int,
    batch_sizes: list[int],
    precisions: list[str],
    channels_last: list[bool],
    compiled: list[bool],
    protocol: TimingConfig = BENCH_PROTOCOL,
    *,
    timer=None,
    **changes: Any,
) -> list[SpeedResult]:
    """Time every model in every setting; ``models[0]`` is the dense reference. A setting is
    ``protocol`` (with ``changes`` to its fields) at one batch size, precision, memory format
    and eager/compiled."""
    protocol = protocol.replace(**changes)
    for p in precisions:
        if p not in PRECISIONS:
            raise ValueError(f"precision {p!r}: allowed values are {', '.join(PRECISIONS)}")
    if protocol.device.type == "cpu" and "fp16" in precisions:
        raise ValueError("precision fp16 needs a GPU; use fp32 or bf16 on a CPU")
    originals, labels = [m.model for m in models], [m.label for m in models]
    rows: list[SpeedResult] = []
    for cl in channels_last:
        for comp in compiled:
            # prepared (folded, compiled) once per memory format and mode, timed in every precision and batch
            nets = prepare(originals, protocol.replace(channels_last=cl, compile=comp))
            for precision in precisions:
                for batch in batch_sizes:
                    setting = protocol.replace(batch_size=batch, amp_dtype=PRECISIONS[precision], channels_last=cl,
                                               compile=comp)
                    rows += time_models(originals, image_size, setting, labels=labels, timer=timer, prepared=nets)
    for m, r in zip(models, rows[: len(models)], strict=False):  # the first setting's records
        m.macs, m.params = r.macs, r.params
    return rows


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


def format_rows(rows: list[SpeedResult]) -> str:
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


def plot_speedups(rows: list[SpeedResult], path: str | Path) -> Path:
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
