"""Checks of a configuration before any work, for what the core schema cannot check because it
knows no method: ``prune.method`` and its options, the epoch budget, and every method, option
and scope a ``search.space`` may draw. Each raises :class:`ConfigError` naming the key; the CLI,
the search (before Ray starts) and every trial run them."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from methods import Allocator, Method, allocator_names, get_allocator_class, get_method_class, method_names
from pipeline.blocks import block_count, identity_blocks
from pipeline.config import Config, ConfigError, format_error, sampler_values
from pipeline.models import check_weights_path


def method_class(name: str, key: str) -> type[Method]:
    try:
        return get_method_class(name)
    except KeyError:
        raise ConfigError(f"{key}: unknown method {name!r}; allowed: {', '.join(method_names())}") from None


def _check_options(name: str, options: Any, key: str) -> None:
    """``options`` against method ``name``'s own schema (``name`` is known to be registered)."""
    cls = get_method_class(name)
    if not isinstance(options, dict):
        raise ConfigError(f"{key} = {options!r}: expected a mapping of {name}'s options")
    try:
        cls.Options(**options)
    except ValidationError as err:
        raise ConfigError(format_error(err, prefix=f"prune.options.{name}.")) from None


def trial_epochs(cfg: Config, method_cls: type[Method]) -> tuple[int, int]:
    """(pruning epochs, fine-tune epochs); ``train.budget_epochs`` covers both when set."""
    prune_epochs = cfg.prune.epochs if method_cls.training_aware else 0
    if cfg.train.budget_epochs is None:
        return prune_epochs, cfg.train.epochs
    if prune_epochs >= cfg.train.budget_epochs:
        raise ConfigError(f"train.budget_epochs = {cfg.train.budget_epochs}: must exceed prune.epochs = {prune_epochs}")
    return prune_epochs, cfg.train.budget_epochs - prune_epochs


def check_config(cfg: Config, for_search: bool = False) -> Config:
    """What the core schema cannot check because it knows no method: ``prune.method``,
    ``prune.options.<method>.<key>``, the epoch budget, and the method names and options a
    ``search.space`` may draw; ``for_search``: also every (method, scope) pair it may draw.
    Raises :class:`ConfigError` naming the key, before any work."""
    trial_epochs(cfg, method_class(cfg.prune.method, "prune.method"))
    _check_scopes(cfg, for_search)
    _check_allocators(cfg, for_search)
    _check_blocks(cfg, for_search)
    if cfg.model.weights is not None:
        check_weights_path(cfg.model.weights)  # a folder or /dev/null: stop now, not after loading data
    for name, options in cfg.prune.options.items():
        method_class(name, f"prune.options.{name}")
        _check_options(name, options, f"prune.options.{name}")
    for key, entry in cfg.search.space.items():
        for name in entry.methods or []:
            method_class(name, f"search.space: {key}.methods")
        values = sampler_values(entry)  # every choice, or both ends of a range (checked by the schema)
        if key == "prune.method":
            for name in values or []:
                method_class(name, "search.space: prune.method")
        elif key.startswith("prune.options."):
            parts = key.split(".")
            cls = method_class(parts[2], f"search.space: {key}")
            if len(parts) > 3 and parts[3] not in cls.Options.model_fields:
                raise ConfigError(f"search.space: {key!r}: {parts[2]} has no option {parts[3]!r}")
            for value in values or []:
                _check_options(parts[2], {parts[3]: value} if len(parts) > 3 else value, key)
    return cfg


def _check_scopes(cfg: Config, for_search: bool) -> None:
    """Every method the trial (or the search) may run supports every scope it may be given
    (a residual-stream group met by a gated method otherwise fails inside the trial)."""
    space = cfg.search.space if for_search else {}
    methods = (sampler_values(space["prune.method"]) or []) if "prune.method" in space else [cfg.prune.method]
    scopes = (sampler_values(space["prune.scope"]) or []) if "prune.scope" in space else [cfg.prune.scope]
    where = "search.space: " if "prune.method" in space or "prune.scope" in space else ""
    for name in methods:
        allowed = method_class(name, "prune.method").scopes
        for scope in scopes:
            if scope not in allowed:
                raise ConfigError(f"{where}prune.method = {name} works with prune.scope = {' or '.join(allowed)}, "
                                  f"not {scope}")


def allocator_class(name: str, key: str) -> type[Allocator]:
    try:
        return get_allocator_class(name)
    except KeyError:
        raise ConfigError(f"{key}: unknown width allocator {name!r}; allowed: {', '.join(allocator_names())}") from None


def allocator_for(cfg: Config, method_cls: type[Method]) -> type[Allocator]:
    """The allocator a trial of ``method_cls`` runs: ``prune.allocate``, or the method's default."""
    return allocator_class(_allocator_name(cfg.prune.allocate, method_cls, cfg.prune.target_speedup is not None),
                           "prune.allocate")


def make_allocator(cfg: Config, method: Method) -> Allocator:
    """The trial's allocator with its options: ``prune.allocator_options``, else the method's own
    for its default allocator (lossvar's δ search); another allocator gets its own defaults."""
    cls = allocator_for(cfg, type(method))
    given = cfg.prune.allocator_options or (method.allocator_options() if cls.name == method.default_allocator
                                            else None)
    return cls(given)


def _allocator_name(given: str | None, method_cls: type[Method], targeted: bool) -> str:
    """A speed target is met by the latency allocator: it is the default when a target is given."""
    return given or ("latency" if targeted else method_cls.default_allocator)


def _check_allocators(cfg: Config, for_search: bool) -> None:
    """Every method the trial (or the search) may run can fill every allocator it may be given,
    and ``prune.allocator_options`` suit each of those allocators."""
    space = cfg.search.space if for_search else {}
    methods = (sampler_values(space["prune.method"]) or []) if "prune.method" in space else [cfg.prune.method]
    drawn = (sampler_values(space["prune.allocate"]) or []) if "prune.allocate" in space else [cfg.prune.allocate]
    where = "search.space: " if "prune.method" in space or "prune.allocate" in space else ""
    drawn_target = space.get("prune.target_speedup")
    for name in methods:
        cls = method_class(name, "prune.method")
        targeted = cfg.prune.target_speedup is not None or (
            drawn_target is not None and (not drawn_target.methods or name in drawn_target.methods))
        for wanted in drawn:
            key = "search.space: prune.allocate" if "prune.allocate" in space else "prune.allocate"
            allocator = allocator_class(_allocator_name(wanted, cls, targeted), key)
            if targeted and allocator.name != "latency":
                # only the latency allocator budgets a latency; a ratio-based one would ignore it
                raise ConfigError(f"{where}prune.target_speedup needs prune.allocate = latency (or unset), "
                                  f"not {allocator.name}")
            if allocator.name not in cls.allocators:
                raise ConfigError(f"{where}prune.method = {name} works with prune.allocate = {' or '.join(cls.allocators)}, "
                                  f"not {allocator.name}")
            if cfg.prune.allocator_options:
                try:
                    allocator.Options(**cfg.prune.allocator_options)
                except ValidationError as err:
                    raise ConfigError(format_error(err, prefix="prune.allocator_options.")) from None


def _check_blocks(cfg: Config, for_search: bool) -> None:
    """Every block count the trial (or the search) may ask for fits the architecture's
    identity-shortcut blocks (counted on the meta device: no memory, no weights)."""
    space = cfg.search.space if for_search else {}
    drawn = "prune.blocks" in space
    values = (sampler_values(space["prune.blocks"]) or []) if drawn else [cfg.prune.blocks]
    if not any(values):
        return
    import torch
    import torchvision

    with torch.device("meta"):
        available = len(identity_blocks(getattr(torchvision.models, cfg.model.arch)()))
    for value in values:
        try:
            block_count(value, available, cfg.model.arch)
        except ConfigError as err:
            raise ConfigError(f"search.space: {err}" if drawn else str(err)) from None
