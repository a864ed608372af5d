"""methods/knapsack.py: the latency allocator's multiple-choice knapsack, checked against brute force."""

from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest

from methods.knapsack import Choice, InfeasibleBudget, Solution, Term, brute_force, solve, total_cost

# ---------------------------------------------------------------------------------------------
# helpers


def _choice(rng: np.random.Generator, name: str, n: int) -> Choice:
    widths = tuple(int(w) for w in np.cumsum(rng.integers(1, 4, size=n)))
    values = tuple(float(v) for v in np.cumsum(rng.random(n)))  # strictly increasing
    return Choice(name, widths, values)


def _table(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return rng.random((rows, cols)) * 3.0  # not monotone: the solver must not rely on it


def _unary(rng: np.random.Generator, group: Choice) -> Term:
    n = len(group.widths)
    if rng.random() < 0.5:  # either axis may be the None one
        return Term(group.name, None, _table(rng, n, 1))
    return Term(None, group.name, _table(rng, 1, n))


def _pair(rng: np.random.Generator, a: Choice, b: Choice) -> Term:
    if rng.random() < 0.5:  # the table may name the pair in either order
        a, b = b, a
    return Term(a.name, b.name, _table(rng, len(a.widths), len(b.widths)))


def _random_instance(rng: np.random.Generator, n_groups: int, layout: str) -> tuple[list[Choice], list[Term]]:
    """Unary, pairwise (a chain, disjoint pairs or random pairs, one pair twice) and constant terms."""
    groups = [_choice(rng, f"g{k}", int(rng.integers(2, 5))) for k in range(n_groups)]
    if layout == "chain":
        pairs = list(itertools.pairwise(groups))
    elif layout == "pairs":
        pairs = list(zip(groups[::2], groups[1::2], strict=False))  # an odd one out stays alone
    else:
        pairs = [tuple(rng.choice(n_groups, size=2, replace=False)) for _ in range(n_groups)]
        pairs = [(groups[i], groups[j]) for i, j in pairs]
    terms = [_pair(rng, a, b) for a, b in pairs]
    if pairs:
        terms.append(_pair(rng, *pairs[0]))  # several terms on the same pair
    terms += [_unary(rng, g) for g in groups if rng.random() < 0.7]
    terms.append(Term(None, None, np.array([[float(rng.random())]])))
    return groups, terms


def _indices(choices: list[Choice]) -> list[tuple[int, ...]]:
    return list(itertools.product(*(range(len(c.widths)) for c in choices)))


def _all_costs(choices: list[Choice], terms: list[Term]) -> list[float]:
    return [total_cost(terms, {c.name: i for c, i in zip(choices, idx, strict=True)}) for idx in _indices(choices)]


def _interior_budget(rng: np.random.Generator, choices: list[Choice], terms: list[Term]) -> float:
    costs = _all_costs(choices, terms)
    return min(costs) + float(rng.uniform(0.05, 0.95)) * (max(costs) - min(costs))


def _index(choices: list[Choice], sol: Solution) -> dict[str, int]:
    return {c.name: c.widths.index(sol.widths[c.name]) for c in choices}


def _check_bounds(choices: list[Choice], terms: list[Term], budget: float, sol: Solution) -> bool:
    """Feasible, at most the optimum, at least the optimum at budget - slack_bound (True when that
    lower optimum exists, i.e. the lower bound was actually tested)."""
    idx = _index(choices, sol)
    assert sol.cost == total_cost(terms, idx)
    assert sol.value == pytest.approx(sum(c.values[idx[c.name]] for c in choices), abs=1e-12)
    assert sol.cost <= budget
    best = brute_force(choices, terms, budget)
    assert best is not None
    assert sol.value <= best.value + 1e-9
    lower = brute_force(choices, terms, budget - sol.slack_bound)
    if lower is None:
        return False
    assert sol.value >= lower.value - 1e-9
    return True


# ---------------------------------------------------------------------------------------------
# against brute force


@pytest.mark.parametrize("bins", [10, 40, 2000])
def test_matches_brute_force_without_hubs(bins: int) -> None:
    rng = np.random.default_rng(bins)
    lower_bound_checked = 0
    runs = 0
    for n_groups, layout in itertools.product((2, 3, 4), ("chain", "pairs", "random")):
        for _ in range(8):
            choices, terms = _random_instance(rng, n_groups, layout)
            budget = _interior_budget(rng, choices, terms)
            sol = solve(choices, terms, budget, bins=bins)
            assert sol.hubs_exact and sol.evaluations == 1
            lower_bound_checked += _check_bounds(choices, terms, budget, sol)
            runs += 1
    assert lower_bound_checked >= runs // 2  # the lower bound is not vacuous on most instances


def test_fine_bins_reach_the_optimum_when_it_has_room() -> None:
    # With 2000 bins the slack is small: whenever the optimum at budget - slack equals the optimum
    # at budget, the DP must find that value.
    rng = np.random.default_rng(7)
    compared = 0
    for _ in range(40):
        choices, terms = _random_instance(rng, 4, "random")
        budget = _interior_budget(rng, choices, terms)
        sol = solve(choices, terms, budget)
        best, lower = brute_force(choices, terms, budget), brute_force(choices, terms, budget - sol.slack_bound)
        if lower is not None and lower.value == best.value:
            assert sol.value == pytest.approx(best.value, abs=1e-12)
            compared += 1
    assert compared >= 20


@pytest.mark.parametrize("n_hubs", [1, 2])
def test_matches_brute_force_with_enumerated_hubs(n_hubs: int) -> None:
    rng = np.random.default_rng(100 + n_hubs)
    lower_bound_checked = 0
    runs = 0
    for n_groups in (3, 4, 5):
        for _ in range(10):
            choices, terms = _random_instance(rng, n_groups, "random")
            hubs = [c.name for c in rng.choice(choices, size=n_hubs, replace=False)]
            budget = _interior_budget(rng, choices, terms)
            sol = solve(choices, terms, budget, hubs=hubs, bins=40)
            assert sol.hubs_exact
            assert sol.evaluations <= np.prod([len(c.widths) for c in choices if c.name in hubs])
            lower_bound_checked += _check_bounds(choices, terms, budget, sol)
            runs += 1
    assert lower_bound_checked >= runs // 2


# ---------------------------------------------------------------------------------------------
# coordinate descent over hubs


def test_descent_is_feasible_and_inexact() -> None:
    rng = np.random.default_rng(5)
    solved = 0
    for _ in range(30):
        choices, terms = _random_instance(rng, 5, "random")
        hubs = [choices[0].name, choices[3].name]
        budget = _interior_budget(rng, choices, terms)
        # The tables are not monotone: descent knows only that the narrowest hubs are the cheapest.
        narrowest_hubs = [cost for idx, cost in zip(_indices(choices), _all_costs(choices, terms), strict=True)
                          if idx[0] == idx[3] == 0]
        if min(narrowest_hubs) > budget:
            with pytest.raises(InfeasibleBudget):
                solve(choices, terms, budget, hubs=hubs, max_hub_combos=1)
            continue
        sol = solve(choices, terms, budget, hubs=hubs, max_hub_combos=1)
        solved += 1
        assert not sol.hubs_exact
        assert sol.cost <= budget
        assert sol.cost == total_cost(terms, _index(choices, sol))
        assert sol.value <= brute_force(choices, terms, budget).value + 1e-9
    assert solved >= 15


def _hub_dominated_instance() -> tuple[list[Choice], list[Term], float]:
    """Hub values outweigh everything else and every hub assignment has a fitting selection, so the
    optimum has both hubs at their widest; descent from the narrowest must walk there."""
    rng = np.random.default_rng(11)
    h1 = Choice("h1", (8, 16, 24, 32), (0.0, 100.0, 200.0, 300.0))
    h2 = Choice("h2", (8, 16, 24, 32), (0.0, 100.0, 200.0, 300.0))
    x, y, z = (_choice(rng, name, 4) for name in ("x", "y", "z"))
    choices = [h1, x, y, h2, z]
    terms = [Term("h1", "x", _table(rng, 4, 4)), Term("x", "y", _table(rng, 4, 4)),
             Term("y", "h2", _table(rng, 4, 4)), Term("h1", "h2", _table(rng, 4, 4)),
             Term(None, "z", _table(rng, 1, 4)), Term(None, None, np.array([[0.5]]))]
    least_per_hubs: dict[tuple[int, int], float] = {}
    for idx, cost in zip(_indices(choices), _all_costs(choices, terms), strict=True):
        hubs = (idx[0], idx[3])
        least_per_hubs[hubs] = min(cost, least_per_hubs.get(hubs, cost))
    most_at_widest = max(c for i, c in zip(_indices(choices), _all_costs(choices, terms), strict=True)
                         if i[0] == i[3] == 3)
    budget = max(least_per_hubs.values()) + 0.5 * (most_at_widest - max(least_per_hubs.values()))
    return choices, terms, budget


def test_descent_walks_to_the_optimum() -> None:
    choices, terms, budget = _hub_dominated_instance()
    best = brute_force(choices, terms, budget)
    assert best.widths["h1"] == best.widths["h2"] == 32
    sol = solve(choices, terms, budget, hubs=["h1", "h2"], max_hub_combos=1, start={"h1": 8, "h2": 8})
    assert not sol.hubs_exact
    assert (sol.widths["h1"], sol.widths["h2"]) == (32, 32)
    lower = brute_force(choices, terms, budget - sol.slack_bound)
    assert lower.value == best.value  # the instance leaves the optimum room beyond the DP's slack
    assert sol.value == pytest.approx(best.value, abs=1e-12)
    assert sol.widths == best.widths


def test_descent_walks_towards_feasibility_from_an_infeasible_start() -> None:
    # Hub costs 0, 10, 20, 30 each: the default start (both widest, 60) is over the budget, and the
    # best fitting point has one hub one step up, which beats the narrowest-hubs fallback.
    hub_cost = np.array([[0.0, 10.0, 20.0, 30.0]])
    h1 = Choice("h1", (1, 2, 3, 4), (0.0, 1.0, 2.0, 3.0))
    h2 = Choice("h2", (1, 2, 3, 4), (0.0, 1.0, 2.0, 3.0))
    x = Choice("x", (4, 8), (0.0, 0.5))
    choices = [h1, h2, x]
    terms = [Term(None, "h1", hub_cost), Term(None, "h2", hub_cost), Term("x", None, np.array([[0.2], [0.9]]))]
    budget = 11.0
    sol = solve(choices, terms, budget, hubs=["h1", "h2"], max_hub_combos=1)
    assert not sol.hubs_exact
    assert sol.cost <= budget
    assert sol.value == pytest.approx(brute_force(choices, terms, budget).value)
    assert sol.value == pytest.approx(1.5)


def test_descent_raises_when_the_narrowest_hubs_do_not_fit() -> None:
    choices, terms, _ = _hub_dominated_instance()
    least = min(_all_costs(choices, terms))
    with pytest.raises(InfeasibleBudget):
        solve(choices, terms, least - 1e-6, hubs=["h1", "h2"], max_hub_combos=1)


# ---------------------------------------------------------------------------------------------
# budgets at the ends


def test_infeasible_budget_names_the_least_reachable_cost() -> None:
    rng = np.random.default_rng(3)
    choices, terms = _random_instance(rng, 4, "chain")  # random tables: the cheapest is not all narrowest
    least = min(_all_costs(choices, terms))
    for hubs in ((), ("g1",), ("g0", "g2")):
        with pytest.raises(InfeasibleBudget) as info:
            solve(choices, terms, least - 0.01, hubs=hubs)
        assert f"{least:.6g}" in str(info.value)
        assert info.value.least_cost == pytest.approx(least, abs=1e-12)
    assert brute_force(choices, terms, least - 0.01) is None
    assert solve(choices, terms, least).cost <= least  # exactly the least cost fits
    assert isinstance(info.value, ValueError)
    again = pickle.loads(pickle.dumps(info.value))  # crosses process boundaries (Ray workers)
    assert (again.budget, again.least_cost, str(again)) == (info.value.budget, info.value.least_cost, str(info.value))


@pytest.mark.parametrize("hubs", [(), ("g1",), ("g0", "g3")])
def test_a_budget_of_the_full_cost_keeps_every_group_widest(hubs: tuple[str, ...]) -> None:
    rng = np.random.default_rng(9)
    choices, terms = _random_instance(rng, 5, "chain")
    full = total_cost(terms, {c.name: len(c.widths) - 1 for c in choices})
    for budget in (full, full * 1.5):
        sol = solve(choices, terms, budget, hubs=hubs, bins=10)
        assert sol.widths == {c.name: c.widths[-1] for c in choices}
        assert sol.cost == full
        if not hubs:  # with hubs, other hub assignments went through the DP and set the bound
            assert sol.slack_bound == 0.0


# ---------------------------------------------------------------------------------------------
# structure, validation, determinism


def test_total_cost_sums_unary_pairwise_and_constant_terms() -> None:
    terms = [Term("a", "b", np.array([[1.0, 2.0], [3.0, 4.0]])), Term(None, "a", np.array([[10.0, 20.0]])),
             Term("b", None, np.array([[100.0], [200.0]])), Term(None, None, np.array([[0.5]]))]
    assert total_cost(terms, {"a": 1, "b": 0}) == 3.0 + 20.0 + 100.0 + 0.5
    with pytest.raises(ValueError, match="'b'"):
        total_cost(terms, {"a": 1})
    with pytest.raises(ValueError, match="index 2 of group 'a'"):
        total_cost(terms, {"a": 2, "b": 0})


def test_a_component_over_max_options_asks_for_a_hub() -> None:
    widths = tuple(range(1, 21))
    values = tuple(float(w) for w in widths)
    choices = [Choice(name, widths, values) for name in ("a", "b", "c")]
    table = np.ones((20, 20))
    terms = [Term("a", "b", table), Term("b", "c", table)]  # 20**3 = 8000 combinations in one component
    with pytest.raises(ValueError, match=r"\['a', 'b', 'c'\] has 8000 .*max_options=4096.*hub"):
        solve(choices, terms, 30.0)
    sol = solve(choices, terms, 30.0, hubs=["b"])  # the hub splits it into two 20-option classes
    assert sol.cost <= 30.0


def test_deterministic_whatever_the_hub_order() -> None:
    rng = np.random.default_rng(21)
    choices, terms = _random_instance(rng, 5, "random")
    budget = _interior_budget(rng, choices, terms)
    runs = [solve(choices, terms, budget, hubs=hubs, bins=20) for hubs in (["g1", "g3"], ("g3", "g1"), {"g3", "g1"})]
    runs.append(solve(choices, terms, budget, hubs=["g1", "g3"], bins=20))
    assert all(r == runs[0] for r in runs)
    descents = [solve(choices, terms, budget, hubs=hubs, max_hub_combos=1) for hubs in (["g1", "g3"], ["g3", "g1"])]
    assert descents[0] == descents[1]


def test_ties_go_to_the_cheaper_option() -> None:
    choices = [Choice("a", (1, 2, 3), (1.0, 2.0, 2.0))]  # widths 2 and 3 are worth the same
    terms = [Term("a", None, np.array([[1.0], [2.0], [3.0]]))]
    assert solve(choices, terms, 2.5).widths == {"a": 2}
    assert solve(choices, terms, 10.0).widths == {"a": 2}


def test_exact_ties_go_to_the_lowest_index() -> None:
    # (a, b) = (1, 2) and (2, 1) cost and weigh the same; so do all of hub h's widths
    choices = [Choice("a", (1, 2), (0.0, 1.0)), Choice("b", (1, 2), (0.0, 1.0)), Choice("h", (1, 2, 3), (0.0, 0.0, 0.0))]
    terms = [Term("a", "b", np.array([[0.0, 1.0], [1.0, 5.0]])), Term("h", None, np.zeros((3, 1)))]
    for hubs in ((), ("h",)):
        for budget in (1.5, 3.0):
            assert solve(choices, terms, budget, hubs=hubs).widths == {"a": 1, "b": 2, "h": 1}
    assert brute_force(choices, terms, 1.5).widths == {"a": 1, "b": 2, "h": 1}


def _good() -> tuple[list[Choice], list[Term]]:
    choices = [Choice("x", (1, 2, 3), (1.0, 2.0, 3.0)), Choice("y", (4, 8), (1.0, 2.0))]
    return choices, [Term("x", "y", np.ones((3, 2)))]


def _with_term(term: Term) -> tuple[list[Choice], list[Term]]:
    choices, terms = _good()
    return choices, terms + [term]


def _with_choice(choice: Choice) -> tuple[list[Choice], list[Term]]:
    choices, terms = _good()
    return choices + [choice], terms


BAD_PROBLEMS = {
    "unknown group": (_with_term(Term("x", "nope", np.ones((3, 1)))), {}, r"terms\[1\].*unknown group 'nope'"),
    "cost shape": (_with_term(Term("y", "x", np.ones((3, 2)))), {},
                   r"terms\[1\] \('y', 'x'\): cost shape \(3, 2\), expected \(2, 3\)"),
    "negative cost": (_with_term(Term(None, "x", -np.ones((1, 3)))), {}, r"terms\[1\] \(None, 'x'\).*>= 0"),
    "nan cost": (_with_term(Term("y", None, np.array([[1.0], [np.nan]]))), {}, r"terms\[1\] \('y', None\).*finite"),
    "same group twice": (_with_term(Term("x", "x", np.ones((3, 3)))), {}, r"terms\[1\].*'x' on both axes"),
    "widths not ascending": (_with_choice(Choice("z", (2, 2), (1.0, 2.0))), {}, r"choice 'z'.*strictly ascending"),
    "values length": (_with_choice(Choice("z", (1, 2), (1.0,))), {}, r"choice 'z': 1 values for 2 widths"),
    "duplicate choice": (_with_choice(Choice("x", (1,), (1.0,))), {}, r"choice 'x' is given twice"),
    "hub unknown": (_good(), {"hubs": ["w"]}, r"hub 'w' is not among the choices"),
    "hubs as a string": (_good(), {"hubs": "x"}, r"hubs must be a collection"),
    "bins": (_good(), {"bins": 9}, r"bins must be an integer >= 10"),
    "budget inf": (_good(), {"budget": float("inf")}, r"budget must be finite"),
    "budget nan": (_good(), {"budget": float("nan")}, r"budget must be finite"),
    "start not a hub": (_good(), {"hubs": ["x"], "start": {"y": 4}}, r"start names 'y'"),
    "start width": (_good(), {"hubs": ["x"], "start": {"x": 5}}, r"start width 5 of hub 'x'"),
}


@pytest.mark.parametrize("case", list(BAD_PROBLEMS))
def test_bad_input_names_the_item(case: str) -> None:
    (choices, terms), kwargs, pattern = BAD_PROBLEMS[case]
    kwargs = dict(kwargs)
    budget = kwargs.pop("budget", 10.0)
    with pytest.raises(ValueError, match=pattern):
        solve(choices, terms, budget, **kwargs)


def test_brute_force_refuses_large_problems() -> None:
    choices = [Choice(f"g{k}", tuple(range(1, 11)), tuple(float(v) for v in range(10))) for k in range(6)]
    with pytest.raises(ValueError, match="1000000 combinations"):
        brute_force(choices, [], 1.0)
