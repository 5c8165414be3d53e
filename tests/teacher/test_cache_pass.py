"""The teacher pass end to end on digits: cached targets equal a live teacher, statistics equal
independent references, resume is exact, identity is enforced, bad input fails cleanly."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from pipeline.cache.lock import cache_lock
from pipeline.cache.manifest import CacheError, Manifest
from pipeline.cache.statistics import recompute_statistics
from pipeline.cache.reader import TeacherCache
from pipeline.data.datasets import DatasetError, load_dataset
from pipeline.data.views import ViewPlan, render_view
from pipeline.stats.cka import linear_cka, pair_sample_counts
from pipeline.stats.gaussian import grid_gaussian
from pipeline.nets.tapped import ModelError
from pipeline.teacher.cache_pass import run_cache_pass
from pipeline.teacher.checkpoint import CheckpointError, TeacherCheckpoint
from pipeline.teacher.forward import cache_shard
from pipeline.teacher.model import TeacherError, build_teacher, manifest_teacher_spec
from pipeline.teacher.plan import plan_cache


def live_teacher(cache: TeacherCache):
    spec = manifest_teacher_spec(cache.manifest.teacher)
    return spec, build_teacher(spec)


def test_cached_targets_equal_live_teacher_on_rendered_views(digits_cache: Path) -> None:
    cache = TeacherCache(digits_cache)
    spec, teacher = live_teacher(cache)
    plan = ViewPlan(**cache.manifest.views.plan_fields())
    dataset = load_dataset("digits", "train")
    rng = np.random.default_rng(0)
    positions = rng.choice(len(dataset), 24, replace=False)
    views = rng.integers(0, cache.num_views, 24)
    x = torch.stack([render_view(dataset.raw(p), plan.params(int(dataset.ids[p]), int(v)), spec.input_size,
                                 spec.mean, spec.std) for p, v in zip(positions, views)])
    with torch.inference_mode():
        out = teacher(x)
    logits = cache.read("logits/dense")[positions, views].astype(np.float32)
    pooled = cache.read("features/pooled")[positions, views].astype(np.float32)
    mean, std = grid_gaussian(out.maps[spec.taps[0]], cache.manifest.storage.grid)
    np.testing.assert_allclose(logits, out.logits.numpy(), rtol=2e-3, atol=2e-3)  # fp16 storage
    np.testing.assert_allclose(pooled, out.pooled.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(cache.read("gaussian/std")[positions, views].astype(np.float32), std.numpy(),
                               rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(cache.read("gaussian/mean")[positions, views].astype(np.float32), mean.numpy(),
                               rtol=2e-3, atol=2e-3)
    assert np.array_equal(cache.read("samples/ids")[positions], dataset.ids[positions])


def test_pca_matches_sklearn_on_stored_features(digits_cache: Path) -> None:
    cache = TeacherCache(digits_cache)
    feats = cache.read("features/pooled")[:, 0].astype(np.float64)
    ref = PCA(n_components=10, svd_solver="full").fit(feats)
    comps = cache.read("stats/pca/components")[:10].astype(np.float64)
    cos = np.abs(np.sum(comps * ref.components_, axis=1)) / (
        np.linalg.norm(comps, axis=1) * np.linalg.norm(ref.components_, axis=1))
    assert cos.min() > 0.999, cos
    np.testing.assert_allclose(cache.read("stats/pca/explained_variance")[:10], ref.explained_variance_, rtol=1e-4)
    np.testing.assert_allclose(cache.read("stats/pca/mean"), feats.mean(0), rtol=1e-5, atol=1e-6)


def test_class_statistics_match_numpy(digits_cache: Path) -> None:
    cache = TeacherCache(digits_cache)
    feats = cache.read("features/pooled")[:, 0].astype(np.float64)
    labels = cache.read("samples/labels")
    means = np.stack([feats[labels == c].mean(0) for c in range(cache.num_classes)])
    np.testing.assert_allclose(cache.read("stats/classes/mean"), means, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cache.read("stats/classes/count"), np.bincount(labels, minlength=10))


def test_cka_interrelations_match_direct_computation(digits_cache: Path) -> None:
    cache = TeacherCache(digits_cache)
    ir = cache.read("stats/cka/ir")
    logits = cache.read("logits/dense")[:, 0].astype(np.float64)
    labels = cache.read("samples/labels")
    m = pair_sample_counts(np.bincount(labels))  # each pair: the first min(n_i, n_j) rows, on the CKA grid
    per_class = [logits[labels == c] for c in range(cache.num_classes)]
    direct = np.array([[linear_cka(a[:m[i, j]], b[:m[i, j]]) for j, b in enumerate(per_class)]
                       for i, a in enumerate(per_class)])
    np.testing.assert_allclose(np.diag(ir), 1.0, atol=1e-6)
    np.testing.assert_allclose(ir, direct, atol=1e-4)
    assert cache.manifest.stats.cka_source == "logits" and cache.manifest.stats.cka_samples_per_class == m.max()


def test_stats_recompute_from_features_needs_no_teacher(digits_cache: Path, tmp_path: Path, monkeypatch) -> None:
    import shutil

    import pipeline.teacher.model as model

    copy = tmp_path / "cache"
    shutil.copytree(digits_cache, copy)
    monkeypatch.setattr(model, "create_timm_model", lambda *a, **k: pytest.fail("teacher constructed"))
    info = recompute_statistics(str(copy), cka_source="features")
    cache = TeacherCache(copy)
    assert info.cka_source == "features" and cache.manifest.status == "complete"
    feats = cache.read("features/pooled")[:, 0].astype(np.float64)
    labels = cache.read("samples/labels")
    m = pair_sample_counts(np.bincount(labels))[3, 8]
    a, b = feats[labels == 3][:m], feats[labels == 8][:m]
    assert cache.read("stats/cka/ir")[3, 8] == pytest.approx(linear_cka(a, b), abs=1e-4)


def test_topk_cache_reconstructs_kept_probabilities_and_tail_mass(digits_cache: Path, cache_request, tmp_path: Path) -> None:
    run_cache_pass(cache_request(tmp_path / "topk", logits="topk:3"))
    topk = TeacherCache(tmp_path / "topk")
    dense = TeacherCache(digits_cache)
    assert "logits/dense" not in topk.manifest.arrays
    assert topk.manifest.arrays["logits/topk_indices"].dtype == "uint8" == topk.array("logits/topk_indices").dtype
    rec = torch.from_numpy(topk.dense_logits())
    ref = torch.from_numpy(dense.read("logits/dense").astype(np.float32))
    p_rec, p_ref = rec.softmax(-1), ref.softmax(-1)
    kept = torch.from_numpy(topk.read("logits/topk_indices").astype(np.int64))
    # fp16 storage of the kept logits is the only error source (exact at T=1 otherwise)
    torch.testing.assert_close(p_rec.gather(-1, kept), p_ref.gather(-1, kept), atol=2e-3, rtol=0)
    tail_rec = 1 - p_rec.gather(-1, kept).sum(-1)
    tail_ref = 1 - p_ref.gather(-1, kept).sum(-1)
    torch.testing.assert_close(tail_rec, tail_ref, atol=2e-3, rtol=0)


def test_killed_pass_resumes_without_recomputing_and_matches_uninterrupted(digits_cache: Path, cache_request,
                                                                          tmp_path: Path, monkeypatch) -> None:
    request = cache_request(tmp_path / "resumed")
    plan = plan_cache(request)
    cache_shard(request, plan.pending[0])
    cache_shard(request, plan.pending[2])  # shards finish out of order under a parallel runner
    first = (tmp_path / "resumed" / "shards" / "train-000000.tar").stat().st_mtime_ns
    assert Manifest.load(tmp_path / "resumed").status == "partial"
    with pytest.raises(CacheError, match="partial"):
        TeacherCache(tmp_path / "resumed")

    import pipeline.teacher.forward as fw

    computed = []
    original = fw.batch_rows
    monkeypatch.setattr(fw, "batch_rows", lambda out, storage, ds, pairs: computed.append(pairs[0, 0]) or
                        original(out, storage, ds, pairs))
    run_cache_pass(request)
    starts = {int(p) for p in computed}
    assert not starts & set(range(0, 400)) and not starts & set(range(800, 1200)), "finished shards recomputed"
    assert (tmp_path / "resumed" / "shards" / "train-000000.tar").stat().st_mtime_ns == first
    resumed, full = TeacherCache(tmp_path / "resumed"), TeacherCache(digits_cache)
    for name in list(full.manifest.arrays) + full.manifest.stats.arrays:
        np.testing.assert_array_equal(resumed.read(name), full.read(name), err_msg=name)
    assert [s.sha256 for s in resumed.manifest.records()] == [s.sha256 for s in full.manifest.records()]


def test_a_stop_request_ends_the_pass_at_a_batch_boundary_and_a_rerun_completes(cache_request, tmp_path: Path,
                                                                              monkeypatch) -> None:
    """What Ctrl-C does to a local `distillery cache` (flows/signals.py asks `pipeline.stop`): the shard in
    progress stops before its next batch and writes nothing, the finished ones stay, the cache stays partial."""
    import signal

    import pipeline.teacher.forward as fw
    from pipeline import stop
    from pipeline.stop import Stopped

    request = cache_request(tmp_path / "stopped", subset=300, views=0, shard_size=100, batch_size=25)
    batches: list[int] = []
    original = fw.batch_rows

    def rows_then_stop(out, storage, ds, pairs):  # noqa: ANN001, ANN202 - batch_rows' own
        batches.append(int(pairs[0, 0]))
        if len(batches) == 6:  # shard 1's second batch: what a signal in the middle of a shard asks
            assert stop.request_stop(signal.SIGINT), "the pass does not poll for stop requests"
        return original(out, storage, ds, pairs)

    monkeypatch.setattr(fw, "batch_rows", rows_then_stop)
    try:
        with pytest.raises(Stopped):
            run_cache_pass(request)
    finally:
        stop.reset()
    assert batches == [0, 25, 50, 75, 100, 125], "the pass did not stop at the next batch"
    assert [p.name for p in sorted((tmp_path / "stopped" / "shards").glob("train-*.json"))] == ["train-000000.json"]
    assert Manifest.load(tmp_path / "stopped").status == "partial"

    monkeypatch.setattr(fw, "batch_rows", original)
    assert run_cache_pass(request).written_shards == 2
    assert TeacherCache(tmp_path / "stopped").verify_integrity() == []


def test_rerun_of_complete_cache_is_a_no_op(digits_cache: Path, cache_request) -> None:
    before = (digits_cache / "manifest.json").read_text()
    run_cache_pass(cache_request(digits_cache))
    assert (digits_cache / "manifest.json").read_text() == before


def test_the_pass_takes_the_writer_lock_itself_and_a_second_writer_gets_one_line(cache_request,
                                                                                 tmp_path: Path) -> None:
    out = tmp_path / "locked"
    with cache_lock(out):  # another writer of the same cache (the lock is per open file, so also in-process)
        with pytest.raises(CacheError, match="another distillery process is writing") as e:
            run_cache_pass(cache_request(out, subset=40, shard_size=20))
        assert "\n" not in str(e.value)
        assert not (out / "manifest.json").exists()  # refused before the plan creates the cache
    assert run_cache_pass(cache_request(out, subset=40, shard_size=20)).written_shards == 2
    assert TeacherCache(out).manifest.status == "complete"


@pytest.mark.parametrize("override, field", [
    ({"views": 3}, "views.num_augmented"),
    ({"view_seed": 1}, "views.seed"),
    ({"subset": 500}, "dataset."),
    ({"tap": "layer1"}, "teacher.taps"),
    ({"logits": "topk:5"}, "storage.logits"),
])
def test_reuse_with_different_identity_is_refused_naming_the_field(digits_cache: Path, cache_request, override,
                                                                   field) -> None:
    with pytest.raises(CacheError, match=field.replace(".", r"\.")):
        plan_cache(cache_request(digits_cache, **override))


def test_reuse_with_another_checkpoint_is_refused(digits_cache: Path, digits_teacher: Path, cache_request,
                                                  tmp_path: Path) -> None:
    ckpt = TeacherCheckpoint.load(digits_teacher)
    other = tmp_path / "other.pt"
    replace(ckpt, state_dict={k: v + 0.01 if v.is_floating_point() else v
                              for k, v in ckpt.state_dict.items()}).save(other)
    with pytest.raises(CacheError, match=r"teacher\.checkpoint_sha256"):
        plan_cache(cache_request(digits_cache, checkpoint=str(other)))


def test_non_finite_teacher_output_fails_and_leaves_cache_partial(digits_teacher: Path, cache_request,
                                                                  tmp_path: Path) -> None:
    ckpt = TeacherCheckpoint.load(digits_teacher)
    bad = tmp_path / "nan.pt"
    replace(ckpt, state_dict={k: torch.full_like(v, float("nan")) if k.startswith("fc.") else v
                              for k, v in ckpt.state_dict.items()}).save(bad)
    out = tmp_path / "nan-cache"
    with pytest.raises(TeacherError, match="non-finite logits/dense for sample id"):
        run_cache_pass(cache_request(out, checkpoint=str(bad)))
    assert Manifest.load(out).status == "partial"
    assert not list((out / "shards").glob("*.json")), "a failed shard must leave no record"


@pytest.mark.parametrize("override, error, message", [
    ({"teacher": "no_such_net"}, ModelError, "unknown timm model 'no_such_net'"),
    ({"checkpoint": "/nonexistent/t.pt"}, CheckpointError, "does not exist"),
    ({"dataset": "mnist-ish"}, DatasetError, "unknown dataset"),
    ({"logits": "top3"}, CacheError, "--logits must be"),
    ({"cka_source": "pixels"}, CacheError, "--cka-source must be logits, features or auto"),
    ({"teacher_head": False, "cka_source": "logits"}, CacheError, "--cka-source logits needs stored logits"),
])
def test_bad_input_fails_with_one_line_and_writes_nothing(cache_request, tmp_path: Path, override, error,
                                                          message) -> None:
    out = tmp_path / "bad"
    with pytest.raises(error, match=message) as info:
        run_cache_pass(cache_request(out, **override))
    assert "\n" not in str(info.value)
    assert not (out / "manifest.json").exists()


def test_empty_dataset_is_refused(cache_request, tmp_path: Path) -> None:
    for c in ("a", "b"):
        (tmp_path / "images" / c).mkdir(parents=True)
    with pytest.raises(DatasetError):
        run_cache_pass(cache_request(tmp_path / "out", dataset=f"imagefolder:{tmp_path / 'images'}",
                                     checkpoint=None))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_head_less_teacher_stores_features_and_statistics_only(cache_request, tmp_path: Path) -> None:
    out = tmp_path / "headless"
    run_cache_pass(cache_request(out, teacher_head=False, cka_source="features", checkpoint=None, subset=300))
    cache = TeacherCache(out)
    assert not any(n.startswith("logits/") for n in cache.manifest.arrays)
    assert {"pooled", "gaussian"} <= cache.available_targets() and "logits" not in cache.available_targets()
    assert cache.read("stats/cka/ir").shape == (10, 10)
    assert json.loads((out / "manifest.json").read_text())["teacher"]["head"] is False


# ------------------------------------------------------------------------------------------------
# ScaleKD (docs/methods.md#scalekd): feature maps per view and the teacher tail.
# ------------------------------------------------------------------------------------------------


def test_cached_featmaps_equal_live_teacher_on_rendered_views_in_zarr_only(featmaps_cache: Path) -> None:
    from pipeline.cache.blocks import decode_block, iter_tar_members

    cache = TeacherCache(featmaps_cache)
    spec, teacher = live_teacher(cache)
    tap = cache.manifest.storage.tap
    stored = cache.read(f"featmaps/{tap}")
    assert stored.dtype == np.float16 and stored.shape[:2] == (cache.num_samples, cache.num_views)
    plan = ViewPlan(**cache.manifest.views.plan_fields())
    dataset = load_dataset("digits", "train", subset=240, seed=0)
    positions = np.repeat(np.arange(0, cache.num_samples, 20), cache.num_views)
    views = np.tile(np.arange(cache.num_views), len(positions) // cache.num_views)
    x = torch.stack([render_view(dataset.raw(p), plan.params(int(dataset.ids[p]), int(v)), spec.input_size,
                                 spec.mean, spec.std) for p, v in zip(positions, views)])
    with torch.inference_mode():
        live = teacher(x).maps[tap].numpy()
    np.testing.assert_allclose(stored[positions, views].astype(np.float32), live, rtol=2e-3, atol=2e-3)
    # Their one copy: the training stream's blocks hold the inputs only.
    blocks = [decode_block(data) for path in cache.shard_paths() for _, data in iter_tar_members(path)]
    assert all(f"featmaps.{tap}" not in b for b in blocks)
    assert cache.available_targets() >= {"featmaps"}
    assert cache.target_shapes(frozenset({"featmaps"}))["featmaps"] == stored.shape[2:]


def test_teacher_tail_file_is_recorded_and_rebuilds_the_tapped_stage(featmaps_cache: Path) -> None:
    from pipeline.checksums import sha256_file
    from pipeline.nets.tail import build_teacher_tail

    cache = TeacherCache(featmaps_cache)
    record = cache.manifest.files["teacher_tail"]
    assert record.sha256 == sha256_file(featmaps_cache / "teacher_tail.pt")
    assert record.stages == [cache.manifest.storage.tap] == ["layer3"]
    tail = build_teacher_tail(*cache.teacher_tail())
    _, teacher = live_teacher(cache)
    x = torch.randn(4, 1, 32, 32)
    with torch.inference_mode():
        _, (before, tapped) = teacher.model.forward_intermediates(x, indices=[2, 3])  # layer2, layer3
        torch.testing.assert_close(tail(before), tapped, rtol=1e-5, atol=1e-5)


def test_rerun_restores_a_lost_teacher_tail(featmaps_cache: Path, cache_request, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(featmaps_cache, copy)
    (copy / "teacher_tail.pt").unlink()
    with pytest.raises(CacheError, match="teacher_tail.pt is missing or fails its sha256"):
        TeacherCache(copy).teacher_tail()
    run_cache_pass(cache_request(copy, subset=240, views=1, featmaps=True, teacher_tail=1, shard_size=120,
                                 block_size=40))
    assert (copy / "teacher_tail.pt").read_bytes() == (featmaps_cache / "teacher_tail.pt").read_bytes()


@pytest.mark.parametrize("override, message", [
    ({"teacher_tail": 1}, "--teacher-tail 1: the tail's outputs mimic the stored feature maps"),
    ({"featmaps": True, "tap": "none"}, "--featmaps stores the map of the tapped stage"),
    ({"featmaps": True, "teacher_tail": 9}, r"--teacher-tail must be 1\.\.3 for tap layer3"),
])
def test_bad_scalekd_storage_options_fail_with_one_line(cache_request, tmp_path: Path, override, message) -> None:
    with pytest.raises((CacheError, ModelError), match=message) as info:
        run_cache_pass(cache_request(tmp_path / "bad", subset=40, **override))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "bad" / "manifest.json").exists()
