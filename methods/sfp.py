"""Soft Filter Pruning — He et al., IJCAI 2018 (METHODS.md §1).

Before training and after every pruning-phase epoch, each group's ``floor(N·prune_ratio)``
filters of smallest L2 norm are set to zero. Only the conv filters are zeroed, as in the
authors' code: gradients and momentum are untouched and the BN keeps its γ and β, so a zeroed
filter gets gradient again and can come back the next epoch (the "soft").

Caveat seen in the tests: the gradient that revives a zeroed filter passes through the BN and
the ReLU. Its channel outputs exactly the BN shift β; where β ≤ 0 (β = 0 is the fresh-init
value) ReLU passes no gradient and the filter stays dead. Softness is real from a trained model
or once β has moved, not in the very first steps from scratch.

At the end the last masks decide. The hard prune then zeroes BN γ and β of the dropped
channels too (what physical removal computes), so the masked model and the cut model agree
exactly; the BN shift a soft-pruned channel carried is lost, and the fine-tune after surgery
re-learns it. Downsample 1×1 convs are skipped as the authors do (they sit in residual groups,
which the default ``scope: inner`` leaves alone).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from methods.base import Method, SelectContext, register_method
from pipeline.surgery import apply_masks, filter_norms, structured_topk


@register_method
class SoftFilterPruning(Method):
    name = "sfp"
    training_aware = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.masks: dict[str, torch.Tensor] = {}

    def _select(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {
            g.name: structured_topk(filter_norms(model, g, 2), self.n_keep(g), g.channel_groups) for g in self.groups
        }

    def soft_prune(self, model: nn.Module) -> None:
        self.masks = self._select(model)
        apply_masks(model, self.groups, self.masks, zero_norm=False)

    def on_train_start(self, model: nn.Module, steps_per_epoch: int = 0, epochs: int = 0) -> None:
        self.soft_prune(model)

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        self.soft_prune(model)

    def state(self) -> dict[str, Any]:
        return {f"mask.{k}": v for k, v in self.masks.items()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.masks = {k.removeprefix("mask."): v for k, v in state.items() if k.startswith("mask.")}

    def keep_masks(self, model: nn.Module, ctx: SelectContext | None = None) -> dict[str, torch.Tensor]:
        # After the last epoch's soft step the zeroed filters have norm 0, so re-selecting gives
        # the same masks; selecting afresh also covers a run with zero pruning epochs.
        return self.masks or self._select(model)
