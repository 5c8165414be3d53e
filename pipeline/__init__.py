"""Distillery's library: teach once, distill many, without Prefect (README.md#python).

The four steps a notebook needs, and the configs that call them, are attributes of this package:
`fit_teacher(FitConfig)`, `cache_teacher(CacheRequest)` (the whole teacher pass in this process),
`open_cache(path)` and `train_student(TrainConfig)` (with `RunSettings`). They are imported on first use
(PEP 562 module `__getattr__`), so `import pipeline` stays cheap and does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# Public name -> "module:attribute" of the plain library function or class it is.
_PUBLIC: dict[str, str] = {
    "fit_teacher": "pipeline.train.fit:fit_teacher",
    "FitConfig": "pipeline.train.fit_config:FitConfig",
    "cache_teacher": "pipeline.teacher.cache_pass:run_cache_pass",
    "CacheRequest": "pipeline.teacher.request:CacheRequest",
    "open_cache": "pipeline.train.loop:open_cache",
    "train_student": "pipeline.train.loop:train_student",
    "TrainConfig": "pipeline.train.config:TrainConfig",
    "RunSettings": "pipeline.train.config:RunSettings",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access and cache the attribute in this module."""
    target = _PUBLIC.get(name)
    if target is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    module, attr = target.split(":")
    value = getattr(import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
