"""Latency-budgeted width choice as a multiple-choice knapsack, solved by dynamic programming.

A latency allocator gives every channel group a list of candidate kept counts (:class:`Choice`:
the widths and the importance kept at each) and the predicted latency as a sum of :class:`Term` s,
each a table over at most two groups' widths (a conv's cost depends on its input group and its
output group). :func:`solve` picks one candidate per group: the largest total value whose total
cost is within the budget. Nothing here knows about networks; the caller builds the tables.

How
---
*Hubs* (residual streams: one group that many terms touch) are fixed first, one assignment of hub
widths at a time. With the hubs fixed, every term touching a hub folds into a term on fewer groups,
and the other groups split into connected components through the remaining two-group terms. Each
component is one class of a multiple-choice knapsack (MCKP): its options are the cartesian product
of its groups' candidates (at most ``max_options``), its option cost the sum of its folded terms.
Dominated options (one at least as costly and at most as valuable as another) are dropped; a class
left with one option is a constant. The MCKP is a DP over the cost discretized into ``bins`` units
``delta``; an option weighs ``ceil(cost / delta)`` units, rounded *up*, so whatever the DP takes
fits under the exact costs. The hub assignments are all enumerated when there are at most
``max_hub_combos`` of them, else searched by coordinate descent (one hub at a time).

Guarantees
----------
* Feasible: a returned :class:`Solution` has ``cost <= budget``, its cost summed term by term from
  the exact tables. (Besides rounding up, the DP holds back ``1e-12 * |budget|`` of the budget so
  float64 summation order cannot push the exact total over it.)
* Per hub assignment *h* solved: the value is at least the exact optimum with those hub widths at
  budget ``budget - s_h``, where ``s_h = n_h * delta_h + guard``, ``n_h`` the classes with more than
  one undominated option and ``delta_h = (budget - fixed_h - guard) / bins`` (``fixed_h``: the
  constants and one-option classes). Each option's rounding overshoots by less than ``delta_h``,
  so any selection of exact cost within ``budget - s_h`` fits the DP's capacity. ``s_h = 0`` when
  every class's most valuable option fits together (then that is the exact optimum); when the
  room left is too small for the DP (no more than the guard), ``s_h`` is that whole room and each
  class takes its cheapest option.
* ``hubs_exact`` (every hub assignment enumerated, or no hubs): ``OPT(budget - slack_bound) <=
  value <= OPT(budget)``, with ``slack_bound`` the largest ``s_h`` over the assignments solved and
  ``OPT(b)`` the exact optimum of the whole problem at budget ``b``.
* Not ``hubs_exact`` (coordinate descent): no global bound. The hub widths are a point where no
  single hub's change improved the value (unless ``max_sweeps`` ran out first); the rest of the
  widths still meet the per-assignment bound above, and ``slack_bound`` is the largest ``s_h``.
* :class:`InfeasibleBudget` is raised when enumerated hubs leave no combination within the budget
  (its least cost is then the true minimum), or, under descent, when the hubs at their narrowest
  candidates with every other group at its cheapest exceed the budget (the true minimum whenever
  cost grows with width). Otherwise a feasible solution is returned: descent that ends on no
  feasible point falls back to the narrowest hubs.
* Deterministic: ties go to the cheaper option, then to the lower candidate index, and between hub
  assignments to the first found (lexicographic over hub candidate indices, hubs in choice order).

Values need not grow with width; nothing above relies on it. :func:`brute_force` enumerates every
combination, for tests and for checking small problems.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# The share of |budget| the DP leaves unused: the DP sums costs per class, the reported cost sums
# them term by term, and the two float64 orders may differ by a few ulps of the total.
_GUARD = 1e-12
# Largest (options x capacities) block one DP step materializes; bigger classes go in chunks.
_BLOCK_ELEMENTS = 1 << 20
BRUTE_FORCE_LIMIT = 200_000


@dataclass(frozen=True)
class Choice:
    """One channel group's candidates: ``values[i]`` is the value of keeping ``widths[i]`` channels."""

    name: str
    widths: tuple[int, ...]
    values: tuple[float, ...]


# eq=False: the default __eq__/__hash__ would compare and hash the ndarray, which numpy refuses.
@dataclass(frozen=True, eq=False)
class Term:
    """A cost table over the candidate indices of groups ``a`` (rows) and ``b`` (columns).

    ``None`` on an axis means the table does not vary along it (that axis has length 1): one
    ``None`` makes a unary term, two a constant.
    """

    a: str | None
    b: str | None
    cost: np.ndarray


@dataclass(frozen=True)
class Solution:
    widths: dict[str, int]
    value: float
    cost: float
    budget: float
    slack_bound: float
    hubs_exact: bool
    evaluations: int


class InfeasibleBudget(ValueError):
    """No choice of widths fits the budget: even the cheapest costs more."""

    def __init__(self, budget: float, least_cost: float) -> None:
        self.budget = budget
        self.least_cost = least_cost
        super().__init__(f"latency budget {budget:.6g} is below the least reachable cost {least_cost:.6g} "
                         "(every group at its narrowest width)")

    def __reduce__(self):  # picklable across processes (Ray workers) despite the two-argument init
        return type(self), (self.budget, self.least_cost)


# ---------------------------------------------------------------------------------------------
# validated problem


@dataclass(frozen=True, eq=False)
class _Term:
    a: int | None  # group position, None = not variable
    b: int | None
    cost: np.ndarray  # 2-D float64


@dataclass(frozen=True)
class _Problem:
    names: tuple[str, ...]
    widths: tuple[tuple[int, ...], ...]
    values: tuple[np.ndarray, ...]
    terms: tuple[_Term, ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(w) for w in self.widths)


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_choice(k: int, choice: object, seen: Mapping[str, int]) -> tuple[str, tuple[int, ...], np.ndarray]:
    if not isinstance(choice, Choice):
        raise ValueError(f"choices[{k}] is a {type(choice).__name__}, not a Choice")
    name = choice.name
    if not isinstance(name, str) or not name:
        raise ValueError(f"choices[{k}]: the name must be a non-empty string, got {name!r}")
    if name in seen:
        raise ValueError(f"choice {name!r} is given twice")
    widths = tuple(choice.widths)
    if not widths:
        raise ValueError(f"choice {name!r} has no candidate widths")
    if not all(_is_int(w) and w >= 0 for w in widths):
        raise ValueError(f"choice {name!r}: widths must be non-negative integers, got {widths}")
    if any(hi <= lo for lo, hi in itertools.pairwise(widths)):
        raise ValueError(f"choice {name!r}: widths must be strictly ascending, got {widths}")
    try:
        values = np.array(choice.values, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"choice {name!r}: values are not numbers ({err})") from err
    if values.ndim != 1 or values.size != len(widths):
        raise ValueError(f"choice {name!r}: {values.size} values for {len(widths)} widths")
    if not np.isfinite(values).all():
        raise ValueError(f"choice {name!r}: values must be finite, got {tuple(values.tolist())}")
    return name, tuple(int(w) for w in widths), values


def _check_term(k: int, term: object, index: Mapping[str, int], sizes: Sequence[int]) -> _Term:
    if not isinstance(term, Term):
        raise ValueError(f"terms[{k}] is a {type(term).__name__}, not a Term")
    label = f"terms[{k}] ({term.a!r}, {term.b!r})"
    axes: list[int | None] = []
    for group in (term.a, term.b):
        if group is not None and group not in index:
            raise ValueError(f"{label}: unknown group {group!r}")
        axes.append(None if group is None else index[group])
    if axes[0] is not None and axes[0] == axes[1]:
        raise ValueError(f"{label} names group {term.a!r} on both axes; a cost of one group is a unary term")
    try:
        cost = np.array(term.cost, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{label}: cost is not a numeric array ({err})") from err
    expected = tuple(1 if g is None else sizes[g] for g in axes)
    if cost.shape != expected:
        raise ValueError(f"{label}: cost shape {cost.shape}, expected {expected} (candidates of a, of b; 1 for None)")
    if not np.isfinite(cost).all() or (cost < 0).any():
        raise ValueError(f"{label}: costs must be finite and >= 0")
    cost.setflags(write=False)
    return _Term(axes[0], axes[1], cost)


def _compile(choices: Sequence[Choice], terms: Sequence[Term]) -> _Problem:
    index: dict[str, int] = {}
    widths: list[tuple[int, ...]] = []
    values: list[np.ndarray] = []
    for k, choice in enumerate(choices):
        name, w, v = _check_choice(k, choice, index)
        index[name] = k
        widths.append(w)
        values.append(v)
    sizes = [len(w) for w in widths]
    checked = tuple(_check_term(k, t, index, sizes) for k, t in enumerate(terms))
    return _Problem(tuple(index), tuple(widths), tuple(values), checked)


def _check_budget(budget: float) -> float:
    try:
        value = float(budget)
    except (TypeError, ValueError) as err:
        raise ValueError(f"budget must be a finite number, got {budget!r}") from err
    if not math.isfinite(value):
        raise ValueError(f"budget must be finite, got {budget!r}")
    return value


def _check_count(name: str, value: object, least: int) -> None:
    if not _is_int(value) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def _hub_positions(problem: _Problem, hubs: Collection[str]) -> tuple[int, ...]:
    if isinstance(hubs, str):  # a lone name would iterate as its letters
        raise ValueError(f"hubs must be a collection of group names, not the string {hubs!r}")
    index = {name: g for g, name in enumerate(problem.names)}
    for hub in hubs:
        if hub not in index:
            raise ValueError(f"hub {hub!r} is not among the choices")
    return tuple(sorted({index[h] for h in hubs}))  # choice order, whatever order the collection has


def _start_assignment(problem: _Problem, hubs: Sequence[int], start: Mapping[str, int] | None) -> tuple[int, ...]:
    """Candidate index per hub: the width ``start`` names, else the widest."""
    start = dict(start or {})
    hub_names = {problem.names[h] for h in hubs}
    for name in start:
        if name not in hub_names:
            raise ValueError(f"start names {name!r}, which is not a hub")
    picks = []
    for h in hubs:
        widths = problem.widths[h]
        width = start.get(problem.names[h], widths[-1])
        if width not in widths:
            raise ValueError(f"start width {width!r} of hub {problem.names[h]!r} is not among its widths {widths}")
        picks.append(widths.index(width))
    return tuple(picks)


# ---------------------------------------------------------------------------------------------
# exact sums (one summation order everywhere a cost or value is reported or compared to the budget)


def total_cost(terms: Sequence[Term], widths_index: Mapping[str, int]) -> float:
    """The sum of every term's cost at the given candidate indices (group name -> index)."""
    total = 0.0
    for k, term in enumerate(terms):
        cost = np.asarray(term.cost, dtype=float)
        at = []
        for axis, group in enumerate((term.a, term.b)):
            if group is None:
                at.append(0)
                continue
            if group not in widths_index:
                raise ValueError(f"terms[{k}] names group {group!r}, which widths_index lacks")
            i = widths_index[group]
            if not _is_int(i) or not 0 <= i < cost.shape[axis]:
                raise ValueError(f"terms[{k}]: index {i!r} of group {group!r} is out of range")
            at.append(int(i))
        total += float(cost[at[0], at[1]])
    return total


def _total(problem: _Problem, idx: Sequence[int]) -> float:
    total = 0.0
    for t in problem.terms:
        total += float(t.cost[0 if t.a is None else idx[t.a], 0 if t.b is None else idx[t.b]])
    return total


def _value(problem: _Problem, idx: Sequence[int]) -> float:
    total = 0.0
    for values, i in zip(problem.values, idx, strict=True):
        total += float(values[i])
    return total


def _solution(problem: _Problem, idx: Sequence[int], budget: float, slack: float, exact: bool,
              evaluations: int) -> Solution:
    widths = {name: problem.widths[g][idx[g]] for g, name in enumerate(problem.names)}
    return Solution(widths, _value(problem, idx), _total(problem, idx), budget, slack, exact, evaluations)


# ---------------------------------------------------------------------------------------------
# folding terms onto the free (non-hub) groups


def _fold(term: _Term, hub_idx: Mapping[int, int]) -> tuple[np.ndarray, list[int]]:
    """The term's table with hub axes fixed at ``hub_idx`` and None axes at 0, and its remaining groups."""
    key: list[int | slice] = []
    free: list[int] = []
    for group in (term.a, term.b):
        if group is None:
            key.append(0)
        elif group in hub_idx:
            key.append(hub_idx[group])
        else:
            key.append(slice(None))
            free.append(group)
    return np.asarray(term.cost[tuple(key)]), free


def _place(table: np.ndarray, free: Sequence[int], axes: Mapping[int, int], ndim: int) -> np.ndarray:
    """``table`` (over ``free`` groups, in that order) shaped to broadcast over a grid with ``axes``."""
    if not free:
        return table
    where = [axes[g] for g in free]
    if len(where) == 2 and where[0] > where[1]:
        table, where = table.T, where[::-1]
    shape = [1] * ndim
    for axis, n in zip(where, table.shape, strict=True):
        shape[axis] = n
    return table.reshape(shape)


def _grid_sum(tables: Sequence[tuple[np.ndarray, Sequence[int]]], axes: Mapping[int, int],
              shape: tuple[int, ...]) -> np.ndarray:
    grid = np.zeros(shape)
    for table, free in tables:
        grid = grid + _place(table, free, axes, len(shape))
    return grid


@dataclass(frozen=True)
class _Frontier:
    """A class's undominated options, by ascending cost (so strictly ascending value)."""

    cost: np.ndarray
    value: np.ndarray
    ids: np.ndarray  # flat option index into the class's grid


def _frontier(cost: np.ndarray, value: np.ndarray) -> _Frontier:
    # Sorted by cost, then the more valuable first (lexsort is stable: then the lower option id).
    # An option survives when it beats every option before it, all at most as costly; a dropped one
    # is matched or beaten by an earlier, no costlier one, so no optimum needs it.
    order = np.lexsort((-value, cost))
    c, v = cost[order], value[order]
    keep = np.ones(v.size, dtype=bool)
    keep[1:] = v[1:] > np.maximum.accumulate(v)[:-1]
    return _Frontier(c[keep], v[keep], order[keep])


@dataclass
class _Class:
    """One connected component of free groups: one MCKP class."""

    groups: tuple[int, ...]
    shape: tuple[int, ...]
    axes: dict[int, int]
    value: np.ndarray  # per option (grid flattened in C order)
    static_cost: np.ndarray  # per option, from the terms that touch no hub
    hub_terms: list[_Term]  # folded anew for every hub assignment
    frontier: _Frontier | None  # the same for every hub assignment when no hub term touches the class

    def options(self, hub_idx: Mapping[int, int]) -> _Frontier:
        if self.frontier is not None:
            return self.frontier
        folded = [_fold(t, hub_idx) for t in self.hub_terms]
        cost = self.static_cost + _grid_sum(folded, self.axes, self.shape).ravel()
        return _frontier(cost, self.value)


@dataclass(frozen=True)
class _Layout:
    hubs: tuple[int, ...]
    classes: tuple[_Class, ...]
    static_const: float  # terms on no variable group
    hub_const_terms: tuple[_Term, ...]  # terms on hubs only: a constant once the hubs are fixed


def _components(problem: _Problem, hubs: Collection[int]) -> list[list[int]]:
    parent = list(range(len(problem.names)))

    def root(g: int) -> int:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    for t in problem.terms:
        free = [g for g in (t.a, t.b) if g is not None and g not in hubs]
        if len(free) == 2:
            ra, rb = root(free[0]), root(free[1])
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = {}
    for g in range(len(problem.names)):
        if g not in hubs:
            members.setdefault(root(g), []).append(g)
    return list(members.values())  # ordered by each component's first group


def _layout(problem: _Problem, hubs: tuple[int, ...], max_options: int) -> _Layout:
    hub_set = set(hubs)
    groups_of = _components(problem, hub_set)
    class_of = {g: k for k, groups in enumerate(groups_of) for g in groups}
    static: list[list[_Term]] = [[] for _ in groups_of]
    touching: list[list[_Term]] = [[] for _ in groups_of]
    static_const, hub_const = 0.0, []
    for t in problem.terms:
        free = [g for g in (t.a, t.b) if g is not None and g not in hub_set]
        on_hub = any(g in hub_set for g in (t.a, t.b))
        if free:
            (touching if on_hub else static)[class_of[free[0]]].append(t)
        elif on_hub:
            hub_const.append(t)
        else:
            static_const += float(t.cost[0, 0])
    classes = []
    for groups, own, hubbed in zip(groups_of, static, touching, strict=True):
        shape = tuple(problem.sizes[g] for g in groups)
        options = math.prod(shape)
        if options > max_options:
            names = [problem.names[g] for g in groups]
            raise ValueError(f"component {names} has {options} width combinations, more than max_options="
                             f"{max_options}; mark one of its groups as a hub (hubs=...) to split it")
        axes = {g: i for i, g in enumerate(groups)}
        value = _grid_sum([(problem.values[g], [g]) for g in groups], axes, shape).ravel()
        static_cost = _grid_sum([_fold(t, {}) for t in own], axes, shape).ravel()
        frontier = None if hubbed else _frontier(static_cost, value)
        classes.append(_Class(tuple(groups), shape, axes, value, static_cost, hubbed, frontier))
    return _Layout(hubs, tuple(classes), static_const, tuple(hub_const))


# ---------------------------------------------------------------------------------------------
# the multiple-choice knapsack DP


def _dp_step(best: np.ndarray, weight: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``new[c] = max_j best[c - weight[j]] + value[j]`` for every capacity c, and the first argmax j."""
    n = best.size
    new = np.full(n, -np.inf)
    arg = np.zeros(n, dtype=np.int64)
    chunk = max(1, _BLOCK_ELEMENTS // n)
    for lo in range(0, weight.size, chunk):
        w, v = weight[lo:lo + chunk], value[lo:lo + chunk]
        shift = int(w.max())
        # row r of the window view is best[c - (shift - r)] for c = 0..n-1 (-inf below capacity 0)
        window = sliding_window_view(np.concatenate([np.full(shift, -np.inf), best]), n)
        cand = window[shift - w] + v[:, None]
        j = cand.argmax(axis=0)
        top = cand[j, np.arange(n)]
        better = top > new  # strict: an earlier chunk (cheaper options) keeps ties
        new[better] = top[better]
        arg[better] = j[better] + lo
    return new, arg


def _mckp(weights: Sequence[np.ndarray], values: Sequence[np.ndarray], capacity: int) -> list[int] | None:
    """One option per class, total weight <= capacity, the largest total value: the options' positions.

    Each class's weights ascend (a frontier). ``best[c]`` is the best value of the classes so far
    within weight ``c``; the first class starts from 0 at every capacity.
    """
    lightest = [int(w[0]) for w in weights]
    spare = capacity - sum(lightest)
    if spare < 0:
        return None
    best = np.zeros(capacity + 1)
    steps = []
    for w, v, low in zip(weights, values, lightest, strict=True):
        # Of options of equal weight only the last (most valuable) matters to the DP; no option
        # heavier than its class's lightest plus the spare can be part of a fitting selection.
        last_of_weight = np.ones(w.size, dtype=bool)
        last_of_weight[:-1] = w[1:] != w[:-1]
        kept = np.flatnonzero(last_of_weight & (w <= low + spare))
        best, arg = _dp_step(best, w[kept], v[kept])
        steps.append((kept, w[kept], arg.astype(np.min_scalar_type(kept.size))))
    # The lightest selection fits (spare >= 0), so best[capacity] is finite and the walk stays in range.
    picks = []
    c = capacity
    for kept, w, arg in reversed(steps):
        j = int(arg[c])
        picks.append(int(kept[j]))
        c -= int(w[j])
    return picks[::-1]


def _weights(cost: np.ndarray, delta: float, capacity: int) -> np.ndarray:
    w = np.ceil(cost / delta)
    w += w * delta < cost  # the division may land just under an integer: round up in earnest
    return np.minimum(w, capacity + 1).astype(np.int64)  # anything over capacity is out anyway


# ---------------------------------------------------------------------------------------------
# one hub assignment


@dataclass(frozen=True)
class _Folded:
    assign: tuple[int, ...]
    const: float
    frontiers: tuple[_Frontier, ...]
    min_cost: float  # exact cost of every class at its cheapest option: the least this assignment reaches


@dataclass(frozen=True)
class _Outcome:
    idx: tuple[int, ...]
    value: float
    cost: float
    slack: float


@dataclass(frozen=True)
class _Point:
    """What the hub search keeps of one assignment (not its frontiers: enumeration may make 512)."""

    assign: tuple[int, ...]
    min_cost: float
    outcome: _Outcome | None  # None: even the cheapest selection is over budget

    @property
    def rank(self) -> tuple[int, float]:
        # feasible beats infeasible; among infeasible points the cheaper, so descent walks towards feasibility
        if self.outcome is not None:
            return 1, self.outcome.value
        return 0, -self.min_cost


class _Search:
    def __init__(self, problem: _Problem, layout: _Layout, budget: float, bins: int) -> None:
        self.problem, self.layout, self.budget, self.bins = problem, layout, budget, bins
        self.evaluations = 0
        self.slack = 0.0
        self._points: dict[tuple[int, ...], _Point] = {}

    def indices(self, assign: Sequence[int], frontiers: Sequence[_Frontier], picks: Sequence[int]) -> tuple[int, ...]:
        """Candidate index per group: hubs from ``assign``, each class's ``picks``-th frontier option."""
        idx = [0] * len(self.problem.names)
        for h, i in zip(self.layout.hubs, assign, strict=True):
            idx[h] = i
        for cls, front, p in zip(self.layout.classes, frontiers, picks, strict=True):
            for g, i in zip(cls.groups, np.unravel_index(int(front.ids[p]), cls.shape), strict=True):
                idx[g] = int(i)
        return tuple(idx)

    def fold(self, assign: tuple[int, ...]) -> _Folded:
        hub_idx = dict(zip(self.layout.hubs, assign, strict=True))
        const = self.layout.static_const
        for t in self.layout.hub_const_terms:
            const += float(_fold(t, hub_idx)[0])
        frontiers = tuple(cls.options(hub_idx) for cls in self.layout.classes)
        cheapest = self.indices(assign, frontiers, [0] * len(frontiers))
        return _Folded(assign, const, frontiers, _total(self.problem, cheapest))

    def point(self, assign: tuple[int, ...]) -> _Point:
        if assign not in self._points:
            folded = self.fold(assign)
            outcome = self._solve(folded) if folded.min_cost <= self.budget else None
            self._points[assign] = _Point(assign, folded.min_cost, outcome)
        return self._points[assign]

    def _solve(self, folded: _Folded) -> _Outcome:
        self.evaluations += 1
        outcome = self._solve_classes(folded)
        self.slack = max(self.slack, outcome.slack)
        return outcome

    def _solve_classes(self, folded: _Folded) -> _Outcome:
        fronts = folded.frontiers
        richest = self.indices(folded.assign, fronts, [f.ids.size - 1 for f in fronts])
        cost = _total(self.problem, richest)
        if cost <= self.budget:  # every class's most valuable option fits: exact, no rounding
            return _Outcome(richest, _value(self.problem, richest), cost, 0.0)
        picks = [0] * len(fronts)  # the cheapest selection, feasible: the fallback if the DP cannot help
        multi = [k for k, f in enumerate(fronts) if f.ids.size > 1]
        fixed = folded.const + sum(float(f.cost[0]) for f in fronts if f.ids.size == 1)
        room = self.budget - fixed
        usable = room - _GUARD * abs(self.budget)
        slack = max(room, 0.0)  # without a DP only the cheapest selection is certain: optimal at no room
        if usable > 0 and multi:
            delta = usable / self.bins
            weights = [_weights(fronts[k].cost, delta, self.bins) for k in multi]
            chosen = _mckp(weights, [fronts[k].value for k in multi], self.bins)
            slack = (room - usable) + len(multi) * delta
            # chosen is None only when the cheapest selection overshoots the discretized capacity;
            # then nothing within room - slack exists, and the cheapest selection stands.
            if chosen is not None:
                for k, j in zip(multi, chosen, strict=True):
                    picks[k] = j
        idx = self.indices(folded.assign, fronts, picks)
        return _Outcome(idx, _value(self.problem, idx), _total(self.problem, idx), slack)

    def enumerate_all(self, sizes: Sequence[int]) -> _Point:
        best: _Point | None = None
        for assign in itertools.product(*(range(n) for n in sizes)):
            p = self.point(assign)
            if best is None or p.rank > best.rank:
                best = p
        assert best is not None  # the product of no hubs is one empty assignment
        if best.outcome is None:  # best ranks the least min_cost among infeasible points
            raise InfeasibleBudget(self.budget, best.min_cost)
        return best

    def descend(self, sizes: Sequence[int], initial: tuple[int, ...], max_sweeps: int) -> _Point:
        narrowest = tuple(0 for _ in sizes)
        least = self.fold(narrowest).min_cost
        if least > self.budget:
            raise InfeasibleBudget(self.budget, least)
        current = self.point(initial)
        for _ in range(max_sweeps):
            moved = False
            for h, n in enumerate(sizes):
                best = current
                for i in range(n):
                    if i != current.assign[h]:
                        trial = self.point(current.assign[:h] + (i,) + current.assign[h + 1:])
                        if trial.rank > best.rank:  # strict: ties keep the current, then the first found
                            best = trial
                if best is not current:
                    current, moved = best, True
            if not moved:
                break
        return current if current.outcome is not None else self.point(narrowest)


# ---------------------------------------------------------------------------------------------
# entry points


def solve(choices: Sequence[Choice], terms: Sequence[Term], budget: float, *, hubs: Collection[str] = (),
          bins: int = 2000, max_options: int = 4096, max_hub_combos: int = 512,
          start: Mapping[str, int] | None = None, max_sweeps: int = 4) -> Solution:
    """The widths of the largest total value within ``budget`` (see the module docstring's guarantees).

    ``hubs`` are fixed per assignment (all enumerated up to ``max_hub_combos``, else coordinate
    descent from ``start``, a width per hub defaulting to its widest, for at most ``max_sweeps``
    sweeps; ``start`` is unused when enumerating). ``bins`` is the DP's cost resolution and
    ``max_options`` the most width combinations one component of non-hub groups may have.
    """
    problem = _compile(choices, terms)
    budget = _check_budget(budget)
    _check_count("bins", bins, 10)
    _check_count("max_options", max_options, 1)
    _check_count("max_hub_combos", max_hub_combos, 1)
    _check_count("max_sweeps", max_sweeps, 1)
    hub_pos = _hub_positions(problem, hubs)
    initial = _start_assignment(problem, hub_pos, start)
    layout = _layout(problem, hub_pos, max_options)
    search = _Search(problem, layout, budget, bins)
    sizes = [problem.sizes[h] for h in hub_pos]
    exact = math.prod(sizes) <= max_hub_combos
    point = search.enumerate_all(sizes) if exact else search.descend(sizes, initial, max_sweeps)
    assert point.outcome is not None
    return _solution(problem, point.outcome.idx, budget, search.slack, exact, search.evaluations)


def brute_force(choices: Sequence[Choice], terms: Sequence[Term], budget: float) -> Solution | None:
    """The exact optimum by enumerating every combination (ties: the cheaper, then the first in
    lexicographic candidate order); None when none fits. Refuses more than 200,000 combinations."""
    problem = _compile(choices, terms)
    budget = _check_budget(budget)
    shape = problem.sizes
    combos = math.prod(shape)
    if combos > BRUTE_FORCE_LIMIT:
        raise ValueError(f"brute_force enumerates {combos} combinations, more than {BRUTE_FORCE_LIMIT}")
    axes = {g: g for g in range(len(shape))}
    # Adding term by term from 0 repeats _total's float64 sums exactly, cell by cell.
    cost = _grid_sum([_fold(t, {}) for t in problem.terms], axes, shape).ravel()
    value = _grid_sum([(v, [g]) for g, v in enumerate(problem.values)], axes, shape).ravel()
    feasible = cost <= budget
    if not feasible.any():
        return None
    masked = np.where(feasible, value, -np.inf)
    tied = np.flatnonzero(masked == masked.max())
    pick = int(tied[np.argmin(cost[tied])])
    idx = tuple(int(i) for i in np.unravel_index(pick, shape))
    return _solution(problem, idx, budget, 0.0, True, 0)
