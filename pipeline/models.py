"""torchvision ResNet-class models by name, with optional local weights loaded safely."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn

from pipeline.config import ARCHS, ConfigError
from pipeline.errors import PrunepipeError
from pipeline.weights_header import Layout, check_header

# ImageNet-21k has 21,841 classes; a class count far beyond that is a doctored manifest or spec,
# and its classifier alone would take gigabytes (2048 x 1e9 floats).
MAX_CLASSES = 100_000


class WeightsError(PrunepipeError, ValueError):
    """A weights file that is missing, unsafe or does not fit the model."""


def build_model(arch: str, num_classes: int, weights: str | Path | None = None) -> nn.Module:
    """A torchvision model with ``num_classes`` outputs, optionally loaded from a local file.

    Nothing is downloaded: ``weights`` is a local ``.safetensors`` file or a plain state-dict
    ``.pt``/``.pth`` read with ``weights_only=True``. A classifier of another size (ImageNet
    weights, 10 classes) is left freshly initialised; any other mismatch is an error.
    """
    if arch not in ARCHS:
        raise ConfigError(f"model.arch = {arch!r}: allowed values are {', '.join(ARCHS)}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or not 2 <= num_classes <= MAX_CLASSES:
        raise ConfigError(f"num_classes = {num_classes!r} (from the dataset's manifest): "
                          f"a model needs 2..{MAX_CLASSES} classes")
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if weights is not None:
        load_weights(model, weights, arch)
    return model


def weights_layout(model: nn.Module, arch: str) -> Layout:
    """What ``model.weights`` may hold for ``model``: its tensors, the classifier with any class
    count (ImageNet weights for a 10-class model), never more than :data:`MAX_CLASSES` rows."""
    return Layout(model.state_dict(), arch, WeightsError, resizable="fc.", max_rows=MAX_CLASSES)


def check_weights_path(path: str | Path, what: str = "model.weights") -> None:
    """A weights path that exists and is a non-empty regular file (not a folder, not a device)."""
    _check_path(Path(path), what)


def _check_path(path: Path, what: str) -> None:
    from pipeline.textfiles import check_regular_file

    check_regular_file(path, f"{what}: {str(path)!r}", WeightsError)
    if path.stat().st_size == 0:
        raise WeightsError(f"{what}: {str(path)!r} is empty")


def read_safetensors(path: str | Path, what: str = "model.weights", layout: Layout | None = None) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file's tensors; anything else (text, a pickle, a sparse or truncated
    file) is a one-line WeightsError naming ``what``, and so is a NaN or infinite value. With
    ``layout``, the header's every tensor is checked against it before any data is read: a
    header is free to claim gigabytes, and a reader would allocate them."""
    from safetensors.torch import load_file

    path = Path(path)
    _check_path(path, what)
    if layout is not None:
        check_header(path, layout, what)
    try:
        state = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ...: all mean "not a safetensors file"
        raise WeightsError(f"{what}: {str(path)!r} is not a valid safetensors file "
                           f"({str(err).splitlines()[0][:100]})") from None
    check_finite(state, path, what)
    return state


def check_finite(state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """NaN or infinite weights train to a NaN loss that still exits 0: refuse them when loaded."""
    for key, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise WeightsError(f"{what}: {str(path)!r} has NaN or infinite values in {key}")


def read_state_dict(path: str | Path, layout: Layout | None = None) -> dict[str, torch.Tensor]:
    """The state dict in a local weights file: ``.safetensors`` (its header checked against
    ``layout`` first, when given), or a plain ``.pt``/``.pth`` read with
    ``torch.load(weights_only=True)`` (which refuses any pickled object that is not a tensor or a
    container; that refusal is the point). One-line WeightsError otherwise."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path, layout=layout)
    _check_path(path, "model.weights")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own warnings would land mid-line in our message
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - UnpicklingError, RuntimeError, KeyError, EOFError: the same answer
        # torch's message advises weights_only=False, i.e. running the file's code: never pass that on
        raise WeightsError(f"model.weights: {str(path)!r} is not a plain weights file (a state dict of tensors "
                           "saved by torch.save, or .safetensors): refused to unpickle it") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"model.weights: {str(path)!r} does not hold a state dict of tensors")
    # checkpoints written from a DDP model carry a "module." prefix
    state = {str(k).removeprefix("module."): v for k, v in obj.items()}
    check_finite(state, path, "model.weights")
    return state


def load_weights(model: nn.Module, path: str | Path, arch: str = "the model") -> None:
    state = read_state_dict(path, weights_layout(model, arch))
    own = model.state_dict()
    head = [k for k in state if k.startswith("fc.")]
    if head and any(k in own and own[k].shape != state[k].shape for k in head):
        for k in head:
            state.pop(k)
        own_head = {k: v for k, v in own.items() if k.startswith("fc.")}
        state.update(own_head)  # keep the fresh classifier of the right size
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise WeightsError(
            f"model.weights: {str(path)!r} does not fit this model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise WeightsError(f"model.weights: {k} has shape {tuple(v.shape)}, the model wants {tuple(own[k].shape)}")
    model.load_state_dict(state)
