"""The seam between scores and widths (methods/allocate.py): a registered allocator turns groups
and a budget into kept counts, the method fills each group to its count with its own scores,
one shared top-k makes the masks. ``uniform`` must be the widths every method had before;
``loss`` must give lossvar's very masks."""

from __future__ import annotations

import pytest
import torch
import torchvision

from methods import Budget, SelectContext, get_allocator_class, get_method_class, keep_count
from methods.allocate import _ALLOCATORS, Allocator, register_allocator
from pipeline.surgery import filter_norms, find_groups

SIZE = 32


def _model(arch: str = "resnet18"):
    torch.manual_seed(0)
    return getattr(torchvision.models, arch)(num_classes=10).eval()


@pytest.fixture(scope="module")
def calib():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 3, SIZE, SIZE, generator=gen), torch.randint(0, 10, (16,), generator=gen))
            for _ in range(4)]


@pytest.mark.parametrize("arch, scope, round_to", [("resnet18", "inner", 1), ("resnet18", "all", 8),
                                                   ("resnext50_32x4d", "all", 8), ("resnet50", "inner", 8)])
def test_uniform_counts_are_the_uniform_rate_bit_for_bit(arch, scope, round_to):
    model = _model(arch)
    groups = find_groups(model, SIZE, scope)
    counts = get_allocator_class("uniform")().allocate(model, groups, Budget(0.37, round_to))
    assert counts == {g.name: keep_count(g.size, 0.37, round_to, g.channel_groups) for g in groups}
    # and a method given those counts keeps exactly the masks it kept with none given
    plain = get_method_class("l1")(groups, 0.37, round_to)
    given = get_method_class("l1")(groups, 0.37, round_to)
    given.set_counts(counts)
    a, b = plain.keep_masks(model), given.keep_masks(model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _lossvar_reference(model, groups, counts):
    """lossvar's masks as defined in docs/method_specs.md: the (size − kept) channels of weakest
    L1 norm dropped, ties to the lower index first."""
    out = {}
    for g in groups:
        order = torch.argsort(filter_norms(model, g, 1), stable=True)
        mask = torch.ones(g.size, dtype=torch.bool)
        mask[order[: g.size - counts[g.name]]] = False
        out[g.name] = mask
    return out


def test_the_loss_allocator_gives_lossvars_masks(calib):
    model = _model()
    groups = find_groups(model, SIZE, "inner")
    ctx = SelectContext(calib=calib, image_size=SIZE)
    options = {"target_macs_reduction": 0.4, "calib_samples": 64}
    allocator = get_allocator_class("loss")(options)
    counts = allocator.allocate(model, groups, Budget(0.5), ctx)
    assert len({c / g.size for g, c in zip(groups, counts.values(), strict=True)}) > 1  # per-group rates
    assert "macs_reduction_found" in allocator.summary()  # the search's report reaches the run
    assert allocator.summary()["loss_evaluations"] > 0
    through_seam = get_method_class("lossvar")(groups, 0.5, options=options, image_size=SIZE)
    through_seam.set_counts(counts)
    on_its_own = get_method_class("lossvar")(groups, 0.5, options=options, image_size=SIZE).keep_masks(model, ctx)
    seam = through_seam.keep_masks(model, ctx)
    reference = _lossvar_reference(model, groups, counts)
    for g in groups:
        assert torch.equal(seam[g.name], on_its_own[g.name]), g.name
        assert torch.equal(seam[g.name], reference[g.name]), g.name
        assert int(seam[g.name].sum()) == counts[g.name]


def test_lossvars_ranking_drops_the_lower_index_of_tied_channels(calib):
    # zeroed filters tie at norm 0: the search masked the first of them in index order, and the
    # shared top-k must drop the same ones (a descending sort of the norms would keep them)
    model = _model()
    groups = find_groups(model, SIZE, "inner")
    g = groups[0]
    with torch.no_grad():
        model.get_submodule(g.producers[0]).weight[:6] = 0
    method = get_method_class("lossvar")(groups, 0.5, image_size=SIZE)
    method.set_counts({g.name: g.size - 3})
    mask = method.keep_masks(model)[g.name]
    assert mask[:3].tolist() == [False] * 3 and mask[3:].all()


def test_another_method_fills_the_loss_allocators_counts(calib):
    model = _model()
    groups = find_groups(model, SIZE, "inner")
    counts = get_allocator_class("loss")({"target_macs_reduction": 0.4, "calib_samples": 64}).allocate(
        model, groups, Budget(0.5), SelectContext(calib=calib, image_size=SIZE))
    for name in ("l2", "random"):
        method = get_method_class(name)(groups, 0.5, seed=0)
        method.set_counts(counts)
        masks = method.keep_masks(model)
        assert {k: int(m.sum()) for k, m in masks.items()} == counts, name


def test_counts_are_checked_at_the_seam():
    model = _model()
    groups = find_groups(model, SIZE, "inner")
    method = get_method_class("l1")(groups, 0.5)
    g = groups[0]
    for bad, says in [({"nope": 3}, "unknown channel group 'nope'"), ({g.name: 0}, f"keeps 0 of {g.size}"),
                      ({g.name: g.size + 1}, f"keeps {g.size + 1} of {g.size}"), ({g.name: 2.5}, "keeps 2.5")]:
        with pytest.raises(ValueError, match=says):
            method.set_counts(bad)


def test_a_registered_allocator_is_filled_by_every_kind_of_method():
    # an allocator of the test's own: the first group at 2 channels, the others whole
    @register_allocator
    class FirstTwo(Allocator):
        name = "test-first-two"

        def allocate(self, model, groups, budget, ctx=None):
            return {g.name: (2 if i == 0 else g.size) for i, g in enumerate(groups)}

    try:
        model = _model()
        groups = find_groups(model, SIZE, "inner")
        counts = get_allocator_class("test-first-two")().allocate(model, groups, Budget(0.5))
        for name in ("l1", "sfp", "random"):
            method = get_method_class(name)(groups, 0.5, seed=0, image_size=SIZE)
            method.set_counts(counts)
            if name == "sfp":
                method.prepare(model)
            masks = method.keep_masks(model)
            assert int(masks[groups[0].name].sum()) == 2, name
            assert all(bool(masks[g.name].all()) for g in groups[1:]), name
    finally:
        _ALLOCATORS.pop(FirstTwo.name)  # other tests list the registered allocators


def test_a_method_must_say_how_it_scores():
    from methods.base import Method

    with pytest.raises(TypeError, match="must define scores"):
        class Nothing(Method):
            name = "test-nothing"


def test_a_delta_given_to_the_loss_allocator_names_the_trial():
    from methods import budget_knob

    prune = {"method": "abp", "prune_ratio": 0.4, "allocate": "loss", "allocator_options": {"delta": 0.02}}
    knob = budget_knob("abp", prune)
    assert (knob.label, knob.value, knob.tag()) == ("δ", 0.02, "δ0.02")
    assert budget_knob("abp", {**prune, "allocate": "uniform"}).tag() == "r0.40"
