"""NVIDIA DALI loader backend (``data.backend: dali``) behind prunepipe's loader contract.

Yields device-resident ``(images, labels)`` like every backend: images float32 N×3×H×W,
normalised with the manifest's mean/std (×255, DALI works on uint8), in channels_last memory
format when asked (DALI writes HWC, the permute to NCHW is free); labels int64.

- Decoding: on the GPU (``fn.decoders.*(device="mixed")``, the local GPU) when there is one
  and ``data.dali_device`` is auto or gpu; DALI's CPU pipeline otherwise (``device_id=None``).
- Sharding: prunepipe's own, through per-rank index files (:mod:`pipeline.data.dali_plan`).
  Train: every rank reads exactly ``floor(N / world)`` samples and takes
  ``floor(quota / batch_size)`` steps, the last partial batch dropped (DROP): the same on every
  rank by construction, and no tiny last batch to upset BatchNorm. Val: every sample exactly
  once, the last batch partial (PARTIAL, no padding, no repeats).
- Transforms mirror the PyTorch loader's ``_transforms`` per ``data.augment``; imagenet train
  decodes only the random crop's window (``fn.decoders.image_random_crop``).
- Bad data (``data.on_error``): samples without ``.jpg``/``.cls`` and truncated shards are
  known from the index before reading; a label that is not an integer in range is dropped
  from its batch. DALI's decode error does not name the sample, so on one the rank re-reads its
  chunk with PIL to find it: ``fail`` raises :class:`BadDataError` naming shard and key;
  ``skip`` records it, quarantines it and rebuilds the pipeline without it. Cost: the rank
  re-reads its chunk once per failure; in train, samples seen before the failure may repeat
  this epoch (the rank still yields exactly the promised number of batches); val resumes
  after the last sample yielded. Every bad sample is recorded once, by one rank.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ConfigError, DataConfig
from pipeline.data.dali_plan import (
    IMAGE_EXT,
    LABEL_EXT,
    Segment,
    drop_samples,
    epoch_plan,
    find_undecodable,
    load_shards,
    write_indexes,
)
from pipeline.data.errors import BadDataError, BadSampleLog, parse_label
from pipeline.data.manifest import DatasetError, read_manifest
from pipeline.data.shards import split_name

PREFETCH = 2  # batches DALI prepares ahead (its prefetch_queue_depth)
LABEL_BYTES = 32  # .cls payloads are read up to this length; longer ones are bad labels
_SPACE = (9, 10, 11, 12, 13, 28, 29, 30, 31, 32)  # what Python's str.strip() removes from ASCII


def _import_dali() -> tuple[Any, Any, Any, Callable]:
    try:
        from nvidia.dali import Pipeline, fn, types
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except ImportError:
        raise ConfigError(
            "data.backend = dali: NVIDIA DALI is not installed; `pip install nvidia-dali-cuda130` "
            "(its CPU pipeline also runs without a GPU) or set data.backend=webdataset"
        ) from None
    return Pipeline, fn, types, feed_ndarray


def _seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def parse_labels(raw: torch.Tensor, lengths: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised :func:`parse_label`: ASCII ``.cls`` payloads (N×L bytes, zero-padded, true
    lengths N) → (int64 labels, valid mask). Valid: optional whitespace, 1 to 9 digits,
    optional whitespace, value below ``num_classes``, at most L bytes."""
    b = raw.to(torch.int64)
    pos = torch.arange(b.shape[1])
    inside = pos[None] < lengths[:, None]
    digit = (b >= 48) & (b <= 57) & inside
    space = torch.isin(b, torch.tensor(_SPACE)) & inside
    ndig = digit.sum(1)
    first = torch.where(digit, pos, b.shape[1]).min(1).values
    last = torch.where(digit, pos, -1).max(1).values
    exp = (last[:, None] - pos[None]).clamp(0, 18)
    value = torch.where(digit, (b - 48) * 10**exp, 0).sum(1)
    ok = (
        (ndig > 0) & (ndig <= 9) & (ndig == last - first + 1)  # one run of digits
        & ((digit | space) == inside).all(1) & (lengths <= b.shape[1]) & (value < num_classes)
    )
    return torch.where(ok, value, 0), ok


def _bad_label_reason(raw: bytes, length: int, num_classes: int) -> str:
    if length > LABEL_BYTES:
        return f"label longer than {LABEL_BYTES} bytes"
    return parse_label(raw[:length] if length else None, num_classes)[1] or "bad label"


# Transforms per data.augment, mirroring pipeline.data.loaders._transforms. Each returns the
# uint8 HWC image of size × size and a mirror flag (or 0). EXIF orientation is ignored
# (adjust_orientation=False), as PIL and torchvision ignore it: both loaders, and the weights
# trained through either, must see the same pixels of a tagged JPEG.
def _random_resized_crop(fn, types, jpg, dec: str, size: int) -> tuple[Any, Any]:
    # torchvision's RandomResizedCrop (scale (0.08, 1), ratio (3/4, 4/3), 10 attempts), decoding
    # only the window; bilinear antialiased resize as torchvision's antialias=True
    img = fn.decoders.image_random_crop(jpg, device=dec, output_type=types.RGB, adjust_orientation=False, random_area=[0.08, 1.0],
                                        random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10)
    img = fn.resize(img, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)
    return img, fn.random.coin_flip(probability=0.5)


def _resize_shorter_centre_crop(fn, types, jpg, dec: str, size: int) -> tuple[Any, Any]:
    # torchvision's Resize(s) + CenterCrop(size), to the pixel: the longer side is
    # floor(s * long / short) (DALI's resize_shorter rounds it instead) and the crop's corner is
    # round-half-even((H - size) / 2) as Python's round(); integer arithmetic, so exact
    from nvidia.dali import math as dmath

    s = int(round(size / 0.875))
    shape = fn.peek_image_shape(jpg, dtype=types.INT64, adjust_orientation=False)
    h, w = shape[0], shape[1]
    short = dmath.min(h, w)
    new_h, new_w = (s * h) // short, (s * w) // short
    img = fn.decoders.image(jpg, device=dec, output_type=types.RGB, adjust_orientation=False)
    img = fn.resize(img, size=fn.cast(fn.stack(new_h, new_w), dtype=types.FLOAT), interp_type=types.INTERP_LINEAR,
                    antialias=True)
    half = [(d - size) // 2 for d in (new_h, new_w)]
    corner = [k + ((d - size) % 2) * (k % 2) for k, d in zip(half, (new_h, new_w), strict=True)]
    img = fn.slice(img, fn.cast(fn.stack(*corner), dtype=types.INT32), [size, size], axes=[0, 1], out_of_bounds_policy="pad", fill_values=0)
    return img, 0


def _resize_square(fn, types, jpg, dec: str, size: int) -> tuple[Any, Any]:
    img = fn.decoders.image(jpg, device=dec, output_type=types.RGB, adjust_orientation=False)
    return fn.resize(img, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True), 0


def _padded_random_crop(fn, types, jpg, dec: str, size: int) -> tuple[Any, Any]:
    # torchvision's RandomCrop(size, padding=p): window top-left uniform in [-p, H + p - size]
    # (integers), zeros outside the image; no flip (digits are not mirror-symmetric)
    from nvidia.dali import math as dmath

    pad = max(1, size // 8)
    img = fn.decoders.image(jpg, device=dec, output_type=types.RGB, adjust_orientation=False)
    shape = fn.peek_image_shape(jpg, dtype=types.FLOAT, adjust_orientation=False)
    # floor before the cast: DALI's float-to-int cast rounds to nearest, which would reach p + 1
    y, x = (fn.cast(dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * (shape[a] + (2 * pad - size + 1))),
                    dtype=types.INT32) - pad for a in (0, 1))
    img = fn.slice(img, fn.stack(y, x), [size, size], axes=[0, 1], out_of_bounds_policy="pad", fill_values=0)
    return img, 0


_TRAIN = {"imagenet": _random_resized_crop, "light": _padded_random_crop, "none": _resize_square}
_VAL = {"imagenet": _resize_shorter_centre_crop, "light": _resize_square, "none": _resize_square}


class DaliLoader:
    """One rank's DALI loader of one split; see the module docstring for the contract."""

    def __init__(self, cfg: DataConfig, split: str, rank: int, world: int, device: torch.device, seed: int,
                 channels_last: bool, device_id: int | None) -> None:
        self._Pipeline, self._fn, self._types, self._feed = _import_dali()
        self.cfg, self.split, self.rank, self.world, self.device = cfg, split, rank, world, device
        self.train, self.seed, self.channels_last, self.device_id = split == "train", seed, channels_last, device_id
        root = Path(cfg.root)
        manifest = read_manifest(root)  # DatasetError (missing shard, bad manifest) passes through unchanged
        self.num_classes: int = manifest["num_classes"]
        self.mean, self.std = manifest["mean"], manifest["std"]
        self.errors = BadSampleLog(policy=cfg.on_error)
        self.max_bad_fraction: float | None = cfg.max_bad_fraction  # the engine stops an epoch that skips more
        self.trace: list[tuple[str, str]] | None = None  # set to [] to collect (shard, key) of every yielded sample
        self._tmp = Path(tempfile.mkdtemp(prefix=f"prunepipe-dali-{split}-r{rank}-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._tmp, True)  # at close, collection or exit
        self._shards = load_shards(root, manifest["splits"][split], self.errors, rank, world)
        self._agreed: set[tuple[str, str]] = set()  # quarantine known to every rank: shapes the chunks
        self._local: set[tuple[str, str]] = set()  # found by this rank since: only leaves its own chunk
        self.epoch = 0
        self._plan()

    # -- plan -------------------------------------------------------------------------------
    def _plan(self) -> None:
        self._chunk, total = epoch_plan(self._shards, self._agreed, self.train, self.seed, self.epoch, self.rank, self.world)
        self._count = sum(len(s.entries) for s in self._chunk)
        bs = self.cfg.batch_size
        if self.train:
            self._len = self._count // bs
            if self._len == 0:
                raise DatasetError(
                    f"data.batch_size = {bs}: the train split has {total} usable samples, {self._count} per rank "
                    f"over {self.world} rank(s): fewer than one batch (lower data.batch_size)")
        else:
            self._len = -(-self._count // bs)

    def set_epoch(self, epoch: int) -> None:
        """Plan ``epoch``: agree on the quarantine across ranks (a collective when torch.distributed
        runs with world > 1: call it on every rank), reshuffle (train), recount ``len()``."""
        found = self._agreed | self._local
        if self.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            everyone: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(everyone, sorted(found))
            found = set().union(*(set(map(tuple, f)) for f in everyone))
        self._agreed, self._local, self.epoch = found, set(), epoch
        self._plan()

    def __len__(self) -> int:
        return self._len

    def close(self) -> None:
        """Remove this loader's index files now (also done when it is collected, or at exit)."""
        self._cleanup()

    # -- pipeline ---------------------------------------------------------------------------
    def _pipeline(self, segments: list[Segment], attempt: int) -> Any:
        fn, types = self._fn, self._types
        folder = self._tmp / f"e{self.epoch}-a{attempt}"
        shutil.rmtree(folder, ignore_errors=True)
        paths, indexes = write_indexes(segments, folder)
        # source info is "<tar path>:<offset>:<member name>"; padded to the longest in the chunk
        info_len = max(len(str(s.shard.path)) + len(str(s.entries[-1].end())) + 2
                       + max(len(c.name) for e in s.entries for c in e.components) for s in segments)
        size, dec = self.cfg.image_size, "mixed" if self.device_id is not None else "cpu"
        pipe = self._Pipeline(batch_size=self.cfg.batch_size, num_threads=max(1, self.cfg.num_workers),
                              device_id=self.device_id, seed=_seed(self.seed, self.epoch, self.rank, attempt),
                              prefetch_queue_depth=PREFETCH)
        with pipe:
            jpg, cls = fn.readers.webdataset(
                paths=paths, index_paths=indexes, ext=[IMAGE_EXT, LABEL_EXT], missing_component_behavior="empty",
                random_shuffle=self.train and self.cfg.shuffle_buffer > 1, initial_fill=max(1, self.cfg.shuffle_buffer),
                num_shards=1, shard_id=0, name="Reader")
            img, mirror = (_TRAIN if self.train else _VAL)[self.cfg.augment](fn, types, jpg, dec, size)
            img = fn.crop_mirror_normalize(
                img, dtype=types.FLOAT, output_layout="HWC" if self.channels_last else "CHW", mirror=mirror,
                mean=[255 * m for m in self.mean], std=[255 * s for s in self.std])
            label = fn.pad(fn.slice(cls, 0, LABEL_BYTES, axes=[0], out_of_bounds_policy="trim_to_shape"),
                           fill_value=0, shape=[LABEL_BYTES], axes=[0])
            info = fn.pad(fn.get_property(jpg, key="source_info"), fill_value=0, shape=[info_len], axes=[0])
            pipe.set_outputs(img, label, cls.shape(), info)
        pipe.build()
        shutil.rmtree(folder, ignore_errors=True)  # the reader parsed the indexes at build: no pile-up over epochs
        return pipe

    def _torch(self, tl: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        t = tl.as_tensor()
        out = torch.empty(t.shape(), dtype=dtype, device=device)
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self._feed(t, out, cuda_stream=stream)
        return out

    def _batches(self, pipe: Any, batches: int, samples: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """``batches`` batches of ``pipe`` (at most ``samples`` samples: val's last one is cut
        short), with the number of chunk samples each consumed."""
        img_device = torch.device("cuda", self.device_id) if self.device_id is not None else torch.device("cpu")
        cpu = torch.device("cpu")
        scheduled = 0
        for _ in range(batches):
            try:
                # pipe.run() would schedule one batch beyond each one taken, so PREFETCH - 1 batches
                # past the epoch's end get decoded and thrown away; schedule only what is owed
                if scheduled < batches:
                    pipe.schedule_run()  # the first call queues PREFETCH batches, later ones one each
                    scheduled += PREFETCH if scheduled == 0 else 1
                out = pipe.outputs()
            except RuntimeError as err:  # DALI reports a failed batch (e.g. undecodable bytes) this way
                raise _DaliFailure(str(err)) from None
            n = min(self.cfg.batch_size, samples)
            samples -= n
            images = self._torch(out[0], torch.float32, img_device)[:n]
            raw = self._torch(out[1], torch.uint8, cpu)[:n]
            lengths = self._torch(out[2], torch.int64, cpu).reshape(-1)[:n]
            info = self._torch(out[3], torch.uint8, cpu)[:n]
            labels, ok = parse_labels(raw, lengths, self.num_classes)
            if not bool(ok.all()):
                for i in (~ok).nonzero().flatten().tolist():
                    shard, key = self._source(info[i])
                    self._bad(shard, key, _bad_label_reason(bytes(raw[i].tolist()), int(lengths[i]), self.num_classes))
                keep = ok.to(images.device)
                images, labels = images[keep], labels[ok]
            if self.trace is not None:
                self.trace.extend(self._source(info[i]) for i in ok.nonzero().flatten().tolist())
            if self.channels_last:
                images = images.permute(0, 3, 1, 2)  # NHWC storage seen as NCHW: channels_last strides
            yield images.to(self.device), labels.to(self.device), n

    def _source(self, info: torch.Tensor) -> tuple[str, str]:
        text = bytes(info.tolist()).rstrip(b"\0").decode("utf-8", "surrogateescape")
        path, _, name = text.rsplit(":", 2)
        return self._rel.get(path, path), split_name(name)[0]

    def _bad(self, shard: str, key: str, reason: str) -> None:
        self.errors.record(shard, key, reason)  # raises BadDataError under on_error=fail
        self._local.add((shard, key))

    # -- iteration --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This epoch's batches. Iterating again without ``set_epoch`` repeats the same epoch."""
        self._rel = {str(s.path): s.rel for s in self._shards}
        segments = drop_samples(self._chunk, self._local)
        done, attempt = 0, 0
        while done < self._len and segments:
            left = sum(len(s.entries) for s in segments)
            batches = self._len - done if self.train else -(-left // self.cfg.batch_size)
            pipe, failure, consumed = self._pipeline(segments, attempt), None, 0
            try:
                for images, labels, n in self._batches(pipe, batches, batches * self.cfg.batch_size if self.train else left):
                    done, consumed = done + 1, consumed + n
                    yield images, labels
                if not self.train:
                    return
            except _DaliFailure as err:
                failure = str(err)
            finally:
                del pipe
            if failure is not None:  # handled outside the except block: no DALI text chained to our error
                self._recover(segments, failure)
                attempt += 1
            # train: re-read the whole chunk (reshuffled) for the batches still owed;
            # val: resume after the samples already yielded, in order
            segments = drop_samples(self._chunk if self.train else segments, self._local, skip=0 if self.train else consumed)

    def _recover(self, segments: list[Segment], message: str) -> None:
        """Find the sample(s) DALI could not decode (PIL scan of ``segments``), record them."""
        fail = self.errors.policy == "fail"
        bad = find_undecodable(segments, max(1, self.cfg.num_workers), first_only=fail,
                               desc=f"rank {self.rank}: finding the undecodable sample")
        if not bad:
            lines = [ln.strip() for ln in message.splitlines() if ln.strip() and not ln.strip().startswith(_NOISE)]
            raise BadDataError(f"rank {self.rank}: DALI failed reading split {self.split} and no sample of the rank's "
                               f"chunk fails to decode with PIL: {lines[-1] if lines else 'no message'}")
        for shard, key, reason in bad:
            self._bad(shard, key, reason)


# lines of DALI's error text that do not say what went wrong
_NOISE = ("Critical error", "Error in ", "which was used", "File ", "encountered", "C++ context", "Current pipeline")


class _DaliFailure(Exception):
    """DALI's pipeline raised while producing a batch."""


def _dali_device_id(cfg: DataConfig, device: torch.device) -> int | None:
    """The GPU DALI decodes on, or None for its CPU pipeline."""
    cuda = torch.cuda.is_available()
    if cfg.dali_device == "gpu" and not cuda:
        raise ConfigError("data.dali_device = gpu: no CUDA GPU is visible here (use auto or cpu)")
    if cfg.dali_device == "cpu" or not cuda:
        return None
    return device.index if device.type == "cuda" and device.index is not None else torch.cuda.current_device()


def build_dali_loader(cfg: DataConfig, split: str, rank: int, world: int, device: torch.device, seed: int = 0,
                      channels_last: bool = False) -> DaliLoader:
    """The DALI loader of ``split`` ("train" or "val") for ``rank`` of ``world``."""
    if split not in ("train", "val"):
        raise ConfigError(f"split {split!r}: expected 'train' or 'val'")
    if not (world >= 1 and 0 <= rank < world):
        raise ConfigError(f"rank {rank} of world {world}: expected 0 <= rank < world")
    _import_dali()  # a missing DALI is a one-line error before anything else
    return DaliLoader(cfg, split, rank, world, device, seed, channels_last, _dali_device_id(cfg, device))
