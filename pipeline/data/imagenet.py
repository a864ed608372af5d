"""``prunepipe data imagenet``: ILSVRC-2012 folders → WebDataset shards, DALI indexes, ``dataset.json``.

The steps, in order (:func:`convert_imagenet`):

1. **Scan** the source (:mod:`pipeline.data.imagenet_source`): class map (ImageFolder's rule),
   train and val images with labels.
2. **Plan**: each split's images in a seeded random order, cut into shards of at most
   ``per_shard`` images whose sizes differ by at most one (equal shards let the by-shard reader
   split give every rank the same count; DALI splits by sample and does not mind). The plan and
   a fingerprint of what decides the shards' content (options, class map, every file's path,
   size and label) go to ``conversion/plan.json.gz`` before any shard is written.
3. **Convert**, one shard per task in a process pool (:mod:`pipeline.data.imagenet_images`).
   A shard is *finished* when its tar, its index and its result record exist and the index
   holds the planned count less the files the record skipped. A rerun with the same arguments
   writes only unfinished shards; with different ones it stops, unless ``--overwrite``.
4. **Verify** against the source listing: per split, every image is in exactly one shard or
   skipped with a reason (found = written + skipped, key by key).
5. Write ``classes.json`` and, last and atomically, ``dataset.json``: a folder with a manifest
   is complete.

Shards are sized by count, not bytes: DALI's reader and prunepipe's loaders balance by
samples, and 1024 ImageNet JPEGs (~110 kB on average) make ~110 MB tars, inside WebDataset's
recommended 100 MB–1 GB, with 1252 train shards: enough for 64 ranks × several readers.
"""

from __future__ import annotations

import gc
import gzip
import hashlib
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.data.convert import write_manifest
from pipeline.data.imagenet_images import ShardTask, convert_shard, init_worker, write_atomic_json
from pipeline.data.imagenet_source import SourceTree, scan_source
from pipeline.data.imagenet_stats import IMAGENET_MEAN, IMAGENET_STD, compute_stats
from pipeline.data.manifest import MANIFEST, DatasetError
from pipeline.data.shards import ShardError, index_path, read_index
from pipeline.progress import progress

__all__ = ["ConvertOptions", "ConversionResult", "convert_imagenet", "make_plan"]

FORMAT = 1  # bump when the same options would write different shards
STATE_DIR = "conversion"
PLAN_FILE = "plan.json.gz"
CLASSES_FILE = "classes.json"
SPLITS = ("train", "val")
_SHARD_FILE = re.compile(r"(train|val)-\d{6}\.(tar|idx)")
_SHARD_TEMP = re.compile(r"\.(train|val)-\d{6}\.tar\..+")  # write_shard's temporary names


@dataclass(frozen=True)
class ConvertOptions:
    """The converter's arguments; :meth:`validated` checks each with a one-line error."""

    src: Path | None
    out: Path | None
    per_shard: int = 1024
    workers: int | None = None  # default: os.cpu_count()
    seed: int = 0
    val_labels: Path | None = None
    devkit: Path | None = None
    overwrite: bool = False
    stats: int = 0  # 0: ImageNet's standard mean/std; N: computed from N seeded train images
    image_size: int = 224
    progress: bool = True

    def validated(self) -> ConvertOptions:
        if self.src is None:
            raise DatasetError("--src is required: the ILSVRC-2012 folder holding train/ and val/")
        if self.out is None:
            raise DatasetError("--out is required: the folder to write the shards into")
        for flag, value, lo, hi in (("--per-shard", self.per_shard, 1, 1_000_000), ("--seed", self.seed, 0, 2**32 - 1),
                                    ("--stats", self.stats, 0, 1_000_000), ("--image-size", self.image_size, 8, 4096)):
            if not lo <= value <= hi:
                raise DatasetError(f"{flag} {value}: allowed range is {lo}..{hi}")
        workers = (os.cpu_count() or 1) if self.workers is None else self.workers
        if not 1 <= workers <= 1024:
            raise DatasetError(f"--workers {workers}: allowed range is 1..1024")
        src, out = Path(self.src), Path(self.out)
        if not src.is_dir():
            raise DatasetError(f"--src {src}: not a folder")
        if out.exists() and not out.is_dir():
            raise DatasetError(f"--out {out}: exists and is not a folder")
        rsrc, rout = src.resolve(), out.resolve()
        if rout.is_relative_to(rsrc):
            raise DatasetError(f"--out {out} is inside --src {src}: write the shards elsewhere")
        if any(rsrc.is_relative_to(rout / d) for d in (*SPLITS, STATE_DIR)):
            raise DatasetError(f"--src {src} is inside the folders --out {out} writes into")
        for flag, path in (("--val-labels", self.val_labels), ("--devkit", self.devkit)):
            if path is not None and not Path(path).exists():
                raise DatasetError(f"{flag} {path}: not found")
        return ConvertOptions(src, out, self.per_shard, workers, self.seed,
                              Path(self.val_labels) if self.val_labels else None,
                              Path(self.devkit) if self.devkit else None,
                              self.overwrite, self.stats, self.image_size, self.progress)

    def shard_options(self) -> dict[str, int]:
        """The options that decide the shards' content (the workers count does not)."""
        return {"format": FORMAT, "per_shard": self.per_shard, "seed": self.seed}


@dataclass
class ConversionResult:
    """What a conversion found, wrote, skipped and how fast; :meth:`summary` prints it."""

    manifest: Path
    classes: int
    found: dict[str, int]
    written: dict[str, int]
    shards: dict[str, int]
    bytes: int
    skipped: list[list[str]]  # [relative path, reason, detail]
    converted: dict[str, int]
    ignored: dict[str, int]
    val_labels: str
    shards_written: int  # this run (the others were finished before)
    images_this_run: int
    seconds: float
    workers: int
    mean_std: str = "ImageNet's standard"
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images_this_run / self.seconds if self.seconds > 0 else 0.0

    def skipped_by_reason(self) -> dict[str, list[list[str]]]:
        return _group(self.skipped)

    def summary(self) -> str:
        total_shards = sum(self.shards.values())
        lines = [
            f"images found: train {self.found['train']}, val {self.found['val']}; {self.classes} classes; "
            f"val labels from {self.val_labels}",
            f"written: train {self.written['train']} in {self.shards['train']} shards, val {self.written['val']} "
            f"in {self.shards['val']} shards; {self.bytes / 1e9:.3f} GB of JPEG",
            f"skipped: {len(self.skipped)}" + "".join(
                f"\n  {reason}: {len(rows)} (e.g. {rows[0][0]}{': ' + rows[0][2] if rows[0][2] else ''})"
                for reason, rows in sorted(self.skipped_by_reason().items())),
            "converted to RGB JPEG: " + (", ".join(f"{k}: {v}" for k, v in sorted(self.converted.items())) or "none"),
            f"non-image files ignored: train {self.ignored.get('train', 0)}, val {self.ignored.get('val', 0)}",
            f"this run: {self.shards_written} of {total_shards} shards written, {self.images_this_run} images in "
            f"{self.seconds:.1f} s = {self.images_per_s:.0f} images/s ({self.workers} workers)",
            f"mean/std: {self.mean_std}",
            f"manifest: {self.manifest}",
        ]
        return "\n".join(lines + self.notes)


def make_plan(tree: SourceTree, opts: ConvertOptions) -> dict[str, Any]:
    """Seeded assignment of every source image to a shard, plus the fingerprint of its inputs."""
    listing = {s: [[im.rel, im.size, im.label] for im in tree.split(s)] for s in SPLITS}
    blob = json.dumps({"options": opts.shard_options(), "classes": tree.classes, "listing": listing})
    shards = []
    for split in SPLITS:
        images = tree.split(split)
        order = list(range(len(images)))
        random.Random(f"prunepipe-imagenet/{opts.seed}/{split}").shuffle(order)  # str seeds hash stably
        n_shards = -(-len(images) // opts.per_shard)
        # sizes differ by at most one: ceil/floor of n / n_shards
        bounds = [len(images) * i // n_shards for i in range(n_shards + 1)]
        for s in range(n_shards):
            chunk = [images[i] for i in order[bounds[s]:bounds[s + 1]]]
            shards.append({"split": split, "path": f"{split}/{split}-{s:06d}.tar",
                           "files": [[im.rel, im.key, im.label] for im in chunk]})
    return {"format": FORMAT, "fingerprint": hashlib.sha256(blob.encode()).hexdigest(),
            "options": opts.shard_options(), "classes": tree.classes,
            "counts": {s: len(tree.split(s)) for s in SPLITS}, "shards": shards}


def _result_path(shard: dict[str, Any]) -> str:
    return f"{STATE_DIR}/{Path(shard['path']).stem}.json"


def _read_plan(path: Path) -> dict[str, Any]:
    try:
        with gzip.open(path, "rt") as f:
            plan = json.load(f)
        if not isinstance(plan, dict) or not {"fingerprint", "options", "shards"} <= plan.keys():
            raise KeyError("fingerprint")
        return plan
    except (OSError, EOFError, ValueError, KeyError, TypeError) as err:
        raise DatasetError(f"{path}: unreadable conversion plan ({type(err).__name__}); "
                           "rerun with --overwrite to start again") from None


def _write_plan(path: Path, plan: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with gzip.open(tmp, "wt", compresslevel=3) as f:
        json.dump(plan, f)
    os.replace(tmp, path)


def _difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = [f"{k} {old['options'].get(k)} then, {v} now" for k, v in new["options"].items()
               if old["options"].get(k) != v]
    if changed:
        return "options (" + "; ".join(changed) + ")"
    if old.get("classes") != new["classes"]:
        return "class folders in train/"
    counts = [f"{s} {old.get('counts', {}).get(s)} images then, {n} now" for s, n in new["counts"].items()
              if old.get("counts", {}).get(s) != n]
    return "source files (" + ("; ".join(counts) or "some changed size or label") + ")"


def _remove_previous(out: Path) -> None:
    """Delete what a converter wrote into ``out`` (shards, indexes, state, manifests), nothing else."""
    for name in (MANIFEST, CLASSES_FILE):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    for split in SPLITS:
        if (out / split).is_dir():
            for p in (out / split).iterdir():
                if _SHARD_FILE.fullmatch(p.name) or _SHARD_TEMP.fullmatch(p.name):
                    p.unlink()


def prepare_out(opts: ConvertOptions, plan: dict[str, Any]) -> dict[str, Any]:
    """The plan to follow in ``--out``: the stored one when it matches (resume), else the new one."""
    out = opts.out
    plan_file = out / STATE_DIR / PLAN_FILE
    if plan_file.is_file():
        old = _read_plan(plan_file)
        if old["fingerprint"] == plan["fingerprint"]:
            (out / MANIFEST).unlink(missing_ok=True)  # it comes back when every shard is verified
            return old
        if not opts.overwrite:
            raise DatasetError(f"--out {out} holds a conversion with different {_difference(old, plan)}: rerun "
                               "with the same arguments to finish it, or add --overwrite to replace it")
        _remove_previous(out)
    elif (out / MANIFEST).exists() or any((out / s).is_dir() and any((out / s).iterdir()) for s in SPLITS):
        if not opts.overwrite:
            raise DatasetError(f"--out {out} already holds a dataset this converter did not plan: "
                               "use an empty folder, or --overwrite to replace its shards")
        _remove_previous(out)
    _write_plan(plan_file, plan)
    return plan


def _finished(out: Path, shard: dict[str, Any]) -> bool:
    result = out / _result_path(shard)
    try:
        record = json.loads(result.read_text())
        if record["planned"] != len(shard["files"]) or record["count"] != len(shard["files"]) - len(record["skipped"]):
            return False
        if record["count"] == 0:
            return True
        tar = out / shard["path"]
        entries = read_index(index_path(tar))
        return len(entries) == record["count"] and entries[-1].end() <= tar.stat().st_size
    except (OSError, ValueError, KeyError, TypeError, ShardError):
        return False


def _clean_temporaries(out: Path) -> None:
    """Remove what an interrupted run left: write_shard's temporary files, half-written records."""
    for folder, pattern in ((out / "train", _SHARD_TEMP), (out / "val", _SHARD_TEMP),
                            (out / STATE_DIR, re.compile(r"\..+\.tmp"))):
        if folder.is_dir():
            for p in folder.iterdir():
                if pattern.fullmatch(p.name):
                    p.unlink(missing_ok=True)


def _run_tasks(opts: ConvertOptions, tasks: list[ShardTask], total: int, done: int) -> int:
    """Write the shards of ``tasks`` (in a pool when more than one worker helps); returns workers used."""
    workers = min(opts.workers or 1, len(tasks)) or 1

    def bar() -> tqdm:
        return progress(show=opts.progress, total=total, initial=done, desc="imagenet", unit="img",
                        dynamic_ncols=True)

    try:
        if workers == 1:
            with bar() as shown:
                for task in tasks:
                    convert_shard(task, tick=shown.update)
            return 1
        # fork: a worker needs only this module, already imported (spawn would import torch again
        # through pipeline.data in every worker). The pool starts before the bar's monitor thread.
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        counter = ctx.Value("q", 0)
        # the plan of full ImageNet is ~0.5 GB of Python objects: frozen, the workers' garbage
        # collector does not walk (and so copy-on-write duplicate) them
        gc.freeze()
        with ctx.Pool(workers, initializer=init_worker, initargs=(counter,)) as pool, bar() as shown:
            results = pool.imap_unordered(convert_shard, tasks, chunksize=1)
            for _ in range(len(tasks)):
                while True:
                    try:
                        results.next(timeout=0.25)
                        break
                    except mp.TimeoutError:
                        shown.update(done + counter.value - shown.n)
                shown.update(done + counter.value - shown.n)
        return workers
    except KeyboardInterrupt:
        raise DatasetError("interrupted: rerun the same command to continue (finished shards are kept)") from None
    except OSError as err:
        raise DatasetError(f"--out {opts.out}: writing a shard failed ({type(err).__name__}: {err})") from None
    finally:
        gc.unfreeze()


def _verify(tree: SourceTree, plan: dict[str, Any], records: dict[str, dict[str, Any]], out: Path) -> dict[str, int]:
    """found = written + skipped per split, key by key, against the fresh source listing."""
    written = {}
    for split in SPLITS:
        keys: Counter[str] = Counter()
        skipped = 0
        for shard in plan["shards"]:
            if shard["split"] != split:
                continue
            record = records[shard["path"]]
            if record["count"]:
                keys.update(e.key for e in read_index(index_path(out / shard["path"])))
            by_rel = {rel: key for rel, key, _ in shard["files"]}
            keys.update(by_rel[row[0]] for row in record["skipped"])
            skipped += len(record["skipped"])
        source = Counter(im.key for im in tree.split(split))
        if keys != source:
            extra, missing = keys - source, source - keys
            raise DatasetError(f"--out {out}: {split} shards do not match the source ({sum(missing.values())} "
                               f"images missing, {sum(extra.values())} unexpected): rerun with --overwrite")
        written[split] = sum(source.values()) - skipped
    return written


def convert_imagenet(opts: ConvertOptions) -> ConversionResult:
    """Convert an ILSVRC-2012 tree into WebDataset shards with a manifest (see the module docstring)."""
    opts = opts.validated()
    tree = scan_source(opts.src, opts.val_labels, opts.devkit)
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    plan = prepare_out(opts, make_plan(tree, opts))
    _clean_temporaries(out)
    for split in SPLITS:
        (out / split).mkdir(exist_ok=True)
    todo = [s for s in plan["shards"] if not _finished(out, s)]
    for shard in todo:
        (out / _result_path(shard)).unlink(missing_ok=True)
    tasks = [ShardTask(str(opts.src), str(out), s["path"], _result_path(s), tuple(map(tuple, s["files"])))
             for s in todo]
    total = sum(len(s["files"]) for s in plan["shards"])
    this_run = sum(len(t.files) for t in tasks)
    t0 = time.perf_counter()
    workers = _run_tasks(opts, tasks, total, total - this_run) if tasks else 0
    seconds = time.perf_counter() - t0

    records = {s["path"]: json.loads((out / _result_path(s)).read_text()) for s in plan["shards"]}
    written = _verify(tree, plan, records, out)
    splits = {split: [{"path": s["path"], "count": records[s["path"]]["count"],
                       "index": index_path(s["path"]).as_posix()}
                      for s in plan["shards"] if s["split"] == split and records[s["path"]]["count"]]
              for split in SPLITS}
    for split in SPLITS:
        if not splits[split]:
            raise DatasetError(f"--src {opts.src}: every {split} image was skipped (see {out / STATE_DIR})")
    mean, std, how = IMAGENET_MEAN, IMAGENET_STD, "ImageNet's standard"
    if opts.stats:
        mean, std = compute_stats(out, splits["train"], opts.stats, opts.seed, opts.image_size, opts.progress)
        how = f"computed from {opts.stats} train images (seed {opts.seed})"
    converted: Counter[str] = Counter()
    for r in records.values():
        converted.update(r["converted"])
    skipped = [row for s in plan["shards"] for row in records[s["path"]]["skipped"]]
    nbytes = sum(r["bytes"] for r in records.values())
    write_atomic_json(out / CLASSES_FILE, {wnid: i for i, wnid in enumerate(tree.classes)})
    manifest = write_manifest(out, {
        "name": "imagenet",
        "num_classes": len(tree.classes),
        "image_size": opts.image_size,
        "mean": [round(x, 4) for x in mean],
        "std": [round(x, 4) for x in std],
        "classes": tree.classes,
        "splits": splits,
        "conversion": {
            "source": str(opts.src.resolve()), "val_labels": tree.val_labels, **opts.shard_options(),
            "fingerprint": plan["fingerprint"], "found": plan["counts"], "written": written,
            "skipped": {k: len(v) for k, v in _group(skipped).items()}, "converted": dict(converted),
            "bytes": nbytes, "mean_std": how, "classes_file": CLASSES_FILE,
        },
    })
    return ConversionResult(
        manifest=manifest, classes=len(tree.classes), found=plan["counts"], written=written,
        shards={s: len(splits[s]) for s in SPLITS}, bytes=nbytes, skipped=skipped, converted=dict(converted),
        ignored=tree.ignored, val_labels=tree.val_labels, shards_written=len(tasks), images_this_run=this_run,
        seconds=seconds, workers=workers, mean_std=how)


def _group(rows: list[list[str]]) -> dict[str, list[list[str]]]:
    groups: dict[str, list[list[str]]] = {}
    for row in rows:
        groups.setdefault(row[1], []).append(row)
    return groups
