"""Distillation methods: one module per method, each registered by name (docs/methods.md#compose).

Build one with ``create_method("kd:T=2,alpha=0.5", cache_info, student_info)``; a run sums the loss
terms of all its methods. Adding a method means adding a module here and importing it below.
"""
from . import ce, dkd, elsh, fitnet, kd, scalekd, tcs, wkd_f, wkd_l  # noqa: F401  (imported for their registrations)
from .base import (
    FEATMAPS,
    GAUSSIAN,
    LOGITS,
    LSH_CODES,
    POOLED,
    TARGETS,
    CacheInfo,
    Method,
    MethodError,
    StudentInfo,
    StudentOutputs,
    TrainingProgress,
    create_method,
    resolve_method_spec,
    list_methods,
    register_method,
)

__all__ = [
    "FEATMAPS",
    "GAUSSIAN",
    "LOGITS",
    "LSH_CODES",
    "POOLED",
    "TARGETS",
    "CacheInfo",
    "Method",
    "MethodError",
    "StudentInfo",
    "StudentOutputs",
    "TrainingProgress",
    "create_method",
    "resolve_method_spec",
    "list_methods",
    "register_method",
]
