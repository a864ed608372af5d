"""A miniature ILSVRC-2012 tree for tests and benchmarks: same layout, same label files, tiny.

``make_mini_imagenet(root)`` writes ``train/<wnid>/<wnid>_<n>.JPEG`` and ``val/`` (flat, as
distributed, or in class folders), with the devkit's ``data/ILSVRC2012_validation_ground_truth.txt``
and ``data/meta.mat``, Kaggle's ``LOC_val_solution.csv`` and a plain ``ImageId,label`` CSV.

Images are random-content JPEGs (quality 90) with sides drawn around ImageNet's (200–500 px,
never square by construction); each is its class's colour plus per-pixel noise, so a tiny model
can learn the classes. Like the real set, a few files are odd: grayscale JPEGs, CMYK JPEGs,
PNGs named ``.JPEG``, and optionally a corrupt (truncated) JPEG. The devkit's ILSVRC2012_IDs are
a permutation of the sorted wnids, as in the real devkit, so a converter that confuses ID order
with class order gets the val labels wrong.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

GT_NAME = "ILSVRC2012_validation_ground_truth.txt"


@dataclass
class MiniImageNet:
    """What was written: files (relative to ``root``) with their wnid, the odd ones, label files."""

    root: Path
    wnids: list[str]  # sorted: position = the label torchvision's ImageFolder gives
    train: dict[str, str] = field(default_factory=dict)  # relative path → wnid
    val: dict[str, str] = field(default_factory=dict)
    special: dict[str, list[str]] = field(default_factory=dict)  # "gray"/"cmyk"/"png"/"corrupt" → paths
    devkit: Path | None = None
    kaggle_csv: Path | None = None
    label_csv: Path | None = None

    def label(self, rel: str) -> int:
        return self.wnids.index({**self.train, **self.val}[rel])

    @staticmethod
    def key(rel: str) -> str:
        return rel.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def _image(rng: np.random.Generator, colour: np.ndarray, size_range: tuple[int, int],
           size: tuple[int, int] | None) -> np.ndarray:
    if size is not None:
        w, h = size
    else:
        lo, hi = size_range
        w = int(rng.integers(lo, hi + 1))
        h = int(rng.integers(lo, hi))
        h += h >= w  # never square
    noise = rng.integers(-45, 46, size=(h, w, 3), dtype=np.int16)
    return (colour.astype(np.int16) + noise).clip(0, 255).astype(np.uint8)


def _encode(img: np.ndarray, kind: str, quality: int) -> bytes:
    buf = io.BytesIO()
    pil = Image.fromarray(img)
    if kind == "png":
        pil.save(buf, format="PNG", compress_level=1)
    else:
        pil = {"gray": pil.convert("L"), "cmyk": pil.convert("CMYK")}.get(kind, pil)
        pil.save(buf, format="JPEG", quality=quality)
    data = buf.getvalue()
    return data[: len(data) // 2] if kind == "corrupt" else data


def _write_meta_mat(path: Path, ids: dict[str, int], rng: np.random.Generator) -> None:
    """A ``synsets`` struct array shaped like the devkit's: leaf synsets with IDs 1..C, then
    a few non-leaf ones (num_children > 0), as in the real file's 1860 entries."""
    from scipy.io import savemat

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = [(i, w, f"class {w}", "a miniature class", 0, np.zeros(0), 0, 10) for w, i in sorted(ids.items(), key=lambda t: t[1])]
    for j in range(3):
        rows.append((len(ids) + 1 + j, f"n{90000000 + j:08d}", "parent", "a non-leaf synset", 2,
                     np.array([1, 2]), 1 + j, 0))
    synsets = np.empty((len(rows), 1), dtype=[(f, "O") for f in fields])
    for r, row in enumerate(rows):
        for f, v in zip(fields, row, strict=True):
            synsets[r, 0][f] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), {"synsets": synsets})


def make_mini_imagenet(
    root: str | Path,
    classes: int = 24,
    train_per_class: int = 10,
    val_per_class: int = 4,
    seed: int = 0,
    flat_val: bool = True,
    size_range: tuple[int, int] = (200, 500),
    size: tuple[int, int] | None = None,
    gray: int = 3,
    cmyk: int = 3,
    png: int = 2,
    corrupt: int = 1,
    quality: int = 90,
    labels: tuple[str, ...] = ("devkit", "kaggle", "csv"),
) -> MiniImageNet:
    """Write a miniature ImageNet tree under ``root`` and describe it (see the module docstring).

    ``size`` = (width, height) fixes every image's size instead of drawing it from ``size_range``.
    ``labels`` chooses the flat-val label files written into ``root``: ``devkit``
    (``ILSVRC2012_devkit_t12/``), ``kaggle`` (``LOC_val_solution.csv``), ``csv`` (``val_labels.csv``).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    wnids = sorted({f"n{int(x):08d}" for x in rng.choice(10**7, size=classes, replace=False) + 10**6})
    colours = rng.uniform(30, 225, size=(classes, 3))
    mini = MiniImageNet(root, wnids)
    for wnid in wnids:
        for n in rng.choice(20000, size=train_per_class, replace=False):
            mini.train[f"train/{wnid}/{wnid}_{int(n)}.JPEG"] = wnid
    val_wnids = [w for w in wnids for _ in range(val_per_class)]
    rng.shuffle(val_wnids)
    for n, wnid in enumerate(val_wnids, start=1):
        folder = "val" if flat_val else f"val/{wnid}"
        mini.val[f"{folder}/ILSVRC2012_val_{n:08d}.JPEG"] = wnid

    every = list(mini.train) + list(mini.val)
    odd = iter(rng.permutation(len(every)).tolist())
    kinds = {rel: "rgb" for rel in every}
    for kind, count in (("gray", gray), ("cmyk", cmyk), ("png", png), ("corrupt", corrupt)):
        mini.special[kind] = sorted(every[next(odd)] for _ in range(count))
        kinds.update(dict.fromkeys(mini.special[kind], kind))
    index = {w: i for i, w in enumerate(wnids)}
    wnid_of = {**mini.train, **mini.val}
    for rel in every:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_encode(_image(rng, colours[index[wnid_of[rel]]], size_range, size), kinds[rel], quality))

    ids = dict(zip(wnids, (rng.permutation(classes) + 1).tolist(), strict=True))  # ID order ≠ wnid order
    val_rows = [(MiniImageNet.key(rel), wnid) for rel, wnid in mini.val.items()]
    if "devkit" in labels:
        mini.devkit = root / "ILSVRC2012_devkit_t12"
        _write_meta_mat(mini.devkit / "data" / "meta.mat", ids, rng)
        (mini.devkit / "data" / GT_NAME).write_text("".join(f"{ids[w]}\n" for _, w in sorted(val_rows)))
    order = rng.permutation(len(val_rows)).tolist()  # the CSVs are not in file order
    if "kaggle" in labels:
        mini.kaggle_csv = root / "LOC_val_solution.csv"
        mini.kaggle_csv.write_text("ImageId,PredictionString\n" + "".join(
            f"{val_rows[i][0]},{val_rows[i][1]} 10 20 150 180 {val_rows[i][1]} 30 40 90 120 \n" for i in order))
    if "csv" in labels:
        mini.label_csv = root / "val_labels.csv"
        mini.label_csv.write_text("ImageId,label\n" + "".join(f"{val_rows[i][0]},{val_rows[i][1]}\n" for i in order))
    return mini
