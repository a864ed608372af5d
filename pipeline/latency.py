"""A latency table of the device a trial runs on: what each piece of the network costs at the
widths pruning can give it, measured, so that widths can be chosen for a *speed* rather than
for a MACs ratio (docs/architecture.md, "Pruning to a measured speed-up").

**Decomposition.** A torchvision ResNet is a sum of *pieces*, each one conv and the elementwise
work that follows it in the block's forward pass, timed as one module as it runs at inference
(BatchNorm folded into the conv when ``measure.fold_bn``; the BN kept otherwise):

- the stem: conv 7×7, ReLU, max-pool;
- in a block: ``conv1`` + ReLU, ``conv2`` + ReLU (a Bottleneck), the block's last conv + the
  residual add + ReLU, and the downsample conv on its own;
- the head: average pool + the fc layer.

So BatchNorm, ReLU and the residual add, which conv-only tables leave out and which at bf16 on a
modern GPU are a large share of a ResNet's time, are in the pieces they follow. A removed block
(``nn.Identity``) costs nothing: its pieces drop out.

**Grid and interpolation.** A piece's cost is a function of its input and output widths. Each
width that pruning can change (the piece's conv reads or writes a channel group of the trial's
scope) is sampled at fractions ``levels`` of the dense width and at the narrowest width allowed
(one ``step`` = lcm(round_to, conv groups)), rounded to the step; a width no group changes has
one point. Between grid points the cost is bilinear in (in, out): a conv's work is
``in · out · k² · H · W / groups`` plus terms in ``out`` (bias, ReLU, add), bilinear itself, so
the interpolation's error is only where the device is not (cache and vector-width steps).
Pieces of one shape (every ``layer3.k.conv1`` of a ResNet-101) are timed once.

**Anchors.** The pieces are timed one at a time, with warm caches; a whole model runs them back
to back, and on this CPU the dense model ran ~9 % faster than its pieces' sum while a model with
half the widths ran as fast as its own. So two whole models are timed, interleaved (the dense
one and every group at half its width), and a prediction is ``a + b · Σ pieces`` through those
two points: the dense model's prediction is its measurement.

**Cache.** A table is written as one JSON file named by a digest of its key (device, torch,
precision, batch, memory format, BN folding, compile, threads, architecture, image size,
classes, scope, round_to, levels), with a SHA-256 of its contents. A file whose key is not the
trial's is never reused; a corrupt or edited one is reported in one line and rebuilt.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from pipeline.errors import PrunepipeError
from pipeline.measure import Timer, cached_allocator, make_timer, time_models, torch_threads
from pipeline.spec import STAGES, removed_blocks

if TYPE_CHECKING:
    from pipeline.measure import TimingConfig
    from pipeline.surgery import ChannelGroup

FORMAT = "prunepipe-latency-table"
VERSION = 1
DEFAULT_LEVELS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


class LatencyTableError(PrunepipeError, ValueError):
    """A latency table that cannot be used: unreadable, edited, built for another setting, or
    asked about a model it does not describe."""


# --- the pieces -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """One timed unit: a conv and the elementwise work after it (or the head)."""

    name: str  # the conv's module name, "fc" for the head
    kind: str  # "stem" | "conv_relu" | "conv_add_relu" | "conv" | "head"
    block: str | None  # the residual block it belongs to (gone with it); None: stem, head
    dense_in: int
    dense_out: int
    in_hw: tuple[int, int]
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    groups: int = 1

    @property
    def out_hw(self) -> tuple[int, int]:
        if self.kind == "head":
            return (1, 1)
        return tuple((s + 2 * self.padding - self.kernel) // self.stride + 1 for s in self.in_hw)  # type: ignore[return-value]

    def signature(self, ins: Sequence[int], outs: Sequence[int]) -> tuple:
        """Pieces with the same signature cost the same at every grid point."""
        return (self.kind, self.kernel, self.stride, self.padding, self.groups, self.in_hw, self.dense_out
                if self.kind == "head" else None, tuple(ins), tuple(outs))


def pieces(model: nn.Module, image_size: int) -> list[Piece]:
    """The pieces of a torchvision ResNet (BasicBlock or Bottleneck stages), in network order.
    Blocks that are ``nn.Identity`` already have none. Another architecture: LatencyTableError."""
    for attr in ("conv1", "maxpool", "fc", *STAGES):
        if not hasattr(model, attr):
            raise LatencyTableError(f"latency table: the model has no {attr!r}; only torchvision ResNet-family "
                                    "models (BasicBlock / Bottleneck stages) can be decomposed")
    hw: dict[str, tuple[int, int]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(_mod: nn.Module, inp: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            hw[name] = tuple(inp[0].shape[-2:])  # a hook that returns a value replaces the output

        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in model.named_modules()
               if isinstance(m, nn.Conv2d | nn.AdaptiveAvgPool2d)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    def conv_piece(name: str, kind: str, block: str | None) -> Piece:
        conv = model.get_submodule(name)
        return Piece(name, kind, block, conv.in_channels, conv.out_channels, hw[name], conv.kernel_size[0],
                     conv.stride[0], conv.padding[0], conv.groups)

    out = [conv_piece("conv1", "stem", None)]
    for stage in STAGES:
        for i, block in enumerate(getattr(model, stage)):
            prefix = f"{stage}.{i}"
            if isinstance(block, nn.Identity):
                continue
            if not isinstance(block, BasicBlock | Bottleneck):
                raise LatencyTableError(f"latency table: {prefix} is a {type(block).__name__}, not a torchvision "
                                        "BasicBlock or Bottleneck")
            convs = ["conv1", "conv2", "conv3"] if isinstance(block, Bottleneck) else ["conv1", "conv2"]
            out += [conv_piece(f"{prefix}.{c}", "conv_relu", prefix) for c in convs[:-1]]
            out.append(conv_piece(f"{prefix}.{convs[-1]}", "conv_add_relu", prefix))
            if block.downsample is not None:
                out.append(conv_piece(f"{prefix}.downsample.0", "conv", prefix))
    fc = model.fc
    out.append(Piece("fc", "head", None, fc.in_features, fc.out_features, hw["avgpool"]))
    return out


class _PieceNet(nn.Module):
    """A piece at widths (cin, cout), as the block's forward runs it."""

    def __init__(self, p: Piece, cin: int, cout: int, batch: int, fold_bn: bool) -> None:
        super().__init__()
        self.kind = p.kind
        if p.kind == "head":
            self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(cin, p.dense_out)
            return
        self.conv = nn.Conv2d(cin, cout, p.kernel, p.stride, p.padding, groups=p.groups, bias=fold_bn)
        self.bn = nn.Identity() if fold_bn else nn.BatchNorm2d(cout)
        self.pool = nn.MaxPool2d(3, 2, 1) if p.kind == "stem" else nn.Identity()
        if p.kind == "conv_add_relu":  # the shortcut's tensor, as the block adds it
            self.register_buffer("shortcut", torch.randn(batch, cout, *p.out_hw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "head":
            return self.fc(torch.flatten(self.pool(x), 1))
        y = self.bn(self.conv(x))
        if self.kind == "conv":
            return y
        if self.kind == "conv_add_relu":
            y += self.shortcut  # in place, as torchvision's blocks add (a new tensor costs its page faults)
        return self.pool(torch.relu_(y))


# --- the grid -------------------------------------------------------------------------------------
def width_grid(dense: int, step: int, levels: Sequence[float]) -> tuple[int, ...]:
    """The widths a varying dimension is timed at: the narrowest allowed (one step), each level's
    fraction of ``dense`` rounded to the step, and ``dense``."""
    points = {step, dense}
    for f in levels:
        points.add(min(dense, max(step, int(round(f * dense / step)) * step)))
    return tuple(sorted(points))


def varying_steps(groups: Sequence[ChannelGroup], round_to: int) -> dict[str, tuple[int | None, int | None]]:
    """For every conv (and the fc) a group touches: the step of its input width (None: fixed)
    and of its output width, from the groups of the trial's scope."""
    steps: dict[str, list[int | None]] = {}
    for g in groups:
        step = math.lcm(round_to, g.channel_groups)
        for name in g.consumers:
            steps.setdefault(name, [None, None])[0] = step
        for name in g.producers:
            steps.setdefault(name, [None, None])[1] = step
    return {name: (s[0], s[1]) for name, s in steps.items()}


def _interp_axis(grid: np.ndarray, x: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Lower grid index and weight of the upper neighbour for each ``x`` (bilinear's one axis)."""
    if len(grid) == 1:
        if np.any(x != grid[0]):
            raise LatencyTableError(f"latency table: {what} is fixed at {int(grid[0])} in this table, asked for "
                                    f"{sorted(set(x.tolist()) - {grid[0]})[:3]}: the table was built for another scope")
        return np.zeros(x.shape, dtype=int), np.zeros(x.shape)
    if np.any(x < grid[0]) or np.any(x > grid[-1]):
        raise LatencyTableError(f"latency table: {what} width outside [{int(grid[0])}, {int(grid[-1])}]")
    i = np.clip(np.searchsorted(grid, x, side="right") - 1, 0, len(grid) - 2)
    return i, (x - grid[i]) / (grid[i + 1] - grid[i])


@dataclass
class TimedPiece:
    """A piece with its grid and the seconds measured at each grid point."""

    piece: Piece
    ins: tuple[int, ...]
    outs: tuple[int, ...]
    seconds: np.ndarray  # (len(ins), len(outs))

    def cost(self, cin: np.ndarray | int, cout: np.ndarray | int) -> np.ndarray:
        """Interpolated seconds at every (cin[i], cout[j]): an array of shape (len(cin), len(cout))."""
        cin, cout = np.atleast_1d(np.asarray(cin, dtype=float)), np.atleast_1d(np.asarray(cout, dtype=float))
        i, t = _interp_axis(np.asarray(self.ins, dtype=float), cin, f"{self.piece.name} input")
        j, u = _interp_axis(np.asarray(self.outs, dtype=float), cout, f"{self.piece.name} output")
        s = self.seconds
        i1, j1 = np.minimum(i + 1, len(self.ins) - 1), np.minimum(j + 1, len(self.outs) - 1)
        t, u = t[:, None], u[None, :]
        return ((1 - t) * (1 - u) * s[i][:, j] + t * (1 - u) * s[i1][:, j] + (1 - t) * u * s[i][:, j1]
                + t * u * s[i1][:, j1])


# --- the table ------------------------------------------------------------------------------------
@dataclass
class LatencyTable:
    """Measured piece costs of one architecture on one device in one timing mode."""

    key: dict[str, Any]
    timed: list[TimedPiece]
    dense_measured_s: float  # the whole dense model, timed
    half_measured_s: float  # the whole model with every group at half its width, timed beside it
    half_pieces_s: float  # that model's pieces, summed
    build_s: float = 0.0
    _by_name: dict[str, TimedPiece] = field(default_factory=dict, repr=False)
    pieces_dense_s: float = field(default=0.0, init=False)  # the dense model's pieces, summed

    def __post_init__(self) -> None:
        self._by_name = {t.piece.name: t for t in self.timed}
        # once: every prediction's anchor line needs it
        self.pieces_dense_s = float(sum(t.cost(t.piece.dense_in, t.piece.dense_out)[0, 0] for t in self.timed))

    @property
    def line(self) -> tuple[float, float]:
        """(a, b) of ``measured = a + b · Σ pieces`` through the two anchor models; one anchor's
        ratio when the two sums are too close to fit a line."""
        s0, s1 = self.pieces_dense_s, self.half_pieces_s
        m0, m1 = self.dense_measured_s, self.half_measured_s
        if abs(s0 - s1) < 0.05 * s0:
            return 0.0, m0 / s0
        b = (m0 - m1) / (s0 - s1)
        return m0 - b * s0, b

    def scaled(self, pieces_s: float) -> float:
        """Whole-model seconds of a model whose pieces sum to ``pieces_s`` (never below a tenth
        of that sum: a line through two noisy points must not predict nothing)."""
        a, b = self.line
        return max(0.1 * pieces_s, a + b * pieces_s)

    @property
    def dense_s(self) -> float:
        return self.dense_measured_s

    def piece(self, name: str) -> TimedPiece:
        try:
            return self._by_name[name]
        except KeyError:
            raise LatencyTableError(f"latency table: no piece {name!r} (built for {self.key['arch']})") from None

    def names(self) -> list[str]:
        return list(self._by_name)

    def seconds(self, widths: Mapping[str, tuple[int, int]], removed: Collection[str] = ()) -> float:
        """Predicted seconds per batch with each piece at ``widths[name]`` = (in, out) (dense
        where not named) and the blocks in ``removed`` gone."""
        unknown = set(widths) - set(self._by_name)
        if unknown:
            raise LatencyTableError(f"latency table: no piece {sorted(unknown)[0]!r} (built for {self.key['arch']})")
        gone = set(removed)
        total = 0.0
        for t in self.timed:
            if t.piece.block in gone:
                continue
            cin, cout = widths.get(t.piece.name, (t.piece.dense_in, t.piece.dense_out))
            total += float(t.cost(cin, cout)[0, 0])
        return self.scaled(total)

    def predict_model(self, model: nn.Module) -> float:
        """Predicted seconds per batch of ``model`` (a cut model of this architecture)."""
        widths = {t.piece.name: table_widths(model, t) for t in self.timed
                  if t.piece.block is None or not isinstance(_block(model, t.piece.block), nn.Identity)}
        return self.seconds(widths, removed_blocks(model))

    def widths_for(self, groups: Sequence[ChannelGroup], counts: Mapping[str, int]) -> dict[str, tuple[int, int]]:
        """Each piece's (in, out) when every group keeps ``counts[group]`` (dense if not named)."""
        ins, outs = {}, {}
        for g in groups:
            if g.name in counts:
                ins |= dict.fromkeys(g.consumers, counts[g.name])
                outs |= dict.fromkeys(g.producers, counts[g.name])
        return {name: (ins.get(name, t.piece.dense_in), outs.get(name, t.piece.dense_out))
                for name, t in self._by_name.items() if name in ins or name in outs}

    def predict_counts(self, groups: Sequence[ChannelGroup], counts: Mapping[str, int],
                       removed: Collection[str] = ()) -> float:
        return self.seconds(self.widths_for(groups, counts), removed)

    def summary(self) -> str:
        unique = len({(t.piece.signature(t.ins, t.outs)) for t in self.timed})
        points = sum(t.seconds.size for t in self.timed)
        k = self.key
        return (f"latency table of {k['arch']} at {k['image_size']}² on {k['device']} ({k['precision']}, batch "
                f"{k['batch']}, {k['memory_format']}, scope {k['scope']}): {len(self.timed)} pieces, {unique} "
                f"distinct shapes, {points} grid points; dense {1000 * self.dense_measured_s:.2f} ms per batch "
                f"measured, pieces sum to {1000 * self.pieces_dense_s:.2f} ms; half widths "
                f"{1000 * self.half_measured_s:.2f} ms measured, {1000 * self.half_pieces_s:.2f} ms summed; "
                f"built in {self.build_s:.1f} s")

    # --- the file ---------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        body = {"format": FORMAT, "version": VERSION, "key": self.key, "dense_measured_s": self.dense_measured_s,
                "half_measured_s": self.half_measured_s, "half_pieces_s": self.half_pieces_s, "build_s": self.build_s,
                "pieces": [{"piece": t.piece.__dict__ | {"in_hw": list(t.piece.in_hw)}, "ins": list(t.ins),
                            "outs": list(t.outs), "seconds": t.seconds.tolist()} for t in self.timed]}
        return body | {"sha256": _digest(body)}

    def save(self, path: Path) -> Path:
        """Written whole or not at all (a temporary file, then renamed), so that concurrent
        trials building the same table never read half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_json()))
        os.replace(tmp, path)
        return path


def _block(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _digest(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class _PieceFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    piece: dict[str, Any]
    ins: list[int] = Field(min_length=1)
    outs: list[int] = Field(min_length=1)
    seconds: list[list[float]]

    @field_validator("ins", "outs")
    @classmethod
    def _ascending(cls, v: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(v, v[1:], strict=False)) or v[0] < 1:
            raise ValueError("widths must be positive and strictly ascending")
        return v


class _TableFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: str
    version: int
    key: dict[str, Any]
    dense_measured_s: float = Field(gt=0)
    half_measured_s: float = Field(gt=0)
    half_pieces_s: float = Field(gt=0)
    build_s: float = Field(ge=0)
    pieces: list[_PieceFile] = Field(min_length=1)
    sha256: str


def read_table(path: Path, key: Mapping[str, Any] | None = None) -> LatencyTable:
    """The table in ``path``, refused with a one-line LatencyTableError when it is not valid JSON,
    not a table of this format, edited (its checksum), malformed, or (``key``) built for
    another setting (the first differing field named)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise LatencyTableError(f"latency table {path}: cannot be read ({err})") from None
    except json.JSONDecodeError as err:
        raise LatencyTableError(f"latency table {path}: not JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise LatencyTableError(f"latency table {path}: not a {FORMAT} file")
    if raw.get("version") != VERSION:
        raise LatencyTableError(f"latency table {path}: version {raw.get('version')!r}, this prunepipe reads {VERSION}")
    body = {k: v for k, v in raw.items() if k != "sha256"}
    if raw.get("sha256") != _digest(body):
        raise LatencyTableError(f"latency table {path}: its checksum does not match its contents (edited by hand, "
                                "or truncated)")
    try:
        data = _TableFile(**raw)
        timed = []
        for p in data.pieces:
            piece = Piece(**(p.piece | {"in_hw": tuple(p.piece["in_hw"])}))
            seconds = np.asarray(p.seconds, dtype=float)
            if seconds.shape != (len(p.ins), len(p.outs)) or not np.all(np.isfinite(seconds)) or np.any(seconds < 0):
                raise ValueError(f"piece {piece.name}: seconds must be a finite, non-negative "
                                 f"{len(p.ins)}×{len(p.outs)} grid")
            timed.append(TimedPiece(piece, tuple(p.ins), tuple(p.outs), seconds))
    except ValidationError as err:
        e = err.errors()[0]
        raise LatencyTableError(f"latency table {path}: {'.'.join(map(str, e['loc']))}: {e['msg']}") from None
    except (TypeError, ValueError) as err:
        raise LatencyTableError(f"latency table {path}: {err}") from None
    if key is not None:
        for k, v in key.items():
            if data.key.get(k) != v:
                raise LatencyTableError(f"latency table {path}: built for {k} = {data.key.get(k)!r}, this trial "
                                        f"has {v!r}")
    return LatencyTable(data.key, timed, data.dense_measured_s, data.half_measured_s, data.half_pieces_s,
                        data.build_s)


# --- building ---------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    """The device as a person would name it: the GPU's model, or the CPU's model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} × {os.cpu_count()} cpus"


def table_key(protocol: TimingConfig, arch: str, image_size: int, num_classes: int, scope: str, round_to: int,
              levels: Sequence[float]) -> dict[str, Any]:
    """Everything a table's numbers depend on; a table is reused only for an equal key."""
    return {"device": device_name(protocol.device), "torch": torch.__version__, "precision": protocol.precision,
            "batch": protocol.batch_size,
            "memory_format": ("fastest" if protocol.fastest_format else
                              "channels_last" if protocol.channels_last else "contiguous"),
            "allocator": "cached" if protocol.cached_allocator else "system", "fold_bn": protocol.fold_bn, "compile": protocol.compile, "threads": protocol.threads or torch.get_num_threads(),
            "arch": arch, "image_size": image_size, "num_classes": num_classes, "scope": scope, "round_to": round_to,
            "levels": [float(v) for v in levels]}


def table_path(cache_dir: Path, key: Mapping[str, Any]) -> Path:
    return Path(cache_dir) / f"{key['arch']}-{_digest(dict(key))[:16]}.json"


def _time(timer: Timer, net: nn.Module, x: torch.Tensor, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        timer(net, x)
    return statistics.median(timer(net, x) for _ in range(reps))


def build_table(dense: nn.Module, groups: Sequence[ChannelGroup], protocol: TimingConfig, key: dict[str, Any], *,
                reps: int = 5, warmup: int = 2, timer: Timer | None = None,
                progress: Callable[[int, int], None] | None = None) -> LatencyTable:
    """Time every distinct piece of ``dense`` on its grid, then the two anchor models whole
    (:func:`pipeline.measure.time_models`, interleaved), under ``protocol`` (device, precision,
    memory format, BN folding, threads). ``timer``: an injected clock (tests). Pieces are timed
    eager even when ``protocol.compile``: compiling hundreds of pieces would cost more than the
    trial; the anchors (compiled) carry what compilation gains overall."""
    t0 = time.perf_counter()
    if protocol.cached_allocator and protocol.device.type == "cpu":
        cached_allocator()  # before anything is timed: pieces and models in one allocator state
    timer = timer or make_timer(protocol.device, protocol.amp_dtype)
    steps = varying_steps(groups, key["round_to"])
    plan = []
    for p in pieces(dense, key["image_size"]):
        in_step, out_step = steps.get(p.name, (None, None))
        ins = width_grid(p.dense_in, in_step, key["levels"]) if in_step else (p.dense_in,)
        outs = (p.dense_out,) if p.kind == "head" or not out_step else width_grid(p.dense_out, out_step, key["levels"])
        plan.append((p, ins, outs))
    # the anchors first: timed each in its fastest memory format when the protocol says so, and
    # the pieces then in the dense model's (the format the table's models are deployed in)
    half = half_widths(dense, groups, key["image_size"])
    anchors = time_models([copy.deepcopy(dense), half], key["image_size"], protocol, labels=("dense", "half"),
                          timer=timer)
    measured: dict[tuple, np.ndarray] = {}
    todo = {p.signature(ins, outs): (p, ins, outs) for p, ins, outs in plan}
    total = sum(len(ins) * len(outs) for _, ins, outs in todo.values())
    done = 0
    fmt = torch.channels_last if anchors[0].channels_last else torch.contiguous_format
    dev, batch = protocol.device, protocol.batch_size
    with torch_threads(protocol.threads):
        for sig, (p, ins, outs) in todo.items():
            grid = np.zeros((len(ins), len(outs)))
            for i, cin in enumerate(ins):
                x = torch.randn(batch, cin, *p.in_hw, device=dev).contiguous(memory_format=fmt)
                for j, cout in enumerate(outs):
                    net = _PieceNet(p, cin, cout, batch, protocol.fold_bn).eval().to(dev, memory_format=fmt)
                    grid[i, j] = _time(timer, net, x, warmup, reps)
                    done += 1
                    if progress:
                        progress(done, total)
            measured[sig] = grid
    timed = [TimedPiece(p, ins, outs, measured[p.signature(ins, outs)]) for p, ins, outs in plan]
    dense_s, half_s = (batch / r.img_s for r in anchors)
    table = LatencyTable(key, timed, dense_s, half_s, 1.0, build_s=0.0)
    table.half_pieces_s = sum(float(t.cost(*table_widths(half, t))[0, 0]) for t in timed)
    table.build_s = time.perf_counter() - t0
    return table


def table_widths(model: nn.Module, t: TimedPiece) -> tuple[int, int]:
    """(in, out) of piece ``t`` in ``model``."""
    if t.piece.kind == "head":
        return model.fc.in_features, model.fc.out_features
    conv = model.get_submodule(t.piece.name)
    return conv.in_channels, conv.out_channels


def half_widths(dense: nn.Module, groups: Sequence[ChannelGroup], image_size: int) -> nn.Module:
    """A copy of ``dense`` with every group cut to half its width (the second anchor)."""
    from pipeline.surgery import apply_masks, prune_model, structured_topk

    model = copy.deepcopy(dense)
    masks = {}
    for g in groups:
        step = g.channel_groups
        keep = max(step, g.size // 2 // step * step)
        masks[g.name] = structured_topk(-torch.arange(g.size, dtype=torch.float64), keep, g.channel_groups)
    apply_masks(model, list(groups), masks)
    return prune_model(model, list(groups), masks, image_size)


def load_or_build(dense: nn.Module, groups: Sequence[ChannelGroup], protocol: TimingConfig, key: dict[str, Any],
                  cache_dir: Path | str, *, rebuild: bool = False, reps: int = 5, warmup: int = 2,
                  timer: Timer | None = None, log: Callable[[str], None] = print,
                  progress: Callable[[int, int], None] | None = None) -> tuple[LatencyTable, Path, bool]:
    """The cached table of ``key`` if there is a valid one, else a new one built and cached;
    (table, its file, whether it was built). A cached file that cannot be used is named with the
    reason, in one line, and rebuilt."""
    path = table_path(Path(cache_dir), key)
    if path.exists() and not rebuild:
        try:
            return read_table(path, key), path, False
        except LatencyTableError as err:
            log(f"[prunepipe] {err}; rebuilding it")
    table = build_table(dense, groups, protocol, key, reps=reps, warmup=warmup, timer=timer, progress=progress)
    table.save(path)
    return table, path, True


# --- hitting a measured target ------------------------------------------------------------------
@dataclass
class TargetResult:
    """What the correction loop did: the counts it settled on and how it got there."""

    counts: dict[str, int]
    target: float
    measured: float  # the measured speed-up of the counts returned
    aim: float  # the predicted speed-up the allocator was asked for, last
    predicted: float  # the table's speed-up of the counts returned
    corrections: int
    history: list[tuple[float, float, float]]  # (aim, predicted, measured) of every try

    @property
    def error(self) -> float:
        return self.measured / self.target - 1

    def summary(self) -> dict[str, float]:
        return {"target_speedup": self.target, "target_measured_speedup": self.measured,
                "target_predicted_speedup": self.predicted, "target_aim": self.aim,
                "target_corrections": self.corrections, "target_error": self.error}


def hit_target(target: float, allocate: Callable[[float], tuple[dict[str, int], float]],
               measure: Callable[[dict[str, int]], float], *, tolerance: float = 0.03, max_corrections: int = 3,
               max_aim: float = math.inf) -> TargetResult:
    """Widths whose *measured* speed-up is within ``tolerance`` of ``target``.

    ``allocate(aim)`` returns counts whose predicted speed-up is ``aim`` (and that prediction);
    ``measure(counts)`` times them against the dense model. The first aim is the target itself;
    a miss corrects the aim, first in proportion (``aim · target / measured``), then by secant
    steps on (aim, measured), at most ``max_corrections`` times, the aim kept within
    (1, ``max_aim``]. The try closest to the target is returned."""
    aim, history = target, []
    counts_of: list[dict[str, int]] = []
    for i in range(max_corrections + 1):
        counts, predicted = allocate(aim)
        measured = measure(counts)
        history.append((aim, predicted, measured))
        counts_of.append(counts)
        if abs(measured / target - 1) <= tolerance or i == max_corrections:
            break
        if len(history) >= 2 and history[-1][2] != history[-2][2]:
            (a0, _, m0), (a1, _, m1) = history[-2], history[-1]
            step = a1 + (target - m1) * (a1 - a0) / (m1 - m0)
        else:
            step = aim * target / measured
        # a secant through noisy points can jump: never more than double or halve the excess
        new = max(1.0 + 1e-3, min(max_aim, 1 + 2 * (aim - 1), max(1 + (aim - 1) / 2, step)))
        if abs(new - aim) < 1e-6:
            break
        aim = new
    best = min(range(len(history)), key=lambda k: abs(history[k][2] / target - 1))
    a, p, m = history[best]
    return TargetResult(counts_of[best], target, m, a, p, len(history) - 1, history)
