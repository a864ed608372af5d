"""The latency allocator (methods/latency_alloc.py) on tables built with an injected clock."""

from __future__ import annotations

import pytest
import torch

from methods.allocate import Budget, check_counts
from methods.base import SelectContext, keep_count
from methods.latency_alloc import LatencyAllocator, TargetUnreachable, candidates
from pipeline.surgery import filter_norms
from tests.test_latency import _table


def _ctx(model, groups, table, scores=None):
    scores = scores or {g.name: filter_norms(model, g) for g in groups}
    return SelectContext(image_size=32, scores=scores, latency_table=table)


@pytest.mark.parametrize(("arch", "scope"), [("resnet18", "inner"), ("resnet50", "all")])
def test_a_target_is_met_on_the_table_and_nearly_filled(arch, scope):
    model, groups, _, _, table = _table(arch, scope)
    alloc = LatencyAllocator({"bins": 4000, "max_choices": 8})  # 8: a fast knapsack for the suite
    for target in (1.5, 2.0) if scope == "inner" else (2.0,):
        counts = alloc.allocate(model, groups, Budget(0.5, 8, target_speedup=target), _ctx(model, groups, table))
        check_counts(groups, counts, "latency")
        predicted = table.dense_s / table.predict_counts(groups, counts)
        assert target <= predicted <= target * 1.03  # within the budget, and not far above it
        assert alloc.summary()["predicted_speedup"] == pytest.approx(predicted)


def test_worthless_channels_go_first():
    model, groups, _, _, table = _table("resnet18", "inner")
    scores = {g.name: torch.ones(g.size) for g in groups}
    worthless = groups[0]  # layer1.0.conv1: the widest maps, so its channels cost the most time
    scores[worthless.name] = torch.full((worthless.size,), 1e-6)
    alloc = LatencyAllocator({"normalize": "none"})
    counts = alloc.allocate(model, groups, Budget(0.5, 8, target_speedup=1.15), _ctx(model, groups, table, scores))
    # a channel worth 1 goes only once the worthless group is at its narrowest candidate
    others_cut = any(counts[g.name] < g.size for g in groups if g is not worthless)
    assert counts[worthless.name] < worthless.size
    assert not others_cut or counts[worthless.name] == candidates(worthless, 8, 0.1, 16)[0]


def test_more_importance_is_kept_than_by_uniform_widths_at_the_same_latency():
    model, groups, _, _, table = _table("resnet50", "all")
    ctx = _ctx(model, groups, table)
    alloc = LatencyAllocator({"max_choices": 8})
    counts = alloc.allocate(model, groups, Budget(0.4, 8), ctx)
    uniform = {g.name: keep_count(g.size, 0.4, 8) for g in groups}
    assert table.predict_counts(groups, counts) <= table.predict_counts(groups, uniform) * (1 + 1e-9)

    def kept(c):
        return sum(alloc._values(g, ctx.scores[g.name], (c[g.name],))[0] for g in groups)

    assert kept(counts) > kept(uniform)


def test_a_whole_group_is_worth_its_producers_under_share_and_its_width_under_mean():
    """``share`` values a group by the share of its importance kept, whatever its width or the
    scale of its weights; ``mean`` by its channels of average importance."""
    model, groups, _, _, _ = _table("resnet50", "all")
    narrow, wide = min(groups, key=lambda g: g.size), max(groups, key=lambda g: g.size)
    assert narrow.size < wide.size
    for g, scale in ((narrow, 1e-3), (wide, 7.0)):
        scores = scale * torch.rand(g.size, generator=torch.Generator().manual_seed(g.size)) + scale
        weight = max(1, len(g.producers))
        share = LatencyAllocator({"normalize": "share"})._values(g, scores, (g.size // 2, g.size))
        mean = LatencyAllocator({"normalize": "mean"})._values(g, scores, (g.size,))
        assert share[1] == pytest.approx(weight) and 0.5 * weight < share[0] < weight  # the best half
        assert mean[0] == pytest.approx(weight * g.size)


def test_without_a_target_the_uniform_widths_latency_is_the_budget():
    model, groups, _, _, table = _table("resnet18", "inner")
    uniform = {g.name: keep_count(g.size, 0.5, 8) for g in groups}
    counts = LatencyAllocator().allocate(model, groups, Budget(0.5, 8), _ctx(model, groups, table))
    assert table.predict_counts(groups, counts) <= table.predict_counts(groups, uniform) * (1 + 1e-9)


def test_a_target_beyond_the_narrowest_model_names_the_reachable_maximum():
    model, groups, _, _, table = _table("resnet18", "inner")
    with pytest.raises(TargetUnreachable, match=r"at most \d+\.\d\d×"):
        LatencyAllocator().allocate(model, groups, Budget(0.5, 8, target_speedup=50.0), _ctx(model, groups, table))


def test_candidates_are_steps_from_the_least_share_to_the_whole_group():
    from pipeline.surgery import find_groups
    from tests.test_latency import _model

    groups = find_groups(_model("resnext50_32x4d"), 32, "inner")
    g = next(g for g in groups if g.channel_groups > 1)
    widths = candidates(g, 8, 0.1, 16)
    assert widths[-1] == g.size and len(widths) <= 16
    assert all(w % 32 == 0 for w in widths) and widths[0] >= 0.1 * g.size
