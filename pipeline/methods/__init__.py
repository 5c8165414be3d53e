"""Distillation methods: one module per method, each registered by name (docs/methods.md#compose).

A spec string is parsed once into a :class:`MethodSpec` (``MethodSpec.parse("kd:T=2,alpha=0.5")``), which
builds the method (``spec.build(cache_info, student_info)``, or ``create_method(spec, cache_info,
student_info)``); a run sums the loss terms of all its methods. Adding a method means adding a module here
and importing it below.
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
    list_methods,
    method_class,
    register_method,
)
from .spec import MethodSpec, create_method

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
    "MethodSpec",
    "StudentInfo",
    "StudentOutputs",
    "TrainingProgress",
    "create_method",
    "list_methods",
    "method_class",
    "register_method",
]
