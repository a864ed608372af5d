"""Torch-Pruning's own criteria as peers, at the same per-group rates as every other method.

- ``tp_magnitude``: ``GroupMagnitudeImportance`` (L2 over every parameter slice of the group,
  Torch-Pruning's MagnitudePruner criterion).
- ``tp_bnscale``: ``BNScaleImportance`` (|γ|, network slimming). With pruning-phase epochs it
  also trains with the slimming penalty ``reg · Σ|γ|`` on the groups' BNs, as
  Torch-Pruning's BNScalePruner regularises; without, it is one-shot by |γ|.

The importance comes from Torch-Pruning on its own traced groups; the count kept per group and
the cut are prunepipe's, so the comparison isolates the criterion.
"""

from __future__ import annotations

from typing import Any

import torch
import torch_pruning as tp
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from methods.base import Method, SelectContext, register_method
from pipeline.surgery import example_input


class _TPImportance(Method):
    def importance(self) -> Any:
        raise TypeError("subclasses name their Torch-Pruning importance")

    def scores(self, model: nn.Module, ctx: SelectContext | None = None) -> dict[str, torch.Tensor]:
        was_training = model.training
        model.eval()
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_input(self.image_size, device=next(model.parameters()).device),
                verbose=False)
        model.train(was_training)
        imp = self.importance()
        out = {}
        with torch.no_grad():
            for g in self.groups:
                root = model.get_submodule(g.name)
                group = dg.get_pruning_group(root, tp.prune_conv_out_channels, idxs=list(range(g.size)))
                out[g.name] = imp(group).detach().double().cpu()
        return out


@register_method
class TPMagnitude(_TPImportance):
    """Torch-Pruning's group L2 magnitude."""

    name = "tp_magnitude"

    def importance(self) -> Any:
        return tp.importance.GroupMagnitudeImportance(p=2)


class BNScaleOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reg: float = Field(1e-4, ge=0)  # slimming penalty during pruning-phase epochs


@register_method
class TPBNScale(_TPImportance):
    """Torch-Pruning's BN-scale criterion, with the slimming penalty while training."""

    name = "tp_bnscale"
    training_aware = True  # uses prune.epochs for sparse training; with 0 epochs, one-shot
    Options = BNScaleOptions

    def importance(self) -> Any:
        return tp.importance.BNScaleImportance()

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        gammas = [model.get_submodule(n).weight.abs().sum() for g in self.groups for n in g.norms]
        return self.options.reg * torch.stack(gammas).sum() if gammas else None
