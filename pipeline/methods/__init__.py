"""Distillation methods: one module per method, each registered by name (docs/methods.md#compose).

A spec string is parsed once into a :class:`MethodSpec` (``MethodSpec.parse("kd:T=2,alpha=0.5")``), which
builds the method (``spec.build(cache_info, student_info)``, or ``create_method(spec, cache_info,
student_info)``); a run sums the loss terms of all its methods. Adding a method means adding a module here
and its name to `registry.METHOD_NAMES`: the registry imports a method's module when its name is first
asked for, and this package imports its names on first access (PEP 562 module `__getattr__`), so parsing a
run's settings, or the command line's help, imports no torch until a method is built.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_MODULE_OF = {
    **dict.fromkeys(("FEATMAPS", "GAUSSIAN", "LOGITS", "LSH_CODES", "POOLED", "TARGETS", "CacheInfo", "Method",
                     "StudentInfo", "StudentOutputs", "TrainingProgress", "register_method"), "base"),
    **dict.fromkeys(("METHOD_NAMES", "MethodError", "list_methods", "method_class"), "registry"),
    **dict.fromkeys(("MethodSpec", "create_method"), "spec"),
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    """A public name, its module imported on first access and the attribute kept in this package."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline.methods' has no attribute {name!r}")
    value = getattr(import_module(f"{__package__}.{module}"), name)
    globals()[name] = value
    return value
