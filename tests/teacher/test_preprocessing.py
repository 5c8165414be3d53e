"""A teacher's own evaluation transform (its pretrained config's size, mean, std, interpolation and crop
fraction) reaches the manifest and the renders: compared with timm's `create_transform` on the same image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from pipeline.cache.inputs import InputCodec, StoredImages
from pipeline.cache.reader import TeacherCache
from pipeline.cache.targets import LOGITS
from pipeline.data.datasets import load_dataset
from pipeline.data.views import ViewError, ViewPlan, render_view
from pipeline.teacher.forward import render_pairs
from pipeline.teacher.model import manifest_teacher_spec
from pipeline.teacher.cache_pass import run_cache_pass
from pipeline.teacher.plan import CacheRequest, build_manifest
from pipeline.teacher.verify import verify_cache
from pipeline.train.stream import CacheStream

MEAN, STD = (0.2, 0.3, 0.4), (0.5, 0.6, 0.7)


def smooth_image(size: int, seed: int = 0) -> np.ndarray:
    """A uint8 (size, size, 3) image with structure at several scales (random noise would make every
    resampling filter differ from every other one by about the same)."""
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.random((1, 3, 6, 6), dtype=np.float32))
    big = torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)[0]
    return (big.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def timm_eval(raw: np.ndarray, size: int, crop_pct: float, interpolation: str) -> torch.Tensor:
    """timm's eval transform (resize to floor(size / crop_pct), centre crop, normalise) on the float image."""
    config = resolve_data_config({"input_size": (3, size, size), "crop_pct": crop_pct, "interpolation": interpolation,
                                  "mean": MEAN, "std": STD})
    return create_transform(**config)(torch.from_numpy(raw).permute(2, 0, 1).float() / 255)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_view_zero_is_timms_centre_crop_with_the_teachers_interpolation(interpolation: str) -> None:
    # 80 px -> timm resizes to 40 and crops 32 from 4; the plan crops 64 px from 8 and resizes to 32: the same
    # box at an integer factor, so away from the box's edge (where timm's filter sees pixels beyond the box)
    # both are the same arithmetic.
    raw = smooth_image(80)
    plan = ViewPlan(num_augmented=0, clean_crop=32 / 40, interpolation=interpolation)
    ours = render_view(raw, plan.params(5, 0), 32, MEAN, STD)
    theirs = timm_eval(raw, 32, 0.8, interpolation)
    torch.testing.assert_close(ours[:, 2:-2, 2:-2], theirs[:, 2:-2, 2:-2], rtol=0, atol=1e-5)
    other = "bicubic" if interpolation == "bilinear" else "bilinear"
    wrong = render_view(raw, ViewPlan(num_augmented=0, clean_crop=0.8, interpolation=other).params(5, 0), 32, MEAN,
                        STD)
    assert (wrong - theirs)[:, 2:-2, 2:-2].abs().max() > 1e-3  # the filter is seen: the comparison can fail
    whole = render_view(raw, ViewPlan(num_augmented=0, interpolation=interpolation).params(5, 0), 32, MEAN, STD)
    assert (whole - theirs).abs().max() > 0.05  # and so is the crop


def test_bicubic_renders_stay_in_the_pixel_range() -> None:
    raw = np.zeros((16, 16, 3), dtype=np.uint8)
    raw[:, 8:] = 255  # a hard edge: bicubic overshoots it unless clamped, as timm's transforms clamp
    out = render_view(raw, ViewPlan(num_augmented=0, interpolation="bicubic").params(0, 0), 40, (0.0,) * 3, (1.0,) * 3)
    assert out.min() == 0.0 and out.max() == 1.0


def test_a_plan_at_its_defaults_keeps_its_manifest_form_and_refuses_unknown_filters() -> None:
    assert set(ViewPlan(num_augmented=1).to_dict()) == {"num_augmented", "seed", "scale", "ratio", "flip", "recipe"}
    plan = ViewPlan(num_augmented=1, clean_crop=0.875, interpolation="bicubic")
    assert ViewPlan.from_dict(plan.to_dict()) == plan and plan.recipe.endswith("+center(0.875)+bicubic")
    assert plan.params(3, 1).interpolation == "bicubic"  # augmented views resize with the teacher's filter too
    with pytest.raises(ViewError, match="interpolation must be one of bilinear, bicubic"):
        ViewPlan(num_augmented=0, interpolation="lanczos")
    with pytest.raises(ViewError, match="clean_crop must be in"):
        ViewPlan(num_augmented=0, clean_crop=0.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image folder of 168 px RGB images, of which test_efficientnet's pretrained config (160 px, crop_pct
    0.95, bicubic, ImageNet mean and std) keeps whole pixels: timm resizes to floor(160 / 0.95) = 168, i.e.
    not at all, and keeps the central 160."""
    root = tmp_path_factory.mktemp("folder168")
    for split in ("train", "val"):
        for label, name in enumerate(("a", "b")):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(smooth_image(168, seed=10 * label + i)).save(root / split / name / f"{i}.png")
    return root


def test_the_pretrained_config_reaches_the_manifest_and_the_renders(folder: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=2).eval()
    weights = tmp_path / "test_efficientnet.safetensors"
    safetensors.torch.save_file(model.state_dict(), weights)
    request = CacheRequest(dataset=f"imagefolder:{folder}", teacher="test_efficientnet", weights=str(weights),
                           out=str(tmp_path / "c"), views=1, tap="none", device="cpu")
    manifest = build_manifest(request)
    config = resolve_data_config(model=model)  # what timm says these weights were trained with
    spec = manifest_teacher_spec(manifest.teacher)
    pre = manifest.teacher.preprocessing
    assert (spec.input_size, spec.mean, spec.std) == (160, tuple(config["mean"]), tuple(config["std"]))
    assert (spec.mean, pre["interpolation"], pre["crop_pct"]) == ((0.485, 0.456, 0.406), "bicubic", 0.95)
    assert (pre["interpolation"], pre["crop_pct"], pre["crop_mode"]) == (config["interpolation"], config["crop_pct"],
                                                                         config["crop_mode"])
    assert (manifest.views.clean_crop, manifest.views.interpolation) == (160 / 168, "bicubic")
    plan = ViewPlan(**manifest.views.plan_fields())
    dataset = load_dataset(f"imagefolder:{folder}", "train")
    pairs = np.array([(p, 0) for p in range(len(dataset))], dtype=np.int64)
    ours = render_pairs(dataset, plan, pairs, spec)
    transform = create_transform(**config)
    theirs = torch.stack([transform(Image.fromarray(dataset.raw(p))) for p in range(len(dataset))])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_a_bicubic_uint8_cache_streams_the_teacher_pass_renders_bit_for_bit(folder: Path, tmp_path: Path) -> None:
    # A new cache resizes in uint8 with the teacher's bicubic filter; the student stream at the teacher's size
    # renders what the teacher pass rendered, bit for bit, and verify re-runs the teacher on it.
    torch.manual_seed(0)
    weights = tmp_path / "test_efficientnet.safetensors"
    safetensors.torch.save_file(timm.create_model("test_efficientnet", num_classes=2).eval().state_dict(), weights)
    run_cache_pass(CacheRequest(dataset=f"imagefolder:{folder}", teacher="test_efficientnet", weights=str(weights),
                                out=str(tmp_path / "c"), views=2, tap="none", device="cpu", shard_size=2))
    cache = TeacherCache(tmp_path / "c")
    m = cache.manifest
    assert (m.views.interpolation, m.views.resize) == ("bicubic", "uint8")
    stream = CacheStream(cache, size=m.teacher.input_size, targets=frozenset({LOGITS}), seed=0, shuffle_buffer=0)
    seen = {(int(b["id"][i]), int(b["view"][i])): b["input"][i]
            for epoch in range(3) for b in stream.loader(epoch, batch_size=3, workers=0) for i in range(len(b["id"]))}
    dataset = load_dataset(f"imagefolder:{folder}", "train")
    position = {int(sample): p for p, sample in enumerate(dataset.ids)}
    pairs = np.array([(position[sample], view) for sample, view in seen], dtype=np.int64)
    teacher = render_pairs(StoredImages.of(dataset, InputCodec.of(m)), ViewPlan(**m.views.plan_fields()), pairs,
                           manifest_teacher_spec(m.teacher))
    assert len({view for _, view in seen}) > 1  # augmented views among them, not only the clean one
    assert torch.equal(torch.stack(list(seen.values())), teacher)
    result = verify_cache(cache.root, samples=4)
    assert result.ok, (result.problems, result.checks)
