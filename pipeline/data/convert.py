"""Write small image datasets as WebDataset shards (``.jpg`` + ``.cls``) with a manifest.

``dataset.json`` beside the shards records the class count, image size, normalisation and
each shard's sample count, so loaders know an epoch's length without scanning the tars.
Every shard gets its DALI index file (see :mod:`pipeline.data.shards`). ImageNet has its
own converter, :mod:`pipeline.data.imagenet`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data.manifest import MANIFEST, DatasetError, read_manifest
from pipeline.data.shards import index_path, write_shard
from pipeline.progress import progress

__all__ = ["DatasetError", "read_manifest", "write_digits", "write_synthetic", "write_manifest"]


def _jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write_split(
    out: Path, split: str, images: np.ndarray, labels: np.ndarray, per_shard: int, desc: str
) -> list[dict[str, Any]]:
    (out / split).mkdir(parents=True, exist_ok=True)
    shards = []
    n = len(labels)
    bar = progress(total=n, desc=f"{desc} {split}", unit="img", leave=False)
    for s, start in enumerate(range(0, n, per_shard)):
        rel = f"{split}/{split}-{s:06d}.tar"
        stop = min(n, start + per_shard)
        # .cls is the label as ASCII digits, the WebDataset/DALI convention
        write_shard(out / rel, ({"__key__": f"{split}_{i:07d}", "jpg": _jpeg(images[i]), "cls": str(int(labels[i]))}
                                for i in range(start, stop)))
        shards.append({"path": rel, "count": stop - start, "index": index_path(rel).as_posix()})
        bar.update(stop - start)
    bar.close()
    return shards


def write_manifest(out: Path, manifest: dict[str, Any]) -> Path:
    """Write ``dataset.json`` atomically (a reader never sees half a manifest)."""
    path = out / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(path)
    return path


def _write_manifest(out: Path, name: str, num_classes: int, image_size: int, splits: dict, images: np.ndarray) -> Path:
    pixels = images.reshape(-1, 3).astype(np.float64) / 255.0
    return write_manifest(out, {
        "name": name,
        "num_classes": int(num_classes),
        "image_size": int(image_size),
        "mean": pixels.mean(0).round(4).tolist(),
        "std": np.maximum(pixels.std(0), 1e-3).round(4).tolist(),
        "splits": splits,
    })


def _check_per_shard(per_shard: int) -> None:
    if not 1 <= per_shard <= 1_000_000:
        raise DatasetError(f"--per-shard {per_shard}: allowed range is 1..1000000")


def write_digits(out: str | Path, image_size: int = 32, val_fraction: float = 0.2, per_shard: int = 256, seed: int = 0) -> Path:
    """scikit-learn's bundled handwritten digits (1797 real 8×8 scans) as RGB JPEG shards.

    A stratified train/val split with a fixed seed; images upscaled bilinearly to ``image_size``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 8 <= image_size <= 512:
        raise DatasetError(f"--image-size {image_size}: allowed range is 8..512")
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"--val-fraction {val_fraction}: must be in (0, 1)")
    _check_per_shard(per_shard)
    digits = load_digits()
    gray = (digits.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
    big = np.stack(
        [np.asarray(Image.fromarray(g).resize((image_size, image_size), Image.BILINEAR)) for g in gray]
    )
    rgb = np.repeat(big[..., None], 3, axis=-1)
    idx = np.arange(len(rgb))
    tr, va = train_test_split(idx, test_size=val_fraction, stratify=digits.target, random_state=seed)
    out = Path(out)
    splits = {
        "train": _write_split(out, "train", rgb[tr], digits.target[tr], per_shard, "digits"),
        "val": _write_split(out, "val", rgb[va], digits.target[va], per_shard, "digits"),
    }
    return _write_manifest(out, "digits", 10, image_size, splits, rgb[tr])


def write_synthetic(
    out: str | Path,
    num_classes: int = 10,
    image_size: int = 32,
    train_samples: int = 512,
    val_samples: int = 128,
    per_shard: int = 128,
    seed: int = 0,
) -> Path:
    """Random images: a class-dependent colour plus noise, so a model can learn something."""
    if not 2 <= num_classes <= 100_000:
        raise DatasetError(f"--classes {num_classes}: allowed range is 2..100000")
    if not 8 <= image_size <= 1024:
        raise DatasetError(f"--image-size {image_size}: allowed range is 8..1024")
    if not 1 <= train_samples <= 10_000_000:
        raise DatasetError(f"--train-samples {train_samples}: allowed range is 1..10000000")
    if not 1 <= val_samples <= 10_000_000:
        raise DatasetError(f"--val-samples {val_samples}: allowed range is 1..10000000")
    _check_per_shard(per_shard)
    rng = np.random.default_rng(seed)
    colours = rng.uniform(40, 215, size=(num_classes, 3))

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, num_classes, size=n)
        noise = rng.normal(0, 40, size=(n, image_size, image_size, 3))
        return (colours[labels][:, None, None, :] + noise).clip(0, 255).astype(np.uint8), labels

    out = Path(out)
    tr_x, tr_y = make(train_samples)
    va_x, va_y = make(val_samples)
    splits = {
        "train": _write_split(out, "train", tr_x, tr_y, per_shard, "synthetic"),
        "val": _write_split(out, "val", va_x, va_y, per_shard, "synthetic"),
    }
    return _write_manifest(out, "synthetic", num_classes, image_size, splits, tr_x)
