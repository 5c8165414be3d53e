"""Datasets with stable integer sample ids and replayable views (docs/ARCHITECTURE.md#data-flow, docs/ARCHITECTURE.md#views)."""

from pipeline.data.datasets import (
    ArrayDataset,
    DatasetError,
    ImageDataset,
    load_dataset,
    stratified_subset,
)
from pipeline.data.imagefolder import FolderDataset  # registers the imagefolder kind
from pipeline.data.views import (
    CLEAN_VIEW,
    ViewParams,
    ViewPlan,
    epoch_view,
    epoch_views,
    render_view,
    render_views,
)
from pipeline.data.webdataset_source import WebDataset  # registers the `wds:` dataset kind

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
