"""ScaleKD (docs/methods.md#scalekd): DFM against independent references, the CAP's layout, TPP from the cache's
teacher tail without ever building the teacher, and cross-architecture training end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.fft
import timm
import torch

from pipeline.cache.manifest import CacheError
from pipeline.cache.reader import TeacherCache
from pipeline.methods import (FEATMAPS, LOGITS, CacheInfo, MethodError, StudentInfo, StudentOutputs,
                              TrainingProgress, create_method)
from pipeline.methods.kd import kd_loss
from pipeline.methods.scalekd import (CrossAttentionProjector, ScaledCrossAttention, dfm_alternative, dfm_direct,
                                     remove_dc)
from pipeline.teacher.plan import CacheRequest
from pipeline.teacher.cache_pass import run_cache_pass
from pipeline.train.config import RunSettings, TrainConfig
from pipeline.train.loop import train_student

PROGRESS = TrainingProgress(epoch=0, step=0, steps_per_epoch=1, total_epochs=1)
TEACHER_MAP = (12, 3, 3)
STUDENT = StudentInfo(pooled_dim=8, taps={-2: "s2", -1: "s3"}, feature_shapes={"s2": (6, 4, 4), "s3": (8, 2, 2)})


def cache_info(*targets: str, root: Path | None = None) -> CacheInfo:
    return CacheInfo(num_classes=5, pooled_dim=None, available=frozenset(targets),
                     target_shapes={FEATMAPS: TEACHER_MAP, LOGITS: (5,)},
                     teacher_tail=TeacherCache(root).teacher_tail if root is not None else None)


def test_removing_the_dc_equals_zeroing_the_dct_dc_coefficient() -> None:
    x = np.random.default_rng(0).normal(size=(3, 4, 5, 7)) * 3 + 2
    coefficients = scipy.fft.dctn(x, type=2, norm="ortho", axes=(-2, -1))
    coefficients[..., 0, 0] = 0
    reference = scipy.fft.idctn(coefficients, type=2, norm="ortho", axes=(-2, -1))
    np.testing.assert_allclose(remove_dc(torch.from_numpy(x)).numpy(), reference, atol=1e-5)
    # The same in float32, the precision training uses.
    np.testing.assert_allclose(remove_dc(torch.from_numpy(x).float()).numpy(), reference, atol=1e-5)


def test_dfm_direct_and_alternative_match_per_position_references() -> None:
    rng = np.random.default_rng(1)
    p, t = rng.normal(size=(2, 4, 3, 6, 5))  # two (N=4, C=3, H=6, W=5) maps
    expected = 0.0
    for n in range(4):
        for h in range(6):
            for w in range(5):
                a, b = p[n, :, h, w], t[n, :, h, w]
                expected += np.sum((a / np.linalg.norm(a) - b / np.linalg.norm(b)) ** 2)
    got = dfm_direct(torch.from_numpy(p), torch.from_numpy(t)).item()
    assert got == pytest.approx(expected / 4, rel=1e-10)

    def dct_route(x: np.ndarray) -> np.ndarray:
        c = scipy.fft.dctn(x, type=2, norm="ortho", axes=(-2, -1))
        c[..., 0, 0] = 0
        return scipy.fft.idctn(c, type=2, norm="ortho", axes=(-2, -1))

    alternative = dfm_alternative(torch.from_numpy(p).float(), torch.from_numpy(t).float())
    via_dct = dfm_direct(torch.from_numpy(dct_route(p)), torch.from_numpy(dct_route(t)))
    assert alternative.dtype == torch.float32 and alternative.item() == pytest.approx(via_dct.item(), abs=1e-5)


def test_cap_output_position_hw_comes_from_query_hw_alone() -> None:
    torch.manual_seed(0)
    cap = CrossAttentionProjector((8, 2, 2), TEACHER_MAP, heads=8).eval()
    assert cap.attention.num_heads == 4  # gcd(12, 8): the heads divide the teacher's width
    x = torch.randn(2, 8, 2, 2)
    with torch.no_grad():
        before = cap(x)
        cap.queries[0, :, 1, 2] += 1.0  # query of teacher position (h=1, w=2) only
        after = cap(x)
    assert before.shape == (2, *TEACHER_MAP)
    changed = (after - before).abs().amax(dim=(0, 1)) > 1e-6
    assert changed.tolist() == [[False, False, False], [False, False, True], [False, False, False]]


def test_the_attention_scale_multiplies_the_logits_as_in_the_official_projector() -> None:
    # Official ScaleKD (WindowMultiheadPosAttention): softmax(q k^T * d_head^-0.5 * softmax_scale) v, then the
    # output projection; computed here per head with plain matmuls from the module's own weights.
    torch.manual_seed(0)
    queries, keys = torch.randn(2, 9, 12, dtype=torch.float64), torch.randn(2, 4, 8, dtype=torch.float64)
    outputs = {}
    for scale in (1.0, 5.0):
        attention = ScaledCrossAttention(12, 8, heads=3, scale=scale).double()
        torch.manual_seed(1)
        for parameter in attention.parameters():
            parameter.data.normal_()
        q, k, v = attention.q(queries), attention.k(keys), attention.v(keys)
        heads = []
        for h in range(3):
            cols = slice(4 * h, 4 * h + 4)
            logits = q[..., cols] @ k[..., cols].transpose(1, 2) * 4 ** -0.5 * scale
            heads.append(torch.softmax(logits, dim=-1) @ v[..., cols])
        expected = attention.out(torch.cat(heads, dim=-1))
        outputs[scale] = attention(queries, keys)
        torch.testing.assert_close(outputs[scale], expected, rtol=1e-12, atol=1e-12)
    # Same weights (same seed), different scale: the outputs differ, so the factor is not a no-op.
    assert (outputs[5.0] - outputs[1.0]).abs().max() > 1e-3


def test_the_scalekd_default_is_the_official_scale_and_plain_attention_is_an_option() -> None:
    default = create_method("scalekd", cache_info(FEATMAPS), STUDENT)
    plain = create_method("scalekd:attention_scale=1", cache_info(FEATMAPS), STUDENT)
    assert default.cap_direct.attention.scale == 5.0 and plain.cap_alternative.attention.scale == 1.0
    with pytest.raises(MethodError, match="option 'attention_scale' must be >= 0.01 and <= 100, not 0"):
        create_method("scalekd:attention_scale=0", cache_info(FEATMAPS), STUDENT)


def test_cap_keeps_nothing_of_its_queries_beyond_the_attention() -> None:
    # One student position means one key: attention returns its value at every query, and with no residual
    # around the attention every output position is the same, whatever the queries.
    torch.manual_seed(0)
    cap = CrossAttentionProjector((8, 1, 1), TEACHER_MAP, heads=4).eval()
    with torch.no_grad():
        out = cap(torch.randn(3, 8, 1, 1))
    torch.testing.assert_close(out, out[:, :, :1, :1].expand_as(out))
    assert out[:, :, 0, 0].std() > 0


def test_terms_are_weighted_dfm_of_each_views_projector_plus_kd_when_logits_are_cached() -> None:
    torch.manual_seed(0)
    method = create_method("scalekd:direct=2,alternative=3,kd=0.25,T=2", cache_info(FEATMAPS, LOGITS), STUDENT)
    assert method.needs == {FEATMAPS, LOGITS} and type(method).needs == {FEATMAPS}
    s3, logits, t_logits = torch.randn(4, 8, 2, 2), torch.randn(4, 5), torch.randn(4, 5)
    teacher = torch.randn(4, *TEACHER_MAP).half()  # served as stored
    student = StudentOutputs(logits=logits, pooled=torch.randn(4, 8), feature_maps={"s2": torch.randn(4, 6, 4, 4),
                                                                                    "s3": s3})
    terms = method(student, {FEATMAPS: teacher, LOGITS: t_logits}, torch.zeros(4), PROGRESS)
    assert set(terms) == {"scalekd_direct", "scalekd_alt", "scalekd_kd"}
    torch.testing.assert_close(terms["scalekd_direct"], 2 * dfm_direct(method.cap_direct(s3), teacher.float()))
    torch.testing.assert_close(terms["scalekd_alt"], 3 * dfm_alternative(method.cap_alternative(s3), teacher.float()))
    torch.testing.assert_close(terms["scalekd_kd"], 0.25 * kd_loss(logits, t_logits, 2.0))


def test_without_cached_logits_there_is_no_kd_term_and_logits_are_not_needed() -> None:
    method = create_method("scalekd", cache_info(FEATMAPS), STUDENT)
    assert method.needs == {FEATMAPS}
    student = StudentOutputs(logits=torch.randn(2, 5), pooled=torch.randn(2, 8),
                             feature_maps={"s2": torch.randn(2, 6, 4, 4), "s3": torch.randn(2, 8, 2, 2)})
    assert set(method(student, {FEATMAPS: torch.randn(2, *TEACHER_MAP)}, torch.zeros(2), PROGRESS)) == {
        "scalekd_direct", "scalekd_alt"}


def test_a_cache_without_feature_maps_names_the_cache_option() -> None:
    with pytest.raises(MethodError, match="needs teacher feature maps.*--featmaps"):
        create_method("scalekd", cache_info(LOGITS), STUDENT)


def test_the_stage_option_picks_the_mimicked_map_and_tpp_reads_the_one_before() -> None:
    from pipeline.methods.scalekd import ScaleKD

    assert ScaleKD.taps_for({}) == (-1,) and ScaleKD.taps_for({"tpp": True}) == (-2, -1)
    assert ScaleKD.taps_for({"stage": -2, "tpp": True}) == (-3, -2)
    with pytest.raises(MethodError, match="counts from the deepest stage"):
        ScaleKD.taps_for({"stage": 1})
    method = create_method("scalekd:stage=-2", cache_info(FEATMAPS), STUDENT)
    assert method.final_stage == "s2" and method.cap_direct(torch.randn(2, 6, 4, 4)).shape == (2, *TEACHER_MAP)


def test_a_one_position_student_map_is_refused_before_training() -> None:
    # A single key makes every query's attention output the same token: the alternative view would be 0 / 0.
    student = StudentInfo(pooled_dim=8, taps={-2: "s2", -1: "s3"}, feature_shapes={"s2": (6, 2, 2), "s3": (8, 1, 1)})
    with pytest.raises(MethodError, match=r"stage -1 \(s3\) is 1x1.*scalekd:stage=-2"):
        create_method("scalekd", cache_info(FEATMAPS), student)
    assert create_method("scalekd:stage=-2", cache_info(FEATMAPS), student).final_stage == "s2"


def test_tpp_needs_the_caches_teacher_tail(digits_cache: Path) -> None:
    with pytest.raises(MethodError, match="tpp=true needs the cache's teacher tail"):
        create_method("scalekd:tpp=true", cache_info(FEATMAPS), STUDENT)
    with pytest.raises(CacheError, match="stores no teacher tail.*--teacher-tail N"):
        create_method("scalekd:tpp=true", cache_info(FEATMAPS, root=digits_cache), STUDENT)


def test_tpp_tail_is_frozen_outside_the_runs_state_but_moves_with_the_method(featmaps_cache: Path) -> None:
    from pipeline.train.loop import cache_info as read_cache_info

    info = read_cache_info(TeacherCache(featmaps_cache))
    method = create_method("scalekd:tpp=true", info, STUDENT)
    tail = method._tail
    assert tail.input_shape == (48, 4, 4) and tail.output_shape == info.target_shapes[FEATMAPS]
    assert not any(k.startswith("_tail") or ".body." in k for k in method.state_dict())
    assert {id(p) for p in method.parameters()}.isdisjoint(id(p) for p in tail.parameters())
    method.train()
    assert method.training and not tail.training
    method.double()
    assert all(p.dtype == torch.float64 for p in tail.parameters())
    early = torch.randn(2, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    out = StudentOutputs(logits=torch.randn(2, 10, dtype=torch.float64), pooled=torch.randn(2, 8),
                         feature_maps={"s2": early, "s3": torch.randn(2, 8, 2, 2, dtype=torch.float64)})
    teacher = torch.randn(2, *info.target_shapes[FEATMAPS]).half()
    terms = method(out, {FEATMAPS: teacher, LOGITS: torch.randn(2, 10)}, torch.zeros(2), PROGRESS)
    (terms["scalekd_tpp_direct"] + terms["scalekd_tpp_alt"]).backward()
    assert early.grad.abs().sum() > 0 and all(p.grad is None for p in tail.parameters())


def test_with_tpp_the_final_projectors_query_with_the_tpp_outputs(featmaps_cache: Path) -> None:
    from pipeline.train.loop import cache_info as read_cache_info

    info = read_cache_info(TeacherCache(featmaps_cache))
    torch.manual_seed(0)
    method = create_method("scalekd:tpp=true", info, STUDENT)
    assert method.cap_direct.queries is None and method.cap_alternative.queries is None
    assert create_method("scalekd:tpp=true,tpp_queries=false", info, STUDENT).cap_direct.queries is not None
    early, final = torch.randn(2, 6, 4, 4), torch.randn(2, 8, 2, 2)
    out = StudentOutputs(logits=torch.randn(2, 10), pooled=torch.randn(2, 8), feature_maps={"s2": early, "s3": final})
    teacher = torch.randn(2, *info.target_shapes[FEATMAPS])
    terms = method(out, {FEATMAPS: teacher, LOGITS: torch.randn(2, 10)}, torch.zeros(2), PROGRESS)
    queries = method._tail(method.tpp_direct(early))
    torch.testing.assert_close(terms["scalekd_direct"], 0.08 * dfm_direct(method.cap_direct(final, queries), teacher))
    # The queries are not detached: the final direct term alone trains the TPP direct projector.
    terms["scalekd_direct"].backward()
    assert method.tpp_direct.query_proj[0].weight.grad.abs().sum() > 0
    assert method.tpp_alternative.query_proj[0].weight.grad is None


def _train(cache: Path, student: str, out: Path, methods=("ce", "scalekd:tpp=true")) -> dict:
    settings = RunSettings(epochs=1, batch_size=60, workers=0)
    return train_student(TrainConfig(cache=str(cache), student=student, methods=tuple(methods), out=str(out),
                                     settings=settings))


def _check_run(out: Path, student: str, summary: dict) -> None:
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "step"]
    terms = ("scalekd_direct", "scalekd_alt", "scalekd_tpp_direct", "scalekd_tpp_alt", "scalekd_kd")
    assert all(np.isfinite([r[t] for t in terms]).all() for r in steps)
    assert any(r["scalekd_tpp_alt"] > 0 for r in steps)
    assert 0 <= summary.val_accuracy <= 1
    # The projectors and the tail are training-only: student.pt is the plain timm model.
    state = torch.load(out / "student.pt", weights_only=True)
    size = {"img_size": 32} if "vit" in student else {}  # a ViT's position embedding is sized for its input
    timm.create_model(student, num_classes=10, in_chans=1, **size).load_state_dict(state, strict=True)


@pytest.mark.slow
def test_tpp_training_never_constructs_the_full_teacher(featmaps_cache: Path, tmp_path: Path, monkeypatch) -> None:
    """A ViT student from the CNN teacher's cache, with TPP through the cached ResNet tail."""
    teacher = json.loads((featmaps_cache / "manifest.json").read_text())["teacher"]["model"]
    create_model = timm.create_model

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was constructed during training")

    def student_only(name, *args, **kwargs):
        if name == teacher:
            refuse()
        return create_model(name, *args, **kwargs)

    monkeypatch.setattr("pipeline.teacher.model.build_teacher", refuse)
    monkeypatch.setattr("pipeline.teacher.model.create_timm_model", refuse)
    monkeypatch.setattr("pipeline.teacher.plan.build_teacher", refuse)
    monkeypatch.setattr("timm.create_model", student_only)
    out = tmp_path / "run"
    summary = _train(featmaps_cache, "test_vit", out)
    _check_run(out, "test_vit", summary)


@pytest.mark.slow
def test_a_cnn_student_trains_from_a_vit_teachers_cache_with_tpp(tmp_path: Path) -> None:
    cache = tmp_path / "vit-cache"
    run_cache_pass(CacheRequest(dataset="digits", teacher="test_vit", out=str(cache), subset=120, views=1,
                                featmaps=True, teacher_tail=2, shard_size=60, block_size=30, device="cpu"))
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["files"]["teacher_tail"]["stages"] == ["blocks.4", "blocks.5"]
    out = tmp_path / "run"
    # At 32 px test_resnet's deepest map is 1x1 and the ViT's tokens 2x2: mimic with its 2x2 layer3.
    summary = _train(cache, "test_resnet", out, methods=("ce", "scalekd:stage=-2,tpp=true"))
    _check_run(out, "test_resnet", summary)
