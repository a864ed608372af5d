"""Cheap calibration-loss probes: recompute only what follows the masked channels.

``lossvar`` asks, hundreds of times, "what is the calibration loss with these channels of one
group masked?". Masking a group changes nothing upstream of the first module it touches, so a
probe can start from the activation entering that module's block instead of from the image.
:class:`StagedForward` runs a ResNet-class model as its sequence of stages (stem, every
residual block, head) and keeps *one* cached activation of the calibration set, advanced
block by block as the probes move down the network (probes are asked in network order), so
memory stays at one activation set, not one per block.

Work is counted in MACs: a probe starting at block ``b`` costs the MACs of blocks ``b..end``;
dividing the total by one full forward's MACs gives "full-forward equivalents", a cost figure
that compares across hardware.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.measure import count_macs

Stage = tuple[str, Callable[[torch.Tensor], torch.Tensor]]


def _resnet_stages(model: nn.Module) -> list[Stage] | None:
    """torchvision's ResNet/ResNeXt/Wide-ResNet forward, as stages; None for other models."""
    needed = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")
    if not all(hasattr(model, n) for n in needed):
        return None
    stages: list[Stage] = [("", lambda x: model.maxpool(model.relu(model.bn1(model.conv1(x)))))]
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        for i, block in enumerate(getattr(model, layer)):
            stages.append((f"{layer}.{i}", block))
    stages.append(("fc", lambda x: model.fc(torch.flatten(model.avgpool(x), 1))))
    return stages


class StagedForward:
    """Calibration losses of one model, recomputed from a chosen stage onward."""

    def __init__(self, model: nn.Module, calib: list[tuple[torch.Tensor, torch.Tensor]], image_size: int,
                 info=None) -> None:
        self.model, self.calib, self.info = model, calib, info
        stages = _resnet_stages(model)
        if stages is not None and calib and not self._matches(stages):
            stages = None  # a model whose forward is not its stages: probe from the image
        self.stages: list[Stage] = stages or [("", model)]
        self._stage_macs = self._macs_per_stage(image_size)
        self.full_macs = float(sum(self._stage_macs))
        self.work_macs = 0.0  # everything run so far, for the full-forward-equivalent count
        self.probes = 0
        self._pos: int | None = None
        self._acts: list[torch.Tensor] = []
        self._total = self._samples()  # the whole calibration set, over all ranks
        if info is not None and info.distributed:
            n = torch.tensor([self._total], dtype=torch.int64, device=next(model.parameters()).device)
            dist.all_reduce(n)
            self._total = int(n.item())

    @torch.no_grad()
    def _matches(self, stages: list[Stage]) -> bool:
        x = self.calib[0][0][:2]
        y = x
        for _, fn in stages:
            y = fn(y)
        return torch.allclose(y, self.model(x), rtol=1e-4, atol=1e-5)

    @torch.no_grad()
    def _macs_per_stage(self, image_size: int) -> list[float]:
        if len(self.stages) == 1:
            return [float(count_macs(self.model, image_size))]
        device = next(self.model.parameters()).device
        x = torch.zeros(1, 3, image_size, image_size, device=device)
        macs = []
        for name, fn in self.stages:
            before = x
            x = fn(x)
            mod = self.model.get_submodule(name) if name not in ("", "fc") else None
            macs.append(float(_count_module_macs(mod, before) if mod is not None else 0.0))
        # the stem and head are small; give them their share so the total is the real total
        rest = float(count_macs(self.model, image_size)) - sum(macs)
        macs[0] += max(0.0, rest)
        return macs

    def start_of(self, module_names: list[str]) -> int:
        """The first stage that contains any of ``module_names`` (0 when unsure)."""
        if len(self.stages) == 1:
            return 0
        best = len(self.stages) - 1
        for name in module_names:
            for i, (stage, _) in enumerate(self.stages):
                if stage and (name == stage or name.startswith(stage + ".")):
                    best = min(best, i)
                    break
            else:
                return 0  # stem, head or an unknown module: start from the image
        return best

    @torch.no_grad()
    def prepare(self, start: int) -> None:
        """Have the (unmasked) activations entering stage ``start`` cached: call before masking."""
        if self._pos is None or self._pos > start:
            self._acts, self._pos = [x for x, _ in self.calib], 0
        while self._pos < start:
            self._acts = [self.stages[self._pos][1](a) for a in self._acts]
            self.work_macs += self._stage_macs[self._pos] * self._samples()
            self._pos += 1

    @torch.no_grad()
    def loss_from(self, start: int, fraction: float = 1.0) -> float:
        """Mean calibration loss, running stages ``start..end`` on the cached activations
        (``prepare(start)`` first); summed over ranks in float64, so every rank decides alike.

        ``fraction`` < 1: only the first ``ceil(fraction × total)`` samples of the calibration
        set's draw (a cheaper, noisier estimate for a coarse search; the same samples each time).
        The calibration set's layout (:func:`pipeline.data.loaders.calibration_set`) puts draw
        sample ``i`` on rank ``i % world``, in order, so that prefix is a prefix of every rank's
        share and the subset, like the full set, is the same whatever the number of ranks.
        Per-sample losses are summed in float64, so the batch split does not change the sum.
        """
        assert self._pos == start, "prepare(start) must come first"
        self.probes += 1
        device = next(self.model.parameters()).device
        acc = torch.zeros(2, dtype=torch.float64, device=device)
        left = self._share(math.ceil(fraction * self._total)) if fraction < 1 else self._samples()
        for a, (_, y) in zip(self._acts, self.calib, strict=True):
            if left <= 0:
                break
            a, y = a[:left], y[:left]
            left -= y.numel()
            for _, fn in self.stages[start:]:
                a = fn(a)
            acc[0] += F.cross_entropy(a.float(), y, reduction="none").double().sum()
            acc[1] += y.numel()
        self.work_macs += sum(self._stage_macs[start:]) * float(acc[1])
        if self.info is not None and self.info.distributed:
            dist.all_reduce(acc)
        return float(acc[0] / acc[1].clamp_min(1))

    def _share(self, first: int) -> int:
        """How many of the draw's first ``first`` samples this rank holds (sample i: rank i % world)."""
        rank, world = (self.info.rank, self.info.world) if self.info is not None else (0, 1)
        return max(0, -(-(first - rank) // world))

    def _samples(self) -> int:
        return sum(int(y.numel()) for _, y in self.calib)

    @property
    def full_forward_equivalents(self) -> float:
        """Work done ÷ one forward of (this rank's share of) the calibration set."""
        return self.work_macs / max(1.0, self.full_macs * self._samples())


def _count_module_macs(module: nn.Module, x: torch.Tensor) -> int:
    total = 0

    def hook(m, _inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            total += out.numel() // out.shape[0] * (m.in_channels // m.groups) * kh * kw
        elif isinstance(m, nn.Linear):
            total += out.numel() // out.shape[0] * m.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        module(x)
    finally:
        for h in handles:
            h.remove()
    return total
