"""The latency table (pipeline/latency.py): its pieces add up to whole models, its file is
validated like a spec, and the target loop converges — all on an injected clock, so that what
is tested is the arithmetic, not this machine's speed."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
import torchvision
from torch import nn

from methods.base import keep_count
from pipeline.latency import (
    DEFAULT_LEVELS,
    LatencyTableError,
    build_table,
    hit_target,
    load_or_build,
    pieces,
    read_table,
    table_key,
    table_path,
    width_grid,
)
from pipeline.measure import TimingConfig, fold_batchnorm
from pipeline.surgery import apply_masks, find_groups, prune_model, structured_topk

SIZE = 32


def work_clock(model: nn.Module, x: torch.Tensor) -> float:
    """A forward 'takes' 1 ns per multiply-accumulate plus 10 µs per conv or linear call: bilinear
    in every layer's (in, out) widths, as the table's interpolation assumes, and additive over
    layers. The table must then predict every model exactly."""
    total = [0.0]

    def hook(m: nn.Module, _inp, out: torch.Tensor) -> None:
        per_out = m.in_features if isinstance(m, nn.Linear) else m.in_channels // m.groups * m.kernel_size[0] ** 2
        total[0] += out.numel() * per_out * 1e-9 + 1e-5

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, arch)(num_classes=10).eval()


def _table(arch: str, scope: str, round_to: int = 8, levels=DEFAULT_LEVELS):
    model = _model(arch)
    groups = find_groups(model, SIZE, scope)
    protocol = TimingConfig(batch_size=2, rounds=2, warmup=0, fold_bn=True)
    key = table_key(protocol, arch, SIZE, 10, scope, round_to, levels)
    return model, groups, protocol, key, build_table(model, groups, protocol, key, reps=1, warmup=0, timer=work_clock)


def _random_cut(model: nn.Module, groups, seed: int, round_to: int = 8) -> tuple[nn.Module, dict[str, int]]:
    rng = random.Random(seed)
    cut = copy.deepcopy(model)
    counts = {g.name: keep_count(g.size, rng.uniform(0.0, 0.85), round_to, g.channel_groups) for g in groups}
    masks = {g.name: structured_topk(torch.rand(g.size), counts[g.name], g.channel_groups) for g in groups}
    apply_masks(cut, groups, masks)
    return prune_model(cut, groups, masks, SIZE), counts


@pytest.mark.parametrize(("arch", "scope"), [("resnet18", "inner"), ("resnet50", "all"), ("resnext50_32x4d", "all")])
def test_the_pieces_predict_whole_cut_models_exactly_on_a_bilinear_clock(arch, scope):
    model, groups, _, _, table = _table(arch, scope)
    x = torch.randn(2, 3, SIZE, SIZE)
    assert table.dense_s == pytest.approx(work_clock(fold_batchnorm(model), x), rel=1e-9)
    for seed in range(3):
        cut, counts = _random_cut(model, groups, seed)
        measured = work_clock(fold_batchnorm(cut), x)
        assert table.predict_model(cut) == pytest.approx(measured, rel=1e-6)
        assert table.predict_counts(groups, counts) == pytest.approx(measured, rel=1e-6)


def test_a_removed_block_costs_nothing():
    from pipeline.blocks import remove_blocks

    model, _, _, _, table = _table("resnet50", "inner")
    cut = copy.deepcopy(model)
    remove_blocks(cut, ["layer3.2", "layer4.1"])
    x = torch.randn(2, 3, SIZE, SIZE)
    assert table.predict_model(cut) == pytest.approx(work_clock(fold_batchnorm(cut), x), rel=1e-6)
    assert table.predict_model(cut) < table.dense_s


def test_pieces_cover_the_elementwise_work_after_each_conv():
    kinds = {p.name: p.kind for p in pieces(_model("resnet50"), SIZE)}
    assert kinds["conv1"] == "stem"  # conv, ReLU, max-pool
    assert kinds["layer1.0.conv1"] == kinds["layer1.0.conv2"] == "conv_relu"
    assert kinds["layer1.0.conv3"] == "conv_add_relu"  # the residual add and the block's ReLU
    assert kinds["layer1.0.downsample.0"] == "conv"
    assert kinds["fc"] == "head"
    assert len(kinds) == 1 + 16 * 3 + 4 + 1


def test_a_width_the_scope_never_changes_is_one_point_and_is_refused_otherwise():
    _, _, _, _, table = _table("resnet18", "inner")
    conv1 = table.piece("layer1.0.conv1")  # reads the stream, which scope inner keeps
    assert len(conv1.ins) == 1 and len(conv1.outs) > 1
    with pytest.raises(LatencyTableError, match="fixed at 64"):
        table.seconds({"layer1.0.conv1": (32, 64)})


def test_the_grid_holds_the_narrowest_step_and_the_dense_width():
    assert width_grid(256, 8, (0.5,)) == (8, 128, 256)
    # 25 rounds up to one step; 100 rounds to 96, and the dense width is a point of its own
    assert width_grid(100, 32, (0.25, 1.0)) == (32, 96, 100)


def test_a_non_resnet_is_refused_in_one_line():
    with pytest.raises(LatencyTableError, match="torchvision ResNet"):
        pieces(nn.Sequential(nn.Conv2d(3, 4, 3)), SIZE)


# --- the file ------------------------------------------------------------------------------------
def test_a_cached_table_is_reused_and_reads_back_the_same(tmp_path):
    model, groups, protocol, key, _ = _table("resnet18", "inner")
    calls = []

    def counting(m, x):
        calls.append(1)
        return work_clock(m, x)

    table, path, built = load_or_build(model, groups, protocol, key, tmp_path, reps=1, warmup=0, timer=counting)
    assert built and path == table_path(tmp_path, key) and calls
    calls.clear()
    again, _, built = load_or_build(model, groups, protocol, key, tmp_path, reps=1, warmup=0, timer=counting)
    assert not built and not calls
    cut, _ = _random_cut(model, groups, 0)
    assert again.predict_model(cut) == table.predict_model(cut)


@pytest.mark.parametrize(("edit", "reason"), [
    (lambda raw: raw["pieces"][0]["seconds"][0].__setitem__(0, 1.0), "checksum"),
    (lambda raw: raw.pop("sha256"), "checksum"),
    (lambda raw: raw.__setitem__("format", "something"), "not a prunepipe-latency-table"),
])
def test_an_edited_table_is_named_in_one_line_and_rebuilt(tmp_path, edit, reason):
    model, groups, protocol, key, _ = _table("resnet18", "inner")
    _, path, _ = load_or_build(model, groups, protocol, key, tmp_path, reps=1, warmup=0, timer=work_clock)
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
    with pytest.raises(LatencyTableError, match=reason) as err:
        read_table(path, key)
    assert "\n" not in str(err.value)
    said = []
    _, _, built = load_or_build(model, groups, protocol, key, tmp_path, reps=1, warmup=0, timer=work_clock,
                                log=said.append)
    assert built and len(said) == 1 and reason in said[0] and "rebuilding" in said[0]
    read_table(path, key)  # the rebuilt file is valid


def test_a_truncated_file_is_refused(tmp_path):
    model, groups, protocol, key, _ = _table("resnet18", "inner")
    _, path, _ = load_or_build(model, groups, protocol, key, tmp_path, reps=1, warmup=0, timer=work_clock)
    path.write_text(path.read_text()[:200])
    with pytest.raises(LatencyTableError, match="not JSON"):
        read_table(path, key)


@pytest.mark.parametrize("field", ["device", "torch", "precision", "batch", "memory_format", "arch"])
def test_a_table_built_for_another_setting_is_never_reused(tmp_path, field):
    model, groups, protocol, key, table = _table("resnet18", "inner")
    path = table.save(table_path(tmp_path, key))
    other = dict(key, **{field: "something else"})
    with pytest.raises(LatencyTableError, match=f"built for {field} = "):
        read_table(path, other)
    # and a setting that differs is looked for under another name: it is built, not read
    assert table_path(tmp_path, other) != path


# --- hitting a measured target -------------------------------------------------------------------
def _loop(bias, target=2.0, **kw):
    """A device that is slower than the table says by ``bias(aim)``: measured = aim · bias."""
    tried = []

    def allocate(aim):
        tried.append(aim)
        return {"g": int(aim * 1000)}, aim

    def measure(counts):
        aim = counts["g"] / 1000
        return aim * bias(aim)

    return hit_target(target, allocate, measure, **kw), tried


def test_a_constant_bias_is_corrected_in_one_step():
    result, tried = _loop(lambda aim: 0.8)
    assert result.corrections == 1 and abs(result.error) <= 0.03
    assert tried[1] == pytest.approx(2.0 / 0.8)


def test_a_bias_that_grows_with_the_aim_is_corrected_by_secant_steps():
    result, _ = _loop(lambda aim: 1.0 - 0.1 * aim, target=1.8)  # reached at aim 2.35
    assert abs(result.error) <= 0.03 and 2 <= result.corrections <= 3
    assert result.summary()["target_measured_speedup"] == result.measured


def test_a_hit_needs_no_correction_and_the_closest_try_is_kept():
    result, tried = _loop(lambda aim: 1.01)
    assert result.corrections == 0 and tried == [2.0]
    # a device the table cannot describe: the loop stops after its corrections, keeps the closest
    result, tried = _loop(lambda aim: 0.5 if aim < 3 else 0.4, max_corrections=2, max_aim=3.5)
    assert result.corrections == 2 and len(tried) == 3 and max(tried) <= 3.5
    assert result.measured == max(a * (0.5 if a < 3 else 0.4) for a in tried)


def test_table_settings_are_validated_with_the_key_named():
    from pipeline.config import ConfigError, load_config
    from tests.conftest import DEMO

    with pytest.raises(ConfigError, match=r"measure\.latency_table\.levels"):
        load_config(DEMO, ["measure.latency_table.levels=[0.5, 1.5]"])
    cfg = load_config(DEMO, ["measure.latency_table.levels=[1.0, 0.5, 0.5]"])
    assert cfg.measure.latency_table.levels == [0.5, 1.0]
