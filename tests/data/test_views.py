"""Augmentation replay (docs/ARCHITECTURE.md#views): deterministic view parameters, one bit-exact render path."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from pipeline.data.views import (
    CLEAN_VIEW,
    ViewParams,
    ViewPlan,
    _pixel_span,
    epoch_view,
    epoch_views,
    render_crops,
    render_view,
    render_views,
)

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _smooth_image(height: int = 64, width: int = 64) -> np.ndarray:
    """A smooth RGB image, so resampling at two resolutions agrees closely."""
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    channels = [np.sin(3 * x + 2 * y), np.cos(4 * y - x), x * y]
    return np.round(127.5 + 127.5 * np.stack(channels, -1).clip(-1, 1)).astype(np.uint8)


# --- ViewPlan.params ----------------------------------------------------------------------------

def test_view_zero_is_the_whole_image_unflipped():
    assert ViewPlan(num_augmented=3, seed=9).params(123, 0) == CLEAN_VIEW == ViewParams(0.0, 0.0, 1.0, 1.0, False)


def test_params_are_deterministic_across_plan_instances():
    a, b = ViewPlan(num_augmented=4, seed=5), ViewPlan(num_augmented=4, seed=5)
    assert [a.params(i, v) for i in range(20) for v in range(5)] == \
           [b.params(i, v) for i in range(20) for v in range(5)]


def test_params_differ_across_seeds_ids_and_views():
    plan = ViewPlan(num_augmented=4, seed=5)
    assert plan.params(1, 1) != ViewPlan(num_augmented=4, seed=6).params(1, 1)
    assert plan.params(1, 1) != plan.params(2, 1)
    assert plan.params(1, 1) != plan.params(1, 2)
    boxes = {plan.params(i, v) for i in range(50) for v in range(1, 5)}
    assert len(boxes) == 200


def test_params_follow_the_random_resized_crop_ranges():
    plan = ViewPlan(num_augmented=8, seed=1, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3))
    views = [plan.params(i, v) for i in range(100) for v in range(1, 9)]
    for view in views:
        assert 0 <= view.top and view.top + view.height <= 1 + 1e-12
        assert 0 <= view.left and view.left + view.width <= 1 + 1e-12
        assert 0.35 - 1e-9 <= view.height * view.width <= 1 + 1e-9
        assert 3 / 4 - 1e-9 <= view.width / view.height <= 4 / 3 + 1e-9
    assert 0.4 < np.mean([view.flip for view in views]) < 0.6


def test_params_fall_back_to_a_central_crop_clamped_to_ratio():
    # Aspect ratios 2..3 at full area never fit the unit square, so every attempt fails.
    view = ViewPlan(num_augmented=1, scale=(1.0, 1.0), ratio=(2.0, 3.0), flip=False).params(0, 1)
    assert view == ViewParams(top=0.25, left=0.0, height=0.5, width=1.0, flip=False)


def test_disabling_flip_keeps_the_crops():
    flipping, plain = ViewPlan(num_augmented=2, seed=3), ViewPlan(num_augmented=2, seed=3, flip=False)
    for i in range(30):
        a, b = flipping.params(i, 1), plain.params(i, 1)
        assert (a.top, a.left, a.height, a.width) == (b.top, b.left, b.height, b.width)
        assert not b.flip


def test_view_id_outside_the_plan_is_rejected():
    plan = ViewPlan(num_augmented=2)
    assert plan.num_views == 3
    for bad in (-1, 3):
        with pytest.raises(ValueError, match=r"view_id .* outside \[0, 3\)"):
            plan.params(0, bad)
    assert ViewPlan(num_augmented=0).params(7, 0) == CLEAN_VIEW
    with pytest.raises(ValueError):
        ViewPlan(num_augmented=0).params(7, 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_augmented=-1), "num_augmented"),
    (dict(num_augmented=1, seed=-2), "seed"),
    (dict(num_augmented=1, scale=(0.8, 0.5)), "scale"),
    (dict(num_augmented=1, scale=(0.0, 0.5)), "scale"),
    (dict(num_augmented=1, ratio=(1.5, 1.0)), "ratio"),
    (dict(num_augmented=1, ratio=(-1.0, 1.0)), "ratio"),
    (dict(num_augmented=1, resize="float16"), "resize must be one of float32, uint8, got 'float16'"),
])
def test_plan_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ViewPlan(**kwargs)


def test_plan_round_trips_through_json():
    plan = ViewPlan(num_augmented=np.int64(6), seed=11, scale=[0.5, 0.9], ratio=(0.8, 1.25), flip=False)
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["recipe"] == plan.recipe == "rrc(0.5-0.9,0.8-1.25)"
    restored = ViewPlan.from_dict(data)
    assert restored == plan and hash(restored) == hash(plan)
    assert restored.params(4, 3) == plan.params(4, 3)
    assert ViewPlan(num_augmented=1).recipe == "rrc(0.35-1.0,0.75-1.333)+hflip"
    # The old float32 resize is the default and writes no key (old caches keep their identity); uint8 does.
    assert "resize" not in data and "resize" not in ViewPlan(num_augmented=1, resize="float32").to_dict()
    uint8 = ViewPlan(num_augmented=1, resize="uint8", interpolation="bicubic")
    assert uint8.to_dict()["resize"] == "uint8" and uint8.recipe.endswith("+hflip+bicubic+uint8")
    assert ViewPlan.from_dict(json.loads(json.dumps(uint8.to_dict()))) == uint8
    assert uint8.params(4, 1).resize == uint8.params(4, 0).resize == "uint8"


# --- render_view --------------------------------------------------------------------------------

def test_render_is_bit_identical_on_every_call():
    image, plan = _smooth_image(40, 56), ViewPlan(num_augmented=3, seed=2)
    for view_id in range(4):
        params = plan.params(17, view_id)
        first = render_view(image, params, 32, MEAN, STD)
        assert first.dtype == torch.float32 and first.shape == (3, 32, 32)
        assert torch.equal(first, render_view(image.copy(), plan.params(17, view_id), 32, MEAN, STD))


def test_render_does_not_depend_on_the_thread_count():
    # Loader workers run single-threaded while the teacher pass uses every core.
    image, plan = _smooth_image(300, 257), ViewPlan(num_augmented=2, seed=1)
    threads = torch.get_num_threads()
    renders = []
    try:
        for count in (1, max(2, threads)):
            torch.set_num_threads(count)
            renders.append([render_view(image, plan.params(5, v), 224, MEAN, STD) for v in range(3)])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*renders))


def test_view_zero_is_a_plain_resize_of_the_whole_image():
    image = _smooth_image(40, 56)
    rendered = render_view(image, CLEAN_VIEW, 24, MEAN, STD)
    pixels = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    expected = TF.resize(pixels, [24, 24], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    expected = TF.normalize(expected, list(MEAN), list(STD))
    torch.testing.assert_close(rendered, expected, rtol=0, atol=1e-5)


def test_different_views_render_differently():
    image, plan = _smooth_image(), ViewPlan(num_augmented=4, seed=0)
    renders = [render_view(image, plan.params(3, v), 32, MEAN, STD) for v in range(5)]
    for i in range(5):
        for j in range(i + 1, 5):
            assert (renders[i] - renders[j]).abs().max() > 0.05


def test_flip_mirrors_the_same_crop():
    image = _smooth_image()
    box = dict(top=0.1, left=0.2, height=0.6, width=0.5)
    plain = render_view(image, ViewParams(**box, flip=False), 20, MEAN, STD)
    assert torch.equal(render_view(image, ViewParams(**box, flip=True), 20, MEAN, STD), plain.flip(-1))


def test_crop_box_maps_to_pixels():
    image = np.zeros((10, 10, 1), dtype=np.uint8)
    image[2:5, 4:9] = 255  # rows 2..4, columns 4..8
    box = ViewParams(top=0.2, left=0.4, height=0.3, width=0.5, flip=False)
    rendered = render_view(image, box, 4, (0.0,), (1.0,))
    torch.testing.assert_close(rendered, torch.ones(1, 4, 4))  # no dark border pixel leaks in


def test_tiny_and_out_of_range_boxes_stay_inside_the_image():
    image = _smooth_image(9, 7)
    tiny = render_view(image, ViewParams(0.999, 0.999, 1e-6, 1e-6, False), 5, MEAN, STD)
    corner = (torch.from_numpy(image[-1, -1]).float() / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(tiny, corner.view(3, 1, 1).expand(3, 5, 5))


def test_render_at_another_size_keeps_the_same_crop():
    image, plan = _smooth_image(96, 96), ViewPlan(num_augmented=2, seed=4)
    params = plan.params(8, 1)
    large = render_view(image, params, 64, MEAN, STD)
    small = render_view(image, params, 32, MEAN, STD)
    downsampled = F.avg_pool2d(large[None], 2)[0]
    same_crop = (downsampled - small).abs().max()
    other_crop = (F.avg_pool2d(render_view(image, plan.params(8, 2), 64, MEAN, STD)[None], 2)[0]
                  - small).abs().max()
    assert same_crop < 0.1 < other_crop


def test_render_rejects_bad_input():
    image = _smooth_image(8, 8)
    with pytest.raises(ValueError, match="uint8"):
        render_view(image.astype(np.float32), CLEAN_VIEW, 8, MEAN, STD)
    with pytest.raises(ValueError, match="one value per channel"):
        render_view(image, CLEAN_VIEW, 8, (0.5,), (0.5,))
    with pytest.raises(ValueError, match="size"):
        render_view(image, CLEAN_VIEW, 0, MEAN, STD)


def _reference_render(raw: np.ndarray, params: ViewParams, size: int) -> torch.Tensor:
    """The per-image arithmetic caches were written with, spelled out: crop, /255, resize, flip, normalise."""
    top, height = _pixel_span(params.top, params.height, raw.shape[0])
    left, width = _pixel_span(params.left, params.width, raw.shape[1])
    crop = torch.from_numpy(raw[top:top + height, left:left + width]).permute(2, 0, 1).contiguous()
    image = F.interpolate((crop.to(torch.float32) / 255.0)[None], size=(size, size), mode="bilinear",
                          align_corners=False, antialias=True)[0]
    image = image.flip(-1) if params.flip else image
    return (image - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def _mixed_batch() -> tuple[list[np.ndarray], list[ViewParams]]:
    """Images of three sizes, clean and augmented views (repeated crop shapes among them), some flipped."""
    plan = ViewPlan(num_augmented=3, seed=7)
    raws, params = [], []
    for sample in range(12):
        image = _smooth_image(*[(28, 28), (40, 56), (33, 21)][sample % 3])
        for view in range(plan.num_views):
            raws.append(np.roll(image, sample, axis=1))
            params.append(plan.params(sample, view))
    params[1] = ViewParams(0.1, 0.2, 0.5, 0.5, flip=True)
    params[5] = ViewParams(0.1, 0.2, 0.5, 0.5, flip=False)  # same image size and crop shape as params[1]
    return raws, params


def test_batch_render_is_bit_identical_to_rendering_one_at_a_time():
    raws, params = _mixed_batch()
    assert any(p.flip for p in params) and not all(p.flip for p in params)
    batch = render_views(raws, params, 32, MEAN, STD)
    assert batch.shape == (len(raws), 3, 32, 32) and batch.dtype == torch.float32
    assert torch.equal(batch, torch.stack([render_view(r, p, 32, MEAN, STD) for r, p in zip(raws, params)]))
    # Any sub-batch (one crop shape, all flipped, reversed order) renders the same bits.
    flipped = [i for i, p in enumerate(params) if p.flip]
    assert torch.equal(render_views([raws[i] for i in flipped], [params[i] for i in flipped], 32, MEAN, STD),
                       batch[flipped])
    assert torch.equal(render_views(raws[::-1], params[::-1], 32, MEAN, STD), batch.flip(0))


def test_render_keeps_the_arithmetic_caches_were_written_with():
    # A cached target is valid only for the bits the teacher saw: a faster render must not move one.
    raws, params = _mixed_batch()
    for size in (32, 17):
        expected = torch.stack([_reference_render(r, p, size) for r, p in zip(raws, params)])
        assert torch.equal(render_views(raws, params, size, MEAN, STD), expected)


def _uint8_reference(raw: np.ndarray, params: ViewParams, size: int) -> torch.Tensor:
    """The uint8 arithmetic spelled out, PIL-free: `F.interpolate` of the contiguous uint8 crop, / 255, flip,
    normalise."""
    top, height = _pixel_span(params.top, params.height, raw.shape[0])
    left, width = _pixel_span(params.left, params.width, raw.shape[1])
    crop = torch.from_numpy(raw[top:top + height, left:left + width]).permute(2, 0, 1).contiguous()
    image = F.interpolate(crop[None], size=(size, size), mode=params.interpolation, antialias=True)[0]
    image = image.to(torch.float32) / 255.0
    image = image.flip(-1) if params.flip else image
    return (image - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_uint8_resize_is_interpolate_of_the_pixels_then_divided_in_any_batch(interpolation: str) -> None:
    raws, float_params = _mixed_batch()
    params = [dataclasses.replace(p, interpolation=interpolation, resize="uint8") for p in float_params]
    for size in (32, 17):
        expected = torch.stack([_uint8_reference(r, p, size) for r, p in zip(raws, params)])
        batch = render_views(raws, params, size, MEAN, STD)
        assert batch.dtype == torch.float32 and torch.equal(batch, expected)
        assert torch.equal(torch.stack([render_view(r, p, size, MEAN, STD) for r, p in zip(raws, params)]), batch)
        assert torch.equal(render_views(raws[::-1], params[::-1], size, MEAN, STD), batch.flip(0))
    # Other bits than the float32 resize: rounded to uint8 before / 255, with the kernel's fixed-point weights
    # (measured: at most 1.07 pixel levels apart here).
    floats = render_views(raws, [dataclasses.replace(p, interpolation=interpolation) for p in float_params], 17,
                          MEAN, STD)
    std = torch.tensor(STD).view(3, 1, 1)
    assert not torch.equal(batch, floats) and ((batch - floats).abs() * std).max() <= 1.5 / 255
    with pytest.raises(ValueError, match="share one interpolation and resize"):
        render_views(raws[:2], [params[0], float_params[1]], 8, MEAN, STD)
    with pytest.raises(ValueError, match="resize must be one of float32, uint8, got 'int8'"):
        render_crops([torch.from_numpy(raws[0])], [False], 8, MEAN, STD, resize="int8")


def test_batch_render_rejects_bad_input():
    image = _smooth_image(8, 8)
    with pytest.raises(ValueError, match="one view per image"):
        render_views([image, image], [CLEAN_VIEW], 8, MEAN, STD)
    with pytest.raises(ValueError, match="nothing to render"):
        render_views([], [], 8, MEAN, STD)
    with pytest.raises(ValueError, match="image 1 has 1 channels"):
        render_views([image, image[..., :1]], [CLEAN_VIEW, CLEAN_VIEW], 8, MEAN, STD)
    with pytest.raises(ValueError, match="uint8"):
        render_views([image, image.astype(np.float32)], [CLEAN_VIEW, CLEAN_VIEW], 8, MEAN, STD)


# --- epoch views --------------------------------------------------------------------------------

def test_epoch_views_match_the_scalar_form():
    ids = np.arange(0, 5000, 7)
    views = epoch_views(3, 2, ids, 5)
    assert views.dtype == np.int64
    assert views.tolist() == [epoch_view(3, 2, int(i), 5) for i in ids]
    np.testing.assert_array_equal(views, epoch_views(3, 2, ids, 5))


def test_epoch_views_are_roughly_uniform_and_vary():
    ids = np.arange(100_000)
    counts = np.bincount(epoch_views(0, 0, ids, 7), minlength=7)
    expected = len(ids) / 7
    assert ((counts - expected) ** 2 / expected).sum() < 30  # chi-square, 6 dof: p ~ 4e-5
    base = epoch_views(0, 0, ids[:1000], 7)
    for other in (epoch_views(0, 1, ids[:1000], 7), epoch_views(1, 0, ids[:1000], 7)):
        assert 0.75 < np.mean(base != other) < 0.95  # independent draws differ 6/7 of the time
    assert set(epoch_views(5, 5, ids[:100], 1)) == {0}


def test_epoch_views_reject_bad_arguments():
    with pytest.raises(ValueError, match="num_views"):
        epoch_views(0, 0, np.arange(3), 0)
    with pytest.raises(ValueError, match="epoch"):
        epoch_view(0, -1, 0, 3)


@pytest.mark.parametrize("plan", [ViewPlan(num_augmented=8),
                                  ViewPlan(num_augmented=8, scale=(0.08, 1.0), ratio=(0.5, 2.0)),
                                  ViewPlan(num_augmented=0, clean_crop=0.875)])
def test_source_side_leaves_every_view_at_least_the_render_size(plan) -> None:
    """A decode reduced to `source_side` pixels a side never enlarges a view's crop (docs/cache-format.md#inputs)."""
    side = plan.source_side(224)
    smallest = min(min(box.height, box.width) for box in (plan.params(i, v) for i in range(200)
                                                          for v in range(plan.num_views)))
    assert smallest * side >= 224
    assert ViewPlan(num_augmented=2).source_side(224) == 438 and plan.source_side(224) <= 224 / 0.2 + 1
