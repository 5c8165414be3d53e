"""`distillery verify`: the live teacher against the cache, shard checksums, and the ways a cache goes wrong."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache.manifest import Manifest
from pipeline.cache.reader import TeacherCache
from pipeline.cache.writer import CacheWriter
from pipeline.teacher.cache_pass import run_cache_pass
from pipeline.teacher.checkpoint import TeacherCheckpoint
from pipeline.teacher.model import TeacherError
from pipeline.teacher.verify import RTOL, sample_pairs, verify_cache


def copy_cache(src: Path, dst: Path, checkpoint: Path | None = None) -> Path:
    """A copy of a cache; with `checkpoint`, its teacher checkpoint is copied there and the manifest points at it."""
    shutil.copytree(src, dst)
    if checkpoint is not None:
        manifest = Manifest.load(dst)
        shutil.copyfile(manifest.teacher.checkpoint, checkpoint)
        manifest.teacher.checkpoint = str(checkpoint)
        manifest.save(dst)
    return dst


def test_sample_pairs_are_distinct_samples_with_every_view_equally_often() -> None:
    pairs = sample_pairs(num_samples=500, num_views=3, count=60, seed=4)
    assert pairs.shape == (60, 2) and len(np.unique(pairs[:, 0])) == 60
    assert np.all(np.diff(pairs[:, 0]) > 0) and pairs[:, 0].max() < 500
    assert np.bincount(pairs[:, 1]).tolist() == [20, 20, 20]
    assert np.array_equal(pairs, sample_pairs(500, 3, 60, 4)) and not np.array_equal(pairs, sample_pairs(500, 3, 60, 5))
    assert len(sample_pairs(num_samples=7, num_views=3, count=60, seed=0)) == 7


def test_a_good_cache_verifies_within_float16_tolerance(digits_cache: Path) -> None:
    result = verify_cache(digits_cache, samples=48, seed=1)
    assert result.ok and result.problems == [] and result.pairs == 48 and result.shards == 4
    assert [c.name for c in result.checks] == ["logits/dense", "features/pooled", "gaussian/mean", "gaussian/std"]
    cache = TeacherCache(digits_cache)
    for check in result.checks:
        scale = np.abs(cache.read(check.name).astype(np.float64)).max()
        assert check.tolerance <= RTOL * scale  # over the sampled rows: at most the whole array's scale
        # What fp16 storage alone explains: one unit in the last place of the largest value.
        assert 0 < check.max_abs_diff <= 2.0 ** (np.floor(np.log2(scale)) - 10), check
        assert check.values == 48 * int(np.prod(cache.array(check.name).shape[2:]))


def test_a_flipped_byte_in_one_shard_is_a_mismatch(digits_cache: Path, tmp_path: Path) -> None:
    root = copy_cache(digits_cache, tmp_path / "flipped")
    shard = root / TeacherCache(root).manifest.records()[1].file
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    result = verify_cache(root, samples=16)
    assert not result.ok
    assert len(result.problems) == 1 and "shard 1" in result.problems[0] and "sha256" in result.problems[0]
    assert all(c.ok for c in result.checks)  # the zarr arrays were not touched


def test_stored_values_that_differ_from_the_live_teacher_are_a_mismatch(digits_cache: Path, tmp_path: Path) -> None:
    root = copy_cache(digits_cache, tmp_path / "edited")
    writer = CacheWriter(root, Manifest.load(root))
    logits = writer.group["logits/dense"]
    logits[...] = (np.asarray(logits[...]).astype(np.float32) + 0.25).astype(np.float16)
    result = verify_cache(root, samples=16)
    # The shard files still match their checksums; the zarr rows do not match their per-array digests.
    assert not result.ok and len(result.problems) == 4
    assert all("logits/dense differs from its digest" in p for p in result.problems)
    by_name = {c.name: c for c in result.checks}
    assert not by_name["logits/dense"].ok and by_name["features/pooled"].ok
    # The offset, up to the fp16 rounding of values of magnitude < 8 on both sides.
    assert abs(by_name["logits/dense"].max_abs_diff - 0.25) <= 2 * 2.0 ** -8


def test_a_checkpoint_replaced_at_the_same_path_is_a_mismatch(digits_cache: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "teacher.pt"
    root = copy_cache(digits_cache, tmp_path / "cache", checkpoint=checkpoint)
    assert verify_cache(root, samples=8).ok
    # Another teacher at the same path: the same architecture, other weights (as if retrained).
    ckpt = TeacherCheckpoint.load(checkpoint)
    generator = torch.Generator().manual_seed(0)
    replace(ckpt, state_dict={k: v * (1 + 0.1 * torch.randn(v.shape, generator=generator)) if v.is_floating_point()
                              else v for k, v in ckpt.state_dict.items()}).save(checkpoint)
    result = verify_cache(root, samples=8)
    assert not result.ok
    assert any("changed since the cache was made" in p for p in result.problems)
    assert not all(c.ok for c in result.checks)  # and the other teacher's outputs are not the cached ones

    checkpoint.unlink()
    with pytest.raises(TeacherError, match="not found"):
        verify_cache(root, samples=8)


def test_top_k_logits_and_feature_maps_are_verified(cache_request, tmp_path: Path) -> None:
    root = tmp_path / "topk"
    run_cache_pass(cache_request(root, subset=90, views=1, logits="topk:3", featmaps=True, shard_size=50))
    result = verify_cache(root, samples=20)
    tap = TeacherCache(root).manifest.storage.tap
    assert result.ok, result.checks
    assert [c.name for c in result.checks] == ["logits (top-k reconstructed)", "features/pooled", "gaussian/mean",
                                               "gaussian/std", f"featmaps/{tap}"]
    assert all(c.values > 0 for c in result.checks)


def test_a_non_finite_stored_value_fails_its_array_with_a_finite_tolerance() -> None:
    from pipeline.teacher.verify import _check

    stored = np.array([[1.0, 2.0], [np.inf, 4.0]], dtype=np.float16)
    live = np.array([[1.0, 2.0], [60000.0, 4.0]], dtype=np.float32)
    check = _check("logits/dense", live, stored, np.array([7, 9]), np.array([0, 1]), RTOL)
    assert not check.ok and np.isfinite(check.tolerance) and check.tolerance == RTOL * 4.0
    assert check.worst == (9, 1)
