"""Layers that methods insert after a group's ReLU, and the plumbing to add and remove them.

A layer goes in front of the group's consuming conv: ``GatedInput(layer, conv)``, so it sees
the activations after BN and ReLU, which is where AutoPruner and ABP put their layers.

Why not on the BN output, before the ReLU? For a factor b ≥ 0 the forward is the same, but a
channel switched fully off (b = 0) then reaches the ReLU as an exact 0, where ReLU's gradient
is 0: the channel would never get gradient again and ABP's "recoverability" would be lost.
After the ReLU, ∂L/∂b_c = Σ ∂L/∂y_c · ReLU(x_c) passes no kink.

Residual streams (``prune.scope: all``, docs/method_specs.md §AutoPruner, §ABP). A stream's
channel is written by several BatchNorms and added into at every block, so there is no single
place "after its ReLU" to gate it; it is read by many consumers (every block's conv1 in the
stage, the next stage's conv1 and downsample, or the final ``fc``). The group's one layer (the
*owner*) goes in front of one consumer and every other consumer gets a :class:`SharedLayer`,
which applies the owner's factor through ``owner.follow(x)``. The masked model then multiplies
the stream by the same factor b at every read: with b_c = 0 channel c still flows along the
identity adds, but no conv or linear ever reads it, which is the function of the model with c
cut from every producer, BN and consumer. Every consumer of a ResNet's stream reads it after
the ReLU that closes a block (or after the stem's ReLU and max-pool, both channel-wise, or
after the average pool for ``fc``), so the placement argument above holds there too.

A :class:`SharedLayer` holds its owner outside the module tree (in a tuple, not as a
submodule): the owner's parameters and buffers appear once in ``state_dict`` and
``parameters()``, so checkpoints, DDP and the optimizer see one set of tensors per group,
and safetensors never meets a tensor shared between two keys. ``copy.deepcopy`` of the model
keeps the follower pointing at the copy of its owner (deepcopy's memo).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from pipeline.surgery import ChannelGroup, filter_norms


def filter_l1(model: nn.Module, groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    """Each group's filter L1 norms: what a gated method's channels are worth before its gates
    have learned anything (:meth:`methods.base.Method.starting_scores`)."""
    return {g.name: filter_norms(model, g, 1) for g in groups}


class GatedInput(nn.Sequential):
    """A method's channel layer followed by the consuming conv (or linear); unwrapped before surgery."""

    def __init__(self, layer: nn.Module, conv: nn.Module) -> None:
        super().__init__(layer, conv)

    @property
    def layer(self) -> nn.Module:
        return self[0]

    @property
    def conv(self) -> nn.Module:
        return self[1]


class SharedLayer(nn.Module):
    """In front of a residual group's other consumers: the owner's factor, ``owner.follow(x)``.

    It has no parameters or buffers of its own; the owner is not registered as a submodule.
    """

    def __init__(self, owner: nn.Module) -> None:
        super().__init__()
        self._owner = (owner,)  # a tuple hides it from the module tree (one copy in state_dict)

    @property
    def owner(self) -> nn.Module:
        return self._owner[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.owner.follow(x)

    def extra_repr(self) -> str:
        return f"shares {type(self.owner).__name__}"


def channel_view(factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (C,) factor shaped to multiply ``x``: (1, C, 1, 1) for a conv's input, (1, C) for a linear's."""
    return factor.view(1, -1, *([1] * (x.dim() - 2)))


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


def _wrap(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, attr = _parent(model, name)
    conv = getattr(parent, attr)
    if isinstance(conv, GatedInput):
        raise RuntimeError(f"{name} already carries a {type(conv.layer).__name__}")
    setattr(parent, attr, GatedInput(layer, conv))


def insert(model: nn.Module, group: ChannelGroup, layer: nn.Module, method: str, first: str | None = None) -> None:
    """Put ``layer`` in front of the group's consumer; in a residual group in front of ``first``
    (default: the first consumer by name) and a :class:`SharedLayer` of it in front of the others."""
    if not group.consumers:
        raise ValueError(f"{method}: channel group {group.name!r} has no consumer to gate")
    if not group.residual:
        name = single_consumer(group, method)
        layer.to(model.get_submodule(name).weight.device)
        _wrap(model, name, layer)
        return
    first = first or group.consumers[0]
    if first not in group.consumers:
        raise ValueError(f"{first!r} is not a consumer of channel group {group.name!r}")
    layer.to(model.get_submodule(first).weight.device)
    _wrap(model, first, layer)
    for name in group.consumers:
        if name != first:
            _wrap(model, name, SharedLayer(layer))


def owner_of(mod: nn.Module) -> nn.Module:
    """The layer a ``GatedInput`` applies: its own, or the owner its ``SharedLayer`` follows."""
    layer = mod.layer
    return layer.owner if isinstance(layer, SharedLayer) else layer


def layers(model: nn.Module, groups: list[ChannelGroup]) -> Iterator[tuple[ChannelGroup, nn.Module]]:
    """(group, inserted layer) pairs, in group order: one per group (a residual group's owner)."""
    for g in groups:
        mod = model.get_submodule(g.consumers[0])
        if isinstance(mod, GatedInput):
            yield g, owner_of(mod)


def remove(model: nn.Module, groups: list[ChannelGroup]) -> None:
    """Put the plain convs (and linears) back, at every consumer."""
    for g in groups:
        for name in g.consumers:
            parent, attr = _parent(model, name)
            mod = getattr(parent, attr)
            if isinstance(mod, GatedInput):
                setattr(parent, attr, mod.conv)
