"""The properties docs/method_specs.md asks of ABP (§ABP) and ISTA (§ISTA); AutoPruner (§AutoPruner):
tests/test_autopruner.py."""

import copy

import pytest
import torch
import torchvision

from methods import gates, get_method_class
from methods.abp import BinaryAttention
from pipeline.surgery import apply_masks, find_groups, prune_model
from tests.lifecycle import calib, randomise_bn


# --- ABP -----------------------------------------------------------------------------------
def test_abp_gradients_reach_the_scores_through_the_estimator():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5)
    groups = find_groups(model, 16, "inner")
    abp = get_method_class("abp")(groups, 0.5, image_size=16)
    abp.prepare(model)
    att = next(a for _, a in gates.layers(model, groups))
    with torch.no_grad():
        att.score[:3] = -0.1  # three channels off
    x, y = calib(8, 16)[0]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for _, a in gates.layers(model, groups):
        assert a.score.grad is not None and a.score.grad.abs().sum() > 0
    assert (att.score.grad[:3] != 0).all()  # switched-off channels still get gradient


def test_abp_mean_mask_approaches_the_budget():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5)
    groups = find_groups(model, 16, "inner")
    abp = get_method_class("abp")(groups, 0.5, image_size=16)
    abp.prepare(model)
    opt = torch.optim.SGD([a.score for _, a in gates.layers(model, groups)], lr=0.01 * abp.options.score_lr_scale)
    on = []
    for _ in range(150):
        opt.zero_grad()
        abp.loss_term(model).backward()
        opt.step()
        on.append(float(torch.cat([(a.score > 0).float() for _, a in gates.layers(model, groups)]).mean()))
    assert on[0] > 0.9  # starts with (nearly) every channel on
    assert sum(on[-20:]) / 20 == pytest.approx(0.5, abs=0.1)  # the budget: keep = 1 - 0.5


def test_abp_a_switched_off_channel_can_switch_back_on():
    att = BinaryAttention(4, tau=0.5, init=0.5)
    with torch.no_grad():
        att.score[2] = -0.05
    x = torch.rand(8, 4, 3, 3) + 0.5  # the channel carries useful (positive) signal
    opt = torch.optim.SGD(att.parameters(), lr=0.5)
    assert att.mask()[2] == 0
    for _ in range(5):
        opt.zero_grad()
        (-att(x)[:, 2].mean()).backward()  # a loss that wants channel 2
        opt.step()
    assert att.mask()[2] == 1


# --- ISTA ----------------------------------------------------------------------------------
def test_ista_alpha_rescaling_leaves_the_function_unchanged():
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=5).eval()
    randomise_bn(model, shift=-0.3)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    ista = get_method_class("ista")(find_groups(model, 32, "inner"), 0.5, image_size=32, options={"alpha": 8.0})
    ista.prepare(model)
    assert not torch.equal(model.layer1[0].bn1.weight, before["layer1.0.bn1.weight"])  # it did rescale
    with torch.no_grad():
        assert ((model(x) - ref).abs().max() / ref.abs().max()) < 1e-5
    ista.finalize(model, {g.name: torch.ones(g.size, dtype=torch.bool) for g in ista.groups})
    for k, v in model.state_dict().items():
        assert torch.allclose(v.float(), before[k].float(), rtol=1e-5, atol=1e-6), k


def test_ista_reaches_exact_zeros_weighted_by_cost():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5)
    groups = find_groups(model, 16, "inner")
    with torch.no_grad():  # spread γ as training would (fresh BNs all start at γ = 1)
        for g in groups:
            bn = model.get_submodule(g.norms[0])
            bn.weight.copy_(torch.linspace(0.01, 0.3, bn.num_features))
    ista = get_method_class("ista")(groups, 0.5, image_size=16, options={"rho": 0.5})
    ista.prepare(model)
    assert len(set(round(w, 6) for w in ista.weights.values())) > 1  # per-layer cost weights differ
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    zeros = []
    for _ in range(6):
        ista.after_step(model, opt)
        zeros.append(sum(int((model.get_submodule(g.norms[0]).weight == 0).sum()) for g in groups))
    assert zeros[0] > 0 and zeros == sorted(zeros) and zeros[-1] > zeros[0]


def _zero_gamma(model, group, n):
    with torch.no_grad():
        model.get_submodule(group.norms[0]).weight[:n] = 0  # these channels now output ReLU(β)
    mask = torch.ones(group.size, dtype=torch.bool)
    mask[:n] = False
    return mask


def test_ista_folding_is_exact_before_a_1x1_conv_and_interior_exact_before_3x3():
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=5).eval()
    randomise_bn(model, shift=-0.3)
    groups = find_groups(model, 32, "inner")
    ista = get_method_class("ista")(groups, 0.5, image_size=32)
    g1x1 = next(g for g in groups if g.name == "layer1.0.conv2")  # consumer conv3 is 1×1
    g3x3 = next(g for g in groups if g.name == "layer1.0.conv1")  # consumer conv2 is 3×3
    x = torch.randn(2, 3, 32, 32)
    for g, exact in ((g1x1, True), (g3x3, False)):
        net = copy.deepcopy(model)
        masks = {g.name: _zero_gamma(net, g, 8)}
        consumer_bn = g.next_norm[g.consumers[0]]
        outs = {}

        def keep(name, outs=outs):
            return lambda m, i, o: outs.__setitem__(name, o)

        hook = net.get_submodule(consumer_bn).register_forward_hook(keep("ref"))
        with torch.no_grad():
            ref = net(x)  # γ = 0: the 8 channels are constants
        hook.remove()
        ista.groups = [g]
        ista.finalize(net, masks)
        apply_masks(net, [g], masks)
        pruned = prune_model(copy.deepcopy(net), [g], masks, 32)
        hook = pruned.get_submodule(consumer_bn).register_forward_hook(keep("cut"))
        with torch.no_grad():
            out = pruned(x)
        hook.remove()
        err = float((out - ref).abs().max() / ref.abs().max())
        interior = (outs["cut"] - outs["ref"])[..., 1:-1, 1:-1].abs().max()
        border = (outs["cut"] - outs["ref"]).abs().max()
        assert interior < 1e-4
        if exact:
            assert err < 1e-5 and border < 1e-4
        else:
            assert border > 1e-3  # the zero-padded border misses taps: measured, not hidden
