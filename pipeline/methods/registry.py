"""The methods' registry: every method by its name, its module imported when the name is first asked for.

`pipeline.methods.base.register_method` adds a class here as its module is imported; `METHOD_NAMES` lists the
built-in ones so the command line names them (`distillery train --help`) without importing torch.
"""

from __future__ import annotations

from importlib import import_module

from pipeline.errors import DistilleryError, did_you_mean

METHOD_NAMES = ("ce", "dkd", "elsh", "fitnet", "kd", "scalekd", "tcs", "wkd_f", "wkd_l")
"""The built-in methods, each registered by the module of its name (pipeline/methods/<name>.py)."""

_REGISTRY: dict[str, type] = {}  # name -> its `pipeline.methods.base.Method` subclass


class MethodError(DistilleryError):
    """A method cannot be built as asked: unknown name or option, or a cache missing a target."""


def method_class(name: str) -> type:
    """The method registered as ``name`` (a built-in one's module imported now); :class:`MethodError` naming
    the known ones otherwise."""
    if name not in _REGISTRY and name in METHOD_NAMES:
        import_module(f"{__package__}.{name}")
    if name not in _REGISTRY:
        raise MethodError(f"unknown method {name!r}{did_you_mean(name, list_methods())}; known methods: "
                          f"{', '.join(list_methods())}")
    return _REGISTRY[name]


def list_methods() -> list[str]:
    """Names of all registered methods, the built-in ones imported first, sorted."""
    for name in METHOD_NAMES:
        import_module(f"{__package__}.{name}")
    return sorted(_REGISTRY)
