"""The pruned-model format: a JSON spec plus a safetensors file. Never a pickle.

The spec names the torchvision base architecture, the class count and the shape of every
conv, BatchNorm and linear layer (that is, the kept widths). Loading builds the base model,
resizes those layers, and loads the tensors: nothing is unpickled, so a file from the
registry is safe to load.

Whole residual blocks can be removed too (:mod:`pipeline.blocks`): ``removed_blocks`` lists
them (``["layer3.4", ...]``, identity-shortcut blocks only), loading puts ``nn.Identity`` in
their place before anything is resized, and their layers are simply absent from ``layers``
and from the weights file. A spec without the key removed none. This module does not import
:mod:`pipeline.blocks`: the MLflow pyfunc model copies a fixed list of modules
(``pipeline/pyfunc_model.py`` ``CODE_MODULES``), and a served model must load with them alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from pipeline.config import ARCHS
from pipeline.errors import PrunepipeError
from pipeline.models import MAX_CLASSES, build_model, read_safetensors
from pipeline.textfiles import read_text_file, write_atomically
from pipeline.weights_header import Layout, check_header

SPEC_FILE = "spec.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "prunepipe.pruned-model/1"
MAX_SPEC_BYTES = 4 << 20  # a ResNet-152 spec is about 60 KB
IMAGE_SIZES = (8, 1024)  # data.image_size's bounds: a spec cannot ask `show` for more


class SpecError(PrunepipeError, ValueError):
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


STAGES = ("layer1", "layer2", "layer3", "layer4")


def downsamples(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is a residual block of ``model`` whose shortcut is not the identity (it
    changes the shape: the first block of a stage), i.e. a block that cannot be removed."""
    try:
        module = model.get_submodule(name) if name else None
    except AttributeError:
        return False
    return module is not None and getattr(module, "downsample", None) is not None


def identity_blocks(model: nn.Module) -> list[str]:
    """Module names of the residual blocks (torchvision ``BasicBlock`` / ``Bottleneck``) whose
    shortcut is the identity (``downsample is None``: input and output shapes agree), in network
    order. That is every block but the first of each stage, and in resnet18/34 also ``layer1.0``
    (64 channels in and out at stride 1, so it has no downsample either). Blocks already removed
    (``nn.Identity``) are not listed."""
    return [name for name, m in model.named_modules()
            if isinstance(m, BasicBlock | Bottleneck) and m.downsample is None]


def removed_blocks(model: nn.Module) -> list[str]:
    """The stage entries of ``model`` that are ``nn.Identity`` (removed blocks), in network order."""
    out = []
    for stage in STAGES:
        layer = getattr(model, stage, None)
        if isinstance(layer, nn.Sequential):
            out += [f"{stage}.{i}" for i, m in enumerate(layer) if isinstance(m, nn.Identity)]
    return out


def replace_by_identity(model: nn.Module, names: list[str]) -> None:
    """Put ``nn.Identity`` where each named module was (in place; the names are not checked here)."""
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, nn.Identity())


def make_spec(model: nn.Module, arch: str, num_classes: int, **meta: Any) -> dict[str, Any]:
    spec = {"format": FORMAT, "arch": arch, "num_classes": num_classes, "layers": layer_shapes(model)}
    removed = removed_blocks(model)
    if removed:  # only then: the spec of a model with every block stays as it always was
        spec["removed_blocks"] = removed
    return {**spec, **meta}


def _positive_int(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SpecError(f"{where}: expected a positive integer, got {value!r}")
    return value


def _base_shapes(arch: str, removed: list[str] = ()) -> dict[str, dict[str, int]]:
    """The dense architecture's layer shapes, built on the meta device (no memory), without the
    layers of the ``removed`` blocks."""
    with torch.device("meta"):
        model = build_model(arch, 2)
        replace_by_identity(model, list(removed))
        return layer_shapes(model)


def _check_removed(spec: dict[str, Any], arch: str) -> list[str]:
    """``spec.removed_blocks`` (absent: none), each an identity-shortcut block of ``arch``, once."""
    removed = spec.get("removed_blocks", [])
    where = "spec.removed_blocks"
    if not isinstance(removed, list) or not all(isinstance(b, str) for b in removed):
        raise SpecError(f"{where}: expected a list of block names such as 'layer3.1', got {removed!r:.80}")
    with torch.device("meta"):
        base = build_model(arch, 2)
    removable = identity_blocks(base)
    allowed = set(removable)
    seen: set[str] = set()
    for i, name in enumerate(removed):
        if name in seen:
            raise SpecError(f"{where}[{i}]: {name!r} is listed twice")
        seen.add(name)
        if name not in allowed:
            if downsamples(base, name):
                raise SpecError(f"{where}[{i}]: {name!r} downsamples (its shortcut is not the identity), "
                                "so it cannot be removed")
            raise SpecError(f"{where}[{i}]: {name!r:.80} is not a residual block of {arch} "
                            f"(removable: {removable[0]} ... {removable[-1]})")
    return removed


def validate_spec(spec: dict[str, Any]) -> None:
    """Everything about a spec, before anything is built for real: format, architecture, class
    count and image size in bounds, every layer of the base architecture with integer shapes no
    wider than the base's (so a doctored spec cannot make a loader allocate gigabytes), and
    widths that connect (a forward pass on PyTorch's meta device, which allocates nothing)."""
    if spec.get("format") != FORMAT:
        raise SpecError(f"spec.format: expected {FORMAT!r}, got {spec.get('format')!r}")
    arch = spec.get("arch")
    if not isinstance(arch, str) or arch not in ARCHS:
        raise SpecError(f"spec.arch: {arch!r} is not one of {', '.join(ARCHS)}")
    num_classes = _positive_int(spec.get("num_classes"), "spec.num_classes")
    if not 2 <= num_classes <= MAX_CLASSES:
        raise SpecError(f"spec.num_classes: {num_classes} is outside 2..{MAX_CLASSES}")
    size = spec.get("image_size", 224)
    if _positive_int(size, "spec.image_size") and not IMAGE_SIZES[0] <= size <= IMAGE_SIZES[1]:
        raise SpecError(f"spec.image_size: {size} is outside {IMAGE_SIZES[0]}..{IMAGE_SIZES[1]}")
    metrics = spec.get("metrics", {})
    if not isinstance(metrics, dict):
        raise SpecError("spec.metrics: expected a mapping of metric name to number")
    for k, v in metrics.items():
        if v is not None and (not isinstance(v, int | float) or isinstance(v, bool)):
            raise SpecError(f"spec.metrics.{k}: expected a number, got {v!r}")
    removed = _check_removed(spec, arch)
    layers = spec.get("layers")
    if not isinstance(layers, dict):
        raise SpecError("spec.layers: expected a mapping of layer name to shape")
    base = _base_shapes(arch, removed)
    if set(layers) != set(base):
        without = f" without {', '.join(removed)}" if removed else ""
        raise SpecError(f"spec.layers: layer names do not match {arch}{without}"[:300])
    for name, shape in layers.items():
        where = f"spec.layers.{name}"
        if not isinstance(shape, dict) or set(shape) != set(base[name]):
            raise SpecError(f"{where}: expected a mapping with keys {', '.join(sorted(base[name]))}")
        for key, dense in base[name].items():
            value = _positive_int(shape[key], f"{where}.{key}")
            if key == "groups" and value != dense:
                raise SpecError(f"{where}.groups: {value}; {arch} has {dense} here")
            if name == "fc" and key == "out":
                if value != num_classes:
                    raise SpecError(f"{where}.out: {value}; spec.num_classes is {num_classes}")
            elif value > dense:
                raise SpecError(f"{where}.{key}: {value} is wider than {arch}'s {dense}")
    try:
        with torch.device("meta"), torch.no_grad():
            _assemble(spec).eval()(torch.empty(1, 3, size, size))
    except RuntimeError as err:
        raise SpecError(f"spec.layers: the widths do not connect ({str(err).splitlines()[0][:120]})") from None


def _assemble(spec: dict[str, Any]) -> nn.Module:
    """The base model, its removed blocks replaced by ``nn.Identity``, every layer resized to
    the (validated) spec's shapes."""
    model = build_model(spec["arch"], spec["num_classes"])
    replace_by_identity(model, spec.get("removed_blocks", []))
    own = dict(model.named_modules())
    for name, shape in spec["layers"].items():
        old = own[name]
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(old, nn.Conv2d):
            cin, cout, groups = shape["in"], shape["out"], shape["groups"]
            if cin % groups or cout % groups:
                raise SpecError(f"spec.layers.{name}: in/out channels must be divisible by groups={groups}")
            new: nn.Module = nn.Conv2d(
                cin, cout, old.kernel_size, old.stride, old.padding, old.dilation, groups, old.bias is not None
            )
        elif isinstance(old, nn.BatchNorm2d):
            new = nn.BatchNorm2d(shape["features"])
        else:
            new = nn.Linear(shape["in"], shape["out"])
        setattr(parent, attr, new)
    return model


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """The architecture a spec describes, with uninitialised weights of the pruned shapes
    (the spec is validated in full first: :func:`validate_spec`)."""
    validate_spec(spec)
    return _assemble(spec)


def save_pruned(model: nn.Module, folder: str | Path, spec: dict[str, Any]) -> Path:
    """Write ``spec.json`` and ``model.safetensors`` into ``folder`` (atomically, file by file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomically(folder / WEIGHTS_FILE, lambda p: save_file(state, p))
    write_atomically(folder / SPEC_FILE, lambda p: Path(p).write_text(json.dumps(spec, indent=1, sort_keys=True)))
    return folder


def read_spec(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / SPEC_FILE
    if not path.exists():
        raise SpecError(f"{str(folder)!r} is not a pruned model: {SPEC_FILE} is missing")
    text = read_text_file(path, repr(str(path)), MAX_SPEC_BYTES, SpecError)
    try:
        spec = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise SpecError(f"{str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(spec, dict):
        raise SpecError(f"{str(path)!r} must hold a JSON object")
    return spec


def load_pruned(folder: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a pruned model from its folder; returns ``(model in eval mode, spec)``.

    Nothing is allocated before the weights file is known to fit the spec: the spec is
    validated, its state dict's shapes are taken from the architecture built on the meta
    device, and the file's size and safetensors header are compared with them."""
    folder = Path(folder)
    spec = read_spec(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise SpecError(f"{str(folder)!r} is not a pruned model: {WEIGHTS_FILE} is missing")
    validate_spec(spec)
    with torch.device("meta"):
        expected = _assemble(spec).state_dict()
    check_header(weights, Layout(expected, "its spec", SpecError), "pruned model")
    # a padded (or sparse) file would still be mapped in full: its size must fit the spec's
    # tensors (float32 at most, plus the header) too
    need = sum(t.numel() * t.element_size() for t in expected.values())
    if weights.stat().st_size > need + MAX_SPEC_BYTES:
        raise SpecError(f"{str(weights)!r} is {weights.stat().st_size} bytes; its spec's tensors take {need}")
    state = read_safetensors(weights, "pruned model")
    model = _assemble(spec)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise SpecError(f"{str(weights)!r} does not match its spec: {str(err).splitlines()[0]}") from None
    return model.eval(), spec


def stage_widths(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Per stage: residual width, the inner widths of each block left, and the blocks removed
    (indices; ``spec.removed_blocks``), for `prunepipe show`. ``blocks`` counts the blocks left;
    a stage whose every block was removed (resnet18/34's layer1 can be) passes its input on, so
    its ``out`` is the width entering it."""
    layers = spec["layers"]
    removed = spec.get("removed_blocks", [])
    rows = []
    out = layers["conv1"]["out"]
    for stage in STAGES:
        blocks = sorted(
            {k.split(".")[1] for k in layers if k.startswith(stage + ".")}, key=int
        )
        inner = []
        for b in blocks:
            convs = [k for k in layers if k.startswith(f"{stage}.{b}.conv")]
            convs.sort()
            inner.append("/".join(str(layers[c]["out"]) for c in convs[:-1]))
        if blocks:
            last = sorted(k for k in layers if k.startswith(f"{stage}.{blocks[-1]}.conv"))[-1]
            out = layers[last]["out"]
        gone = sorted(int(b.split(".")[1]) for b in removed if b.startswith(stage + "."))
        rows.append({"stage": stage, "blocks": len(blocks), "out": out, "inner": inner, "removed": gone})
    return rows
