"""torchvision ResNet-class models by name, with optional local weights loaded safely."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torchvision
from torch import nn

from pipeline.config import ARCHS


class WeightsError(ValueError):
    """A weights file that is missing, unsafe or does not fit the model."""


def build_model(arch: str, num_classes: int, weights: str | Path | None = None) -> nn.Module:
    """A torchvision model with ``num_classes`` outputs, optionally loaded from a local file.

    Nothing is downloaded: ``weights`` is a local ``.safetensors`` file or a plain state-dict
    ``.pt``/``.pth`` read with ``weights_only=True``. A classifier of another size (ImageNet
    weights, 10 classes) is left freshly initialised; any other mismatch is an error.
    """
    if arch not in ARCHS:
        raise ValueError(f"model.arch = {arch!r}: allowed values are {', '.join(ARCHS)}")
    if num_classes < 2:
        raise ValueError(f"num_classes = {num_classes}: need at least 2")
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if weights is not None:
        load_weights(model, weights)
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"model.weights: {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refuses any global that is not a tensor/container: that is the point.
        raise WeightsError(
            f"model.weights: {str(path)!r} is not a plain weights file (refused to unpickle: "
            f"{str(err).splitlines()[0][:120]})"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"model.weights: {str(path)!r} does not hold a state dict of tensors")
    # checkpoints written from a DDP model carry a "module." prefix
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights(model: nn.Module, path: str | Path) -> None:
    state = read_state_dict(path)
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
