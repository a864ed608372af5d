"""Soft Filter Pruning — He et al., IJCAI 2018 (docs/method_specs.md §SFP).

Before training and after every pruning-phase epoch, the ``floor(N·prune_ratio)`` filters of
smallest L2 norm are set to zero. Only the conv filters are zeroed, as in the authors' code
(he-y/soft-filter-pruning, ``pruning_train.py``, ``Mask.do_mask``): gradients and momentum are
untouched and the BN keeps its γ and β, so a zeroed filter gets gradient again and can come back
the next epoch (the "soft").

How many a cut group soft-prunes is the width allocator's count for it (``n_keep``; the uniform
allocator gives the authors' ``floor(N·prune_ratio)`` rule); a conv soft-pruned that is not a
cut group (the stem and conv3 under ``scope: inner``) keeps the uniform rate.

**Where the soft masks go** (``soft_scope``):

- ``authors`` (default): every conv but the projection shortcuts, each conv on its own — the
  stem, conv1/conv2 and the conv3 that writes into the residual sum — which is what the
  authors' ``--layer_begin 0 --layer_end … --layer_inter 3 --skip_downsample 1`` selects.
  Projection shortcuts are found from the traced graph (a conv that reads *and* writes a
  residual stream), not by name.
- ``groups``: the channel groups the hard cut uses (``prune.scope``), as before.

**What is reported.** The paper's accuracy is the soft-masked model's: the recipe evaluates the
model as the pruning phase leaves it (``masked_val_top1``/``top5``) beside the hard-pruned one
(``pruned_*`` right after the cut, then after fine-tuning). The paper's FLOPs count treats every
zeroed filter as gone, and the next conv's matching input too where nothing else adds into
that channel; ``summary()`` gives that count as ``soft_macs_reduction`` (ResNet-50 at 0.3:
41.2 %, the paper says 41.8 %). The hard cut can only remove what the surgery's groups allow:
with ``prune.scope: inner`` the conv1/conv2 outputs (35.7 % on ResNet-50), whose soft masks
are exactly the cut's; the zeroed stem and conv3 filters stay in the cut model as zero filters
(their channels carry the BN shift), and the fine-tune may revive them. The authors' own small
model (``utils/get_small_model.py``) keeps conv3 partially, scattering its outputs back into the
full residual width, which physical channel removal cannot express.

Caveat seen in the tests: the gradient that revives a zeroed filter passes through the BN and
the ReLU. Its channel outputs exactly the BN shift β; where β ≤ 0 (β = 0 is the fresh-init
value) ReLU passes no gradient and the filter stays dead. Softness is real from a trained model
or once β has moved, not in the very first steps from scratch.

At the end the last masks decide. The hard prune then zeroes BN γ and β of the dropped
channels too (what physical removal computes), so the masked model and the cut model agree
exactly; the BN shift a soft-pruned channel carried is lost, and the fine-tune after surgery
re-learns it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from methods.base import Method, SelectContext, register_method
from pipeline.surgery import ChannelGroup, apply_masks, filter_norms, find_groups, macs_profile, structured_topk


class SfpOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # authors: every conv but the projection shortcuts, each on its own; groups: prune.scope's groups
    soft_scope: Literal["authors", "groups"] = "authors"


def shortcut_convs(all_groups: list[ChannelGroup]) -> set[str]:
    """Projection shortcuts: convs that read a residual stream and write one (``scope="all"`` groups)."""
    reads = {c for g in all_groups if g.residual for c in g.consumers}
    writes = {p for g in all_groups if g.residual for p in g.producers}
    return reads & writes


def soft_units(all_groups: list[ChannelGroup]) -> list[ChannelGroup]:
    """One single-producer unit per conv the authors soft-prune: every producer but the shortcuts."""
    skip = shortcut_convs(all_groups)
    units = []
    for g in all_groups:
        for p in g.producers:
            if p in skip:
                continue
            alone = len(g.producers) == 1
            units.append(ChannelGroup(name=p, size=g.size, producers=[p], norms=[], consumers=g.consumers if alone else [],
                                      channel_groups=g.channel_groups if alone else 1, residual=g.residual))
    return units


def soft_macs(profile: dict[str, int], all_groups: list[ChannelGroup], kept: dict[str, int]) -> float:
    """MACs of a soft-masked model counted the paper's way: a zeroed filter's output is gone, and
    so is the next conv's input slice where that conv alone writes the channel (not a residual sum).

    ``kept``: kept filters per producing conv; convs not in it keep all.
    """
    frac_out = {p: kept[p] / g.size for g in all_groups for p in g.producers if p in kept}
    frac_in = {}
    for g in all_groups:
        if len(g.producers) == 1 and g.producers[0] in kept:
            for c in g.consumers:
                frac_in[c] = frac_out[g.producers[0]]
    return sum(m * frac_in.get(n, 1.0) * frac_out.get(n, 1.0) for n, m in profile.items())


@register_method
class SoftFilterPruning(Method):
    name = "sfp"
    training_aware = True
    Options = SfpOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.masks: dict[str, torch.Tensor] = {}
        self.units: list[ChannelGroup] = list(self.groups)
        self._soft_reduction: float | None = None

    def prepare(self, model: nn.Module) -> None:
        """Find the soft units (traced once; resume calls this too) and the paper's MACs count."""
        all_groups = find_groups(model, self.image_size, "all")
        if self.options.soft_scope == "authors":
            by_name = {g.name: g for g in self.groups}
            # a unit that is also a cut group keeps the group's own rounding and conv-group structure
            self.units = [by_name.get(u.name, u) for u in soft_units(all_groups)]
        profile = macs_profile(model, self.image_size)
        kept = {p: self._keep(u) for u in self.units for p in u.producers}
        self._soft_reduction = 1.0 - soft_macs(profile, all_groups, kept) / sum(profile.values())

    def _keep(self, unit: ChannelGroup) -> int:
        # a unit that is a cut group gets the allocator's count; a soft-only unit (the stem, a
        # conv3 under scope inner) the uniform one, as the authors' single rate
        return self.n_keep(unit)

    def _select(self, model: nn.Module, units: list[ChannelGroup]) -> dict[str, torch.Tensor]:
        return {u.name: structured_topk(filter_norms(model, u, 2), self._keep(u), u.channel_groups) for u in units}

    def soft_prune(self, model: nn.Module) -> None:
        self.masks = self._select(model, self.units)
        apply_masks(model, self.units, self.masks, zero_norm=False)

    def on_train_start(self, model: nn.Module, steps_per_epoch: int = 0, epochs: int = 0) -> None:
        if self._soft_reduction is None:
            self.prepare(model)  # a caller that skipped prepare still gets the configured scope
        self.soft_prune(model)

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        self.soft_prune(model)

    def state(self) -> dict[str, Any]:
        return {f"mask.{k}": v for k, v in self.masks.items()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.masks = {k.removeprefix("mask."): v for k, v in state.items() if k.startswith("mask.")}

    def scores(self, model: nn.Module, ctx: SelectContext | None = None) -> dict[str, torch.Tensor]:
        # The cut's groups, scored afresh: after the last soft step the zeroed filters have
        # norm 0, so a single-producer group gets its last soft mask back; a residual group
        # (scope all) sums its producers' norms. This also covers a run with no pruning epoch.
        return {g.name: filter_norms(model, g, 2) for g in self.groups}

    def summary(self) -> dict[str, Any]:
        return {} if self._soft_reduction is None else {"soft_macs_reduction": self._soft_reduction}
