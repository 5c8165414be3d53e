"""`fit-teacher --patch-size`: a small ViT fitted here with its own patch size, cached with that architecture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cache.reader import TeacherCache
from pipeline.methods import FEATMAPS
from pipeline.nets.tapped import ModelError, create_timm_model
from pipeline.teacher.cache_pass import run_cache_pass
from pipeline.teacher.checkpoint import TeacherCheckpoint
from pipeline.teacher.plan import CacheRequest
from pipeline.train.fit import FitConfig, fit_teacher
from pipeline.train.loop import cache_info


def test_a_patch_4_vit_teacher_is_fitted_and_cached_with_its_8x8_token_maps(tmp_path: Path) -> None:
    out = tmp_path / "vit.pt"
    fit_teacher(FitConfig(dataset="digits", model="test_vit", out=str(out), epochs=1, subset=64, patch_size=4,
                          workers=0, device="cpu"))
    checkpoint = TeacherCheckpoint.load(out)
    assert checkpoint.model_kwargs == {"patch_size": 4} and checkpoint.input_size == 32
    cache = tmp_path / "cache"
    run_cache_pass(CacheRequest(dataset="digits", teacher="test_vit", checkpoint=str(out), out=str(cache), subset=40,
                                views=1, featmaps=True, teacher_tail=1, shard_size=40, block_size=20, device="cpu"))
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["teacher"]["model_kwargs"] == {"patch_size": 4}
    # 32 px in patches of 4: an 8x8 grid of 64-wide tokens (a patch-16 test_vit would give 2x2).
    assert tuple(cache_info(TeacherCache(cache)).target_shapes[FEATMAPS]) == (64, 8, 8)


def test_a_patch_size_for_a_convnet_is_one_line() -> None:
    with pytest.raises(ModelError, match=r"^timm model 'test_resnet' does not take patch_size=4; leave it out"):
        create_timm_model("test_resnet", 10, 1, 32, patch_size=4)
