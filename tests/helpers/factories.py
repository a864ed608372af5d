"""Small objects many tests build: kept here once, not re-written per test module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torchvision
from torch import nn

from methods import keep_count
from pipeline.config import Config, RegistryConfig, absolutize, load_config
from pipeline.data.errors import BadSampleLog
from pipeline.spec import make_spec, save_pruned
from pipeline.surgery import apply_masks, filter_norms, find_groups, prune_model, structured_topk


class ListLoader:
    """A :class:`~pipeline.data.contract.BatchLoader` over fixed batches: ``n`` seeded batches of
    ``batch`` random ``size``² images and labels below ``classes``, the same every epoch."""

    max_bad_fraction = None

    def __init__(self, n: int = 3, batch: int = 4, size: int = 8, classes: int = 3, seed: int = 0,
                 device: torch.device | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        self.batches = [(torch.randn(batch, 3, size, size, generator=g).to(device or "cpu"),
                         torch.randint(0, classes, (batch,), generator=g).to(device or "cpu")) for _ in range(n)]
        self.num_classes = classes
        self.errors = BadSampleLog()

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.batches)


class LoaderView:
    """Base of a test's view of a real loader (the first ``n`` batches, a counting pass-through):
    the contract's attributes and ``set_epoch`` are the wrapped loader's, so the engine sees the
    same bad-sample log and limit through the view."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.num_classes = loader.num_classes
        self.errors, self.max_bad_fraction = loader.errors, loader.max_bad_fraction

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


def pruned_model(ratio: float = 0.5, arch: str = "resnet18", size: int = 32, classes: int = 10,
                 random_bn: bool = False) -> nn.Module:
    """A seeded torchvision ``arch`` with ``ratio`` of every inner group's channels cut by L2 norm
    (eval mode). ``random_bn``: BatchNorm statistics and affine terms drawn at random first, so
    that folding or cutting them has something to get wrong."""
    from tests.lifecycle import randomise_bn

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=classes).eval()
    if random_bn:
        randomise_bn(model)
    groups = find_groups(model, size, "inner")
    masks = {g.name: structured_topk(filter_norms(model, g), keep_count(g.size, ratio, 1, g.channel_groups),
                                     g.channel_groups) for g in groups}
    apply_masks(model, groups, masks)
    return prune_model(model, groups, masks, size)


def saved_pruned_model(folder: Path, ratio: float = 0.5, arch: str = "resnet18", size: int = 32,
                       classes: int = 10) -> Path:
    """:func:`pruned_model` saved as a pruned-model folder (spec + safetensors); its path."""
    model = pruned_model(ratio, arch, size, classes)
    return save_pruned(model, folder, make_spec(model, arch, classes, image_size=size))


def demo_config(tmp_path: Path, *overrides: str, store: bool = False) -> Config:
    """The demo config (``configs/demo.yaml``) writing under ``tmp_path``: ``output_dir`` is
    ``tmp_path/out`` and MLflow is off, or (``store``) a SQLite store ``tmp_path/mlflow.db``;
    ``overrides`` (dotted ``key=value``) come last and win."""
    from tests.conftest import DEMO

    registry = [f"registry.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"] if store else ["registry.enabled=false"]
    return absolutize(load_config(DEMO, [f"output_dir={tmp_path / 'out'}", *registry, *overrides]))


def sqlite_store(folder: Path, experiment: str = "t", model_name: str = "m") -> RegistryConfig:
    """A registry section for a fresh SQLite MLflow store in ``folder``."""
    return RegistryConfig(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}", experiment=experiment, model_name=model_name)


def logged_pruned_model(tmp_path: Path, ratio: float, top1: float, name: str) -> tuple[str, nn.Module]:
    """A seeded resnet50 at 64² with ``ratio`` of its inner channels cut (dense at 0), logged as
    the ``model/`` folder of an MLflow run named ``name`` with metric ``val_top1``; (run id, model)."""
    import mlflow

    if ratio > 0:
        model = pruned_model(ratio, "resnet50", 64)
    else:
        torch.manual_seed(0)
        model = torchvision.models.resnet50(num_classes=10).eval()
    folder = save_pruned(model, tmp_path / name, make_spec(model, "resnet50", 10, image_size=64))
    with mlflow.start_run(run_name=name) as run:
        mlflow.log_artifacts(str(folder), artifact_path="model")
        mlflow.log_metric("val_top1", top1)
    return run.info.run_id, model


def macs_timer(noise=None):
    """A deterministic clock: a forward pass 'takes' time in proportion to the model's MACs, so
    decisions on measured speed are tested without depending on this machine's speed or load."""
    import random

    from pipeline.measure import count_macs

    cache, rng = {}, random.Random(0)

    def timer(model, x):
        if id(model) not in cache:  # the model is kept: a freed model's id can be reused by the next one
            cache[id(model)] = (model, count_macs(model, x.shape[-1]) * 1e-9)
        return cache[id(model)][1] * (noise(rng) if noise else 1.0)

    return timer


def method_step(method, model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                labels: torch.Tensor) -> None:
    """One training step as the engine takes it: the task loss plus the method's own term,
    backward, the optimizer step, then the method's ``after_step``."""
    model.train()
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    extra = method.loss_term(model)
    loss = loss + extra if extra is not None else loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    method.after_step(model, optimizer)
