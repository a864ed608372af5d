"""A method describes its own budget knob (the setting that decided the widths): trial and run
names, the search table's knob column and the model card take it from the method, so a method
with a knob of its own needs no change outside its module."""

import ast
import re
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from launch import search_log
from launch.checks import check_config
from launch.model_card import build_card
from launch.search import _table_knob, format_table
from methods import Knob, Method, budget_knob, get_method_class, method_names, register_method
from methods.base import _REGISTRY
from pipeline.config import build_config
from pipeline.registry import run_name
from tests.conftest import ROOT


def _prune(method: str, ratio: float = 0.4, **options: Any) -> dict[str, Any]:
    return {"method": method, "prune_ratio": ratio, "scope": "inner", "round_to": 8,
            "options": {method: options} if options else {}}


def _row(conf: dict[str, Any], cfg) -> dict[str, Any]:
    return {"trial": "t1", "method": conf["prune.method"], "ratio": 0.4, "knob": _table_knob(conf, cfg),
            "status": "done", "val_top1": 0.9, "dense_val_top1": 0.95, "macs_reduction": 0.5,
            "params_reduction": 0.5, "img_s": 10.0, "dense_img_s": 5.0, "speedup": None, "speedup_efficiency": None}


@pytest.mark.parametrize("name", method_names())
def test_every_registered_method_describes_its_knob(name):
    knob = get_method_class(name).budget_knob(get_method_class(name).Options(), _prune(name))
    assert isinstance(knob, Knob) and knob.label and knob.setting
    # with its default options every built-in method is decided by the uniform ratio
    assert knob.is_ratio and knob.value == 0.4 and knob.tag() == "r0.40"
    assert budget_knob(name, _prune(name)) == knob
    assert run_name(name, knob.tag(), "abc_00001") == f"{name} r0.40 abc_00001"


def test_lossvar_with_a_delta_is_named_by_delta():
    knob = budget_knob("lossvar", _prune("lossvar", 0.5, delta=0.0234))
    assert (knob.label, knob.value, knob.setting, knob.is_ratio) == ("δ", 0.0234, "delta", False)
    assert run_name("lossvar", knob.tag(), "b5ee6_00001") == "lossvar δ0.0234 b5ee6_00001"
    # searching δ for a MACs target (or for the ratio's MACs): the ratio is what it was given
    assert budget_knob("lossvar", _prune("lossvar", 0.5, target_macs_reduction=0.4)).tag() == "r0.50"
    assert budget_knob("lossvar", _prune("lossvar", 0.5)).is_ratio


def test_a_name_is_given_even_to_options_the_trial_will_refuse():
    # a search may draw δ over a base that sets a target: the trial fails its checks, its name does not
    prune = _prune("lossvar", 0.5, delta=0.1, target_macs_reduction=0.4)
    assert budget_knob("lossvar", prune).tag() == "δ0.1"
    assert budget_knob("no_such_method", prune).tag() == "r0.50"  # unknown: a uniform-ratio method
    assert budget_knob("?", {}).tag() == ""


def test_trial_prune_lays_dotted_overrides_over_the_base():
    base = {"prune": _prune("l1", 0.5)}
    config = {"__base__": base, "prune.method": "lossvar", "prune.options.lossvar.delta": 0.1,
              "prune.prune_ratio": 0.3, "train.epochs": 9}
    prune = search_log.trial_prune(config)
    assert prune["method"] == "lossvar" and prune["prune_ratio"] == 0.3 and prune["round_to"] == 8
    assert prune["options"] == {"lossvar": {"delta": 0.1}}
    assert base["prune"]["options"] == {}  # the base is not touched: every trial shares it
    # without __base__ (a result whose config lost it), the search's own config is the base
    assert search_log.trial_prune({"prune.prune_ratio": 0.2}, base)["method"] == "l1"


def test_a_space_entry_for_some_methods_is_dropped_from_the_others_trials():
    base = {"prune": _prune("l1", 0.5),
            "search": {"space": {"prune.target_speedup": {"uniform": [1.3, 1.9], "methods": ["l1", "sfp"]},
                                 "prune.prune_ratio": {"uniform": [0.4, 0.7]}}}}
    drawn = {"__base__": base, "prune.target_speedup": 1.7, "prune.prune_ratio": 0.45}
    # sfp draws a target: that decides its widths, and its name says so
    assert search_log.trial_overrides({**drawn, "prune.method": "sfp"}) == {
        "prune.target_speedup": 1.7, "prune.prune_ratio": 0.45, "prune.method": "sfp"}
    assert search_log.label({**drawn, "prune.method": "sfp"}) == "sfp t1.70"
    # ista is not among the entry's methods: its trial keeps the base's (no target) and its ratio
    assert "prune.target_speedup" not in search_log.trial_overrides({**drawn, "prune.method": "ista"})
    assert search_log.label({**drawn, "prune.method": "ista"}) == "ista r0.45"
    assert search_log.label(drawn) == "l1 t1.70"  # the base's method, l1, is among them


def test_search_table_knob_column_is_unchanged_for_the_built_in_methods():
    cfg = build_config({"prune": {"method": "l1", "prune_ratio": 0.4}})
    lossvar = _row({"prune.method": "lossvar", "prune.options.lossvar.delta": 0.1}, cfg)
    l1 = _row({"prune.method": "l1", "prune.options.lossvar.delta": 0.1}, cfg)  # δ drawn, not used
    assert lossvar["knob"] == "δ0.1" and l1["knob"] is None
    table = format_table([lossvar, l1], None).splitlines()
    assert table[2].startswith("t1           lossvar        δ0.1 done")
    assert table[3].startswith("t1           l1             0.40 done")


# --- a method with a knob of its own, added without touching anything outside its class --------
class _BudgetOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    budget: float | None = None  # fraction of the dense MACs kept


class _MacsBudget(Method):
    name = "test_macs_budget"
    Options = _BudgetOptions

    @classmethod
    def budget_knob(cls, options: BaseModel, prune: Mapping[str, Any]) -> Knob:
        assert isinstance(options, _BudgetOptions)
        if options.budget is None:
            return super().budget_knob(options, prune)
        return Knob("MACs kept", options.budget, option="budget", symbol="m", fmt=".0%")

    def scores(self, model, ctx=None) -> dict[str, torch.Tensor]:
        return {g.name: torch.ones(g.size) for g in self.groups}

    def kept(self, group, scores) -> int:
        return group.size


@pytest.fixture
def macs_budget() -> Iterator[type[Method]]:
    cls = register_method(_MacsBudget)
    yield cls
    _REGISTRY.pop(cls.name)  # other tests list the registered methods


def test_a_new_method_with_its_own_knob_needs_no_change_outside_it(macs_budget):
    name = macs_budget.name
    assert budget_knob(name, _prune(name)).tag() == "r0.40"  # no budget given: the ratio decides
    knob = budget_knob(name, _prune(name, budget=0.3))
    assert run_name(name, knob.tag(), "abc_00002") == f"{name} m30% abc_00002"
    # the console's trial name, from a Tune config
    base = {"prune": _prune("l1", 0.5)}
    assert search_log.label({"__base__": base, "prune.method": name, "prune.options.test_macs_budget.budget": 0.3}) \
        == f"{name} m30%"
    # the search table's knob column
    cfg = build_config({"prune": {"method": "l1", "prune_ratio": 0.4}})
    row = _row({"prune.method": name, "prune.options.test_macs_budget.budget": 0.3}, cfg)
    assert "  m30% done" in format_table([row], None).splitlines()[2]
    # the model card: the budget decided the widths, the ratio it ignored is not shown
    card = build_card({"arch": "resnet18", "num_classes": 10, "config": {"prune": _prune(name, budget=0.3)}})
    assert "budget=0.3 decided the widths" in card and "prune_ratio" not in card
    # and the launch layer's checks find it by name like any built-in method
    check_config(build_config({"prune": {"method": name, "options": {name: {"budget": 0.3}}}}))


# lossvar or its δ option as a word of its own ("timedelta" is not one)
SPECIAL = re.compile(r"(?<![a-z])(lossvar|delta)(?![a-z])", re.IGNORECASE)


def test_no_method_is_special_cased_outside_methods():
    """Method knowledge lives in the methods: the code (not the docs) of the library and launch
    layers names neither lossvar nor its δ option; the method describes itself instead."""

    def words(path) -> list[str]:
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        found = []
        for n in ast.walk(tree):
            text = n.id if isinstance(n, ast.Name) else n.attr if isinstance(n, ast.Attribute) else \
                n.arg if isinstance(n, ast.arg) else \
                n.value if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings else ""
            if SPECIAL.search(text):
                found.append(f"{path.relative_to(ROOT)}:{n.lineno}: {text[:60]!r}")
        return found

    assert [hit for layer in ("pipeline", "launch") for path in sorted((ROOT / layer).rglob("*.py"))
            for hit in words(path)] == []
