"""The pruned-model format: a JSON spec plus a safetensors file. Never a pickle.

The spec names the torchvision base architecture, the class count and the shape of every
conv, BatchNorm and linear layer (that is, the kept widths). Loading builds the base model,
resizes those layers, and loads the tensors: nothing is unpickled, so a file from the
registry is safe to load.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import ARCHS
from pipeline.models import build_model

SPEC_FILE = "spec.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "prunepipe.pruned-model/1"


class SpecError(ValueError):
    """A pruned-model folder that is missing a file or whose spec does not validate."""


def layer_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = {"in": m.in_channels, "out": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.BatchNorm2d):
            out[name] = {"features": m.num_features}
        elif isinstance(m, nn.Linear):
            out[name] = {"in": m.in_features, "out": m.out_features}
    return out


def make_spec(model: nn.Module, arch: str, num_classes: int, **meta: Any) -> dict[str, Any]:
    return {"format": FORMAT, "arch": arch, "num_classes": num_classes, "layers": layer_shapes(model), **meta}


def _positive_int(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SpecError(f"{where}: expected a positive integer, got {value!r}")
    return value


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """The architecture a spec describes, with uninitialised weights of the pruned shapes."""
    if spec.get("format") != FORMAT:
        raise SpecError(f"spec.format: expected {FORMAT!r}, got {spec.get('format')!r}")
    if spec.get("arch") not in ARCHS:
        raise SpecError(f"spec.arch: {spec.get('arch')!r} is not one of {', '.join(ARCHS)}")
    num_classes = _positive_int(spec.get("num_classes"), "spec.num_classes")
    model = build_model(spec["arch"], num_classes)
    layers = spec.get("layers")
    if not isinstance(layers, dict):
        raise SpecError("spec.layers: expected a mapping of layer name to shape")
    own = dict(model.named_modules())
    if set(layers) != set(layer_shapes(model)):
        raise SpecError(f"spec.layers: layer names do not match {spec['arch']}")
    for name, shape in layers.items():
        old = own[name]
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        where = f"spec.layers.{name}"
        if isinstance(old, nn.Conv2d):
            cin, cout, groups = (_positive_int(shape.get(k), f"{where}.{k}") for k in ("in", "out", "groups"))
            if cin % groups or cout % groups:
                raise SpecError(f"{where}: in/out channels must be divisible by groups={groups}")
            new: nn.Module = nn.Conv2d(
                cin, cout, old.kernel_size, old.stride, old.padding, old.dilation, groups, old.bias is not None
            )
        elif isinstance(old, nn.BatchNorm2d):
            new = nn.BatchNorm2d(_positive_int(shape.get("features"), f"{where}.features"))
        else:
            new = nn.Linear(_positive_int(shape.get("in"), f"{where}.in"), _positive_int(shape.get("out"), f"{where}.out"))
        setattr(parent, attr, new)
    return model


def save_pruned(model: nn.Module, folder: str | Path, spec: dict[str, Any]) -> Path:
    """Write ``spec.json`` and ``model.safetensors`` into ``folder`` (atomically, file by file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic(folder / WEIGHTS_FILE, lambda p: save_file(state, p))
    _atomic(folder / SPEC_FILE, lambda p: Path(p).write_text(json.dumps(spec, indent=1, sort_keys=True)))
    return folder


def read_spec(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / SPEC_FILE
    if not path.is_file():
        raise SpecError(f"{str(folder)!r} is not a pruned model: {SPEC_FILE} is missing")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SpecError(f"{str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(spec, dict):
        raise SpecError(f"{str(path)!r} must hold a JSON object")
    return spec


def load_pruned(folder: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a pruned model from its folder; returns ``(model in eval mode, spec)``."""
    folder = Path(folder)
    spec = read_spec(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise SpecError(f"{str(folder)!r} is not a pruned model: {WEIGHTS_FILE} is missing")
    model = build_from_spec(spec)
    state = load_file(str(weights))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise SpecError(f"{str(weights)!r} does not match its spec: {str(err).splitlines()[0]}") from None
    return model.eval(), spec


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def stage_widths(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Per stage: residual width and the inner widths of each block (for `prunepipe show`)."""
    layers = spec["layers"]
    rows = []
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        blocks = sorted(
            {k.split(".")[1] for k in layers if k.startswith(stage + ".")}, key=int
        )
        inner = []
        for b in blocks:
            convs = [k for k in layers if k.startswith(f"{stage}.{b}.conv")]
            convs.sort()
            inner.append("/".join(str(layers[c]["out"]) for c in convs[:-1]))
        last = sorted(k for k in layers if k.startswith(f"{stage}.{blocks[-1]}.conv"))[-1]
        rows.append({"stage": stage, "blocks": len(blocks), "out": layers[last]["out"], "inner": inner})
    return rows
