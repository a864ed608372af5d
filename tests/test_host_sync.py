"""The training and evaluation loops read nothing back from the device per step (the host never
waits on the GPU): a per-step ``.item()`` makes the host wait until the GPU's queue has drained,
every step. The property is checked on CPU by counting every way a tensor's value reaches Python
while an epoch runs: the count must not grow with the epoch's number of steps. Plain training, each
training-aware method's hooks, and evaluation."""

from __future__ import annotations

import pytest
import torch
import torchvision

from methods import get_method_class, method_names
from pipeline.distributed import DistInfo
from pipeline.engine import evaluate, train_epoch
from pipeline.surgery import find_groups
from tests.helpers.factories import ListLoader

CPU = DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
# every way a tensor's value is copied to the host as Python data
READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture
def host_reads(monkeypatch):
    calls: list[str] = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def _loader(steps: int) -> ListLoader:
    return ListLoader(steps, batch=4, size=16, classes=10)


def _model_and_method(name: str | None):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    method = None
    if name is not None:
        method = get_method_class(name)(find_groups(model, 16), 0.5, image_size=16)
        method.prepare(model)
        method.on_train_start(model, steps_per_epoch=8, epochs=2)
    return model, method


def _reads_in_one_epoch(host_reads: list[str], steps: int, name: str | None) -> list[str]:
    from tests.helpers.ddp_check import ddp_backend

    model, method = _model_and_method(name)
    backend = ddp_backend(model, CPU)
    loader = _loader(steps)
    train_epoch(backend, _loader(1), CPU, method=method)  # first-step set-up is not per step
    host_reads.clear()
    stats = train_epoch(backend, loader, CPU, method=method)
    assert stats["steps"] == steps
    return list(host_reads)


TRAINING_AWARE = [n for n in method_names() if get_method_class(n).training_aware]


@pytest.mark.parametrize("name", [None, *TRAINING_AWARE])
def test_a_training_epoch_reads_the_device_a_fixed_number_of_times_whatever_its_steps(host_reads, name):
    short = _reads_in_one_epoch(host_reads, 2, name)
    long = _reads_in_one_epoch(host_reads, 6, name)
    assert sorted(long) == sorted(short), f"{len(long) - len(short)} more host reads in 4 more steps: {long}"
    assert len(short) <= 12  # the end-of-epoch summary only


def test_evaluation_reads_the_device_a_fixed_number_of_times_whatever_its_batches(host_reads):
    model, _ = _model_and_method(None)
    counts = []
    for steps in (2, 6):
        host_reads.clear()
        result = evaluate(model, _loader(steps), CPU)
        counts.append(len(host_reads))
        assert 0.0 <= result["val_top1"] <= result["val_top5"] <= 1.0
    assert counts[0] == counts[1], f"{counts[1] - counts[0]} more host reads in 4 more batches"


def test_the_counter_sees_a_per_step_read(host_reads):
    """The check above is only as good as the counter: a loop that reads a loss per step is caught."""
    model, _ = _model_and_method(None)
    for images, labels in _loader(3):
        float(torch.nn.functional.cross_entropy(model(images), labels).detach())
    assert host_reads.count("__float__") == 3
