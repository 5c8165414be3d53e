"""WKD-F: Wasserstein distance between per-cell diagonal Gaussians of feature maps (docs/methods.md#wkd-f).

Lv et al., NeurIPS'24. The teacher pass caches, for its tapped stage, the mean and std of every channel
in each cell of a G x G grid (``--tap STAGE --grid G``; ``pipeline.stats.gaussian.grid_gaussian``). The
student's map (its deepest stage unless the ``stage`` option says otherwise) goes through a learned
projector to the teacher's Cf channels and then through the same ``grid_gaussian``, so both sides use
identical cell boundaries (adaptive pooling) and ``std = sqrt(unbiased var + 1e-5)``. For diagonal Gaussians the squared 2-Wasserstein distance is
``||mu_s - mu_t||^2 + ||sigma_s - sigma_t||^2``; WKD weights the mean part by gamma.

Only G and Cf must agree between teacher and student: the maps may differ in size and channels. Each
of the student's cells needs at least 2 positions (unbiased variance), which is checked when the method
is built; a map too small for the cache's grid is refused with what to change.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated

import torch
from torch import Tensor, nn

from pipeline.stats.gaussian import grid_gaussian
from pipeline.options import Help, Range

from .base import (
    GAUSSIAN,
    CacheInfo,
    Method,
    MethodError,
    StudentInfo,
    StudentOutputs,
    Targets,
    TrainingProgress,
    at_least_float32,
    register_method,
)
from .schedules import cosine_decay

PROJECTORS = ("conv1x1", "bottleneck")


def _conv_bn(c_in: int, c_out: int, kernel: int, relu: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    return [*layers, nn.ReLU(inplace=True)] if relu else layers


def build_projector(kind: str, c_in: int, c_out: int, hidden: int, relu: bool) -> nn.Sequential:
    """Student channels -> teacher channels (docs/methods.md#wkd-f): ``conv1x1`` is conv1x1+BN(+ReLU) (small nets);
    ``bottleneck`` is 1x1 -> 3x3 -> 1x1 through ``hidden`` channels, each conv+BN, ReLU between, and the
    last ReLU only when ``relu`` (large nets). Spatial size is kept."""
    if kind == "conv1x1":
        return nn.Sequential(*_conv_bn(c_in, c_out, 1, relu))
    if kind == "bottleneck":
        return nn.Sequential(
            *_conv_bn(c_in, hidden, 1, True), *_conv_bn(hidden, hidden, 3, True), *_conv_bn(hidden, c_out, 1, relu)
        )
    raise MethodError(f"method 'wkd_f': projector must be one of {', '.join(PROJECTORS)}, not {kind!r}")


def gaussian_w2_terms(
    mean_s: Tensor, std_s: Tensor, mean_t: Tensor, std_t: Tensor
) -> tuple[Tensor, Tensor]:
    """``(sum (mu_s - mu_t)^2, sum (sigma_s - sigma_t)^2)``, each divided by ``N * G^2`` (docs/methods.md#wkd-f).

    Inputs are (N, G*G, C); the sum runs over cells and channels, so the two parts add up to the squared
    W2 between the diagonal Gaussians, averaged over samples and cells.
    """
    scale = mean_s.shape[0] * mean_s.shape[1]
    mean_term = (at_least_float32(mean_s) - at_least_float32(mean_t)).square().sum() / scale
    std_term = (at_least_float32(std_s) - at_least_float32(std_t)).square().sum() / scale
    return mean_term, std_term


@register_method
class WKDF(Method):
    """``w_F(progress) * (gamma * mean part + std part)`` of the squared W2 between per-cell diagonal
    Gaussians of the projected student map and the cached teacher map (docs/methods.md#wkd-f).

    Needs a cache made with ``--tap STAGE --grid G``. Options: each's meaning is declared with it (defaults: the
    ImageNet ResNet-34 -> ResNet-18 setting of the paper; CIFAR-100 used weight=0.08, gamma=4 with G=1).

    Terms: ``wkd_f_mean`` and ``wkd_f_std``, both already weighted. The projector trains with the student
    and is dropped at inference.
    """

    name = "wkd_f"
    needs = frozenset({GAUSSIAN})
    student_taps = (-1,)

    def __init__(
        self,
        cache: CacheInfo,
        student: StudentInfo,
        *,
        weight: Annotated[float, Range(ge=0, le=1e4), Help("w_F before decay")] = 0.02,
        gamma: Annotated[float, Range(ge=0, le=1e4), Help("weight of the mean part against the std part")] = 2.0,
        projector: Annotated[str, Help("conv1x1 (small students) or bottleneck (the paper's ImageNet choice)")] = "conv1x1",
        hidden: Annotated[int, Range(ge=1, le=8192), Help("bottleneck width")] = 256,
        relu: Annotated[bool, Help("end the projector with a ReLU (off when the tapped teacher map can be negative)")] = True,
        decay_start: Annotated[float, Range(ge=0, le=1e4), Help("epoch after which w_F is cosine-decayed to 0 by the end (at or beyond the epochs: constant)")] = 0.0,
        stage: Annotated[int, Help("student stage read, from the deepest (-1; -2 the one before)")] = -1,
    ) -> None:
        super().__init__(cache, student)
        self.taps_for({"stage": stage})  # the same refusal as when the run picks its taps
        cells, channels = cache.target_shapes[GAUSSIAN]
        self.grid = math.isqrt(cells)
        if self.grid * self.grid != cells:
            raise MethodError(f"method 'wkd_f': the cache's Gaussians have {cells} cells, not a square grid")
        self.stage = student.taps[stage]
        c_in, height, width = student.feature_shapes[self.stage]
        if not _fits(height, width, self.grid):
            raise MethodError(
                f"method 'wkd_f': the student's map at stage {stage} ({self.stage}) is {height}x{width}, too "
                f"small for the cache's {self.grid}x{self.grid} grid (each cell needs >= 2 positions for the "
                f"unbiased variance); {_what_fits(student, self.grid)}"
            )
        self.projector = build_projector(projector, c_in, channels, hidden, relu)
        self.weight = weight
        self.gamma = gamma
        self.decay_start = decay_start

    @classmethod
    def taps_for(cls, options: Mapping[str, bool | int | float | str]) -> tuple[int, ...]:
        """``(stage,)``."""
        return (cls.stage_option(options),)

    def forward(
        self, student: StudentOutputs, targets: Targets, labels: Tensor, progress: TrainingProgress
    ) -> dict[str, Tensor]:
        mean_s, std_s = grid_gaussian(self.projector(student.feature_maps[self.stage]), self.grid)
        mean_t, std_t = targets[GAUSSIAN]
        mean_term, std_term = gaussian_w2_terms(mean_s, std_s, mean_t, std_t)
        w = self.weight * cosine_decay(progress, self.decay_start)
        return {"wkd_f_mean": w * self.gamma * mean_term, "wkd_f_std": w * std_term}


def _fits(height: int, width: int, grid: int) -> bool:
    """Whether a height x width map gives every cell of the grid >= 2 positions: decided by the function the
    forward pass uses."""
    try:
        grid_gaussian(torch.zeros(1, 1, height, width), grid)
    except ValueError:
        return False
    return True


def _what_fits(student: StudentInfo, grid: int) -> str:
    """The refusal's remedy, computed: the deepest student stage whose map fits the grid, else a larger input."""
    deepest_fit = next((-i for i in range(1, len(student.stage_shapes) + 1)
                        if _fits(*student.stage_shapes[-i][1:], grid)), None)
    if deepest_fit is None:
        return "no stage of this student fits at this input size: train with a larger --input-size or use a cache " \
               "made with a smaller --grid"
    return (f"read stage {deepest_fit}, the deepest whose map fits (wkd_f:stage={deepest_fit}), train with a larger "
            f"--input-size or use a cache made with a smaller --grid")

