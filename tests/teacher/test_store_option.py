"""`distillery cache --store`: which per-sample targets a cache keeps (README "The teacher cache")."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cache.reader import TeacherCache
from pipeline.cache.targets import LOGITS
from pipeline.errors import DistilleryError
from pipeline.methods import MethodError, method_class
from pipeline.teacher.cache_pass import run_cache_pass
from pipeline.teacher.plan import check_request
from pipeline.train.loop import cache_info

SMALL = dict(subset=120, views=1, shard_size=60)


def test_a_cache_keeps_only_the_listed_targets_and_the_statistics_their_rows_allow(cache_request, tmp_path: Path) -> None:
    run_cache_pass(cache_request(tmp_path / "c", store="logits", **SMALL))
    cache = TeacherCache(tmp_path / "c")
    assert cache.available_targets() == {LOGITS}
    assert sorted(cache.manifest.arrays) == ["logits/dense", "samples/ids", "samples/labels"]
    # No pooled rows: no PCA or class statistics; the CKA interrelations come from the logits.
    assert cache.manifest.stats.arrays == ["stats/cka/ir"] and cache.manifest.stats.cka_source == "logits"
    with pytest.raises(MethodError, match=r"needs teacher pooled features, .*--store with pooled listed"):
        method_class("fitnet").check_cache(cache_info(cache))
    method_class("kd").check_cache(cache_info(cache))  # what it stores still serves


def test_the_default_keeps_every_target_the_options_produce(cache_request, tmp_path: Path) -> None:
    manifest = check_request(cache_request(tmp_path / "c", **SMALL))
    assert manifest.storage.store is None and "store" not in manifest.to_dict()["storage"]  # JSON as before --store
    listed = check_request(cache_request(tmp_path / "c", store="gaussian,logits,pooled", **SMALL))
    assert listed.storage.store == "logits,pooled,gaussian"  # one spelling: the same identity either order
    assert sorted(listed.arrays) == sorted(manifest.arrays)


@pytest.mark.parametrize("store, options, message", [
    ("logits,bogus", {}, "['bogus'] are not per-sample targets; list some of logits,pooled,gaussian,featmaps"),
    ("featmaps", {}, "--store lists featmaps, but these options produce no teacher feature maps: add --featmaps"),
    ("gaussian", {"tap": "none"}, "--store lists gaussian, but these options produce no teacher feature-map Gaussian"),
    ("logits", {"lsh_bits": 64}, "--lsh-bits 64 trains LSH planes on the pooled features: add pooled to --store"),
    ("logits", {"cka_source": "features"}, "--cka-source features needs stored pooled features"),
])
def test_a_store_the_options_cannot_fill_is_one_line(cache_request, tmp_path: Path, store: str, options: dict,
                                                      message: str) -> None:
    with pytest.raises(DistilleryError) as e:
        check_request(cache_request(tmp_path / "c", store=store, **SMALL, **options))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "c").exists()
