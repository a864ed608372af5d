"""Balanced pruning at a preset loss variation (METHODS.md §3)."""

import pytest
import torch
import torchvision

from methods import SelectContext, get_method_class
from pipeline.engine import recalibrate_bn
from pipeline.measure import count_macs
from pipeline.surgery import apply_masks, find_groups, macs_after, macs_profile, prune_model
from tests.lifecycle import calib


@pytest.fixture(scope="module")
def net():
    """A ResNet-18 fitted to its calibration batch. On an untrained net, masking channels hardly
    moves (or even lowers) the loss, so any δ prunes most of every group: the criterion needs
    a model whose channels matter."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5)
    data = calib(32, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(30):
        x, y = data[0]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    recalibrate_bn(model, data)
    model.eval()
    return model, find_groups(model, 32, "inner"), SelectContext(calib=data, image_size=32)


def test_rate_is_monotone_in_delta(net):
    model, groups, ctx = net
    previous = None
    for delta in (1e-4, 1e-3, 1e-2, 1e-1, 1.0):
        m = get_method_class("lossvar")(groups, 0.0, options={"delta": delta}, image_size=32)
        m.keep_masks(model, ctx)
        rates = m.rates
        assert all(0.0 <= r < 1.0 for r in rates.values())
        if previous is not None:
            assert all(rates[k] >= previous[k] for k in rates), (delta, rates, previous)
        previous = rates
    assert any(r > 0 for r in previous.values())


@pytest.mark.parametrize("target", [0.3, 0.5])
def test_delta_search_lands_on_the_target_macs_reduction(net, target):
    model, groups, ctx = net
    m = get_method_class("lossvar")(groups, 0.0, options={"target_macs_reduction": target}, image_size=32)
    masks = m.keep_masks(model, ctx)
    s = m.summary()
    assert s["loss_evaluations"] > 0 and s["delta"] > 0
    # measured on the real cut, not on the method's own estimate
    pruned = prune_model(_copy_masked(model, groups, masks), groups, masks, 32)
    reduction = 1 - count_macs(pruned, 32) / count_macs(model, 32)
    assert reduction == pytest.approx(target, abs=0.01)
    assert s["macs_reduction_found"] == pytest.approx(reduction, abs=1e-6)  # analytic MACs are exact


def test_analytic_macs_match_the_cut_model(net):
    model, groups, _ = net
    kept = {g.name: g.size // 3 for g in groups}
    masks = {g.name: torch.arange(g.size) < kept[g.name] for g in groups}
    pruned = prune_model(_copy_masked(model, groups, masks), groups, masks, 32)
    assert macs_after(macs_profile(model, 32), groups, kept) == count_macs(pruned, 32)


def test_evaluations_are_cached(net):
    model, groups, ctx = net
    m = get_method_class("lossvar")(groups, 0.0, options={"delta": 0.05}, image_size=32)
    m.keep_masks(model, ctx)
    first = m.evaluations
    m.keep_masks(model, ctx)  # the same δ again: only the dense loss is recomputed
    assert m.evaluations == first + 1


def test_options_are_validated():
    # the launcher's check_config validates method options (the core config knows no method)
    from launch.recipe import check_config
    from pipeline.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="prune.options.lossvar"):
        check_config(build_config({"prune": {"method": "lossvar",
                                             "options": {"lossvar": {"delta": 0.1, "target_macs_reduction": 0.5}}}}))
    with pytest.raises(ConfigError, match="prune.options.lossvar.delta"):
        check_config(build_config({"prune": {"method": "lossvar", "options": {"lossvar": {"delta": -1}}}}))


def _copy_masked(model, groups, masks):
    import copy

    m = copy.deepcopy(model)
    apply_masks(m, groups, masks)
    return m
