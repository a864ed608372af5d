"""Every registered method, and SFP's soft behaviour (docs/method_specs.md §SFP)."""

import copy

import pytest
import torch
import torchvision

from methods import get_method_class, keep_count, method_names
from pipeline.surgery import apply_masks, find_groups, prune_model
from tests.lifecycle import cut_equals_masked, randomise_bn, run_lifecycle


@pytest.fixture(scope="module")
def resnet18_groups():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5)
    return model, find_groups(model, 32, "inner")


@pytest.mark.parametrize("name", method_names())
@pytest.mark.parametrize("arch", ["resnet18", "resnext50_32x4d"])
def test_every_method_keeps_the_promised_count_and_cuts_exactly(name, arch):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=5)
    # fresh BNs (β = 0, mean 0) make a masked channel 0 whether or not its BN is zeroed:
    # random statistics make "cutting equals masking" a real check (as the surgery tests do)
    randomise_bn(model)
    twin = copy.deepcopy(model)
    method, groups, masks = run_lifecycle(name, model)
    assert set(masks) == {g.name for g in groups}
    for g in groups:
        kept = int(masks[g.name].sum())
        if method.uniform_rate:
            assert kept == keep_count(g.size, 0.4, 1, g.channel_groups)
        assert 1 <= kept <= g.size and kept % g.channel_groups == 0
    # deterministic: a second instance from the same start (another rank) decides the same
    _, _, again = run_lifecycle(name, twin)
    assert all(torch.equal(masks[k], again[k]) for k in masks)
    # the plain architecture is back, and cutting equals masking
    assert not any("GatedNorm" in type(m).__name__ for m in model.modules())
    assert cut_equals_masked(model, groups, masks)


def test_round_to_gives_multiples(resnet18_groups):
    model, groups = resnet18_groups
    masks = get_method_class("l1")(groups, 0.3, round_to=8).keep_masks(model)
    assert all(int(m.sum()) % 8 == 0 for m in masks.values())


def test_random_differs_from_norm_and_by_seed(resnet18_groups):
    model, groups = resnet18_groups
    l1 = get_method_class("l1")(groups, 0.5).keep_masks(model)
    r1 = get_method_class("random")(groups, 0.5, seed=1).keep_masks(model)
    r2 = get_method_class("random")(groups, 0.5, seed=2).keep_masks(model)
    assert any(not torch.equal(l1[k], r1[k]) for k in l1)
    assert any(not torch.equal(r1[k], r2[k]) for k in r1)


def _zero_filters(model, group):
    w = model.get_submodule(group.producers[0]).weight.detach()
    return (w.flatten(1).abs().sum(1) == 0)


def test_sfp_zeroes_exactly_floor_n_r_and_filters_come_back():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5)
    groups = find_groups(model, 32, "inner")
    # a trained net's BN shifts are non-zero; with β = 0 (fresh init) a zeroed channel sits at
    # ReLU's kink and gets no gradient (see the SFP docstring)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.bias.uniform_(0.1, 0.5)
    sfp = get_method_class("sfp")(groups, 0.3)
    sfp.on_train_start(model)
    for g in groups:
        assert int(_zero_filters(model, g).sum()) == int(g.size * 0.3)
    # a training step: gradients reach the zeroed filters (only the filter is zeroed, not BN)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    loss = model(torch.randn(8, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    opt.step()
    g = groups[0]
    zero_before = sfp.masks[g.name].logical_not()
    assert not _zero_filters(model, g)[zero_before].all(), "zeroed filters got no gradient: pruning is not soft"
    # make one zeroed filter the strongest: after the epoch it must be kept (recoverable)
    idx = int(zero_before.nonzero()[0])
    with torch.no_grad():
        w = model.get_submodule(g.producers[0]).weight
        w[idx] = w[sfp.masks[g.name]][0] * 3.0
    sfp.on_epoch_end(model, 0)
    assert bool(sfp.masks[g.name][idx])
    for g in groups:
        assert int(_zero_filters(model, g).sum()) == int(g.size * 0.3)
    # the hard prune is exact against the masked model
    masks = sfp.keep_masks(model)
    masked = copy.deepcopy(model).eval()
    apply_masks(masked, groups, masks)
    pruned = prune_model(copy.deepcopy(masked), groups, masks, 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = masked(x)
        # the step above (BN over an all-zero channel scales gradients by 1/sqrt(eps)) leaves
        # this untrained net with large logits: compare relative to their size
        assert ((ref - pruned(x)).abs().max() / ref.abs().max()) < 1e-6


def test_sfp_state_round_trip(resnet18_groups):
    model, groups = resnet18_groups
    a = get_method_class("sfp")(groups, 0.5)
    a.on_train_start(copy.deepcopy(model))
    b = get_method_class("sfp")(groups, 0.5)
    b.load_state(a.state())
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
