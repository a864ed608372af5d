"""Surgery is exact on every named architecture, and MACs/params match independent counts."""

import copy

import pytest
import torch
import torch_pruning as tp
import torchvision
from torchvision.models import get_model_weights

from methods import keep_count
from pipeline.config import ARCHS
from pipeline.measure import count_macs, count_params
from pipeline.surgery import apply_masks, filter_norms, find_groups, prune_model, structured_topk, validate_masks
from tests.lifecycle import randomise_bn


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_equals_masked_and_counts_match(arch):
    torch.manual_seed(0)
    size = 64
    model = torchvision.models.get_model(arch, num_classes=10).eval()
    randomise_bn(model)
    scope = "all" if arch in ("resnet18", "resnext50_32x4d") else "inner"  # both scopes covered
    groups = find_groups(model, size, scope)
    assert groups, "no channel group found"
    masks = {g.name: structured_topk(filter_norms(model, g), keep_count(g.size, 0.4), g.channel_groups) for g in groups}
    masked = copy.deepcopy(model)
    apply_masks(masked, groups, masks)
    pruned = prune_model(copy.deepcopy(masked), groups, masks, size)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        # A trained classifier's logits are of order 10; random BN statistics make deep nets'
        # logits explode, so the classifier is rescaled to that range (both models alike).
        scale = 10.0 / masked(x).abs().max()
        for net in (masked, pruned):
            net.fc.weight.mul_(scale)
            net.fc.bias.mul_(scale)
        ref, out = masked(x), pruned(x)
    assert ref.abs().max() > 1.0  # not a degenerate all-zero comparison
    assert (ref - out).abs().max().item() < 1e-4
    # kept widths are what the masks said
    for g in groups:
        assert pruned.get_submodule(g.name).out_channels == int(masks[g.name].sum())
    # MACs and params against Torch-Pruning's own counter (an independent implementation)
    tp_macs, tp_params = tp.utils.count_ops_and_params(pruned, example_inputs=torch.randn(1, 3, size, size))
    assert count_params(pruned) == tp_params
    assert count_params(pruned) < count_params(model)
    ours = count_macs(pruned, size)
    assert ours < count_macs(model, size)
    # TP also counts BN/ReLU/pooling elementwise ops; conv+linear MACs must be within 2 % of it
    assert ours <= tp_macs and ours > 0.98 * tp_macs


@pytest.mark.parametrize("arch", ["resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_dense_macs_match_torchvision_reference(arch):
    model = torchvision.models.get_model(arch, num_classes=1000)
    reference = get_model_weights(arch).DEFAULT.meta["_ops"] * 1e9  # torchvision's published GFLOPS (MACs)
    assert count_macs(model, 224) == pytest.approx(reference, rel=0.01)
    assert count_params(model) == get_model_weights(arch).DEFAULT.meta["num_params"]


def test_inner_scope_leaves_residual_widths():
    model = torchvision.models.resnet50(num_classes=10)
    groups = find_groups(model, 64, "inner")
    assert len(groups) == 2 * 16  # conv1 and conv2 of each of the 16 bottlenecks
    assert all(not g.residual and len(g.producers) == 1 for g in groups)
    names = {g.name for g in groups}
    assert "layer1.0.conv1" in names and "layer1.0.conv2" in names and "layer1.0.conv3" not in names


def test_grouped_conv_masks_are_structured():
    model = torchvision.models.resnext50_32x4d(num_classes=10)
    groups = find_groups(model, 64, "inner")
    g = groups[0]
    assert g.channel_groups == 32
    mask = structured_topk(torch.rand(g.size), 64, g.channel_groups)
    per = mask.view(32, -1)
    assert (per == per[0]).all() and int(mask.sum()) == 64
    broken = mask.clone()
    broken[0] = ~broken[0]
    with pytest.raises(ValueError, match="group-structured"):
        validate_masks(groups, {g.name: broken})


def test_mask_validation_errors():
    model = torchvision.models.resnet18(num_classes=10)
    groups = find_groups(model, 32, "inner")
    g = groups[0]
    with pytest.raises(ValueError, match="keeps no channel"):
        validate_masks(groups, {g.name: torch.zeros(g.size, dtype=torch.bool)})
    with pytest.raises(ValueError, match="expected a bool tensor"):
        validate_masks(groups, {g.name: torch.ones(g.size + 1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="unknown channel group"):
        validate_masks(groups, {"nope": torch.ones(3, dtype=torch.bool)})


@pytest.mark.parametrize("n, ratio, round_to, expected", [(64, 0.3, 1, 45), (64, 0.5, 8, 32), (10, 0.99, 1, 1),
                                                          (64, 0.3, 8, 48), (7, 0.0, 1, 7), (64, 0.95, 8, 8)])
def test_keep_count(n, ratio, round_to, expected):
    assert keep_count(n, ratio, round_to) == expected
