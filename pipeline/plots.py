"""Plots people would rather look at than read."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: clusters and CI have no display
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Lay out, write (creating the folder) and close a figure; returns its path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def width_plot(dense: dict[str, int], kept: dict[str, int], title: str, path: str | Path) -> Path:
    """Per channel group: dense width (grey) and kept width (blue)."""
    names = list(dense)
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(names) + 2), 3.6))
    xs = range(len(names))
    ax.bar(xs, [dense[n] for n in names], color="#c8c8c8", label="dense")
    ax.bar(xs, [kept[n] for n in names], color="#3572b0", label="kept")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("channels")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=110)
