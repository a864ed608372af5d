"""Per-channel mean and std of a converted training set, from a seeded sample of its images."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.data.shards import index_path, iter_members, read_index

# torchvision's ImageNet normalisation (the values its pretrained weights expect)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SIDE = 64  # every sampled image is resized to this square, so each weighs the same


def compute_stats(root: Path, shards: list[dict[str, Any]], samples: int, seed: int,
                  progress: bool = True) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std (per RGB channel, in [0, 1]) over ``samples`` seeded-random images of the shards.

    Images are decoded at a reduced DCT scale (PIL's ``draft``) and resized to 64×64: the
    statistics of colour do not need full resolution, and it keeps 5000 images to seconds.
    """
    population = [(s["path"], e) for s in shards for e in read_index(index_path(root / s["path"]))]
    chosen = random.Random(seed).sample(population, min(samples, len(population)))
    by_shard: dict[str, list] = {}
    for path, entry in chosen:
        by_shard.setdefault(path, []).append(entry)
    total = np.zeros(3)
    squares = np.zeros(3)
    n = 0
    with tqdm(total=len(chosen), desc="stats", unit="img", disable=not progress) as bar:
        for path, entries in by_shard.items():
            entries.sort(key=lambda e: e.end())
            for _, comps in iter_members(root / path, entries):
                im = Image.open(io.BytesIO(comps["jpg"]))
                im.draft("RGB", (_SIDE, _SIDE))
                x = np.asarray(im.convert("RGB").resize((_SIDE, _SIDE), Image.BILINEAR), dtype=np.float64) / 255.0
                total += x.reshape(-1, 3).sum(0)
                squares += (x.reshape(-1, 3) ** 2).sum(0)
                n += _SIDE * _SIDE
                bar.update()
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean**2, 1e-8))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
