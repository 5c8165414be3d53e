"""Views: augmentation replay, the correctness core (docs/ARCHITECTURE.md#views).

A teacher target is valid only for the exact input the teacher saw, so augmentations are not drawn
on the fly: a *view* is fully determined by ``(plan seed, sample id, view id)``, and ``render_view`` is
the one function that turns a raw image and a view into a tensor, for the teacher pass and the
student loader alike. View 0 is the clean view (the whole image, no flip); views 1..K are seeded
random-resized crops with an optional horizontal flip. A plan may also carry a teacher's own evaluation
preprocessing: view 0 as the central ``clean_crop`` fraction of the image (timm's crop_pct) and the
``interpolation`` every view is resized with (docs/guide.md#your-own-teacher), and the ``resize`` arithmetic:
"float32" (x / 255, then the resize: caches made before the field) or "uint8" (the resize on the pixels, as
timm's transforms resize PIL images, then x / 255: new caches; a render ~1.5x faster on a CPU).

Crop boxes live in normalised [0, 1] image coordinates and are drawn as if the image were square.
That keeps a view independent of the image size, so one cached view can be re-rendered at any
resolution (a student at another input size) and images of different sizes in one folder share one
plan. The price: on a non-square image the drawn aspect ratio is stretched by the image's own aspect.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import numpy as np
import torch
from pydantic import model_validator

from pipeline.errors import DistilleryError
from pipeline.options import Config

__all__ = ["CLEAN_VIEW", "INTERPOLATIONS", "RESIZES", "ViewError", "ViewParams", "ViewPlan", "crop_view", "epoch_view",
           "epoch_views", "normalise_resized", "render_crops", "render_view", "render_views", "resize_uint8"]

_DEFAULTED = {"clean_crop", "interpolation", "resize"}  # ViewPlan fields written to a manifest only when not at defaults
# torchvision's RandomResizedCrop gives up drawing after this many attempts and crops the centre.
_RRC_ATTEMPTS = 10


@dataclass(frozen=True)
class ViewParams:
    """Geometry of one view: a crop box in normalised [0, 1] coordinates, a horizontal flip, and the filter
    the box is resized with."""

    top: float
    left: float
    height: float
    width: float
    flip: bool
    interpolation: str = "bilinear"  # how the crop is resized to the render size (one of INTERPOLATIONS)
    resize: str = "float32"  # the arithmetic it is resized in (one of RESIZES)


CLEAN_VIEW = ViewParams(top=0.0, left=0.0, height=1.0, width=1.0, flip=False)
INTERPOLATIONS = ("bilinear", "bicubic")
"""Resize filters a plan renders with (antialiased): the two that timm's pretrained configs name."""
RESIZES = ("float32", "uint8")
"""The arithmetic a view is resized in: on x / 255 in float32, or on the uint8 pixels (rounded to uint8) before
x / 255 (docs/ARCHITECTURE.md#views)."""


class ViewError(DistilleryError):
    """A view plan that cannot be drawn from: a count, seed or bound out of range."""


class ViewPlan(Config):
    """Which views exist per sample: view 0 is clean, views 1..K are seeded augmentations (docs/ARCHITECTURE.md#views).

    ``scale`` bounds the crop's area fraction and ``ratio`` its aspect ratio (width / height), as in
    torchvision's RandomResizedCrop; ``flip`` enables a horizontal flip with probability 1/2. ``clean_crop``
    is the side of view 0's central box (1: the whole image) and ``interpolation`` the resize filter of
    every view: a teacher's evaluation transform, resolution-free (docs/guide.md#your-own-teacher). ``resize``
    is the arithmetic (`RESIZES`): the default, "float32", is what caches made before the field rendered;
    `distillery cache` makes new caches with "uint8". At their defaults they are left out of `to_dict`, so
    caches made before them keep their identity.
    """

    num_augmented: int
    seed: int = 0
    scale: tuple[float, ...] = (0.35, 1.0)
    ratio: tuple[float, ...] = (3 / 4, 4 / 3)
    flip: bool = True
    clean_crop: float = 1.0
    interpolation: str = "bilinear"
    resize: str = "float32"

    @model_validator(mode="before")
    @classmethod
    def _check_integers(cls, data: Any) -> Any:
        # Any integer (numpy's from a sweep) becomes a plain int, which keeps the plan hashable and JSON-able;
        # a float or a string is refused rather than rounded or parsed.
        if not isinstance(data, dict):
            return data
        for key, name in (("num_augmented", "num_augmented"), ("seed", "view plan seed")):
            if key in data:
                value = data[key]
                if not isinstance(value, Integral) or value < 0:
                    raise ViewError(f"{name} must be an integer >= 0, got {value!r}")
                data = {**data, key: int(value)}
        return data

    @model_validator(mode="after")
    def _check_bounds(self) -> ViewPlan:
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ViewError(f"scale must be (low, high) with 0 < low <= high <= 1, got {self.scale}")
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ViewError(f"ratio must be (low, high) with 0 < low <= high, got {self.ratio}")
        if not 0 < self.clean_crop <= 1:
            raise ViewError(f"clean_crop must be in (0, 1], got {self.clean_crop}")
        if self.interpolation not in INTERPOLATIONS:
            raise ViewError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.resize not in RESIZES:
            raise ViewError(f"resize must be one of {', '.join(RESIZES)}, got {self.resize!r}")
        return self

    @property
    def num_views(self) -> int:
        return self.num_augmented + 1

    @property
    def recipe(self) -> str:
        """Short description of the augmentation recipe, recorded in the cache manifest (docs/cache-format.md#contract)."""
        crop = "rrc({}-{},{}-{})".format(*(round(v, 3) for v in (*self.scale, *self.ratio)))
        clean = f"+center({round(self.clean_crop, 3)})" if self.clean_crop != 1 else ""
        resize = f"+{self.interpolation}" if self.interpolation != "bilinear" else ""
        arithmetic = f"+{self.resize}" if self.resize != "float32" else ""
        return crop + ("+hflip" if self.flip else "") + clean + resize + arithmetic

    def source_side(self, size: int) -> int:
        """The fewest pixels each image side needs so that no view's crop box, rendered at `size`, is
        enlarged: `size` over the smallest side fraction a box of this plan can have (the clean view's
        `clean_crop`; a random crop's sqrt(scale_low * ratio_low) wide and sqrt(scale_low / ratio_high)
        high, or the central fallback's shorter side). A decode reduced no further (`decode_min_side`,
        docs/cache-format.md#inputs) renders every view from at least as many pixels as it has."""
        sides = [self.clean_crop]
        if self.num_augmented:
            low, (ratio_low, ratio_high) = self.scale[0], self.ratio
            fallback = min(max(1.0, ratio_low), ratio_high)
            sides += [math.sqrt(low * ratio_low), math.sqrt(low / ratio_high), min(fallback, 1 / fallback)]
        return math.ceil(size / min(sides))

    def params(self, sample_id: int, view_id: int) -> ViewParams:
        """The geometry of view ``view_id`` of sample ``sample_id``; the same on every call."""
        if not 0 <= view_id < self.num_views:
            raise ValueError(f"view_id {view_id} is outside [0, {self.num_views}) for this plan")
        if sample_id < 0:
            raise ValueError(f"sample_id must be >= 0, got {sample_id}")
        if view_id == 0:
            margin = (1.0 - self.clean_crop) / 2
            return ViewParams(top=margin, left=margin, height=self.clean_crop, width=self.clean_crop, flip=False,
                              interpolation=self.interpolation, resize=self.resize)
        rng = np.random.default_rng([self.seed, int(sample_id), int(view_id)])
        top, left, height, width = _random_resized_crop(rng, self.scale, self.ratio)
        # Drawn last so toggling flips leaves every crop unchanged.
        flip = self.flip and bool(rng.random() < 0.5)
        return ViewParams(top=top, left=left, height=height, width=width, flip=flip,
                          interpolation=self.interpolation, resize=self.resize)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for the cache manifest; ``recipe`` is informational only."""
        return {**self.model_dump(mode="json", exclude_defaults=True, include=_DEFAULTED),
                **self.model_dump(mode="json", exclude=_DEFAULTED), "recipe": self.recipe}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViewPlan:
        fields = {key: value for key, value in data.items() if key != "recipe"}
        return cls(**fields)


def _random_resized_crop(rng: np.random.Generator, scale: tuple[float, float],
                         ratio: tuple[float, float]) -> tuple[float, float, float, float]:
    """torchvision's RandomResizedCrop draw on a unit square: (top, left, height, width).

    Up to 10 attempts at an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``;
    if none fits, a central crop of the whole square clamped to ``ratio``.
    """
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_RRC_ATTEMPTS):
        area = rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        width, height = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if width <= 1.0 and height <= 1.0:
            top = rng.uniform(0.0, 1.0 - height)
            left = rng.uniform(0.0, 1.0 - width)
            return float(top), float(left), float(height), float(width)
    aspect = min(max(1.0, ratio[0]), ratio[1])
    width, height = (1.0, 1.0 / aspect) if aspect >= 1.0 else (aspect, 1.0)
    return (1.0 - height) / 2, (1.0 - width) / 2, height, width


def _pixel_span(start: float, length: float, extent: int) -> tuple[int, int]:
    """A normalised [start, start + length) interval in pixels: at least 1 px, inside the image."""
    pixels = min(max(1, round(length * extent)), extent)
    return min(max(0, round(start * extent)), extent - pixels), pixels


def render_view(raw: np.ndarray, params: ViewParams, size: int, mean: Sequence[float],
                std: Sequence[float]) -> torch.Tensor:
    """Render one view of a raw uint8 (H, W, C) image as a normalised float32 (C, size, size) tensor.

    The single render path of docs/ARCHITECTURE.md#views: the teacher pass and the student loader both call it (or
    its batch forms ``render_views`` and ``render_crops``, which run the same arithmetic), so a student sees
    bit-identical inputs to the teacher's at the same ``size`` on the same device type; another ``size``
    renders the same normalised crop at another resolution.
    """
    return render_views([raw], [params], size, mean, std)[0]


def render_views(raws: Sequence[np.ndarray], params: Sequence[ViewParams], size: int, mean: Sequence[float],
                 std: Sequence[float], device: torch.device | str | None = None) -> torch.Tensor:
    """Render view ``params[i]`` of ``raws[i]`` for every i: a float32 (N, C, size, size) batch on ``device``
    (default CPU): each view's pixel crop (``crop_view``), then ``render_crops``."""
    if len(raws) != len(params):
        raise ValueError(f"got {len(raws)} images and {len(params)} views; give one view per image")
    resizes = {(view.interpolation, view.resize) for view in params}
    if len(resizes) > 1:  # views of one plan share its resize; a mixed batch is a caller's mistake
        raise ValueError(f"views of one batch share one interpolation and resize, got {sorted(resizes)}")
    interpolation, resize = resizes.pop() if resizes else ("bilinear", "float32")
    crops = [crop_tensor(crop_view(raw, view)) for raw, view in zip(raws, params)]
    return render_crops(crops, [view.flip for view in params], size, mean, std, device,
                        interpolation=interpolation, resize=resize)


def crop_view(raw: np.ndarray, params: ViewParams) -> np.ndarray:
    """The pixels of a view's crop box: a uint8 (h, w, C) view into ``raw`` (no copy).

    The crop is integer slicing on the host, so a view's box is the same pixels on every device; the
    arithmetic that follows is ``render_crops``'s. The student stream crops in its DataLoader workers and
    ships only the crop (smaller than the image) to where it renders.
    """
    height, width, _ = _check_raw(raw).shape
    top, crop_height = _pixel_span(params.top, params.height, height)
    left, crop_width = _pixel_span(params.left, params.width, width)
    return raw[top:top + crop_height, left:left + crop_width]


def render_crops(crops: Sequence[torch.Tensor], flips: Sequence[bool], size: int, mean: Sequence[float],
                 std: Sequence[float], device: torch.device | str | None = None, *,
                 interpolation: str = "bilinear", resize: str = "float32") -> torch.Tensor:
    """Crops (uint8 (h, w, C) tensors, any sizes) -> a normalised float32 (N, C, size, size) batch on ``device``.

    The arithmetic caches were written with, batched. ``resize`` "float32": per crop, channels first, x / 255
    in float32, an antialiased resize to ``size`` with the plan's ``interpolation``, the flip, (x - mean) / std.
    Crops of equal shape share one resize call, whose planes are resized independently, so a crop renders to
    the same bits alone or in any batch on one device type (tests/data/test_views.py); the per-channel steps
    run once on the whole batch. On CUDA the resize is CUDA's kernel: close to the CPU's, not bit-identical.
    ``resize`` "uint8": the antialiased resize of the uint8 pixels on the CPU (`resize_uint8`; torch has no
    uint8 antialiased kernel on CUDA), then x / 255, the flip and (x - mean) / std on ``device``
    (`normalise_resized`): correctly rounded IEEE steps, so a CUDA render is expected to give the CPU's bits
    (not yet measured on a GPU, docs/ARCHITECTURE.md#views).
    """
    if len(crops) != len(flips):
        raise ValueError(f"got {len(crops)} crops and {len(flips)} flips; give one flip per crop")
    if not crops:
        raise ValueError("nothing to render: no images given")
    if size < 1:
        raise ValueError(f"render size must be >= 1, got {size}")
    device = torch.device("cpu") if device is None else torch.device(device)
    channels = _check_crop(crops[0], 0).shape[2]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean and std need one value per channel ({channels}), "
                         f"got {len(mean)} and {len(std)}")
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, crop in enumerate(crops):
        height, width, c = _check_crop(crop, i).shape
        if c != channels:
            raise ValueError(f"image {i} has {c} channels, image 0 has {channels}; render them separately")
        by_shape.setdefault((height, width), []).append(i)
    if resize == "uint8":
        return normalise_resized(resize_uint8(crops, size, interpolation), flips, mean, std, device)
    if resize != "float32":
        raise ValueError(f"resize must be one of {', '.join(RESIZES)}, got {resize!r}")
    flips = torch.tensor([bool(f) for f in flips])
    if len(by_shape) == 1:  # one crop shape (a single image, or a batch of clean views): already in order
        out = _resize([crops[i] for i in range(len(crops))], size, device, interpolation)
        _flip(out, flips)
    else:
        out = torch.empty(len(crops), channels, size, size, device=device)
        for indices in by_shape.values():
            if len(indices) == 1:  # the usual random crop: resized straight into its row, no copy
                row = out[indices[0]:indices[0] + 1]
                _resize([crops[indices[0]]], size, device, interpolation, row)
                if flips[indices[0]]:
                    row.copy_(row.flip(-1))
            else:
                images = _resize([crops[i] for i in indices], size, device, interpolation)
                _flip(images, flips[indices])
                out[indices] = images
    mean_t, std_t = _normalisation(tuple(mean), tuple(std), device)
    return out.sub_(mean_t).div_(std_t)


def resize_uint8(crops: Sequence[torch.Tensor], size: int, interpolation: str) -> torch.Tensor:
    """Host uint8 (h, w, C) crops -> a host uint8 (N, C, size, size) batch: each crop's antialiased resize with
    ``interpolation``, rounded to uint8 (`F.interpolate` of a uint8 image, antialias=True: torch's AVX2
    integer kernel, the arithmetic of PIL's resize). One call per crop, so a crop resizes to the same bits
    alone or in any batch; a DataLoader worker can run it and ship only the small resized batch."""
    out = torch.empty(len(crops), crops[0].shape[2], size, size, dtype=torch.uint8)
    for i, crop in enumerate(crops):
        # The HWC crop permuted is an NCHW image in channels-last strides: the layout the uint8 kernel reads.
        _AA_RESIZE[interpolation](crop.permute(2, 0, 1)[None], [size, size], False, None, None, out=out[i:i + 1])
    return out


def normalise_resized(resized: torch.Tensor, flips: Sequence[bool], mean: Sequence[float], std: Sequence[float],
                      device: torch.device | str | None = None) -> torch.Tensor:
    """A uint8 (N, C, size, size) batch (`resize_uint8`) -> float32 on ``device``: x / 255, the flips,
    (x - mean) / std. Each step is one correctly rounded IEEE operation per element, so a device type that
    rounds them as IEEE does gives the CPU's bits (docs/ARCHITECTURE.md#views)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    pixels = resized.to(device, non_blocking=True)
    mean_t, std_t = _normalisation(tuple(mean), tuple(std), device)
    # Divided by a tensor on the device, not a Python scalar: CUDA's division by a host scalar multiplies by
    # its rounded reciprocal instead, which is not x / 255 correctly rounded.
    out = torch.empty(pixels.shape, device=device).copy_(pixels).div_(_pixel_max(device))
    _flip(out, torch.tensor([bool(f) for f in flips]))
    return out.sub_(mean_t).div_(std_t)


@functools.lru_cache(maxsize=4)
def _pixel_max(device: torch.device) -> torch.Tensor:
    return torch.tensor(255.0, device=device)


def _flip(images: torch.Tensor, flips: torch.Tensor) -> None:
    """Mirror, in place, the images whose flip (a host bool tensor: deciding costs no device sync) is set."""
    if flips.all():
        images.copy_(images.flip(-1))
    elif flips.any():
        chosen = flips.to(images.device)
        images[chosen] = images[chosen].flip(-1)


_AA_RESIZE = {"bilinear": torch.ops.aten._upsample_bilinear2d_aa.out,
              "bicubic": torch.ops.aten._upsample_bicubic2d_aa.out}
"""`torch.nn.functional.interpolate(antialias=True)`'s own kernels, as ops that write into a given tensor (its batch row)."""


def _resize(crops: list[torch.Tensor], size: int, device: torch.device, interpolation: str,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Equal-shape uint8 (h, w, C) crops -> float32 (n, C, size, size) in [0, 1], antialiased (into `out`
    when given)."""
    pixels = (crops[0][None] if len(crops) == 1 else torch.stack(crops)).to(device, non_blocking=True)
    # Channels first in the same pass as the float conversion (one read of the crop, one write): a permuted
    # NHWC buffer looks channels-last to interpolate, which then takes another kernel: one contiguous
    # layout, one arithmetic. x / 255 in float32 is correctly rounded (IEEE), so it equals the table of every
    # pixel value it replaced.
    n, height, width, channels = pixels.shape
    unit = torch.empty(n, channels, height, width, device=device).copy_(pixels.permute(0, 3, 1, 2)).div_(255.0)
    if out is None:
        out = torch.empty(n, channels, size, size, device=device)
    _AA_RESIZE[interpolation](unit, [size, size], False, None, None, out=out)
    # Bicubic overshoots at edges; timm's transforms (on images or tensors) clamp to the pixel range.
    return out.clamp_(0.0, 1.0) if interpolation == "bicubic" else out


def crop_tensor(crop: np.ndarray) -> torch.Tensor:
    """A host crop as a tensor sharing its memory; a decoded image may be read-only, and nothing writes to it
    (rendering copies it channels first before any arithmetic), so torch's warning about that is moot."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(crop)


def _check_raw(raw: np.ndarray) -> np.ndarray:
    if raw.dtype != np.uint8 or raw.ndim != 3:
        raise ValueError(f"raw image must be uint8 (H, W, C), got {raw.dtype} with shape {raw.shape}")
    return raw


def _check_crop(crop: torch.Tensor, index: int) -> torch.Tensor:
    if crop.dtype != torch.uint8 or crop.ndim != 3:
        raise ValueError(f"image {index} must be uint8 (H, W, C), got {crop.dtype} with shape {tuple(crop.shape)}")
    return crop


@functools.lru_cache(maxsize=16)
def _normalisation(mean: tuple[float, ...], std: tuple[float, ...],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Built once per (mean, std, device): two tensor constructions per batch cost more than a small resize.
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1),
            torch.tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixing map of uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def epoch_views(seed: int, epoch: int, sample_ids: np.ndarray, num_views: int) -> np.ndarray:
    """The view each sample uses in ``epoch``, int64, reproducible and uniform over [0, num_views).

    The student loader calls this per batch (docs/ARCHITECTURE.md#views), so it is an integer hash of (seed, epoch, id)
    rather than a generator per sample.
    """
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    ids = np.asarray(sample_ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        hashed = _mix64(np.full(ids.shape, seed, dtype=np.uint64) + _GOLDEN)
        hashed = _mix64((hashed ^ np.uint64(epoch)) + _GOLDEN)
        hashed = _mix64((hashed ^ ids) + _GOLDEN)
    # The modulo bias is at most num_views / 2**64: negligible.
    return (hashed % np.uint64(num_views)).astype(np.int64)


def epoch_view(seed: int, epoch: int, sample_id: int, num_views: int) -> int:
    """Scalar form of ``epoch_views``: the view ``sample_id`` uses in ``epoch``."""
    return int(epoch_views(seed, epoch, np.array([sample_id]), num_views)[0])
