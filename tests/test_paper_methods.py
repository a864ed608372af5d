"""The papers' schedules and settings: the schedule settings' validation, the pruning phase's own
optimizer settings, ISTA's cost weights / ρ stages / step learning rate, SFP's authors' scope,
lossvar's round_to and its seeded calibration draw. The engine's schedules: tests/test_engine.py."""

import math

import pytest
import torch
import torchvision
from torch import nn

from methods import SelectContext, get_method_class
from methods.sfp import shortcut_convs
from pipeline.config import ConfigError, DataConfig, build_config
from pipeline.data.loaders import ShardedSamples, _draw_calibration, _transforms, calibration_set
from pipeline.data.manifest import read_manifest
from pipeline.surgery import find_groups, macs_after, macs_profile
from tests.lifecycle import calib

CPU = torch.device("cpu")


def _train(**kw):
    return build_config({"train": kw}).train


@pytest.mark.parametrize("bad, key", [
    ({"schedule": "step"}, "train.milestones"),
    ({"milestones": [3]}, "train.milestones"),
    ({"schedule": "step", "milestones": [4, 2]}, "train.milestones"),
    ({"schedule": "step", "milestones": [0, 2]}, "train.milestones"),
    ({"schedule": "step", "milestones": [8], "cycle_epochs": 8}, "train.milestones"),
    ({"prune_phase": {"schedule": "step"}}, "train.prune_phase.milestones"),
    ({"prune_phase": {"lr": -1}}, "train.prune_phase.lr"),
    ({"prune_phase": {"typo": 1}}, "train.prune_phase.typo"),
])
def test_schedule_settings_are_validated_naming_the_key(bad, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config({"train": bad})


def test_pruning_phase_settings_override_only_the_pruning_phase():
    t = _train(lr=1e-4, weight_decay=1e-4, schedule="step", milestones=[10],
               prune_phase={"lr": 1e-3, "weight_decay": 5e-4, "milestones": [4], "cycle_epochs": 8})
    p = t.for_phase("prune")
    assert (p.lr, p.weight_decay, p.milestones, p.cycle_epochs, p.momentum) == (1e-3, 5e-4, [4], 8, t.momentum)
    f = t.for_phase("finetune")
    assert (f.lr, f.weight_decay, f.milestones, f.cycle_epochs) == (1e-4, 1e-4, [10], None)
    cos = _train(schedule="step", milestones=[3], prune_phase={"schedule": "cosine"}).for_phase("prune")
    assert cos.schedule == "cosine" and cos.milestones == []


# --- ISTA ---------------------------------------------------------------------------------------
def test_ista_cost_is_the_authors_memory_cost_without_a_spatial_factor():
    model = torchvision.models.resnet50(num_classes=1000)
    groups = find_groups(model, 224, "inner")
    ista = get_method_class("ista")(groups, 0.5, image_size=224)
    ista.prepare(model)
    # layer3.0.conv2: 3x3 256->256 (stride 2, 14x14 out), consumed by conv3 1x1 256->1024
    assert ista.weights["layer3.0.conv2"] == pytest.approx((256 * 9 + 1024 + 14 * 14) / 224**2)
    # layer1.0.conv1: 1x1 64->64 at 56x56, consumed by conv2 3x3 64->64
    assert ista.weights["layer1.0.conv1"] == pytest.approx((64 + 64 * 9 + 56 * 56) / 224**2)
    # the parameter terms do not scale with the map: at twice the resolution only H*W/pixels moves
    big = get_method_class("ista")(groups, 0.5, image_size=448)
    big.prepare(model)
    for name in ("layer1.0.conv1", "layer4.0.conv2"):
        p224 = ista.weights[name] * 224**2
        p448 = big.weights[name] * 448**2
        hw = {"layer1.0.conv1": 56 * 56, "layer4.0.conv2": 7 * 7}[name]
        assert p448 - 4 * hw == pytest.approx(p224 - hw)
    # layer4's channels are the dearest (most parameters per channel), unlike a per-MACs weight
    assert ista.weights["layer4.0.conv2"] > ista.weights["layer3.0.conv2"] > ista.weights["layer2.0.conv2"]


def _gammas(model, groups):
    return torch.cat([model.get_submodule(g.norms[0]).weight.detach().clone() for g in groups])


def test_ista_rho_has_a_warmup_stage_then_the_main_one_and_resumes_it():
    model = torchvision.models.resnet18(num_classes=3)
    groups = find_groups(model, 16, "inner")
    opts = {"rho_warmup": 0.001, "rho": 0.005, "warmup_fraction": 0.5, "cost_weighted": False}
    ista = get_method_class("ista")(groups, 0.5, image_size=16, options=opts)
    ista.prepare(model)
    ista.on_train_start(model, steps_per_epoch=2, epochs=2)  # 4 steps: 2 warm-up, 2 main
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    shrinks = []
    for _ in range(4):
        before = _gammas(model, groups)
        ista.after_step(model, opt)
        shrinks.append(float((before - _gammas(model, groups)).max()))
    assert shrinks == pytest.approx([2.0 * 0.001] * 2 + [2.0 * 0.005] * 2, rel=1e-4)  # lr · ρ · λ, λ = 1 (float32 γ)
    again = get_method_class("ista")(groups, 0.5, image_size=16, options=opts)
    state = get_method_class("ista")(groups, 0.5, image_size=16, options=opts)
    state.on_train_start(model, steps_per_epoch=2, epochs=2)
    state.step = 1
    again.load_state(state.state())  # resumed after one step: one warm-up step left
    assert [again.rho, (again.step, again.warmup_steps)] == [0.001, (1, 2)]
    again.step = 2
    assert again.rho == 0.005


# --- SFP ----------------------------------------------------------------------------------------
def test_sfp_authors_scope_soft_prunes_every_conv_but_the_shortcuts():
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10)
    groups = find_groups(model, 64, "inner")
    sfp = get_method_class("sfp")(groups, 0.3, image_size=64)
    sfp.prepare(model)
    sfp.on_train_start(model)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    shortcuts = shortcut_convs(find_groups(model, 64, "all"))
    assert shortcuts == {f"layer{i}.0.downsample.0" for i in range(1, 5)}
    for name, conv in convs.items():
        zero = int((conv.weight.flatten(1).abs().sum(1) == 0).sum())
        assert zero == (0 if name in shortcuts else math.floor(conv.out_channels * 0.3)), name
    # the cut's inner groups get exactly their soft masks back
    masks = sfp.keep_masks(model)
    assert all(torch.equal(masks[g.name], sfp.masks[g.name]) for g in groups)


def test_sfp_groups_scope_leaves_stem_and_conv3_alone():
    model = torchvision.models.resnet50(num_classes=10)
    groups = find_groups(model, 64, "inner")
    sfp = get_method_class("sfp")(groups, 0.3, image_size=64, options={"soft_scope": "groups"})
    sfp.prepare(model)
    sfp.on_train_start(model)
    for name in ("conv1", "layer1.0.conv3", "layer4.2.conv3"):
        assert int((model.get_submodule(name).weight.flatten(1).abs().sum(1) == 0).sum()) == 0


def test_sfp_soft_macs_count_is_the_papers_and_the_hard_cut_is_smaller():
    model = torchvision.models.resnet50(num_classes=1000)
    groups = find_groups(model, 224, "inner")
    sfp = get_method_class("sfp")(groups, 0.3, image_size=224)
    sfp.prepare(model)
    soft = sfp.summary()["soft_macs_reduction"]
    assert abs(soft - 0.418) <= 0.02  # He et al. 2018, Table 2, ResNet-50 30 %
    profile = macs_profile(model, 224)
    hard = 1 - macs_after(profile, groups, {g.name: sfp.n_keep(g) for g in groups}) / sum(profile.values())
    assert hard < soft - 0.03  # the cut removes conv1/conv2 outputs only


# --- lossvar ------------------------------------------------------------------------------------
def test_lossvar_widths_honour_round_to():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    groups = find_groups(model, 32, "inner")
    lv = get_method_class("lossvar")(groups, 0.5, round_to=8, options={"delta": 0.05}, image_size=32)
    masks = lv.keep_masks(model, SelectContext(calib=calib(), image_size=32))
    kept = [int(m.sum()) for m in masks.values()]
    assert all(k % 8 == 0 for k in kept), kept
    assert any(k < g.size for k, g in zip(kept, groups, strict=True)), "nothing pruned: the test proves nothing"


def test_calibration_set_is_a_seeded_draw_over_many_shards(digits_root):
    cfg = DataConfig(root=str(digits_root), image_size=16, batch_size=8)
    n_shards = len(read_manifest(digits_root)["splits"]["train"])
    assert n_shards > 2
    a = calibration_set(cfg, 48, 0, 1, CPU, seed=1)
    b = calibration_set(cfg, 48, 0, 1, CPU, seed=1)
    c = calibration_set(cfg, 48, 0, 1, CPU, seed=2)
    xa = torch.cat([x for x, _ in a])
    assert xa.shape[0] == 48
    assert torch.equal(xa, torch.cat([x for x, _ in b]))  # deterministic for a seed
    assert not torch.equal(xa, torch.cat([x for x, _ in c]))  # another seed, another sample
    # drawn from more than one shard: the first 48 in shard order all sit in the first shard
    draw = _draw_calibration(cfg, 48, 1)
    first_shard = calibration_first_shard_images(digits_root, cfg)
    assert sum(any(torch.equal(x, f) for f in first_shard) for x, _ in draw) < 48
    assert len({int(y) for _, y in draw}) > 3  # many classes, not a shard's few
    # split over ranks: the union of the ranks' shares is the one-rank set, in order
    r0 = torch.cat([x for x, _ in calibration_set(cfg, 48, 0, 2, CPU, seed=1)])
    r1 = torch.cat([x for x, _ in calibration_set(cfg, 48, 1, 2, CPU, seed=1)])
    assert torch.equal(torch.stack([r0, r1], 1).flatten(0, 1), xa)


def calibration_first_shard_images(root, cfg):
    m = read_manifest(root)
    ds = ShardedSamples(root, m["splits"]["train"][:1], 0, 1, 0,
                        _transforms("none", False, cfg.image_size, m["mean"], m["std"]),
                        shuffle=False, seed=0, buffer=0, num_classes=m["num_classes"])
    return [ds._decode(s)[0] for s in ds._samples(ds.shards)]
