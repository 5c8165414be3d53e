"""Datasets with stable integer sample ids and replayable views (docs/ARCHITECTURE.md#data-flow, docs/ARCHITECTURE.md#views).

The dataset modules are imported here, each registering its `--dataset` kind, and none imports torch (the
command line lists the kinds and their help without it). The views, which render with torch, are imported on
first use of one of their names (PEP 562 module `__getattr__`).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from pipeline.data.datasets import (
    ArrayDataset,
    DatasetError,
    ImageDataset,
    load_dataset,
    stratified_subset,
)
from pipeline.data.imagefolder import FolderDataset  # registers the imagefolder kind
from pipeline.data.webdataset_source import WebDataset  # registers the `wds:` dataset kind

_VIEWS = ("CLEAN_VIEW", "ViewParams", "ViewPlan", "epoch_view", "epoch_views", "render_view", "render_views")

__all__ = [
    "ArrayDataset",
    "CLEAN_VIEW",
    "DatasetError",
    "FolderDataset",
    "ImageDataset",
    "ViewParams",
    "ViewPlan",
    "WebDataset",
    "epoch_view",
    "epoch_views",
    "load_dataset",
    "render_view",
    "render_views",
    "stratified_subset",
]


def __getattr__(name: str) -> Any:
    """A name of `pipeline.data.views`, imported (with torch) on first access and kept in this module."""
    if name not in _VIEWS:
        raise AttributeError(f"module 'pipeline.data' has no attribute {name!r}")
    value = getattr(import_module("pipeline.data.views"), name)
    globals()[name] = value
    return value
