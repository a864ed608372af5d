"""AutoPruner and ABP at ``prune.scope: all`` (docs/method_specs.md §AutoPruner, §ABP): one gate per
residual stream, shared by every consumer; masked == cut; checkpoints round-trip mid-pruning."""

import copy

import pytest
import torch
import torchvision

from methods import gates, get_method_class
from methods.autopruner import ACTIVE, FROZEN
from pipeline.surgery import apply_masks, find_groups, prune_model
from tests.helpers.factories import method_step
from tests.lifecycle import calib, randomise_bn

METHODS = ("abp", "autopruner")
FAST = {"autopruner": {"vote_window": 2, "alpha_window": 1}}


def _setup(name, arch="resnet18", size=16, ratio=0.5, round_to=1, seed=0, **options):
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, num_classes=5)
    groups = find_groups(model, size, "all")
    method = get_method_class(name)(groups, ratio, round_to=round_to, seed=seed, image_size=size,
                                    options={**FAST.get(name, {}), **options})
    torch.manual_seed(seed)  # as the recipe seeds every rank before prepare()
    method.prepare(model)
    return method, model, groups


def _step(method, model, opt, i, size=16):
    method_step(method, model, opt, *calib(8, size, seed=i)[0])


def _optimizer(method, model, lr=0.02):
    scales = method.lr_scales(model)
    ids = {id(p) for p in scales}
    plain = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": plain}] + [{"params": [p], "lr": lr * s} for p, s in scales.items()]
    return torch.optim.SGD(groups, lr=lr, momentum=0.9)


def _train(method, model, steps, size=16, total=None, lr=0.02):
    method.on_train_start(model, steps_per_epoch=total or steps, epochs=1)
    opt = _optimizer(method, model, lr)
    for i in range(steps):
        _step(method, model, opt, i, size)
    return opt


def _residual(groups):
    return [g for g in groups if g.residual]


def _set_to_masks(name, model, method, masks):
    """Every gate of the method at its group's final keep-mask (the masked model)."""
    with torch.no_grad():
        for g, layer in gates.layers(model, method.groups):
            if name == "abp":
                layer.score.copy_(masks[g.name].float() * 2 - 1)  # b = 1 exactly where kept
            else:
                layer.freeze(masks[g.name])


# --- masked == cut ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("arch,round_to", [("resnet18", 1), ("resnet50", 8), ("resnext50_32x4d", 8)])
def test_gated_model_at_its_masks_equals_the_cut_model(name, arch, round_to):
    size = 32
    options = {"stagewise": False, "skip_last_block": False} if name == "autopruner" else {}
    method, model, groups = _setup(name, arch, size=size, ratio=0.4, round_to=round_to, **options)
    # one small step: the votes and v get values (AutoPruner from scratch explodes at larger steps)
    _train(method, model, 1, size=size, lr=1e-4)
    randomise_bn(model)  # after training: random statistics make the comparison meaningful
    masks = method.keep_masks(model)
    for g in _residual(groups):  # the streams are cut, to widths that are multiples of round_to
        assert not bool(masks[g.name].all()), g.name
        assert int(masks[g.name].sum()) == method.n_keep(g) and method.n_keep(g) % round_to == 0
    _set_to_masks(name, model, method, masks)
    model.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        gated = model(x)
    method.finalize(model, masks)
    assert not any(isinstance(m, gates.GatedInput | gates.SharedLayer) for m in model.modules())
    apply_masks(model, groups, masks)
    pruned = prune_model(copy.deepcopy(model), groups, masks, size)
    for g in _residual(groups):
        assert pruned.get_submodule(g.name).out_channels == int(masks[g.name].sum())
    with torch.no_grad():
        out = pruned(x)
    assert gated.abs().max() > 0
    assert float((out - gated).abs().max() / gated.abs().max()) < 1e-5


# --- one gate per stream -----------------------------------------------------------------------
def _factors(model, groups):
    """Per residual group: what each consumer's gate multiplied its input by in the last forward."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for g in _residual(groups):
        for c in g.consumers:
            mod = model.get_submodule(c)

            def hook(m, i, o, name=g.name):
                x = i[0].detach()
                ratio = torch.where(x != 0, o.detach() / x, torch.nan)
                per_channel = ratio.transpose(0, 1).flatten(1).nanmean(1)  # (C,)
                seen.setdefault(name, []).append(per_channel)

            hooks.append(mod.layer.register_forward_hook(hook))
    return seen, hooks


@pytest.mark.parametrize("name", METHODS)
def test_training_moves_the_shared_gate_and_every_consumer_applies_the_same_values(name):
    options = {"stagewise": False, "skip_last_block": False} if name == "autopruner" else {}
    method, model, groups = _setup(name, **options)
    streams = _residual(groups)
    assert len(streams) == 4  # resnet18: the stem's group (layer1's stream) and layer2..4's streams
    # one set of parameters per group, named once; every consumer carries the group's one layer
    owners = {g.name: layer for g, layer in gates.layers(model, groups)}
    assert len(owners) == len(groups)
    for g in streams:
        assert len(g.consumers) > 1
        assert {id(gates.owner_of(model.get_submodule(c))) for c in g.consumers} == {id(owners[g.name])}
    tensors = [p for n, p in model.state_dict(keep_vars=True).items() if isinstance(p, torch.Tensor)]
    assert len({t.data_ptr() for t in tensors if t.numel()}) == len([t for t in tensors if t.numel()])
    own = {n for n, _ in model.named_parameters()}
    gate_params = {n for n in own if n.endswith(".score") or ".0.fc." in n}
    assert len(gate_params) == len(groups) * (1 if name == "abp" else 2)
    before = {g.name: copy.deepcopy(owners[g.name].state_dict()) for g in streams}
    _train(method, model, 3)
    for g in streams:
        after = owners[g.name].state_dict()
        assert any(not torch.equal(after[k], before[g.name][k]) for k in after if k in ("score", "fc.weight")), g.name
    # one more forward (training mode: AutoPruner's soft v) watched at every consumer
    seen, hooks = _factors(model, groups)
    model.train()
    model(calib(8, 16, seed=99)[0][0])
    for h in hooks:
        h.remove()
    for g in streams:
        values = seen[g.name]
        assert len(values) == len(g.consumers)
        expected = owners[g.name].factor if name == "autopruner" else owners[g.name].mask().detach()
        for v in values:
            known = ~torch.isnan(v)
            assert known.any()
            assert torch.allclose(v[known], expected.detach()[known], rtol=1e-4, atol=1e-5), g.name
    if name == "autopruner":  # the soft v is what the loss and the votes read, one per group
        assert all(owners[g.name].v is not None and owners[g.name].mode == ACTIVE for g in streams)


def test_autopruner_streams_follow_their_stage_and_the_last_block_stays_ungated():
    ap, model, groups = _setup("autopruner", "resnet50", size=32)
    gated = {g.name for g in ap.gated}
    assert {"conv1", "layer1.0.downsample.0", "layer2.0.downsample.0", "layer3.0.downsample.0"} <= gated
    assert "layer4.0.downsample.0" not in gated  # the last block adds into layer4's stream
    assert ap.stages == ["layer1", "layer2", "layer3", "layer4"]  # the stem goes with layer1
    layer1 = next(gt for g, gt in gates.layers(model, groups) if g.name == "layer1.0.downsample.0")
    assert isinstance(model.layer1[1].conv1.layer, type(layer1)) and model.layer1[1].conv1.layer is layer1
    assert layer1.fc.in_features == 256 * 4 * 4  # layer1.1.conv1 reads 256 × 8 × 8, pooled 2×2
    assert model.layer2[0].downsample[0].layer.owner is layer1
    assert ap.n_keep(next(g for g in groups if g.name == "layer4.0.downsample.0")) == 2048
    ap2, model2, groups2 = _setup("autopruner", "resnet50", size=32, skip_last_block=False)
    last = next(gt for g, gt in gates.layers(model2, groups2) if g.name == "layer4.0.downsample.0")
    assert model2.layer4[1].conv1.layer is last and last.pool == 1  # first reader: not fc
    assert model2.fc.layer.owner is last and last.fc.in_features == 2048 * 1 * 1
    # stage-wise: the layer1 stream trains with layer1, then is frozen for layer2's stage
    ap2.on_train_start(model2, steps_per_epoch=8, epochs=1)
    opt = _optimizer(ap2, model2)
    for i in range(3):
        _step(ap2, model2, opt, i, size=32)
    stream1 = next(gt for g, gt in gates.layers(model2, groups2) if g.name == "layer1.0.downsample.0")
    assert ap2.stage == 1 and stream1.mode == FROZEN
    x = torch.randn(2, 3, 32, 32)
    seen, hooks = _factors(model2, groups2)
    model2(x)
    for h in hooks:
        h.remove()
    code = stream1.code
    for v in seen["layer1.0.downsample.0"]:  # every reader of the frozen stream applies its code
        known = ~torch.isnan(v)
        assert torch.allclose(v[known], code[known])


# --- checkpoints ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_checkpoint_mid_pruning_resumes_identically(name, tmp_path):
    from safetensors.torch import save_file

    total, kill = 8, 3  # AutoPruner: 4 stages of 2 steps, killed inside the second
    method, model, groups = _setup(name, **({"skip_last_block": False} if name == "autopruner" else {}))
    opt = _train(method, model, kill, total=total)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "method": method.state(), "optimizer": opt.state_dict()}, path)
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    save_file(tensors, str(tmp_path / "gated.safetensors"))  # no tensor shared between two keys
    for i in range(kill, total):
        _step(method, model, opt, i)
    whole = (method.keep_masks(model), model.state_dict(), method.state())

    state = torch.load(path, map_location="cpu", weights_only=True)
    method2, model2, _ = _setup(name, seed=0, **({"skip_last_block": False} if name == "autopruner" else {}))
    model2.load_state_dict(state["model"])
    method2.load_state(state["method"])
    opt2 = _optimizer(method2, model2)
    opt2.load_state_dict(state["optimizer"])
    for i in range(kill, total):
        _step(method2, model2, opt2, i)
    masks, weights, mstate = method2.keep_masks(model2), model2.state_dict(), method2.state()
    assert masks.keys() == whole[0].keys() and all(torch.equal(masks[k], whole[0][k]) for k in masks)
    assert weights.keys() == whole[1].keys()
    for k, v in weights.items():
        assert (torch.equal(v, whole[1][k]) if isinstance(v, torch.Tensor) else v == whole[1][k]), k
    assert mstate.keys() == whole[2].keys()
    for k, v in mstate.items():
        assert (torch.equal(v, whole[2][k]) if isinstance(v, torch.Tensor) else v == whole[2][k]), k
