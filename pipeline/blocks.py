"""Removing whole residual blocks: which blocks can go, what each costs, and the cut.

Only blocks whose shortcut is the identity (``downsample is None``) can be removed
(:func:`identity_blocks`). torchvision's blocks compute ``relu(x + F(x))``, and their input
``x`` is already the output of a ReLU (the previous block's, or the stem's ReLU then max-pool),
so ``x >= 0``. With the branch ``F`` bypassed the block computes ``relu(x + 0) = relu(x) = x``
exactly (``x + 0.0 == x`` in floating point, and ReLU leaves non-negative values as they are):
the block *is* the identity, and :func:`remove_blocks` replaces it with ``nn.Identity()``. The
"masked" form of the same model, :func:`branch_zeroed`, makes the branch output exactly zero
(the block's last BatchNorm returns zeros) and is the reference the removal is tested against.

How the recipe uses it (docs/architecture.md): on the dense model, before the channel groups are
found, ``k = block_count(cfg.prune.blocks, len(identity_blocks(model)), arch)``, then
``scores = block_scores(model, identity_blocks(model), calib, info)``,
``chosen = choose_blocks(scores, k)`` and ``remove_blocks(model, chosen)``; ``find_groups``,
the method and ``prune_model`` then run on the model with those blocks gone, and
:func:`pipeline.spec.make_spec` records them as ``removed_blocks``.

Costs are calibration-loss rises, computed like ``methods/staged.py`` does for channels but
here, in ``pipeline``, which may not import ``methods`` (docs/architecture.md, the layers): the
model runs as its stages (stem, blocks, head), one cached activation of the calibration set is
advanced block by block in network order, and bypassing block ``b`` only runs the stages after
``b`` on the activation entering ``b`` (which *is* the bypassed block's output). All the probes
together cost one forward for the cache, one for the base loss, and the tails.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.config import ConfigError
from pipeline.errors import PrunepipeError
from pipeline.spec import downsamples, identity_blocks, removed_blocks, replace_by_identity

if TYPE_CHECKING:
    from pipeline.distributed import DistInfo

__all__ = ["BlockError", "block_count", "block_scores", "branch_zeroed", "choose_blocks", "identity_blocks",
           "remove_blocks", "removed_blocks"]

Batch = tuple[torch.Tensor, torch.Tensor]


class BlockError(PrunepipeError, ValueError):
    """A block name that is not an identity-shortcut residual block of the model."""


def check_blocks(model: nn.Module, names: Sequence[str], what: str = "blocks") -> list[str]:
    """``names`` as a list, each an identity-shortcut block of ``model``, none twice; otherwise a
    one-line :class:`BlockError` naming the first bad entry."""
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise BlockError(f"{what}: expected a list of block names such as 'layer3.1', got {names!r:.80}")
    allowed = set(identity_blocks(model))
    gone = set(removed_blocks(model))
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise BlockError(f"{what}: {name!r} is listed twice")
        seen.add(name)
        if name in allowed:
            continue
        if name in gone:
            raise BlockError(f"{what}: {name!r} is already removed")
        if downsamples(model, name):
            raise BlockError(f"{what}: {name!r} downsamples (its shortcut is not the identity: input and output "
                             "shapes differ), so it cannot be removed")
        raise BlockError(f"{what}: {name!r:.80} is not a residual block of this model with an identity shortcut "
                         f"({len(allowed)} are; pipeline.blocks.identity_blocks lists them)")
    return list(names)


def remove_blocks(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """Replace each named identity-shortcut block by ``nn.Identity()`` (in place; returns
    ``model``). Every name is checked before anything changes (:func:`check_blocks`)."""
    replace_by_identity(model, check_blocks(model, names))
    return model


def _last_norm(block: nn.Module) -> nn.Module:
    """The BatchNorm that ends a block's residual branch (BasicBlock ``bn2``, Bottleneck ``bn3``)."""
    norms = [m for name, m in block.named_children() if name != "downsample" and isinstance(m, nn.BatchNorm2d)]
    return norms[-1]


@contextlib.contextmanager
def branch_zeroed(model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """Within the block, each named block's residual branch outputs exactly zero (its last
    BatchNorm returns zeros; the weights are not touched), so the block computes
    ``relu(x + 0) = x``: the masked form of :func:`remove_blocks`, for checking it."""
    handles = [_last_norm(model.get_submodule(n)).register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
               for n in check_blocks(model, names)]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


# --- scores -------------------------------------------------------------------------------------

Stage = tuple[str, Callable[[torch.Tensor], torch.Tensor]]


def _stages(model: nn.Module) -> list[Stage] | None:
    """torchvision's ResNet forward as stages (stem, each block, head); None for other models."""
    needed = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")
    if not all(hasattr(model, n) for n in needed):
        return None
    stages: list[Stage] = [("", lambda x: model.maxpool(model.relu(model.bn1(model.conv1(x)))))]
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        stages += [(f"{layer}.{i}", block) for i, block in enumerate(getattr(model, layer))]
    stages.append(("fc", lambda x: model.fc(torch.flatten(model.avgpool(x), 1))))
    return stages


def _run(stages: list[Stage], x: torch.Tensor) -> torch.Tensor:
    for _, fn in stages:
        x = fn(x)
    return x


def _distributed(info: DistInfo | None) -> bool:
    if info is not None:
        return info.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _mean_loss(outputs: Iterator[tuple[torch.Tensor, torch.Tensor]], distributed: bool,
               device: torch.device) -> float:
    """Mean cross-entropy over (logits, labels) pairs: per-sample losses summed in float64 and,
    across ranks, all-reduced with the sample count, so every rank gets the same number."""
    acc = torch.zeros(2, dtype=torch.float64, device=device)
    for logits, y in outputs:
        acc[0] += F.cross_entropy(logits.float(), y, reduction="none").double().sum()
        acc[1] += y.numel()
    if distributed:
        dist.all_reduce(acc)
    return float(acc[0] / acc[1].clamp_min(1))


@torch.no_grad()
def block_scores(model: nn.Module, blocks: Sequence[str] | None, calib: list[Batch],
                 info: DistInfo | None = None) -> dict[str, float]:
    """The calibration loss rise when each block alone is bypassed (removed): ``loss(without b)
    - loss(model)``, the loss being the mean cross-entropy over the calibration set (``calib``:
    this rank's ``(images, labels)`` batches; with several ranks the sums are all-reduced in
    float64, so every rank gets the same scores and chooses the same blocks).

    ``blocks``: identity-shortcut blocks of ``model`` (None: all of them). The model is run in
    eval mode (its mode is restored after). Returned in network order. A rise can be negative
    (bypassing a block may lower the loss)."""
    names = check_blocks(model, identity_blocks(model) if blocks is None else blocks)
    if not calib:
        raise BlockError("block scores need a calibration set (no batch given)")
    device = next(model.parameters()).device
    distributed = _distributed(info)
    was_training = model.training
    model.eval()
    try:
        stages = _stages(model)
        if stages is not None and not torch.allclose(_run(stages, calib[0][0][:2]), model(calib[0][0][:2]),
                                                     rtol=1e-4, atol=1e-5):
            stages = None  # a forward that is not torchvision's: probe each block from the image
        if stages is None:
            return _scores_full(model, names, calib, distributed, device)
        index = {name: i for i, (name, _) in enumerate(stages)}
        names.sort(key=index.__getitem__)
        base = _mean_loss(((_run(stages, x), y) for x, y in calib), distributed, device)
        acts, pos, scores = [x for x, _ in calib], 0, {}
        for name in names:
            i = index[name]
            while pos < i:  # advance the one cached activation set to the input of block i
                acts = [stages[pos][1](a) for a in acts]
                pos += 1
            tail = stages[i + 1:]  # block i bypassed: its input is its output
            scores[name] = _mean_loss(((_run(tail, a), y) for a, (_, y) in zip(acts, calib, strict=True)),
                                      distributed, device) - base
        return scores
    finally:
        model.train(was_training)


def _scores_full(model: nn.Module, names: list[str], calib: list[Batch], distributed: bool,
                 device: torch.device) -> dict[str, float]:
    """The same scores by full forwards, each block bypassed by :func:`branch_zeroed`."""
    base = _mean_loss(((model(x), y) for x, y in calib), distributed, device)
    scores = {}
    for name in names:
        with branch_zeroed(model, [name]):
            scores[name] = _mean_loss(((model(x), y) for x, y in calib), distributed, device) - base
    return scores


_BLOCK_NAME = re.compile(r"layer(\d+)\.(\d+)")


def _network_key(name: str, position: int) -> tuple[int, int, int]:
    m = _BLOCK_NAME.fullmatch(name)
    return (int(m[1]), int(m[2]), position) if m else (1 << 30, 0, position)


def choose_blocks(scores: dict[str, float], n: int) -> list[str]:
    """The ``n`` blocks whose removal raises the loss least (ties: the earlier block in the
    network; a NaN score last), returned in network order."""
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= len(scores):
        raise BlockError(f"choose_blocks: n = {n!r}; expected a whole number in 0..{len(scores)}")
    keys = {name: _network_key(name, i) for i, name in enumerate(scores)}
    ranked = sorted(scores, key=lambda b: (math.isnan(scores[b]), scores[b], keys[b]))
    return sorted(ranked[:n], key=keys.__getitem__)


def block_count(value: Any, available: int, arch: str = "the model") -> int:
    """How many blocks ``prune.blocks`` asks for: a whole number ``N`` (0 keeps every block;
    at most ``available``, the number of identity-shortcut blocks), or a fraction in (0, 1) of
    the ``available`` ones, rounded down. Anything else is a one-line ConfigError naming
    ``prune.blocks``."""
    where = f"prune.blocks = {value!r}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: expected a number of blocks or a fraction in (0, 1)")
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{where}: expected a number of blocks or a fraction in (0, 1)")
        if value >= 1:
            if value != int(value):
                raise ConfigError(f"{where}: a number of blocks is a whole number; a fraction lies below 1")
            value = int(value)
        else:
            # rounded down; the epsilon keeps 0.29 × 100 (28.999...) at 29
            return math.floor(value * available + 1e-9)
    if value < 0:
        raise ConfigError(f"{where}: expected a number of blocks (0 or more) or a fraction in (0, 1)")
    if value > available:
        raise ConfigError(f"{where}: {arch} has only {available} blocks that can be removed "
                          "(those with an identity shortcut)")
    return value
