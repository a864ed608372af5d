"""The method protocol and registry.

A method decides *which* channels to keep; a width allocator (methods/allocate.py) decides *how
many* each group keeps; the engine decides how to train and the surgery how to cut. Every hook
has a no-op default, so a one-shot method only implements :meth:`Method.scores` (the default
:meth:`Method.keep_masks` keeps the top-scored ``n_keep`` of every group) and a training-aware
one adds the hooks it needs.

Masks are ``{group_name: BoolTensor[N]}`` with True = keep, one entry per channel group
(``pipeline.surgery.ChannelGroup``). Every decision must be identical on every rank: the
norm-based ones are, because DDP keeps weights identical; batch-dependent ones all-reduce.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:
    from torch import nn

    from pipeline.distributed import DistInfo
    from pipeline.surgery import ChannelGroup

_REGISTRY: dict[str, type[Method]] = {}


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available under ``cls.name``."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} needs a class attribute `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def get_method_class(name: str) -> type[Method]:
    return _REGISTRY[name]


def method_names() -> list[str]:
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class Knob:
    """The one setting that decides how many channels a method keeps, as a person reads it:
    the uniform ``prune.prune_ratio`` for most methods, an option of the method's own for a
    method that sets its rates another way (lossvar's loss budget δ). Trial and run names, the
    search table and the model card show this setting rather than one the method ignores."""

    label: str  # what the search table and the card call it: "ratio", "δ"
    value: float | None  # None: not set (a name then carries no knob)
    option: str | None = None  # its key under prune.options.<method>; None: prune.prune_ratio
    symbol: str = "r"  # its prefix in a run name: "r0.40", "δ0.02"
    fmt: str = ".2f"  # how its value is written

    @property
    def is_ratio(self) -> bool:
        return self.option is None

    @property
    def setting(self) -> str:
        """Its name among the trial's prune settings, as the model card lists them."""
        return "prune_ratio" if self.option is None else self.option

    def tag(self) -> str:
        """``r0.40`` / ``δ0.0234``: the knob in a run name; "" when it is not set."""
        return "" if self.value is None else f"{self.symbol}{format(self.value, self.fmt)}"


def budget_knob(method: str, prune: Mapping[str, Any]) -> Knob:
    """The :class:`Knob` of the method named ``method`` in a trial whose prune section is
    ``prune`` (a config's ``prune`` as a mapping; the method's options are those under
    ``options.<method>``). A name that is not registered reads as a uniform-ratio method:
    names are also shown for trials whose config never ran its checks."""
    if prune.get("target_speedup") is not None:
        # a speed target replaces every other budget: the latency allocator meets it whatever
        # the method's ratio or δ says
        return Knob("target", prune["target_speedup"], option="target_speedup", symbol="t", fmt=".2f")
    cls = _REGISTRY.get(method)
    if cls is None:
        return Method.budget_knob(NoOptions(), prune)
    given = (prune.get("options") or {}).get(method) or {}
    try:
        options = cls.Options(**given)
    except ValidationError:
        # a search may draw options its base contradicts; that trial fails its own checks, but
        # the console and the table still name it, from the options as given
        options = cls.Options.model_construct(**given)
    return cls.budget_knob(options, prune)


def keep_count(n: int, prune_ratio: float, round_to: int = 1, channel_groups: int = 1) -> int:
    """Channels kept of ``n`` when ``prune_ratio`` of them are removed.

    ``floor(n * prune_ratio)`` are removed (SFP's rule); the kept count is then rounded to
    the nearest multiple of ``round_to`` (tensor cores want multiples of 8) and of the conv
    groups of a grouped conv, and never drops to zero: a width of 0 cuts the network in two.
    """
    keep = n - math.floor(n * prune_ratio + 1e-9)
    step = math.lcm(round_to, channel_groups)
    if step > 1 and n % step == 0:
        keep = int(round(keep / step)) * step
        keep = min(n, max(step, keep))
    elif channel_groups > 1:
        keep = max(channel_groups, keep // channel_groups * channel_groups)
    return max(1, min(n, keep))


@dataclass
class SelectContext:
    """What a method may use when it decides: the rank layout and calibration data."""

    info: DistInfo | None = None
    # this rank's share of a fixed calibration set (methods with ``calibration_samples``)
    calib: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    image_size: int = 224
    # for allocators that need them (the latency allocator): the method's channel scores and the
    # device's latency table (pipeline/latency.py)
    scores: dict[str, torch.Tensor] | None = None
    latency_table: Any = None
    # groups the method keeps whole whatever count it is given (:meth:`Method.kept_whole`)
    whole: frozenset[str] = frozenset()


class Method(ABC):
    """Base class of every pruning method. Subclass, set ``name``, decorate with @register_method.

    Life cycle, as the recipe calls it: ``prepare`` (add layers, rescale) → pruning-phase
    epochs with ``loss_term`` / ``after_step`` / ``on_epoch_end`` → ``keep_masks`` →
    ``finalize`` (remove added layers, fold constant channels) → surgery.
    """

    name: ClassVar[str] = ""
    training_aware: ClassVar[bool] = False
    uniform_rate: ClassVar[bool] = True  # False: per-group rates of its own (lossvar)
    # the prune.scope values it can work with: gates and BN penalties need one consumer per group
    scopes: ClassVar[tuple[str, ...]] = ("inner", "all")
    # the width allocators (prune.allocate) it can fill, and the one it gets when none is named
    allocators: ClassVar[tuple[str, ...]] = ("uniform", "loss", "latency")
    default_allocator: ClassVar[str] = "uniform"
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name and getattr(cls.scores, "__isabstractmethod__", False):
            raise TypeError(f"method {cls.name!r} must define scores()")

    @classmethod
    def budget_knob(cls, options: BaseModel, prune: Mapping[str, Any]) -> Knob:
        """The setting that decides this method's widths, from its validated ``options`` and the
        trial's prune section: the uniform ``prune_ratio`` unless the method overrides this (a
        method with a budget of its own overrides it in its own module, nowhere else). Under the
        loss allocator with a δ of its own, that δ decides every width and the ratio is ignored."""
        allocated = prune.get("allocator_options") or {}
        if prune.get("allocate") == "loss" and allocated.get("delta") is not None:
            return Knob("δ", allocated["delta"], option="allocator_options.delta", symbol="δ", fmt=".3g")
        return Knob("ratio", prune.get("prune_ratio"))

    def __init__(
        self,
        groups: list[ChannelGroup],
        prune_ratio: float,
        round_to: int = 1,
        options: dict[str, Any] | None = None,
        seed: int = 0,
        image_size: int = 224,
    ) -> None:
        self.groups = groups
        self.prune_ratio = prune_ratio
        self.round_to = round_to
        self.options = self.Options(**(options or {}))
        self.seed = seed
        self.image_size = image_size
        self.counts: dict[str, int] = {}  # kept channels per group, from the width allocator

    # --- set-up ---------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> None:
        """Modify the dense model in place before the pruning phase (insert gates, rescale)."""

    def calibration_samples(self) -> int:
        """Size of the fixed calibration set :meth:`keep_masks` needs (0: none)."""
        return 0

    def optimizer_overrides(self) -> dict[str, Any]:
        """Pruning-phase SGD settings the method insists on, e.g. ``{"momentum": 0.0}`` for ISTA."""
        return {}

    def lr_scales(self, model: nn.Module) -> dict[nn.Parameter, float]:
        """Learning-rate multipliers for the method's own parameters (gate scores...)."""
        return {}

    # --- hooks of the pruning phase (training-aware methods) -------------------------------
    def on_train_start(self, model: nn.Module, steps_per_epoch: int = 0, epochs: int = 0) -> None:
        """Called once before the pruning-phase epochs (schedules need their length)."""

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        """An extra loss added to the task loss at each step (sparsity, budget...)."""
        return None

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called after every optimizer step (proximal updates, re-masking)."""

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        """Called after each pruning-phase epoch."""

    def state(self) -> dict[str, Any]:
        """Tensors and numbers to checkpoint with the model (resume mid-pruning)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned."""

    # --- the decision ------------------------------------------------------------------------
    def allocator_options(self) -> dict[str, Any] | None:
        """Options this method gives its default allocator when ``prune.allocator_options`` is
        empty (lossvar: its δ / MACs target); None: the allocator's defaults."""
        return None

    def set_counts(self, counts: dict[str, int]) -> None:
        """The width allocator's kept count per group, given before the pruning phase; groups it
        does not name keep the uniform count."""
        from methods.allocate import check_counts  # allocate imports this module

        check_counts(self.groups, counts, f"{self.name} counts")
        self.counts = dict(counts)

    def starting_scores(self, model: nn.Module, ctx: SelectContext | None = None) -> dict[str, torch.Tensor]:
        """Channel scores on the model *before* :meth:`prepare`, for an allocator that needs them
        then (the latency allocator values widths by them): :meth:`scores` itself, unless the
        method's scores exist only after its pruning phase (gates: AutoPruner, ABP)."""
        return self.scores(model, ctx)

    def kept_whole(self) -> frozenset[str]:
        """Groups this method never cuts, whatever count it is given (AutoPruner's ungated last
        block): an allocator that spends a budget must not count on them."""
        return frozenset()

    @abstractmethod
    def scores(self, model: nn.Module, ctx: SelectContext | None = None) -> dict[str, torch.Tensor]:
        """A score per channel of every group (higher = more worth keeping), by the method's criterion."""

    def kept(self, group: ChannelGroup, scores: torch.Tensor) -> int:
        """How many of ``group``'s channels the masks keep: the allocator's count (``n_keep``). A
        learned method's ``exact_budget: false`` keeps its own decision instead (read from its scores)."""
        return self.n_keep(group)

    def keep_masks(self, model: nn.Module, ctx: SelectContext | None = None) -> dict[str, torch.Tensor]:
        """Final keep-mask per channel group (True = keep): the ``kept`` best-scored channels."""
        from pipeline.surgery import structured_topk

        scores = self.scores(model, ctx)
        return {g.name: structured_topk(scores[g.name], self.kept(g, scores[g.name]), g.channel_groups)
                for g in self.groups}

    def finalize(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        """Undo :meth:`prepare` in place so that the plain architecture is left for surgery,
        folding whatever a pruned channel still contributes (a constant) into the next layer."""

    def summary(self) -> dict[str, Any]:
        """Numbers worth reporting about the decision (δ found, loss evaluations, per-group rates)."""
        return {}

    def n_keep(self, group: ChannelGroup) -> int:
        """The group's kept count: the allocator's when it gave one, else the uniform rate's."""
        if group.name in self.counts:
            return self.counts[group.name]
        return keep_count(group.size, self.prune_ratio, self.round_to, group.channel_groups)
