"""Layers that methods insert after a group's BatchNorm, and the plumbing to add and remove them.

A layer is inserted by replacing the BN module with ``GatedNorm(bn, layer)``: the block's
forward then calls ``layer(bn(x))`` right before its ReLU. For a positive per-channel factor
``v``, ``ReLU(x)·v == ReLU(x·v)``, so gating the BN output is the same function as gating the
ReLU output, which is where AutoPruner and ABP put their layers.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from pipeline.surgery import ChannelGroup


class GatedNorm(nn.Sequential):
    """``bn`` followed by a method's channel layer; unwrapped again before surgery."""

    def __init__(self, bn: nn.Module, layer: nn.Module) -> None:
        super().__init__(bn, layer)

    @property
    def bn(self) -> nn.Module:
        return self[0]

    @property
    def layer(self) -> nn.Module:
        return self[1]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def single_norm(group: ChannelGroup, method: str) -> str:
    if len(group.norms) != 1 or group.residual:
        raise ValueError(
            f"{method} gates one BatchNorm per channel group; group {group.name!r} is a residual stream: "
            "set prune.scope=inner"
        )
    return group.norms[0]


def insert(model: nn.Module, group: ChannelGroup, layer: nn.Module, method: str) -> None:
    name = single_norm(group, method)
    parent, attr = _parent(model, name)
    bn = getattr(parent, attr)
    if isinstance(bn, GatedNorm):
        raise RuntimeError(f"{name} already carries a {type(bn.layer).__name__}")
    setattr(parent, attr, GatedNorm(bn, layer.to(bn.weight.device)))


def layers(model: nn.Module, groups: list[ChannelGroup]) -> Iterator[tuple[ChannelGroup, nn.Module]]:
    """(group, inserted layer) pairs, in group order."""
    for g in groups:
        mod = model.get_submodule(g.norms[0])
        if isinstance(mod, GatedNorm):
            yield g, mod.layer


def remove(model: nn.Module, groups: list[ChannelGroup]) -> None:
    """Put the plain BatchNorms back."""
    for g in groups:
        parent, attr = _parent(model, g.norms[0])
        mod = getattr(parent, attr)
        if isinstance(mod, GatedNorm):
            setattr(parent, attr, mod.bn)
