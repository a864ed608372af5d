"""Pruning methods, registered by name (a config or a Ray Tune ``choice`` names them).

Importing this package registers every built-in method.
"""

# Registration happens on import: each module decorates its class with @register_method.
from methods import abp as _abp  # noqa: E402,F401
from methods import autopruner as _autopruner  # noqa: E402,F401
from methods import ista as _ista  # noqa: E402,F401
from methods import latency_alloc as _latency_alloc  # noqa: E402,F401
from methods import lossvar as _lossvar  # noqa: E402,F401
from methods import norm as _norm  # noqa: E402,F401
from methods import sfp as _sfp  # noqa: E402,F401
from methods import tp_peers as _tp_peers  # noqa: E402,F401
from methods.allocate import Allocator, Budget, allocator_names, get_allocator_class, register_allocator
from methods.base import (
    Knob,
    Method,
    SelectContext,
    budget_knob,
    get_method_class,
    keep_count,
    method_names,
    register_method,
)

__all__ = ["Allocator", "Budget", "Knob", "Method", "SelectContext", "allocator_names", "budget_knob",
           "get_allocator_class", "get_method_class", "keep_count", "method_names", "register_allocator",
           "register_method"]
