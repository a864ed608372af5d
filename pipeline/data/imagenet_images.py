"""Bytes in, shard out: what the ImageNet converter does to each image, and one shard's task.

:func:`prepare_image` decides by the bytes (magic number, then PIL), never by the file name:

- a JPEG (``FF D8 FF`` and PIL's ``JPEG``/``MPO``) in mode RGB or L: **kept byte-identical**,
  after a decode at 1/8 scale (libjpeg's DCT scaling) that proves the whole entropy-coded
  stream reads: truncated files fail there. Grayscale JPEGs are kept: DALI's CPU decoder with
  ``output_type=types.RGB`` and PIL's ``convert("RGB")`` both return the same 3-channel pixels
  (checked with DALI 2.4 and Pillow 13, see tests/test_imagenet_convert.py);
- a CMYK or YCCK JPEG (PIL reports both as mode CMYK: libjpeg turns YCCK into CMYK and PIL
  undoes Adobe's inverted CMYK; YCCK is untested, Pillow cannot write one): converted once to
  RGB and re-encoded (quality 95, 4:4:4).
  PIL 13 and DALI 2.4's CPU decoder gave the same pixels for a PIL-written CMYK file (a one-off check),
  but CMYK → RGB has no single answer without a colour profile (colour-managed readers apply
  the ICC profile, nvJPEG needs an allow-CMYK flag), so the conversion is done once and every
  loader sees the same RGB. TensorFlow's reference converter (tensorflow/models,
  ``build_imagenet_data.py``) converts ImageNet's 22 CMYK files too, from a hard-coded list of
  names; here they are found by their bytes;
- any other format PIL reads (ImageNet's one PNG named ``.JPEG``, ...): converted to RGB JPEG
  (q95, 4:4:4): the ``.jpg`` extension in a shard promises JPEG, and DALI's GPU decoder sends
  other formats back to the CPU (NVIDIA/DALI#785);
- anything else (empty, unknown format, truncated, corrupt): skipped with a reason, never written.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.shards import index_path, write_shard

JPEG_MAGIC = b"\xff\xd8\xff"
REENCODE_QUALITY = 95
MAX_IMAGE_BYTES = 64 << 20  # ImageNet's largest file is ~15 MB; past this it is not a photo
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError, MemoryError)


@dataclass(frozen=True)
class Prepared:
    """The bytes to store (None: skip), what was done, and why it was skipped."""

    data: bytes | None
    action: str = ""  # "" = stored as it was; else e.g. "CMYK JPEG → RGB JPEG"
    reason: str = ""  # skip category, grouped in the summary
    detail: str = ""  # the decoder's own message


def _encode_rgb(im: Image.Image) -> bytes:
    if im.mode.startswith("I;16"):  # 16-bit grey: scale, where convert() would clip at 255
        im = Image.fromarray((np.asarray(im, dtype=np.uint32) // 257).astype(np.uint8))
    buf = io.BytesIO()
    # 4:4:4: chroma subsampling would blur colour once more on top of the source's own loss
    im.convert("RGB").save(buf, format="JPEG", quality=REENCODE_QUALITY, subsampling=0)
    return buf.getvalue()


def prepare_image(data: bytes) -> Prepared:
    """What to store for one source file's bytes (see the module docstring)."""
    if not data:
        return Prepared(None, reason="empty file")
    try:
        im = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, *_DECODE_ERRORS) as err:
        return Prepared(None, reason="not an image PIL can identify", detail=str(err)[:200])
    fmt = im.format or "unknown"
    try:
        if data.startswith(JPEG_MAGIC) and fmt in ("JPEG", "MPO") and im.mode in ("RGB", "L"):
            im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
            return Prepared(data)
        im.load()
        if fmt in ("JPEG", "MPO"):
            kind = "YCCK" if im.mode == "CMYK" and im.info.get("adobe_transform") == 2 else im.mode
            action = f"{kind} JPEG → RGB JPEG"
        else:
            action = f"{fmt} → RGB JPEG"
        return Prepared(_encode_rgb(im), action=action)
    except _DECODE_ERRORS as err:
        return Prepared(None, reason=f"corrupt or truncated {fmt}", detail=str(err)[:200])


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: which source files (relative path, key, label) go into it, in order."""

    src: str
    out: str
    path: str  # the tar, relative to out
    result: str  # the shard's result record, relative to out
    files: tuple[tuple[str, str, int], ...]


_counter: Any = None  # a multiprocessing.Value shared with the parent's progress bar


def init_worker(counter: Any) -> None:
    global _counter
    _counter = counter


def _pool_tick(n: int) -> None:
    with _counter.get_lock():
        _counter.value += n


def write_atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def convert_shard(task: ShardTask, tick: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Read, check and (where needed) convert the task's images, write the shard atomically,
    then its result record (written last: a shard without one is not finished)."""
    tick = tick or _pool_tick
    skipped: list[list[str]] = []
    actions: Counter[str] = Counter()
    stored = 0
    pending = 0

    def samples() -> Iterator[dict[str, bytes | str]]:
        nonlocal stored, pending
        for rel, key, label in task.files:
            path = Path(task.src) / rel
            try:
                if path.stat().st_size > MAX_IMAGE_BYTES:
                    prep = Prepared(None, reason=f"larger than {MAX_IMAGE_BYTES >> 20} MB")
                else:
                    prep = prepare_image(path.read_bytes())
            except OSError as err:
                prep = Prepared(None, reason="unreadable file", detail=f"{type(err).__name__}: {err.strerror}")
            pending += 1
            if pending >= 32:
                tick(pending)
                pending = 0
            if prep.data is None:
                skipped.append([rel, prep.reason, prep.detail])
                continue
            if prep.action:
                actions[prep.action] += 1
            stored += len(prep.data)
            # .cls is the label as ASCII digits: the WebDataset and DALI convention
            yield {"__key__": key, "jpg": prep.data, "cls": str(label)}

    tar = Path(task.out) / task.path
    entries = write_shard(tar, samples())
    if pending:
        tick(pending)
    if not entries:  # every file skipped: no empty tar for the loaders to trip over
        tar.unlink(missing_ok=True)
        index_path(tar).unlink(missing_ok=True)
    record = {"path": task.path, "planned": len(task.files), "count": len(entries), "bytes": stored,
              "skipped": skipped, "converted": dict(actions)}
    write_atomic_json(Path(task.out) / task.result, record)
    return record
