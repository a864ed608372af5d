"""AutoPruner (docs/method_specs.md §AutoPruner) against the authors' code, and every method × mode under 2-rank DDP."""

import copy
import json
import math

import numpy as np
import pytest
import torch
import torchvision

from methods import gates, get_method_class, method_names
from methods.autopruner import ACTIVE, FROZEN, IDLE, AutoPrunerGate
from pipeline.measure import count_macs
from pipeline.surgery import apply_masks, find_groups, prune_model
from tests.conftest import ROOT
from tests.helpers.factories import method_step
from tests.helpers.procs import torchrun
from tests.lifecycle import calib


def _method(arch="resnet18", size=16, ratio=0.5, prepare=True, **options):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=5)
    groups = find_groups(model, size, "inner")
    ap = get_method_class("autopruner")(groups, ratio, image_size=size, options=options)
    if prepare:
        ap.prepare(model)
    return ap, model, groups


def _feed(ap, model, steps, v_of):
    """``steps`` after_step calls with every active gate's v set to ``v_of(gate)``."""
    for _ in range(steps):
        for _, gate in gates.layers(model, ap.gated):
            if gate.mode == ACTIVE:
                gate.v = v_of(gate)
        ap.after_step(model, None)


def _train(method, model, steps, size=16, lr=0.05):
    method.on_train_start(model, steps_per_epoch=steps, epochs=1)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for i in range(steps):
        method_step(method, model, opt, *calib(16, size, seed=i)[0])


# --- the authors' schedule ---------------------------------------------------------------------
def test_alpha_ramps_linearly_from_1_to_100_one_point_per_window():
    ap, model, _ = _method(stagewise=False, alpha_window=10)
    ap.on_train_start(model, steps_per_epoch=50, epochs=4)  # 200 steps: K = 20 points
    line = np.linspace(1, 100, 20)
    alphas = [ap.alpha_at(s) for s in range(260)]
    assert alphas[:200] == pytest.approx([line[s // 10] for s in range(200)])
    assert alphas[0] == 1 and alphas[199] == pytest.approx(100) and set(alphas[200:]) == {alphas[199]}
    steps = np.diff(sorted(set(alphas)))
    assert steps == pytest.approx(np.full(19, 99 / 19))  # linear, not geometric


def test_non_binary_boost_adds_one_per_vote_window_only_after_the_first_epoch():
    ap, model, _ = _method(stagewise=False, alpha_window=10, vote_window=5)
    ap.on_train_start(model, steps_per_epoch=40, epochs=3)  # K = 12 points, 4 per epoch
    half = lambda gate: torch.full((gate.code.numel(),), 0.5) + 0.01 * (torch.arange(gate.code.numel()) % 2)  # noqa: E731
    g0 = ap.gated[0].name
    _feed(ap, model, 30, half)  # windows closing in the first 3 α windows: no boost yet
    assert ap.offset[g0] == 0
    _feed(ap, model, 30, half)  # 6 more windows, from the first epoch's last α window on (authors)
    assert ap.offset[g0] == 6
    gate = next(gt for _, gt in gates.layers(model, ap.gated))
    assert float(gate.alpha) == pytest.approx(ap.alpha_at(60) + 6)  # scheduled + the layer's offset
    assert ap.lambdas[g0] == pytest.approx(100 * abs(0.5 - 0.5))  # λ from the window's code


def test_collapse_guard_and_lambda_follow_the_windows_code():
    ap, model, _ = _method(stagewise=False, alpha_window=10, vote_window=5, ratio=0.4)
    ap.on_train_start(model, steps_per_epoch=1000, epochs=1)  # the non-binary boost never applies
    g0 = ap.gated[0].name
    _feed(ap, model, 5 * 3, lambda gate: torch.full((gate.code.numel(),), 0.1))  # everything pruned
    assert ap.offset[g0] == 3  # +1 per window pruning ≥ the threshold
    assert ap.threshold[g0] == 80  # 95 − 3·5
    assert ap.lambdas[g0] == pytest.approx(100 * (1.0 - 0.4))
    _feed(ap, model, 5 * 10, lambda gate: torch.full((gate.code.numel(),), 0.1))
    assert ap.threshold[g0] == 40  # never below the pruning ratio


def test_stagewise_restarts_alpha_and_state_per_stage_and_freezes_finished_ones():
    ap, model, _ = _method(alpha_window=2, vote_window=2)
    assert ap.options.stagewise  # the authors' ResNet-50 is pruned stage by stage
    ap.on_train_start(model, steps_per_epoch=40, epochs=1)  # 10 steps per stage
    _feed(ap, model, 9, lambda gate: torch.linspace(0.05, 0.95, gate.code.numel()))
    layer1 = next(gt for g, gt in gates.layers(model, ap.gated) if g.name.startswith("layer1"))
    assert float(layer1.alpha) > 1
    _feed(ap, model, 1, lambda gate: torch.linspace(0.05, 0.95, gate.code.numel()))
    assert ap.stage == 1
    for g, gate in gates.layers(model, ap.gated):
        stage = ap.stages.index(g.name.split(".")[0])
        assert gate.mode == {0: FROZEN, 1: ACTIVE}.get(stage, IDLE)
        if stage == 1:
            assert float(gate.alpha) == 1 and ap.offset[g.name] == 0 and ap.lambdas[g.name] == 10
            n = gate.fc.in_features  # drawn afresh when its stage starts (authors' init)
            assert float(gate.fc.weight.detach().std()) == pytest.approx(10 * math.sqrt(2 / n), rel=0.1)
    assert torch.equal(layer1.code.bool(), ap._code(ap.gated[0]))


def test_fc_starts_at_the_authors_draw():
    ap, model, _ = _method(arch="resnet50", size=64, stagewise=False)
    for _, gate in gates.layers(model, ap.gated):
        n = gate.fc.in_features
        assert float(gate.fc.weight.detach().std()) == pytest.approx(10 * math.sqrt(2 / n), rel=0.1)
        assert float(gate.fc.bias.detach().abs().max()) <= 1 / math.sqrt(n) and float(gate.fc.bias.detach().abs().max()) > 0
    # the last stage is not pooled (authors' max_ks = 1), earlier ones are pooled 2×2
    assert {(g.name.split(".")[0], gate.pool) for g, gate in gates.layers(model, ap.gated)} == {
        ("layer1", 2), ("layer2", 2), ("layer3", 2), ("layer4", 1)}


def test_last_block_of_layer4_is_never_gated():
    ap, model, groups = _method(arch="resnet50", size=32)
    gated = {g.name for g, _ in gates.layers(model, groups)}
    last = {g.name for g in groups if g.name.startswith("layer4.2.")}
    assert last and not gated & last and gated == {g.name for g in groups} - last
    masks = ap.keep_masks(model)
    assert all(bool(masks[n].all()) for n in last)
    # the widths it plans (what a benchmark bisects its ratio on) are the widths it keeps
    assert {g.name: ap.n_keep(g) for g in groups} == {n: int(m.sum()) for n, m in masks.items()}
    ap2, model2, groups2 = _method(arch="resnet50", size=32, skip_last_block=False)
    assert {g.name for g, _ in gates.layers(model2, groups2)} == {g.name for g in groups2}


def _macs_reduction(**options) -> float:
    ap, model, groups = _method(arch="resnet50", size=224, prepare=False, **options)
    dense = count_macs(model, 224)
    masks = ap.keep_masks(model)
    apply_masks(model, groups, masks)
    return 1 - count_macs(prune_model(model, groups, masks, 224), 224) / dense


def test_resnet50_keep_half_gives_the_papers_macs_reduction():
    # paper (Luo & Wu 2020, ResNet-50, keep 0.5): 51 % fewer FLOPs
    assert _macs_reduction() == pytest.approx(0.51, abs=0.02)
    assert _macs_reduction(skip_last_block=False) > 0.53  # gating layer4's last block overshoots


def test_validation_during_pruning_uses_the_binary_code():
    gate = AutoPrunerGate(4, 6, 6, pool=2)
    x = torch.rand(3, 4, 6, 6) + 0.1
    gate.eval()
    v_code = gate(x)  # no code yet: the binarised v
    assert set(torch.unique(v_code / x).round(decimals=5).tolist()) <= {0.0, 1.0}
    gate.code.copy_(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    gate.coded = True
    assert torch.equal(gate(x), x * gate.code.view(1, -1, 1, 1))
    gate.train()
    assert not torch.equal(gate(x), x * gate.code.view(1, -1, 1, 1))  # training: the soft v


# --- behaviour ---------------------------------------------------------------------------------
def test_gates_become_binary_and_hit_the_budget():
    ap, model, groups = _method(ratio=0.4, stagewise=False, exact_budget=False, alpha_window=5, vote_window=5)
    _train(ap, model, steps=60)
    vs = torch.cat([gate.v.detach() for _, gate in gates.layers(model, groups)])
    assert float(((vs < 0.2) | (vs > 0.8)).float().mean()) >= 0.9  # α ↑ ⇒ v binary
    kept = [float(m.float().mean()) for n, m in ap.keep_masks(model).items() if n in {g.name for g in ap.gated}]
    assert sum(kept) / len(kept) == pytest.approx(0.6, abs=0.12)  # kept fraction → 1 − prune_ratio


def test_gate_removal_and_surgery_preserve_the_gated_logits():
    ap, model, groups = _method(arch="resnet50", size=32, stagewise=False)
    _train(ap, model, steps=4, size=32)
    masks = ap.keep_masks(model)
    for g, gate in gates.layers(model, groups):  # the gated model with its final binary code
        gate.freeze(masks[g.name])
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        gated = model(x)
    ap.finalize(model, masks)
    apply_masks(model, groups, masks)
    pruned = prune_model(copy.deepcopy(model), groups, masks, 32)
    with torch.no_grad():
        assert ((pruned(x) - gated).abs().max() / gated.abs().max()) < 1e-5


# --- every method × mode under 2-rank DDP -----------------------------------------------------
def _torchrun(*args, timeout=900):
    return torchrun(str(ROOT / "tests" / "helpers" / "method_modes_check.py"), *args, cwd=ROOT, timeout=timeout)


@pytest.mark.multiprocess
def test_every_method_and_mode_trains_under_ddp(tmp_path, tiny_synthetic):
    from tests.helpers.method_modes_check import modes

    out = tmp_path / "lifecycle.json"
    proc = _torchrun("lifecycle", str(out), str(tiny_synthetic))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result) == {f"{n}[{m}]" for n in method_names() for m in modes(n)}
    assert "autopruner[stagewise=False]" in result  # both AutoPruner modes (stage-wise is the default)
    # every method that declares scope all runs it too (residual streams pruned)
    assert {f"{n}[scope=all]" for n in method_names() if "all" in get_method_class(n).scopes} <= set(result)
    assert {"autopruner[scope=all]", "abp[scope=all]"} <= set(result)
    assert all(result.values()), result


@pytest.mark.multiprocess
# every training-aware method killed mid-pruning; l1 (one-shot) killed mid-fine-tune
@pytest.mark.parametrize("name", [n for n in method_names() if get_method_class(n).training_aware] + ["l1"])
def test_resumed_mid_pruning_ends_like_an_uninterrupted_run(tmp_path, tiny_synthetic, name):
    from tests.helpers.method_modes_check import modes

    out = tmp_path / "resume.json"
    proc = _torchrun("resume", str(out), str(tiny_synthetic), name)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result) == {f"{name}[{m}]" for m in modes(name)}
    assert all(r["masks"] and r["weights"] for r in result.values()), result
