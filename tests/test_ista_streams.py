"""ISTA at ``prune.scope: all`` (docs/method_specs.md §ISTA): a group lasso over the BNs writing
each residual stream, its cost weights, and the folding of a stream channel whose scales are all
0 — exact before 1×1 convs and the fc, interior-exact before zero-padded k×k convs."""

import copy

import pytest
import torch
import torchvision

from methods import get_method_class
from methods.ista import group_prox
from pipeline.surgery import apply_masks, find_groups, prune_model
from tests.lifecycle import calib, randomise_bn


def _ista(model, size, ratio=0.5, round_to=1, **options):
    groups = find_groups(model, size, "all")
    return get_method_class("ista")(groups, ratio, round_to=round_to, image_size=size, options=options)


def _streams(groups):
    return [g for g in groups if len(g.norms) > 1]


def _gammas(model, group):
    return torch.stack([model.get_submodule(n).weight.detach().clone() for n in group.norms])


def _spread(model, groups, seed=0):
    """γ spread as training would leave them (fresh BNs all start at γ = 1), every writer apart."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for g in groups:
            for n in g.norms:
                bn = model.get_submodule(n)
                bn.weight.copy_(torch.rand(bn.num_features, generator=gen) * 0.3 + 0.01)


def _logits(net, x):
    with torch.no_grad():
        return net(x)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# --- the proximal step ------------------------------------------------------------------------
def test_group_prox_is_the_soft_threshold_for_one_bn_and_shrinks_the_norm_for_several():
    torch.manual_seed(0)
    net = torch.nn.Sequential(*(torch.nn.BatchNorm2d(16) for _ in range(3)))
    with torch.no_grad():
        for bn in net:
            bn.weight.copy_(torch.randn(16) * 0.2)
    gamma = net[0].weight.detach().clone()
    shrink = 0.1
    group_prox(net, ["0"], shrink)  # m = 1: the paper's sign(γ) · max(|γ| − s, 0)
    assert torch.allclose(net[0].weight, gamma.sign() * (gamma.abs() - shrink).clamp_min(0), atol=1e-7)
    assert int((net[0].weight == 0).sum()) == int((gamma.abs() <= shrink).sum()) > 0

    v = torch.stack([net[i].weight.detach().clone() for i in (1, 2)]).double()
    norm = v.norm(dim=0)
    group_prox(net, ["1", "2"], shrink)
    after = torch.stack([net[i].weight.detach() for i in (1, 2)]).double()
    survive = norm > shrink
    assert survive.any() and (~survive).any()
    assert (after[:, ~survive] == 0).all()  # both scales of a channel reach 0 in the same step
    assert torch.allclose(after.norm(dim=0)[survive], norm[survive] - shrink, atol=1e-6)  # the norm shrinks by s
    # the direction is kept: a group lasso, not a per-BN threshold
    assert torch.allclose(after[:, survive] / after.norm(dim=0)[survive], v[:, survive] / norm[survive], atol=1e-5)


def test_inner_groups_at_scope_all_keep_the_scalar_soft_threshold_bit_for_bit():
    model = torchvision.models.resnet18(num_classes=3)
    ista = _ista(model, 16, cost_weighted=False, rho=0.5)
    _spread(model, ista.groups)
    inner = [g for g in ista.groups if len(g.norms) == 1]
    before = {g.name: _gammas(model, g)[0] for g in inner}
    ista.after_step(model, torch.optim.SGD(model.parameters(), lr=0.1))
    shrink = 0.1 * 0.5 * 1.0
    for g in inner:
        gamma = before[g.name]
        assert torch.equal(_gammas(model, g)[0], gamma.sign() * (gamma.abs() - shrink).clamp_min(0))


def test_the_scales_of_a_stream_channel_reach_zero_together():
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=5)
    ista = _ista(model, 32, rho=0.5)
    ista.prepare(model)
    streams = _streams(ista.groups)
    assert len(streams) == 4 and all(g.residual for g in streams)  # layer1..layer4; resnet50's stem has one BN
    _spread(model, ista.groups)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    zeros = []
    for _ in range(6):
        norms = {g.name: _gammas(model, g).double().norm(dim=0) for g in streams}
        ista.after_step(model, opt)
        count = 0
        for g in streams:
            gam = _gammas(model, g)
            zero_any, zero_all = (gam == 0).any(0), (gam == 0).all(0)
            assert torch.equal(zero_any, zero_all), g.name  # never one writer alone
            shrink = 0.1 * ista.rho * ista.weights[g.name]
            assert torch.equal(zero_all, norms[g.name] <= shrink), g.name
            count += int(zero_all.sum())
        zeros.append(count)
    assert zeros[0] > 0 and zeros == sorted(zeros) and zeros[-1] > zeros[0]
    masks = ista.keep_masks(model)
    for g in streams:  # the score is the norm over the writers: the smallest (zeros first) are dropped
        score = _gammas(model, g).double().norm(dim=0)
        keep = masks[g.name]
        assert int(keep.sum()) == ista.n_keep(g) and score[keep].min() >= score[~keep].max()
    assert 0 < ista.summary()["gamma_zero_fraction"] < 1


def test_exact_budget_false_drops_exactly_the_zero_stream_channels():
    model = torchvision.models.resnet18(num_classes=3)
    ista = _ista(model, 16, exact_budget=False)
    g = _streams(ista.groups)[1]
    with torch.no_grad():
        for n in g.norms:
            model.get_submodule(n).weight[:5] = 0
        model.get_submodule(g.norms[0]).weight[5] = 0  # one writer at 0 is not enough
    mask = ista.keep_masks(model)[g.name]
    assert (~mask).nonzero().flatten().tolist() == [0, 1, 2, 3, 4]


# --- cost weights and α ---------------------------------------------------------------------
def test_residual_cost_sums_the_stage_convs_maps_and_the_fc():
    model = torchvision.models.resnet50(num_classes=1000)
    ista = _ista(model, 224)
    ista.prepare(model)
    # layer1 stream: written by 3 conv3 (1x1 64->256) and the downsample (1x1 64->256), 56x56 maps;
    # read by layer1.1/1.2 conv1 (1x1 256->64), layer2.0.conv1 (1x1 256->128), its downsample (->512)
    assert ista.weights["layer1.0.downsample.0"] == pytest.approx(
        (4 * 64 + (64 + 64 + 128 + 512) + 4 * 56 * 56) / 224**2)
    # layer4 stream: 3 conv3 (512 in) and the downsample (1024 in), 7x7 maps; read by two conv1
    # (->512) and the fc (1000 outputs)
    assert ista.weights["layer4.0.downsample.0"] == pytest.approx(
        (3 * 512 + 1024 + (512 + 512 + 1000) + 4 * 7 * 7) / 224**2)
    # the stem: conv1 7x7x3 at 112x112, read by layer1.0.conv1 (->64) and the downsample (->256)
    assert ista.weights["conv1"] == pytest.approx((147 + 64 + 256 + 112 * 112) / 224**2)
    # inner groups keep the authors' cost (tests/test_paper_methods.py)
    assert ista.weights["layer3.0.conv2"] == pytest.approx((256 * 9 + 1024 + 14 * 14) / 224**2)


def test_alpha_rescaling_at_scope_all_leaves_the_function_unchanged():
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=5).eval()
    randomise_bn(model, shift=-0.3)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    ref = _logits(model, x)
    ista = _ista(model, 32, alpha=8.0)
    ista.prepare(model)
    assert not torch.equal(model.layer2[1].bn3.weight, before["layer2.1.bn3.weight"])  # a stream writer
    assert not torch.equal(model.fc.weight, before["fc.weight"])  # the linear consumer
    assert _rel(_logits(model, x), ref) < 1e-5
    ista.finalize(model, {g.name: torch.ones(g.size, dtype=torch.bool) for g in ista.groups})
    for k, v in model.state_dict().items():
        assert torch.allclose(v.float(), before[k].float(), rtol=1e-5, atol=1e-6), k


# --- folding ----------------------------------------------------------------------------------
def _converged(arch, size, ratio=0.5, round_to=1, seed=0):
    """A model whose stream scales have partly reached 0, the ISTA method, and its masks; masks of
    groups with a k×k consumer (bottleneck conv1 → conv2) keep everything, so every fold is exact."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, num_classes=5).eval()
    randomise_bn(model, shift=-0.3)
    ista = _ista(model, size, ratio=ratio, round_to=round_to)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for g in _streams(ista.groups):
            zero = torch.rand(g.size, generator=gen) < 0.3  # some channels fully at 0, others not
            for n in g.norms:
                model.get_submodule(n).weight[zero] = 0
    masks = ista.keep_masks(model)
    for g in ista.groups:
        if any(model.get_submodule(c).kernel_size != (1, 1) for c in g.consumers
               if isinstance(model.get_submodule(c), torch.nn.Conv2d)):
            masks[g.name] = torch.ones(g.size, dtype=torch.bool)
    return model, ista, masks


def _with_dropped_gammas_zeroed(model, groups, masks):
    """The function ISTA promises to keep: every writer's γ of every dropped channel at 0."""
    net = copy.deepcopy(model)
    with torch.no_grad():
        for g in groups:
            for n in g.norms:
                net.get_submodule(n).weight[~masks[g.name]] = 0
    return net


def test_a_stream_channel_at_zero_is_a_constant_at_every_consumer():
    model, ista, masks = _converged("resnet50", 32)
    ref = _with_dropped_gammas_zeroed(model, ista.groups, masks)
    seen = {}
    hooks = [ref.get_submodule(c).register_forward_pre_hook(lambda m, i, c=c: seen.__setitem__(c, i[0]))
             for g in _streams(ista.groups) for c in g.consumers]
    _logits(ref, torch.randn(3, 3, 32, 32))
    for h in hooks:
        h.remove()
    for g in _streams(ista.groups):
        drop = ~masks[g.name]
        assert drop.any()
        for c in g.consumers:
            x = seen[c][:, drop].flatten(2) if seen[c].dim() > 2 else seen[c][:, drop].unsqueeze(-1)
            assert torch.equal(x, x[:1, :, :1].expand_as(x)), c  # the same value everywhere, every sample
    # the constants differ between consumers: each block adds its own β
    g = _streams(ista.groups)[0]
    a, b = seen[g.consumers[0]][0, ~masks[g.name], 0, 0], seen[g.consumers[-1]][0, ~masks[g.name], 0, 0]
    assert not torch.equal(a, b)


@pytest.mark.parametrize("arch, round_to", [("resnet50", 1), ("resnet50", 8), ("resnext50_32x4d", 8),
                                            ("wide_resnet50_2", 1)])
def test_cut_equals_the_finalized_model_on_bottlenecks(arch, round_to):
    size = 32
    model, ista, masks = _converged(arch, size, round_to=round_to)
    ref = _with_dropped_gammas_zeroed(model, ista.groups, masks)
    streams = _streams(ista.groups)
    for g in streams:
        kept = int(masks[g.name].sum())
        assert kept < g.size and kept % round_to == 0
        # exact_budget: some dropped channels had not reached 0 yet and are folded as if they had
        assert (_gammas(model, g)[:, ~masks[g.name]] != 0).any()
    fc_bias = model.fc.bias.detach().clone()
    ista.finalize(model, masks)
    assert not torch.equal(model.fc.bias, fc_bias)  # layer4's constants went into the fc's bias
    apply_masks(model, ista.groups, masks)
    cut = prune_model(copy.deepcopy(model), ista.groups, masks, size)
    assert cut.fc.in_features == int(masks["layer4.0.downsample.0"].sum())
    x = torch.randn(2, 3, size, size)
    want = _logits(ref, x)
    assert want.abs().max() > 0
    assert _rel(_logits(model, x), want) < 1e-5  # finalized + masked == the γ = 0 model
    assert _rel(_logits(cut, x), want) < 1e-5  # and the cut model with it


def test_fc_bias_fold_alone_is_exact():
    model, ista, masks = _converged("resnet50", 32)
    only = {g.name: (masks[g.name] if g.name == "layer4.0.downsample.0" else torch.ones(g.size, dtype=torch.bool))
            for g in ista.groups}
    ref = _with_dropped_gammas_zeroed(model, ista.groups, only)
    x = torch.randn(2, 3, 32, 32)
    want = _logits(ref, x)
    running = {n: b.clone() for n, b in model.state_dict().items() if n.endswith("running_mean")}
    ista.finalize(model, only)
    changed = {n for n, b in model.state_dict().items() if n in running and not torch.equal(b, running[n])}
    assert changed == {"layer4.1.bn1.running_mean", "layer4.2.bn1.running_mean"}  # the other consumers
    apply_masks(model, ista.groups, only)
    assert _rel(_logits(model, x), want) < 1e-5


def test_fold_before_a_basicblock_3x3_is_interior_exact():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    randomise_bn(model, shift=-0.3)
    ista = _ista(model, 32)
    g = next(g for g in ista.groups if g.name == "layer2.0.downsample.0")
    masks = {h.name: torch.ones(h.size, dtype=torch.bool) for h in ista.groups}
    masks[g.name][: g.size // 2] = False
    ref = _with_dropped_gammas_zeroed(model, ista.groups, masks)
    ista.finalize(model, masks)
    apply_masks(model, ista.groups, masks)
    cut = prune_model(copy.deepcopy(model), ista.groups, masks, 32)
    outs = {}
    for name, net in (("ref", ref), ("cut", cut)):
        h = net.layer2[1].bn1.register_forward_hook(lambda m, i, o, name=name: outs.__setitem__(name, o))
        _logits(net, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
        h.remove()
    diff = outs["cut"] - outs["ref"]  # after layer2.1.conv1, a 3×3 zero-padded consumer
    assert diff[..., 1:-1, 1:-1].abs().max() < 1e-4
    assert diff.abs().max() > 1e-3  # the border misses taps: measured, not hidden


# --- resume -----------------------------------------------------------------------------------
def _train(model, ista, steps, data):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.0)
    model.train()
    for _ in range(steps):
        x, y = data[0]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ista.after_step(model, opt)


def test_state_round_trip_mid_pruning():
    torch.manual_seed(0)
    size, opts = 16, {"rho": 2.0, "rho_warmup": 0.5, "warmup_fraction": 0.5}
    model = torchvision.models.resnet18(num_classes=5)
    data = calib(8, size)
    whole = _ista(model, size, **opts)
    _spread(model, whole.groups)
    start = copy.deepcopy(model.state_dict())
    whole.prepare(model)
    whole.on_train_start(model, steps_per_epoch=2, epochs=2)  # 2 warm-up steps, 2 main ones
    _train(model, whole, 4, data)

    first = torchvision.models.resnet18(num_classes=5)
    first.load_state_dict(start)
    part = _ista(first, size, **opts)
    part.prepare(first)
    part.on_train_start(first, steps_per_epoch=2, epochs=2)
    _train(first, part, 1, data)  # interrupted inside the warm-up stage
    saved, state = copy.deepcopy(first.state_dict()), part.state()

    resumed = torchvision.models.resnet18(num_classes=5)
    resumed.load_state_dict(saved)
    again = _ista(resumed, size, **opts)
    again.load_state(state)
    assert (again.step, again.warmup_steps, again.rho) == (1, 2, 0.5)
    again.prepare(resumed)  # cost weights are recomputed (they depend on shapes only)
    _train(resumed, again, 3, data)
    for k, v in model.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    streams = _streams(whole.groups)
    assert sum(int((_gammas(model, g) == 0).all(0).sum()) for g in streams) > 0  # it did sparsify streams
    masks, masks_again = whole.keep_masks(model), again.keep_masks(resumed)
    assert all(torch.equal(masks[n], masks_again[n]) for n in masks)
