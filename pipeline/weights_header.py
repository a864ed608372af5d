"""A ``.safetensors`` file's header, read and checked before any of its data.

The format is an 8-byte little-endian header length, that many bytes of JSON naming every
tensor (dtype, shape, byte range), then the data. Everything a loader would allocate is declared
in the header, so it is compared with what the architecture holds first: a file that claims a
16 GB ``fc.weight`` (its data a sparse file, costing no disk) is refused from a few hundred bytes,
before a reader maps or copies anything.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

# a ResNet-152 header is ~70 KB; safetensors itself refuses headers over 100 MB
MAX_HEADER_BYTES = 16 << 20
ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
              "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# a tensor may be stored at another precision of its own kind (load_state_dict converts it):
# float weights as F16/BF16/F64, an integer buffer (num_batches_tracked) as any integer
FLOATS = frozenset({"F16", "BF16", "F32", "F64"})
INTEGERS = frozenset({"U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64"})


@dataclass(frozen=True)
class HeaderTensor:
    """One tensor as the header declares it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte range in the data section
    end: int

    def describe(self) -> str:
        return f"{self.dtype} {list(self.shape)}"


def _invalid(path: Path, what: str, error: type[Exception], why: str) -> Exception:
    return error(f"{what}: {str(path)!r} is not a valid safetensors file ({why})")


def read_header(path: str | Path, what: str, error: type[Exception]) -> list[HeaderTensor]:
    """The tensors ``path``'s header declares, in its order, after checking that the header is
    JSON of the safetensors schema and that every byte range has its tensor's size and lies in
    the file; anything else is ``error`` naming ``what`` and the file. Reads the header only."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _invalid(path, what, error, f"{size} bytes, shorter than a header")
            (length,) = struct.unpack("<Q", head)
            if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
                raise _invalid(path, what, error, f"header length {length} in a file of {size} bytes")
            raw = f.read(length)
    except OSError as err:
        raise error(f"{what}: {str(path)!r} cannot be read ({err.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _invalid(path, what, error, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _invalid(path, what, error, "its header is not a JSON object")
    header.pop("__metadata__", None)
    tensors = [_entry(name, value, path, what, error) for name, value in header.items()]
    data = size - 8 - length
    for t in tensors:
        if t.end > data:
            raise _invalid(path, what, error, f"tensor {t.name!r} ends at byte {t.end} of a {data}-byte data section")
    return tensors


def _entry(name: str, value: object, path: Path, what: str, error: type[Exception]) -> HeaderTensor:
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise _invalid(path, what, error, f"tensor {name!r}: expected dtype, shape and data_offsets")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    ints = (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (*shape, *offsets)))
    if dtype not in ITEM_BYTES or not ints:
        raise _invalid(path, what, error, f"tensor {name!r}: dtype {dtype!r}, shape {shape!r}, "
                                          f"data_offsets {offsets!r}")
    start, end = offsets
    if end - start != math.prod(shape) * ITEM_BYTES[dtype]:
        raise _invalid(path, what, error, f"tensor {name!r}: {dtype} {shape} takes "
                                          f"{math.prod(shape) * ITEM_BYTES[dtype]} bytes, its range {end - start}")
    return HeaderTensor(name, dtype, tuple(shape), start, end)


def _kind(t: torch.Tensor) -> frozenset[str]:
    if t.dtype == torch.bool:
        return frozenset({"BOOL"})
    return FLOATS if t.is_floating_point() else INTEGERS


@dataclass(frozen=True)
class Layout:
    """What a weights file must hold: ``tensors`` (a state dict; meta tensors do), named
    ``against`` in messages; ``resizable``: a module prefix (the classifier, ``"fc."``) whose
    tensors may have another first dimension, up to ``max_rows`` (weights made for another class
    count); ``error``: the error class to raise."""

    tensors: Mapping[str, torch.Tensor]
    against: str
    error: type[Exception]
    resizable: str | None = None
    max_rows: int = 0

    def fits(self, t: HeaderTensor, own: torch.Tensor) -> bool:
        want = tuple(own.shape)
        if t.dtype not in _kind(own):
            return False
        if t.shape == want:
            return True
        return (self.resizable is not None and t.name.startswith(self.resizable) and len(t.shape) == len(want) >= 1
                and t.shape[1:] == want[1:] and 1 <= t.shape[0] <= self.max_rows)


def check_header(path: str | Path, layout: Layout, what: str) -> list[HeaderTensor]:
    """Every tensor of ``path``'s header is one of ``layout``'s, with its shape and a dtype of
    its kind, and none is missing; the first that does not fit is ``layout.error`` naming the
    file, the tensor, what it claims and what ``layout.against`` has. Reads the header only."""
    path, error = Path(path), layout.error
    tensors = read_header(path, what, error)
    where = f"{what}: {str(path)!r} does not match {layout.against}"
    for t in tensors:
        own = layout.tensors.get(t.name)
        if own is None:
            raise error(f"{where}: it holds tensor {t.name!r} ({t.describe()}), which {layout.against} does not have")
        if not layout.fits(t, own):
            rows = f" (or up to {layout.max_rows} rows)" if layout.resizable and t.name.startswith(layout.resizable) else ""
            raise error(f"{where}: tensor {t.name!r} is {t.describe()}, {layout.against} has "
                        f"{str(own.dtype).removeprefix('torch.')} {list(own.shape)}{rows}")
    missing = sorted(set(layout.tensors) - {t.name for t in tensors})
    if missing:
        raise error(f"{where}: tensor {missing[0]!r} is missing ({len(missing)} missing)")
    return tensors
