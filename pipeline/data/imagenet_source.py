"""The ILSVRC-2012 source tree: class map, image listing and validation labels.

Layouts read (``--src``):

- ``train/<wnid>/*.JPEG`` (always). The class map is torchvision's ``ImageFolder`` rule: every
  sub-folder of ``train/`` is a class, sorted by name, position = label; image files are those
  with one of ImageFolder's extensions (case-insensitive), searched recursively. So the labels
  equal ``ImageFolder(train).class_to_idx`` and "images found" equals ImageFolder's count.
- ``val/<wnid>/*.JPEG``: labels from the folder names, which must all be train classes.
- ``val/*.JPEG`` (flat, as distributed): labels from one of
  - the devkit (``ILSVRC2012_devkit_t12``): ``data/ILSVRC2012_validation_ground_truth.txt`` holds
    one 1-based ILSVRC2012_ID per line, line *n* for ``ILSVRC2012_val_<n>``, and ``data/meta.mat``
    maps an ILSVRC2012_ID to its wnid (the ID order is *not* the sorted-wnid order);
  - a CSV with a header ``ImageId,label`` (label = a wnid) or Kaggle's ``LOC_val_solution.csv``
    (``ImageId,PredictionString``; the string starts with the wnid).

The format of an image is decided later by its bytes (:mod:`pipeline.data.imagenet`), never
here by its name. Every problem is a :class:`DatasetError` of one line naming the file or option.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.manifest import DatasetError

# torchvision.datasets.folder.IMG_EXTENSIONS: the files ImageFolder counts as images
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DEVKIT_NAME = "ILSVRC2012_devkit_t12"
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
KAGGLE_CSV = "LOC_val_solution.csv"
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d+)")
_MAX_LABEL_FILE = 64 << 20  # the real files are 0.2 MB (txt) and 3 MB (Kaggle CSV)


@dataclass(frozen=True)
class SourceImage:
    """One image file of the source tree, with its label."""

    rel: str  # path relative to --src, POSIX separators
    key: str  # the WebDataset key: file stem, no dots
    label: int
    size: int  # bytes on disk (part of the plan's fingerprint)


@dataclass
class SourceTree:
    """What :func:`scan_source` found: the class map and both splits' images."""

    src: Path
    classes: list[str]
    train: list[SourceImage]
    val: list[SourceImage]
    val_labels: str  # where val labels came from, for the summary and the manifest
    ignored: dict[str, int] = field(default_factory=dict)  # non-image files per split

    def split(self, name: str) -> list[SourceImage]:
        return self.train if name == "train" else self.val


def sample_key(name: str) -> str:
    """``n01440764_10026.JPEG`` → ``n01440764_10026``.

    The last suffix goes; any character other than letters, digits, ``_`` and ``-`` becomes
    ``_``: a dot would start the extension in WebDataset/DALI, and a space would break DALI's
    space-separated index lines. ImageNet's names are unchanged by this.
    """
    base = name.rsplit("/", 1)[-1]
    stem = base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "_"


def find_classes(train_dir: Path) -> list[str]:
    """Sorted names of the sub-folders of ``train/``: torchvision's ``find_classes`` rule.

    A name that is not UTF-8 is refused: Python hands it over with lone surrogates, which
    ``classes.json`` and ``dataset.json`` would carry and other JSON readers reject."""
    names = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    for name in names:
        _check_utf8(train_dir, name)
    return names


def _check_utf8(folder: Path, name: str) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(name).decode("utf-8", "backslashreplace")
        raise DatasetError(f"class folder {folder.name}/{shown} in {folder.parent}: its name is not UTF-8; "
                           "rename it (class names go into classes.json and dataset.json)") from None


def _images_under(folder: Path, src: Path) -> tuple[list[tuple[str, int]], int]:
    """(relative path, size) of every image file under ``folder`` (recursive, following links,
    sorted like ImageFolder), and the number of other files."""
    found, other = [], 0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.lower().endswith(IMG_EXTENSIONS):
                other += 1
                continue
            try:
                size = path.stat().st_size
            except OSError:
                size = -1  # a dangling link: listed, and skipped as unreadable when converted
            found.append((path.relative_to(src).as_posix(), size))
    return found, other


def _check_unique(images: list[SourceImage], split: str) -> None:
    seen: dict[str, str] = {}
    for im in images:
        if im.key in seen:
            raise DatasetError(f"{split}/: {seen[im.key]} and {im.rel} give the same sample key {im.key!r}: "
                               "file names must be unique within a split")
        seen[im.key] = im.rel


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise DatasetError(f"{what} {path}: not a file")
    if path.stat().st_size > _MAX_LABEL_FILE:
        raise DatasetError(f"{what} {path}: larger than {_MAX_LABEL_FILE >> 20} MB, not a label file")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{what} {path}: cannot be read as text ({type(err).__name__})") from None


def read_meta_mat(path: Path) -> dict[int, str]:
    """ILSVRC2012_ID → wnid from the devkit's ``data/meta.mat`` (its ``synsets`` struct array)."""
    from scipy.io import loadmat

    if not path.is_file():
        raise DatasetError(f"devkit: {path} not found (the ground truth's IDs need the devkit's meta.mat)")
    try:
        synsets = loadmat(str(path), squeeze_me=True)["synsets"]
        return {int(i): str(w) for i, w in zip(synsets["ILSVRC2012_ID"], synsets["WNID"], strict=True)}
    except Exception as err:  # scipy raises many types for a bad .mat; all mean the same here
        raise DatasetError(f"devkit: {path} is not the devkit's meta.mat ({type(err).__name__})") from None


def labels_from_ground_truth(gt: Path, meta: Path, keys: list[str]) -> dict[str, str]:
    """Val key → wnid: line *n* of the ground truth labels ``ILSVRC2012_val_<n>``.

    The number is read from the file name rather than taken from the sorted position (the
    same for the full set); the file has one line per val image, no fewer and no more.
    """
    lines = _read_text(gt, "--val-labels").split()
    if not all(x.isdigit() for x in lines):
        raise DatasetError(f"--val-labels {gt}: expected one ILSVRC2012_ID (an integer) per line")
    id_to_wnid = read_meta_mat(meta)
    labels = {}
    for key in keys:
        m = _VAL_NAME.fullmatch(key)
        if m is None:
            raise DatasetError(f"--val-labels {gt}: val file {key!r} is not named ILSVRC2012_val_<number>, "
                               "so the ground truth's line order cannot label it")
        n = int(m.group(1))
        if not 1 <= n <= len(lines):
            raise DatasetError(f"--val-labels {gt}: has {len(lines)} lines, no label for val image {key}")
        ilsvrc_id = int(lines[n - 1])
        if ilsvrc_id not in id_to_wnid:
            raise DatasetError(f"--val-labels {gt} line {n}: ILSVRC2012_ID {ilsvrc_id} is not in {meta}")
        labels[key] = id_to_wnid[ilsvrc_id]
    if len(lines) > len(keys):  # the other way round than "no label for val image": lines left over
        raise DatasetError(f"--val-labels {gt}: has {len(lines)} lines, val/ holds {len(keys)} images: "
                           f"{len(lines) - len(keys)} labels for images that are not there")
    return labels


def labels_from_csv(path: Path, keys: list[str]) -> dict[str, str]:
    """Val key → wnid from ``ImageId,label`` or Kaggle's ``ImageId,PredictionString``."""
    rows = csv.reader(io.StringIO(_read_text(path, "--val-labels")))
    header = [h.strip().lower() for h in next(rows, [])]
    if len(header) < 2 or header[0] != "imageid" or header[1] not in ("label", "predictionstring"):
        raise DatasetError(f"--val-labels {path}: expected a header 'ImageId,label' or 'ImageId,PredictionString'")
    table: dict[str, str] = {}
    for n, row in enumerate(rows, start=2):
        if not row:
            continue
        words = row[1].split() if len(row) > 1 else []
        if not words:
            raise DatasetError(f"--val-labels {path} line {n}: no label for {row[0]!r}")
        image_id, wnid = sample_key(row[0].strip()), words[0]
        if table.setdefault(image_id, wnid) != wnid:
            raise DatasetError(f"--val-labels {path} line {n}: {image_id} labelled twice, differently")
    missing = [k for k in keys if k not in table]
    if missing:
        raise DatasetError(f"--val-labels {path}: no label for {len(missing)} val images (first: {missing[0]})")
    return {k: table[k] for k in keys}


def _devkit_file(devkit: Path, name: str) -> Path:
    """``DIR/data/name``, or ``DIR/name`` when DIR is the devkit's data folder itself."""
    return devkit / "data" / name if (devkit / "data").is_dir() else devkit / name


def _label_source(src: Path, val_labels: Path | None, devkit: Path | None) -> tuple[str, Path, Path | None]:
    """Pick the flat-val label source: ('gt', txt, meta.mat) or ('csv', file, None)."""
    if devkit is not None and not devkit.is_dir():
        raise DatasetError(f"--devkit {devkit}: not a folder")
    if val_labels is not None:
        first = _read_text(val_labels, "--val-labels").lstrip().split("\n", 1)[0].strip()
        if first.isdigit():  # the devkit's ground truth: its IDs need meta.mat
            meta = _devkit_file(devkit, "meta.mat") if devkit is not None else val_labels.parent / "meta.mat"
            return "gt", val_labels, meta
        if devkit is not None:
            raise DatasetError(f"--val-labels {val_labels} is a CSV and --devkit {devkit} is given: give one of them")
        return "csv", val_labels, None
    if devkit is not None:
        return "gt", _devkit_file(devkit, GROUND_TRUTH), _devkit_file(devkit, "meta.mat")
    found = [p for p in (src / DEVKIT_NAME, src / KAGGLE_CSV) if p.exists()]
    if not found:
        raise DatasetError(f"--src {src}: val/ is flat and no labels were found: give --devkit DIR "
                           f"({DEVKIT_NAME}) or --val-labels FILE ({KAGGLE_CSV} or an ImageId,label CSV)")
    if len(found) > 1:
        raise DatasetError(f"--src {src}: val labels are ambiguous ({' and '.join(p.name for p in found)} "
                           "both found): choose with --devkit or --val-labels")
    if found[0].name == DEVKIT_NAME:
        return "gt", _devkit_file(found[0], GROUND_TRUTH), _devkit_file(found[0], "meta.mat")
    return "csv", found[0], None


def scan_source(src: Path, val_labels: Path | None = None, devkit: Path | None = None) -> SourceTree:
    """List the train and val images of an ILSVRC-2012 tree with their labels."""
    train_dir, val_dir = src / "train", src / "val"
    if not train_dir.is_dir():
        raise DatasetError(f"--src {src}: no train/ folder (expected train/<wnid>/*.JPEG)")
    if not val_dir.is_dir():
        raise DatasetError(f"--src {src}: no val/ folder (expected val/*.JPEG or val/<wnid>/*.JPEG)")
    classes = find_classes(train_dir)
    if len(classes) < 2:
        raise DatasetError(f"--src {src}: train/ holds {len(classes)} class folders, at least 2 are needed")
    index = {c: i for i, c in enumerate(classes)}
    train, ignored = [], {"train": 0, "val": 0}
    for wnid in classes:
        files, other = _images_under(train_dir / wnid, src)
        ignored["train"] += other
        if not files:  # ImageFolder refuses an empty class too
            raise DatasetError(f"--src {src}: class folder train/{wnid} holds no image files")
        train += [SourceImage(rel, sample_key(rel), index[wnid], size) for rel, size in files]
    _check_unique(train, "train")

    subdirs = sorted(e.name for e in os.scandir(val_dir) if e.is_dir())
    for name in subdirs:
        _check_utf8(val_dir, name)
    loose = [e.name for e in os.scandir(val_dir) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)]
    if subdirs and loose:
        raise DatasetError(f"--src {src}: val/ is ambiguous: it holds {len(subdirs)} folders and "
                           f"{len(loose)} loose images (use one layout)")
    val: list[SourceImage] = []
    if subdirs:
        if val_labels is not None or devkit is not None:
            raise DatasetError(f"--src {src}: val/ is in class folders, which are its labels: "
                               "drop --val-labels/--devkit")
        unknown = [d for d in subdirs if d not in index]
        if unknown:
            raise DatasetError(f"--src {src}: val/{unknown[0]} is not a train class ({len(unknown)} unknown val folders)")
        for wnid in subdirs:
            files, other = _images_under(val_dir / wnid, src)
            ignored["val"] += other
            val += [SourceImage(rel, sample_key(rel), index[wnid], size) for rel, size in files]
        how = "class folders"
    else:
        files, ignored["val"] = _images_under(val_dir, src)
        keys = [sample_key(rel) for rel, _ in files]
        kind, path, meta = _label_source(src, val_labels, devkit)
        wnids = labels_from_ground_truth(path, meta, keys) if kind == "gt" else labels_from_csv(path, keys)
        for (rel, size), key in zip(files, keys, strict=True):
            if wnids[key] not in index:
                raise DatasetError(f"val label of {rel}: wnid {wnids[key]!r} is not a train class")
            val.append(SourceImage(rel, key, index[wnids[key]], size))
        how = f"{'devkit ground truth' if kind == 'gt' else 'CSV'} {path}"
    if not val:
        raise DatasetError(f"--src {src}: val/ holds no image files")
    _check_unique(val, "val")
    return SourceTree(src, classes, train, val, how, ignored)
