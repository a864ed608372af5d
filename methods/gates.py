"""Layers that methods insert after a group's ReLU, and the plumbing to add and remove them.

A layer goes in front of the group's single consuming conv: ``GatedInput(layer, conv)``, so
it sees the activations after BN and ReLU, which is where AutoPruner and ABP put their layers.

Why not on the BN output, before the ReLU? For a factor b ≥ 0 the forward is the same, but a
channel switched fully off (b = 0) then reaches the ReLU as an exact 0, where ReLU's gradient
is 0: the channel would never get gradient again and ABP's "recoverability" would be lost.
After the ReLU, ∂L/∂b_c = Σ ∂L/∂y_c · ReLU(x_c) passes no kink.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from pipeline.surgery import ChannelGroup


class GatedInput(nn.Sequential):
    """A method's channel layer followed by the consuming conv; unwrapped before surgery."""

    def __init__(self, layer: nn.Module, conv: nn.Module) -> None:
        super().__init__(layer, conv)

    @property
    def layer(self) -> nn.Module:
        return self[0]

    @property
    def conv(self) -> nn.Module:
        return self[1]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def single_consumer(group: ChannelGroup, method: str) -> str:
    if len(group.consumers) != 1 or group.residual:
        raise ValueError(
            f"{method} gates the input of one conv per channel group; group {group.name!r} is a residual "
            "stream: set prune.scope=inner"
        )
    return group.consumers[0]


def insert(model: nn.Module, group: ChannelGroup, layer: nn.Module, method: str) -> None:
    name = single_consumer(group, method)
    parent, attr = _parent(model, name)
    conv = getattr(parent, attr)
    if isinstance(conv, GatedInput):
        raise RuntimeError(f"{name} already carries a {type(conv.layer).__name__}")
    setattr(parent, attr, GatedInput(layer.to(conv.weight.device), conv))


def layers(model: nn.Module, groups: list[ChannelGroup]) -> Iterator[tuple[ChannelGroup, nn.Module]]:
    """(group, inserted layer) pairs, in group order."""
    for g in groups:
        mod = model.get_submodule(g.consumers[0])
        if isinstance(mod, GatedInput):
            yield g, mod.layer


def remove(model: nn.Module, groups: list[ChannelGroup]) -> None:
    """Put the plain convs back."""
    for g in groups:
        parent, attr = _parent(model, g.consumers[0])
        mod = getattr(parent, attr)
        if isinstance(mod, GatedInput):
            setattr(parent, attr, mod.conv)
