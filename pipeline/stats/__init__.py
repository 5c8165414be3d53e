"""Streaming, mergeable dataset-level statistics of the teacher cache (docs/cache-format.md#statistics)."""

from pipeline.stats.cka import category_interrelations, linear_cka
from pipeline.stats.classes import ClassMoments
from pipeline.stats.gaussian import GaussianSummary, grid_gaussian
from pipeline.stats.moments import FeatureMoments, PCABasis, pca_from_moments

__all__ = [
    "ClassMoments",
    "FeatureMoments",
    "GaussianSummary",
    "PCABasis",
    "category_interrelations",
    "grid_gaussian",
    "linear_cka",
    "pca_from_moments",
]
