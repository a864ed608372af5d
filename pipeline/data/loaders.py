"""The loader contract: every backend yields device-resident ``(images, labels)`` and has a length.

The training loop cannot tell backends apart. Backends:

- ``webdataset``: WebDataset shards decoded by PIL in a PyTorch ``DataLoader``. Sharded by
  rank *and* DataLoader worker so each sample is read once per epoch across all ranks:
  whole shards per reader when there are plenty of shards (ImageNet), else every
  ``slots``-th sample (tiny datasets with fewer shards than readers).
- ``synthetic``: random tensors made on the device, for benchmarks without I/O.

Training readers all yield the same number of samples per epoch (``equal=True``), so every
rank takes the same number of optimizer steps: uneven steps under DDP either hang a
collective or, with ``join()``, let the ranks' optimizer and LR-schedule states drift apart.
The price is a few samples per epoch: fewer than ``slots`` when splitting by sample, the
excess of the fullest reader when splitting by shard (shards of equal size make it zero).
The reshuffle each epoch changes which. Validation readers yield everything, exactly once.

Bad samples (``data.on_error``) are decided in the reader: an undecodable image, a missing or
bad label is not yielded; it travels to the main process as a :class:`BadSample` beside the
batch (DataLoader workers are other processes) and lands in ``loader.errors``. A batch may
therefore be a few samples short; a reader that runs out early (a truncated shard) is handled
by the engine, which ends the epoch on every rank at once.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import math
import multiprocessing
import multiprocessing.context
import os
import random
import signal
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import v2 as T

from pipeline.config import DataConfig
from pipeline.data.contract import BatchLoader
from pipeline.data.errors import BadSample, BadSampleLog, parse_label, truncated_warning
from pipeline.data.manifest import read_manifest
from pipeline.data.shards import IndexEntry, index_path, iter_members, read_index, scan_tar
from pipeline.errors import PrunepipeError

# Below this many shards per reader, splitting by shard balances badly: split by sample.
_MIN_SHARDS_PER_SLOT = 4


def _transforms(augment: str, train: bool, size: int, mean: list[float], std: list[float]) -> T.Compose:
    head = [T.ToImage()]
    if train and augment == "imagenet":
        head += [T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip()]
    elif train and augment == "light":
        head += [T.RandomCrop(size, padding=max(1, size // 8))]  # no flip: digits are not mirror-symmetric
    elif augment == "imagenet":
        head += [T.Resize(int(round(size / 0.875)), antialias=True), T.CenterCrop(size)]
    else:
        head += [T.Resize((size, size), antialias=True)]
    return T.Compose([*head, T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])


class ShardedSamples(IterableDataset):
    """Samples of a shard list, split over ``world`` ranks × DataLoader workers."""

    def __init__(
        self,
        root: Path,
        shards: list[dict[str, Any]],
        rank: int,
        world: int,
        num_workers: int,
        transform: T.Compose,
        shuffle: bool,
        seed: int,
        buffer: int,
        equal: bool = False,
        num_classes: int | None = None,
    ) -> None:
        # what a shard can yield is what verification found readable (a truncated tail is not)
        shards = [{**s, "count": s.get("readable", s["count"])} for s in shards]
        self.root, self.shards = root, shards
        self.num_classes = num_classes
        self.rank, self.world = rank, world
        self.workers = max(1, num_workers)
        self.transform, self.shuffle, self.seed, self.buffer = transform, shuffle, seed, buffer
        self.equal = equal
        self.epoch = 0

    @property
    def slots(self) -> int:
        return self.world * self.workers

    def by_shard(self) -> bool:
        return len(self.shards) >= self.slots * _MIN_SHARDS_PER_SLOT

    def _order(self) -> list[dict[str, Any]]:
        order = list(self.shards)
        if self.shuffle:  # same permutation on every rank: seeded by (seed, epoch) only
            random.Random(self.seed * 1000003 + self.epoch).shuffle(order)
        return order

    def _assignment(self) -> list[list[dict[str, Any]]]:
        """Shards per reader, balanced: largest first, each to the reader with fewest samples.

        The sort is stable over the epoch's shuffled order, so equal-size shards still move
        between readers every epoch; the result is the same on every rank.
        """
        bins: list[list[dict[str, Any]]] = [[] for _ in range(self.slots)]
        loads = [0] * self.slots
        for shard in sorted(self._order(), key=lambda s: -s["count"]):
            i = loads.index(min(loads))
            bins[i].append(shard)
            loads[i] += shard["count"]
        return bins

    def slot_count(self, slot: int) -> int:
        """How many samples reader ``slot`` holds this epoch (exact)."""
        if self.by_shard():
            return sum(s["count"] for s in self._assignment()[slot])
        total = sum(s["count"] for s in self.shards)
        return len(range(slot, total, self.slots))

    def slot_yield(self, slot: int) -> int:
        """Samples reader ``slot`` actually yields: its count, or the common quota if ``equal``."""
        if not self.equal:
            return self.slot_count(slot)
        return min(self.slot_count(s) for s in range(self.slots))

    def rank_count(self) -> int:
        first = self.rank * self.workers
        return sum(self.slot_yield(first + w) for w in range(self.workers))

    def rank_batches(self, batch_size: int) -> int:
        # each DataLoader worker batches its own samples: the last batch of every worker may be short
        first = self.rank * self.workers
        return sum(math.ceil(self.slot_yield(first + w) / batch_size) for w in range(self.workers))

    def _samples(self, shards: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for shard in shards:
            path = self.root / shard["path"]
            with open(path, "rb") as stream:  # closed even when the consumer stops early
                files = wds.tariterators.tar_file_expander([{"url": str(path), "stream": stream}])
                samples = wds.tariterators.group_by_keys(files)
                while True:
                    try:
                        sample = next(samples)
                    except StopIteration:
                        break
                    except (tarfile.TarError, OSError, ValueError, EOFError):
                        # a shard broken past its readable part: verification counted the loss
                        break
                    sample["__shard__"] = shard["path"]
                    yield sample

    def _raw(self, slot: int) -> Iterator[dict[str, Any]]:
        if self.by_shard():
            yield from self._samples(self._assignment()[slot])
            return
        for i, sample in enumerate(self._samples(self._order())):
            if i % self.slots == slot:
                yield sample

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, int | None, BadSample | None]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        slot = self.rank * self.workers + worker
        rng = random.Random(hash((self.seed, self.epoch, slot)))
        buf: list[dict[str, Any]] = []
        quota = self.slot_yield(slot)
        for i, sample in enumerate(self._raw(slot)):
            if i >= quota:
                break
            if self.shuffle and self.buffer > 1:
                buf.append(sample)
                if len(buf) < self.buffer:
                    continue
                sample = buf.pop(rng.randrange(len(buf)))
            yield self._decode(sample)
        rng.shuffle(buf)
        for sample in buf:
            yield self._decode(sample)

    def _decode(self, sample: dict[str, Any]) -> tuple[torch.Tensor | None, int | None, BadSample | None]:
        """(image, label, None) for a good sample, (None, None, why) for a bad one."""
        shard, key = sample.get("__shard__", "?"), str(sample.get("__key__", "?"))
        label, why = parse_label(sample.get("cls"), self.num_classes or 1 << 30)
        if why is not None:
            return None, None, BadSample(shard, key, why)
        if "jpg" not in sample:
            return None, None, BadSample(shard, key, "no .jpg component")
        try:
            with Image.open(io.BytesIO(sample["jpg"])) as img:
                img = img.convert("RGB")  # decodes fully: a truncated JPEG fails here, not later
        except Exception as err:  # PIL raises many types for bad bytes; all mean "undecodable"
            return None, None, BadSample(shard, key, f"undecodable image ({type(err).__name__})")
        return self.transform(img), label, None


def _collate(items: list[tuple[torch.Tensor | None, int | None, BadSample | None]]):
    """Stack the good samples of a batch; hand the bad ones over beside them."""
    good = [(x, y) for x, y, bad in items if bad is None]
    bad = [b for _, _, b in items if b is not None]
    if not good:
        return None, None, bad
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good], dtype=torch.int64), bad


class WebDatasetLoader:
    """The ``webdataset`` backend: a PyTorch ``DataLoader`` over :class:`ShardedSamples`, its
    batches moved to ``device`` (pinned memory and non-blocking copies on a GPU). Keeps the
    :class:`~pipeline.data.contract.BatchLoader` contract."""

    def __init__(
        self,
        dataloader: DataLoader,
        dataset: ShardedSamples,
        device: torch.device,
        errors: BadSampleLog,
        max_bad_fraction: float | None,
        channels_last: bool = False,
        name: str = "",
    ) -> None:
        self._dl, self._dataset, self.device = dataloader, dataset, device
        self.num_classes: int = dataset.num_classes
        self.errors, self.max_bad_fraction = errors, max_bad_fraction
        self.channels_last, self.name = channels_last, name
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self._dataset.epoch = epoch
        self._len = self._dataset.rank_batches(self._dl.batch_size)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        non_blocking = self.device.type == "cuda"  # pinned host memory: the copy overlaps compute
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for images, labels, bad in self._host_batches():
            for b in bad:
                self.errors.record(b.shard, b.key, b.reason)  # raises under on_error=fail
            if images is None:
                continue  # every sample of this batch was bad
            images = images.to(self.device, non_blocking=non_blocking, memory_format=fmt)
            yield images, labels.to(self.device, non_blocking=non_blocking)

    def _host_batches(self) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None, list[BadSample]]]:
        """The DataLoader's batches; its timeout (``data.worker_timeout_s``) becomes a
        :class:`DataStallError` after the stuck workers have printed their stacks."""
        it = iter(self._dl)
        while True:
            stalled = False
            try:
                batch = next(it)
            except StopIteration:
                return
            except RuntimeError as err:
                if not str(err).startswith("DataLoader timed out"):
                    raise
                stalled = True
            if stalled:
                # raised out here, and without the iterator: the timeout's traceback (as context)
                # and this frame (in the new traceback) would otherwise keep the iterator alive,
                # and with it the stuck workers, for as long as the exception lives
                message = self._stalled(it)
                del it
                raise DataStallError(message)
            yield batch

    def _stalled(self, it: Any) -> str:
        # the workers registered SIGUSR1 to print every thread's stack (_worker_init): that stack
        # is what tells a hung read from a deadlock. ``_workers`` is the iterator's own list.
        pids = [w.pid for w in getattr(it, "_workers", []) if w.is_alive()][:8]
        for pid in pids:  # one at a time: stacks written at once interleave character by character
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
            time.sleep(0.5)  # written before the next, and before the iterator's shutdown ends it
        return (f"{self.name or 'data'} loader: no batch from its DataLoader workers in {self._dl.timeout:.0f} s "
                f"(data.worker_timeout_s): a read that never returns or a deadlocked worker; the stacks of "
                f"worker processes {pids} are printed above")


class DataStallError(PrunepipeError, RuntimeError):
    """A DataLoader worker handed over no batch within ``data.worker_timeout_s``."""

    exit_code = 1  # the run failed; the input was not refused


def _worker_context(start: str) -> multiprocessing.context.BaseContext:
    """The start method of DataLoader workers (``data.worker_start``). A forkserver imports this
    module (torch, torchvision, PIL, webdataset) once; each epoch's workers are then forked from it
    ready to run, instead of paying the imports as spawned ones would."""
    if start not in multiprocessing.get_all_start_methods():
        start = "spawn"  # no forkserver on this platform
    ctx = multiprocessing.get_context(start)
    if start == "forkserver":
        # "__main__" too when the program is a file (a Ray worker's is Ray's default_worker.py):
        # imported once in the server, not again by every worker of every epoch
        ctx.set_forkserver_preload(["__main__", __name__])  # no effect once the server runs
    return ctx


def _worker_init(worker_id: int) -> None:
    """In each DataLoader worker: SIGUSR1 prints every thread's stack (see :meth:`Loader._stalled`)."""
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)


def build_loader(
    cfg: DataConfig, split: str, rank: int, world: int, device: torch.device, seed: int = 0, channels_last: bool = False
) -> BatchLoader:
    """The loader of ``split`` ("train" or "val") for this rank, of the backend ``cfg`` names;
    every backend keeps the :class:`~pipeline.data.contract.BatchLoader` contract.
    ``channels_last`` asks for images in that memory format."""
    if cfg.backend == "synthetic":
        return SyntheticLoader(cfg, world, device, seed + rank, channels_last)
    if cfg.backend == "dali":
        from pipeline.data.dali import build_dali_loader  # optional dependency: imported only when asked for

        return build_dali_loader(cfg, split, rank, world, device, seed=seed, channels_last=channels_last)
    return _webdataset_loader(cfg, split, rank, world, device, seed, channels_last)


def _webdataset_loader(
    cfg: DataConfig, split: str, rank: int, world: int, device: torch.device, seed: int, channels_last: bool
) -> WebDatasetLoader:
    train = split == "train"
    root = Path(cfg.root)
    manifest = read_manifest(root)
    errors = BadSampleLog(cfg.on_error)
    record_truncated(manifest["splits"][split], errors, split, announce=rank == 0)
    dataset = ShardedSamples(
        root,
        manifest["splits"][split],
        rank,
        world,
        cfg.num_workers,
        _transforms(cfg.augment, train, cfg.image_size, manifest["mean"], manifest["std"]),
        shuffle=train,
        seed=seed,
        buffer=cfg.shuffle_buffer,
        equal=train,
        num_classes=manifest["num_classes"],
    )
    dl = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        collate_fn=_collate,
        timeout=cfg.worker_timeout_s if cfg.num_workers > 0 else 0,
        worker_init_fn=_worker_init,
        multiprocessing_context=_worker_context(cfg.worker_start) if cfg.num_workers > 0 else None,
    )
    return WebDatasetLoader(dl, dataset, device, errors, cfg.max_bad_fraction, channels_last=channels_last, name=split)


def record_truncated(shards: list[dict[str, Any]], errors: BadSampleLog, split: str = "train",
                     announce: bool = False) -> None:
    """Samples a truncated shard lost are bad data: counted under ``skip``, an error under ``fail``.
    ``announce``: also say so now, in one line, before any step (not only in the epoch's count)."""
    if announce and (warning := truncated_warning(shards, split)):
        print(warning, flush=True)
    for shard in shards:
        lost = shard["count"] - shard.get("readable", shard["count"])
        if lost > 0:
            errors.record(shard["path"], "(tail)", f"{shard.get('problem') or 'truncated'}", count=lost)


class SyntheticLoader:
    """The ``synthetic`` backend: random batches drawn on the device itself, for benchmarks
    without I/O (a CPU draw of a 256×3×224² batch takes longer than a GPU's training step, and a
    training-rate benchmark would measure the random generator). Never has a bad sample."""

    max_bad_fraction = None

    def __init__(self, cfg: DataConfig, world: int, device: torch.device, seed: int, channels_last: bool = False) -> None:
        self._cfg, self.device, self._fmt = cfg, device, torch.channels_last if channels_last else torch.contiguous_format
        self._steps = max(1, cfg.synthetic_samples // (cfg.batch_size * world))
        self._gen = torch.Generator(device=device).manual_seed(seed)
        self.num_classes: int = cfg.synthetic_classes
        self.errors = BadSampleLog()

    def set_epoch(self, epoch: int) -> None:
        pass  # every epoch draws fresh batches of the same count

    def __len__(self) -> int:
        return self._steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        c = self._cfg
        for _ in range(self._steps):
            x = torch.randn(c.batch_size, 3, c.image_size, c.image_size, generator=self._gen, device=self.device)
            y = torch.randint(0, c.synthetic_classes, (c.batch_size,), generator=self._gen, device=self.device)
            yield x.contiguous(memory_format=self._fmt), y


def calibration_set(
    cfg: DataConfig, samples: int, rank: int, world: int, device: torch.device, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of a fixed calibration set: ``samples`` training images drawn at random
    (seeded by ``seed``) from the whole training split, so the set spreads over every shard and
    class instead of the first shards' few classes; without augmentation, sample ``i`` of the
    draw on rank ``i % world``. The set depends on ``seed`` alone, not on the number of ranks,
    so a decision made on it does not either."""
    if samples < 1:
        raise ValueError(f"calibration samples = {samples}: must be at least 1")
    if cfg.backend == "synthetic":
        gen = torch.Generator().manual_seed(1234 + seed)
        x = torch.randn(samples, 3, cfg.image_size, cfg.image_size, generator=gen)
        y = torch.randint(0, cfg.synthetic_classes, (samples,), generator=gen)
        mine = list(range(rank, samples, world))
        xs, ys = x[mine], y[mine]
    else:
        picked = [p for i, p in enumerate(_draw_calibration(cfg, samples, seed)) if i % world == rank]
        xs = torch.stack([p[0] for p in picked]) if picked else torch.empty(0, 3, cfg.image_size, cfg.image_size)
        ys = torch.tensor([p[1] for p in picked], dtype=torch.int64)
    return [(xs[i:i + cfg.batch_size].to(device), ys[i:i + cfg.batch_size].to(device))
            for i in range(0, len(ys), cfg.batch_size)]


def _shard_entries(root: Path, shard: dict[str, Any]) -> list[IndexEntry]:
    """The readable samples of a shard: its index file (written by ``prunepipe data``), else its tar headers."""
    path = root / shard["path"]
    idx = index_path(path)
    entries = read_index(idx) if idx.is_file() else scan_tar(path)[0]
    return entries[: shard.get("readable", shard["count"])]


def _draw_calibration(cfg: DataConfig, samples: int, seed: int) -> list[tuple[torch.Tensor, int]]:
    """``samples`` good training samples, a seeded uniform draw over all shards, in draw order.

    Every rank draws and decodes the same candidates, so a bad sample is skipped everywhere
    alike; candidates are read shard by shard in file order (one seek per sample).
    """
    root = Path(cfg.root)
    manifest = read_manifest(root)
    shards = manifest["splits"]["train"]
    ds = ShardedSamples(root, shards, 0, 1, 0,
                        _transforms("none", False, cfg.image_size, manifest["mean"], manifest["std"]),
                        shuffle=False, seed=0, buffer=0, num_classes=manifest["num_classes"])
    entries = [_shard_entries(root, s) for s in ds.shards]
    where = [(si, ei) for si, es in enumerate(entries) for ei in range(len(es))]
    rng = random.Random(seed)
    # a margin of extra candidates stands in for bad samples; the whole split if that is not enough
    order = rng.sample(range(len(where)), min(len(where), 2 * samples + 16))
    good = _decode_candidates(root, ds, entries, [where[i] for i in order])
    if len(good) < samples and len(order) < len(where):
        taken = set(order)
        rest = [i for i in rng.sample(range(len(where)), len(where)) if i not in taken]
        good += _decode_candidates(root, ds, entries, [where[i] for i in rest])
    return good[:samples]


def _decode_candidates(root: Path, ds: ShardedSamples, entries: list[list[IndexEntry]],
                       wanted: list[tuple[int, int]]) -> list[tuple[torch.Tensor, int]]:
    """Decode the samples ``wanted`` (shard, entry) and return the good ones in ``wanted``'s order."""
    by_shard: dict[int, list[int]] = {}
    for si, ei in wanted:
        by_shard.setdefault(si, []).append(ei)
    decoded: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}
    for si, eis in by_shard.items():
        path = ds.shards[si]["path"]
        chosen = [entries[si][ei] for ei in sorted(eis)]
        for ei, (entry, comps) in zip(sorted(eis), iter_members(root / path, chosen), strict=True):
            sample = {"__key__": entry.key, "__shard__": path, **comps}
            x, y, bad = ds._decode(sample)
            if bad is None:
                decoded[(si, ei)] = (x, y)
    return [decoded[w] for w in wanted if w in decoded]
