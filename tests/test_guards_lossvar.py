"""lossvar's per-group search checked from outside: each group's k against the calibration loss
computed directly (a full forward, that group alone masked), and the count of loss evaluations
against the distinct (group, k) probes asked for."""

import copy

import pytest
import torch

from methods import SelectContext, get_method_class
from methods.lossvar import LossVariation
from methods.staged import StagedForward
from pipeline.surgery import find_groups
from tests.lifecycle import fitted_resnet18

DELTA = 0.05


@pytest.fixture(scope="module")
def fitted():
    """A ResNet-18 fitted to its calibration batch, so that masking channels raises the loss."""
    model, data = fitted_resnet18(16)
    return model, find_groups(model, 16, "inner"), data


@pytest.fixture(scope="module")
def searched(fitted):
    """One δ-search over every group, with every real loss evaluation and every probe recorded."""
    model, groups, data = fitted
    asked: list[tuple[str, int]] = []
    evaluated = 0
    with pytest.MonkeyPatch.context() as mp:
        loss_from, loss_masked = StagedForward.loss_from, LossVariation._loss_masked

        def counting_loss_from(self, start, *args):
            nonlocal evaluated
            evaluated += 1
            return loss_from(self, start, *args)

        def recording_loss_masked(self, model, ctx, g, order, k, *args):
            asked.append((g.name, k, *args))
            return loss_masked(self, model, ctx, g, order, k, *args)

        mp.setattr(StagedForward, "loss_from", counting_loss_from)
        mp.setattr(LossVariation, "_loss_masked", recording_loss_masked)
        method = get_method_class("lossvar")(groups, 0.0, options={"delta": DELTA}, image_size=16)
        masks = method.keep_masks(model, SelectContext(calib=data, image_size=16))
    return method, masks, asked, evaluated


@torch.no_grad()
def _direct_loss(model, group, drop: torch.Tensor, data) -> float:
    """Mean cross-entropy of the calibration set through the whole model, ``drop`` channels of
    ``group`` masked (filters, BN γ and β) on a copy."""
    net = copy.deepcopy(model).eval()
    for name in group.producers + group.norms:
        m = net.get_submodule(name)
        for p in (m.weight, m.bias):
            if p is not None:
                p[drop] = 0
    total = count = 0.0
    for x, y in data:
        total += float(torch.nn.functional.cross_entropy(net(x), y, reduction="sum"))
        count += y.numel()
    return total / count


def test_each_groups_k_is_a_threshold_of_its_own_loss_curve(fitted, searched):
    model, groups, data = fitted
    method, masks, _, _ = searched
    base = _direct_loss(model, groups[0], torch.zeros(0, dtype=torch.long), data)
    orders = method._orders(model)
    ks = {g.name: int((~masks[g.name]).sum()) for g in groups}
    assert len(set(ks.values())) > 2, ks  # the groups got different rates: a shared answer would show
    eps = 1e-5  # staged (cached activations) vs full forward: float rounding only
    for g in groups:
        k, step = ks[g.name], method._step(g)
        # the masked channels are the k weakest of this group's own order
        assert torch.equal(torch.sort(orders[g.name][:k]).values, torch.nonzero(~masks[g.name]).flatten())
        assert _direct_loss(model, g, orders[g.name][:k], data) - base <= DELTA + eps, g.name
        if k + step <= g.size - max(method.options.min_keep, step):  # one more step must break δ
            assert _direct_loss(model, g, orders[g.name][:k + step], data) - base > DELTA - eps, (g.name, k)


def test_every_probe_is_evaluated_once_and_counted(searched):
    method, _, asked, evaluated = searched
    distinct = set(asked)
    # more than one group probed the same k: a cache keyed by k alone would answer from another group
    by_k: dict[int, set[str]] = {}
    for name, k in distinct:
        by_k.setdefault(k, set()).add(name)
    assert any(len(names) > 1 for names in by_k.values())
    assert evaluated == 1 + len(distinct)  # the dense loss, then each (group, k) once
    assert method.evaluations == evaluated
    assert method.summary()["loss_evaluations"] == evaluated
