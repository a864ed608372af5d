"""Per-channel mean and std of a converted training set, from a seeded sample of its images."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data.shards import index_path, iter_members, read_index
from pipeline.progress import progress as progress_bar

# torchvision's ImageNet normalisation (the values its pretrained weights expect)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _eval_view(data: bytes, size: int) -> np.ndarray:
    """The pixels a model sees at evaluation: shorter side to size / 0.875, centre crop size × size
    (the loaders' ``imagenet`` val transform); decoded at the smallest DCT scale that is still
    larger than that (PIL's ``draft``), which is exact enough for statistics and several times faster."""
    im = Image.open(io.BytesIO(data))
    short = int(round(size / 0.875))
    im.draft("RGB", (short, short))
    im = im.convert("RGB")
    scale = short / min(im.size)
    w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
    im = im.resize((w, h), Image.BILINEAR, reducing_gap=None)
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float64) / 255.0


def compute_stats(root: Path, shards: list[dict[str, Any]], samples: int, seed: int, size: int = 224,
                  progress: bool = True) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std (per RGB channel, in [0, 1]) over ``samples`` seeded-random images of the shards,
    each seen as at evaluation (see :func:`_eval_view`), so every image weighs the same."""
    population = [(s["path"], e) for s in shards for e in read_index(index_path(root / s["path"]))]
    chosen = random.Random(seed).sample(population, min(samples, len(population)))
    by_shard: dict[str, list] = {}
    for path, entry in chosen:
        by_shard.setdefault(path, []).append(entry)
    total = np.zeros(3)
    squares = np.zeros(3)
    n = 0
    with progress_bar(show=progress, total=len(chosen), desc="stats", unit="img") as bar:
        for path, entries in by_shard.items():
            entries.sort(key=lambda e: e.end())
            for _, comps in iter_members(root / path, entries):
                x = _eval_view(comps["jpg"], size).reshape(-1, 3)
                total += x.sum(0)
                squares += (x**2).sum(0)
                n += len(x)
                bar.update()
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean**2, 1e-8))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
