"""Channel groups, masking and physical channel removal.

Groups come from Torch-Pruning's traced ``DependencyGraph``, never from hard-coded layer
names: a group is every tensor slice that must lose the same channels (a conv's output, its
BN, the next conv's input; every conv writing into one residual sum).

Surgery is exact by construction: a *masked* model (filter rows and the BN's γ and β of a
pruned channel set to zero, so the channel outputs exactly 0 after BN and ReLU) computes the
same function as the physically pruned one. Methods whose masked state leaves a channel at a
non-zero constant fold it themselves before asking for the cut.

Grouped convs (ResNeXt): Torch-Pruning slices a grouped conv's input as if the same
within-group positions were removed from every conv group, so masks of such channel groups
are *group-structured* (channel ``g*w + j`` is kept iff position ``j`` is). ``structured_topk``
builds such masks and ``prune_model`` refuses any other kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn


@dataclass
class ChannelGroup:
    """One set of channels that must be removed together."""

    name: str  # the root conv's module name: the group's stable id in masks and reports
    size: int
    producers: list[str]  # convs whose OUTPUT channels are the group
    norms: list[str]  # BatchNorms over the group's channels
    consumers: list[str]  # convs / linears whose INPUT channels are the group
    channel_groups: int = 1  # >1 when a grouped conv touches the group (ResNeXt)
    residual: bool = False
    # consumer conv → the BatchNorm right after it (where a constant channel is folded)
    next_norm: dict[str, str] = field(default_factory=dict)


def example_input(image_size: int, batch: int = 1, device: str | torch.device = "cpu") -> torch.Tensor:
    return torch.randn(batch, 3, image_size, image_size, device=device)


def _dependency_graph(model: nn.Module, image_size: int) -> tp.DependencyGraph:
    was_training = model.training
    model.eval()  # tracing must not update BN running statistics
    device = next(model.parameters()).device
    with torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(
            model, example_inputs=example_input(image_size, device=device), verbose=False
        )
    model.train(was_training)
    return dg


def _conv_groups(conv: nn.Conv2d) -> int:
    # depthwise convs couple in=out and are handled by TP as such; only true grouped convs count
    if conv.groups > 1 and conv.groups != conv.out_channels:
        return conv.groups
    return 1


def find_groups(model: nn.Module, image_size: int, scope: str = "inner") -> list[ChannelGroup]:
    """Channel groups of ``model`` rooted at convs.

    ``scope="inner"``: only groups with one producing conv and one consuming conv (the
    bottleneck's conv1/conv2 outputs, BasicBlock's conv1 output): residual widths stay.
    ``scope="all"``: also the residual streams and the stem.
    """
    if scope not in ("inner", "all"):
        raise ValueError(f"prune.scope = {scope!r}: allowed values are 'inner', 'all'")
    dg = _dependency_graph(model, image_size)
    names = {m: n for n, m in model.named_modules()}
    groups: list[ChannelGroup] = []
    for group in dg.get_all_groups(root_module_types=[nn.Conv2d]):
        producers, norms, consumers, cgroups = [], [], [], 1
        for dep, _idxs in group:
            mod = dep.target.module
            if not isinstance(mod, nn.Module) or mod not in names:
                continue  # functional nodes (relu, add) carry no parameters
            out_side = dg.is_out_channel_pruning_fn(dep.handler)
            if isinstance(mod, nn.Conv2d):
                (producers if out_side else consumers).append(names[mod])
                cgroups = max(cgroups, _conv_groups(mod))
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
                norms.append(names[mod])
            elif isinstance(mod, nn.Linear) and not out_side:
                consumers.append(names[mod])
        if not producers:
            continue
        root = names[group[0].dep.target.module]
        size = model.get_submodule(root).out_channels
        next_norm = {}
        for c in consumers:
            node = dg.module2node.get(model.get_submodule(c))
            following = [o.module for o in (node.outputs if node is not None else [])]
            bns = [names[m] for m in following if isinstance(m, nn.modules.batchnorm._BatchNorm) and m in names]
            if len(bns) == 1:
                next_norm[c] = bns[0]
        residual = len(producers) > 1 or len(consumers) != 1
        if scope == "inner" and residual:
            continue
        groups.append(
            ChannelGroup(
                name=root,
                size=size,
                producers=sorted(set(producers)),
                norms=sorted(set(norms)),
                consumers=sorted(set(consumers)),
                channel_groups=cgroups,
                residual=residual,
                next_norm=next_norm,
            )
        )
    groups.sort(key=lambda g: list(names.values()).index(g.name))
    return groups


def structured_topk(scores: torch.Tensor, keep: int, channel_groups: int = 1) -> torch.Tensor:
    """Keep-mask of the ``keep`` best channels (ties → lower index), group-structured if needed.

    With ``channel_groups = G > 1`` the scores of position ``j`` are summed over the G conv
    groups, ``keep // G`` positions are kept, and the same positions are kept in every group.
    """
    scores = scores.detach().double().cpu().flatten()
    n = scores.numel()
    if channel_groups > 1:
        w = n // channel_groups
        per_pos = scores.view(channel_groups, w).sum(0)
        pos_mask = structured_topk(per_pos, max(1, keep // channel_groups))
        return pos_mask.repeat(channel_groups)
    order = torch.argsort(scores, descending=True, stable=True)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[: max(1, min(keep, n))]] = True
    return mask


def filter_norms(model: nn.Module, group: ChannelGroup, p: int = 2) -> torch.Tensor:
    """Σ over the group's producing convs of each output filter's Lp norm."""
    total = torch.zeros(group.size, dtype=torch.float64)
    for name in group.producers:
        w = model.get_submodule(name).weight.detach()
        total += w.flatten(1).norm(p=p, dim=1).double().cpu()
    return total


def macs_profile(model: nn.Module, image_size: int) -> dict[str, int]:
    """MACs of every conv and linear of one forward pass, by module name."""
    profile: dict[str, int] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            def hook(mod, _inp, out, name=name):
                per_out = (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1] \
                    if isinstance(mod, nn.Conv2d) else mod.in_features
                profile[name] = out.numel() // out.shape[0] * per_out
            handles.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input(image_size, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return profile


def macs_after(profile: dict[str, int], groups: list[ChannelGroup], kept: dict[str, int]) -> float:
    """MACs once each group keeps ``kept[name]`` channels, without cutting anything.

    A conv's MACs scale with the kept fraction of its input group and of its output group
    (``in/groups`` shrinks the same way for a grouped conv, since masks are group-structured).
    """
    frac_in: dict[str, float] = {}
    frac_out: dict[str, float] = {}
    for g in groups:
        f = kept.get(g.name, g.size) / g.size
        for p in g.producers:
            frac_out[p] = f
        for c in g.consumers:
            frac_in[c] = f
    return sum(m * frac_in.get(n, 1.0) * frac_out.get(n, 1.0) for n, m in profile.items())


def validate_masks(groups: list[ChannelGroup], masks: dict[str, torch.Tensor]) -> None:
    by_name = {g.name: g for g in groups}
    for name, mask in masks.items():
        if name not in by_name:
            raise ValueError(f"mask for unknown channel group {name!r}")
        g = by_name[name]
        if mask.dtype != torch.bool or mask.numel() != g.size:
            raise ValueError(f"mask of group {name!r}: expected a bool tensor of {g.size}, got {tuple(mask.shape)}")
        if not bool(mask.any()):
            raise ValueError(f"mask of group {name!r} keeps no channel: the network would be cut in two")
        if g.channel_groups > 1:
            per = mask.view(g.channel_groups, -1)
            if not bool((per == per[0]).all()):
                raise ValueError(
                    f"mask of group {name!r} is not group-structured (grouped conv, {g.channel_groups} groups)"
                )


@torch.no_grad()
def apply_masks(
    model: nn.Module, groups: list[ChannelGroup], masks: dict[str, torch.Tensor], zero_norm: bool = True
) -> None:
    """Zero the pruned channels in place.

    ``zero_norm=True`` also zeroes BN's γ and β, so the channel outputs exactly 0 and the
    masked model equals the physically pruned one. ``zero_norm=False`` zeroes the filters only
    (SFP's soft step: the BN keeps its shift and gradients can bring the filter back).
    """
    by_name = {g.name: g for g in groups}
    for name, keep in masks.items():
        g = by_name[name]
        drop = ~keep.to(torch.bool)
        for conv_name in g.producers:
            conv = model.get_submodule(conv_name)
            d = drop.to(conv.weight.device)
            conv.weight[d] = 0
            if conv.bias is not None:
                conv.bias[d] = 0
        if zero_norm:
            for bn_name in g.norms:
                bn = model.get_submodule(bn_name)
                d = drop.to(bn.weight.device)
                bn.weight[d] = 0
                bn.bias[d] = 0


def prune_model(
    model: nn.Module, groups: list[ChannelGroup], masks: dict[str, torch.Tensor], image_size: int
) -> nn.Module:
    """Physically remove every channel whose mask is False (in place; returns ``model``)."""
    validate_masks(groups, masks)
    dg = _dependency_graph(model, image_size)
    for name, keep in masks.items():
        idxs = (~keep).nonzero().flatten().tolist()
        if not idxs:
            continue
        root = model.get_submodule(name)
        group = dg.get_pruning_group(root, tp.prune_conv_out_channels, idxs=idxs)
        group.prune()
    return model
