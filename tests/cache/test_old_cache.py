"""A cache written before the code's refactors still opens, verifies and serves the same targets, and today's
code plans and writes the very same manifest for its request (tests/fixtures/README.md)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.manifest import Manifest
from pipeline.cache.reader import TeacherCache
from pipeline.cache.targets import FEATMAPS, GAUSSIAN, LOGITS, LSH_CODES, POOLED
from pipeline.teacher.plan import CacheRequest, build_manifest
from pipeline.train.stream import CacheStream

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "cache-v1-before-targets"
REQUEST = dict(dataset="digits", teacher="test_resnet", subset=24, views=1, logits="topk:3", featmaps=True,
               lsh_bits=16, shard_size=12, block_size=6, device="cpu", batch_size=64)


@pytest.fixture()
def old_cache(tmp_path: Path) -> Path:
    copy = tmp_path / "old"
    shutil.copytree(FIXTURE, copy)
    return copy


def test_the_manifest_reads_and_writes_back_byte_for_byte(old_cache: Path) -> None:
    text = (old_cache / "manifest.json").read_text()
    assert Manifest.load(old_cache).to_json() == text
    Manifest.load(old_cache).save(old_cache)
    assert (old_cache / "manifest.json").read_text() == text


def test_it_opens_verifies_and_serves_every_target(old_cache: Path) -> None:
    cache = TeacherCache(old_cache)
    assert cache.verify_integrity() == [] and cache.undigested_statistics() == []
    assert cache.available_targets() == {LOGITS, POOLED, GAUSSIAN, FEATMAPS, LSH_CODES}
    assert cache.target_shapes(frozenset({LOGITS, FEATMAPS, LSH_CODES})) == {
        LOGITS: (10,), FEATMAPS: tuple(cache.manifest.arrays["featmaps/layer3"].shape[2:]), LSH_CODES: (2,)}
    stream = CacheStream(cache, 32, cache.available_targets(), seed=0, shuffle_buffer=0)
    batch = next(iter(stream.loader(0, batch_size=24, workers=0)))
    order = np.argsort(batch["id"].numpy())
    ids = cache.read("samples/ids")
    rows = np.searchsorted(ids, batch["id"].numpy()[order])
    views = batch["view"].numpy()[order]
    logits = cache.dense_logits()[rows, views]
    np.testing.assert_array_equal(batch["targets"][LOGITS].numpy()[order], logits)
    np.testing.assert_array_equal(batch["targets"][LSH_CODES].numpy()[order], cache.read("lsh/codes")[rows, 0])
    mean = cache.read("gaussian/mean")[rows, views].astype(np.float32)
    np.testing.assert_array_equal(batch["targets"][GAUSSIAN][0].numpy()[order], mean)
    assert batch["targets"][FEATMAPS].dtype.is_floating_point and batch["targets"][FEATMAPS].itemsize == 2


def test_todays_code_plans_the_same_identity_and_layout(old_cache: Path) -> None:
    stored = Manifest.load(old_cache)
    # Its own command (--out the cache) plans its identity: the float32 resize it was made with, no views.resize.
    planned = build_manifest(CacheRequest(out=str(old_cache), **REQUEST))
    assert planned.identity() == stored.identity() and "resize" not in planned.identity()["views"]
    # Into a new --out the same request (an in-memory dataset) plans the same identity: float32 stays its resize.
    fresh = build_manifest(CacheRequest(out=str(old_cache / "new"), **REQUEST)).identity()
    assert fresh == stored.identity()
    # Asked for uint8, only views.resize (and its recipe) differ.
    new = build_manifest(CacheRequest(out=str(old_cache / "new"), resize="uint8", **REQUEST)).identity()
    assert new["views"].pop("resize") == "uint8" and new["views"].pop("recipe").endswith("+uint8")
    assert new == {**stored.identity(), "views": {k: v for k, v in stored.identity()["views"].items()
                                                 if k != "recipe"}}
    # One planned change since that cache: top-k indices in the smallest unsigned type holding the classes.
    assert planned.arrays.pop("logits/topk_indices").to_dict() == {
        **stored.arrays.pop("logits/topk_indices").to_dict(), "dtype": "uint8"}
    assert planned.arrays == stored.arrays and planned.shards == [s.planned() for s in stored.records()]
