"""TCS (docs/methods.md#tcs): teacher PCA coordinates, the alignment term, the tailoring schedule, the fold into
one linear head, and a run from a head-less teacher's cache end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.methods import POOLED, CacheInfo, MethodError, StudentInfo, StudentOutputs, TrainingProgress, create_method
from pipeline.nets.tapped import create_timm_model
from pipeline.train.student import Student

D, CLASSES = 12, 4


def pca_cache(seed: int = 0) -> tuple[CacheInfo, np.ndarray]:
    """A CacheInfo whose PCA statistics are numpy's eigendecomposition of random teacher features."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(200, D)) * np.linspace(3, 0.1, D)
    mean = features.mean(0)
    values, vectors = np.linalg.eigh(np.cov(features, rowvar=False))
    order = np.argsort(values)[::-1]
    stats = {"pca/mean": torch.tensor(mean, dtype=torch.float32),
             "pca/components": torch.tensor(vectors[:, order].T.copy(), dtype=torch.float32),
             "pca/explained_variance": torch.tensor(values[order].copy(), dtype=torch.float32)}
    return CacheInfo(num_classes=CLASSES, pooled_dim=D, available=frozenset({POOLED}), statistics=stats), features


def progress(step: int, steps: int = 16) -> TrainingProgress:
    return TrainingProgress(epoch=0, step=step, steps_per_epoch=steps, total_epochs=1)


def test_k_follows_the_explained_variance_fraction_or_a_fixed_number() -> None:
    cache, _ = pca_cache()
    ev = cache.statistics["pca/explained_variance"].double().numpy()
    ratio = np.cumsum(ev) / ev.sum()
    for fraction in (0.5, 0.9, 0.99):
        k = create_method(f"tcs:variance={fraction},min_dims=0", cache, StudentInfo(pooled_dim=5)).k
        assert ratio[k - 1] >= fraction and (k == 1 or ratio[k - 2] < fraction)
    method = create_method("tcs:dims=7,keep=0.4,min_dims=0", cache, StudentInfo(pooled_dim=5))
    assert method.k == 7 and method.target == 3 and method.head.map.weight.shape == (7, 5)


def test_k_and_the_tailored_count_never_fall_below_the_class_count_unless_asked() -> None:
    cache, _ = pca_cache()
    ev = cache.statistics["pca/explained_variance"].double().numpy()
    assert np.cumsum(ev)[0] / ev.sum() >= 0.2  # the first component alone explains 20 %: k = 1 by variance
    method = create_method("tcs:variance=0.2,keep=0.1", cache, StudentInfo(pooled_dim=5))
    assert method.k == CLASSES and method.target == CLASSES  # floored, before and after tailoring
    method = create_method("tcs:variance=0.2,min_dims=2", cache, StudentInfo(pooled_dim=5))
    assert method.k == 2  # an explicit floor
    method = create_method("tcs:dims=3,keep=0.5", cache, StudentInfo(pooled_dim=5))
    assert method.k == 3 and method.target == 3  # dims is explicit; tailoring still stops at the floor (<= k)


@pytest.mark.parametrize("norm", ["none", "scale", "whiten"])
def test_targets_are_scaled_per_norm(norm: str) -> None:
    cache, features = pca_cache()
    method = create_method(f"tcs:dims=6,norm={norm}", cache, StudentInfo(pooled_dim=5))
    ev = cache.statistics["pca/explained_variance"].double().numpy()[:6]
    raw = (features - cache.statistics["pca/mean"].double().numpy()) @ \
        cache.statistics["pca/components"].double().numpy()[:6].T
    divisor = {"none": np.ones(6), "scale": np.full(6, np.sqrt(ev.mean())), "whiten": np.sqrt(ev)}[norm]
    got = method.teacher_coordinates(torch.tensor(features, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(got, raw / divisor, rtol=1e-4, atol=1e-5)
    if norm == "whiten":  # the PCA's own features: unit variance per coordinate (ddof 1, as np.cov)
        np.testing.assert_allclose(got.var(0, ddof=1), np.ones(6), rtol=1e-4)


def test_alignment_is_mse_to_centred_teacher_coordinates_over_active_ones() -> None:
    cache, features = pca_cache()
    method = create_method("tcs:dims=6,weight=2,norm=none", cache, StudentInfo(pooled_dim=5))
    method.head.active[[1, 4]] = 0
    f_s, f_t = torch.randn(8, 5), torch.tensor(features[:8], dtype=torch.float32)
    out = method(StudentOutputs(logits=torch.zeros(8, CLASSES), pooled=f_s), {POOLED: f_t}, torch.zeros(8), progress(0))
    components = cache.statistics["pca/components"].double().numpy()[:6]
    t = (features[:8] - cache.statistics["pca/mean"].double().numpy()) @ components.T
    z = method.head.map(f_s).detach().double().numpy()
    keep = [0, 2, 3, 5]
    expected = 2 * ((z[:, keep] - t[:, keep]) ** 2).mean()
    assert out["tcs"].item() == pytest.approx(expected, rel=1e-5)


def test_decay_scales_the_alignment_by_the_cosine_of_training_done() -> None:
    cache, features = pca_cache()
    f_s, f_t = torch.randn(8, 5), torch.tensor(features[:8], dtype=torch.float32)
    losses = {}
    for decay in (False, True):
        method = create_method(f"tcs:dims=6,decay={str(decay).lower()}", cache, StudentInfo(pooled_dim=5))
        torch.nn.init.constant_(method.head.map.weight, 0.1)  # the same map, so only the weight differs
        torch.nn.init.zeros_(method.head.map.bias)
        losses[decay] = [method(StudentOutputs(logits=torch.zeros(8, CLASSES), pooled=f_s), {POOLED: f_t},
                                torch.zeros(8), progress(step))["tcs"].item() for step in (0, 4, 8, 15)]
    factors = [d / c for d, c in zip(losses[True], losses[False], strict=True)]
    assert factors == pytest.approx([0.5 * (1 + np.cos(np.pi * s / 16)) for s in (0, 4, 8, 15)], abs=1e-6)
    assert factors[0] == 1 and factors[-1] < 0.01


def test_mask_pruning_drops_the_least_important_coordinates_on_schedule() -> None:
    torch.manual_seed(0)
    cache, features = pca_cache()
    method = create_method("tcs:dims=10,keep=0.3,min_dims=0,rounds=3,prune_start=0.25,prune_end=0.75", cache,
                           StudentInfo(pooled_dim=5))
    head = method.head
    f_s, f_t = torch.randn(32, 5), torch.tensor(features[:32], dtype=torch.float32)
    labels = torch.arange(32) % CLASSES
    points = [0.25, 0.5, 0.75]  # rounds spread evenly over [prune_start, prune_end]
    grads = torch.zeros(10, dtype=torch.float64)
    for step in range(16):
        before, importance = head.active.clone(), head.importance.clone()
        np.testing.assert_allclose(importance.numpy(), grads.numpy(), rtol=1e-12)  # accumulated |dL/dmask|
        logits = head(f_s)
        terms = method(StudentOutputs(logits=logits, pooled=f_s), {POOLED: f_t}, labels, progress(step))
        done = sum(p <= step / 16 for p in points)
        assert int(head.active.sum()) == 10 - round(7 * done / 3)  # 10 -> 8 -> 5 -> 3 = keep * k
        dropped = (before.bool() & ~head.active.bool()).nonzero().flatten()
        if len(dropped):  # the dropped ones had the least importance among the active ones
            survivors = importance[head.active.bool()]
            assert importance[dropped].max() <= survivors.min()
        head.mask.grad = None  # as the loop: the student's forward (logits) ran before the method's
        (F.cross_entropy(logits, labels) + terms["tcs"]).backward()
        grads += head.mask.grad.abs().double()
    assert int(head.active.sum()) == 3 and int(head.rounds) == 3
    assert torch.all(head.mask.grad[~head.active.bool()] == 0)  # dropped coordinates leave the classifier


def test_the_head_replaces_the_students_and_folds_into_one_plain_timm_linear_layer() -> None:
    torch.manual_seed(0)
    cache, _ = pca_cache()
    student = Student("test_resnet", CLASSES, 1, 16).eval()
    method = create_method("tcs:dims=8", cache, student.info())
    method.adopt_student(student.model)
    with torch.no_grad():
        method.head.mask.uniform_(0.5, 1.5)
        method.head.active[[0, 3, 6]] = 0
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        outputs = student(x)
        trained = method.head.classifier(method.head.map(outputs.pooled) * method.head.mask * method.head.active)
        torch.testing.assert_close(outputs.logits, trained)  # the student's logits are the TCS path
        torch.testing.assert_close(student.model(x), trained)  # and so is what the evaluation calls
    assert method.export_student(student.model)
    plain = create_timm_model("test_resnet", CLASSES, 1, 16).eval()
    plain.load_state_dict(student.model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), trained, rtol=1e-5, atol=1e-5)


def test_bad_options_and_a_cache_without_pca_are_refused() -> None:
    cache, _ = pca_cache()
    for spec in ("tcs:variance=0", "tcs:dims=13", "tcs:min_dims=-2", "tcs:norm=pca", "tcs:keep=0", "tcs:rounds=0",
                 "tcs:prune_start=0.8,prune_end=0.5"):
        with pytest.raises(MethodError, match="tcs"):
            create_method(spec, cache, StudentInfo(pooled_dim=5))
    bare = CacheInfo(num_classes=CLASSES, pooled_dim=D, available=frozenset({POOLED}))
    with pytest.raises(MethodError, match="distillery stats"):
        create_method("tcs", bare, StudentInfo(pooled_dim=5))


def test_head_less_teacher_cache_then_tcs_and_elsh_training(cache_request, tmp_path: Path) -> None:
    from pipeline.cache.reader import TeacherCache
    from pipeline.cache.summary import array_rows, teacher_accuracy_per_view
    from pipeline.data.datasets import load_dataset
    from pipeline.teacher.cache_pass import run_cache_pass
    from pipeline.train.config import RunSettings, TrainConfig
    from pipeline.train.evaluate import evaluate_accuracy
    from pipeline.train.loop import check_run, train_student

    out = tmp_path / "headless"
    run_cache_pass(cache_request(out, teacher_head=False, subset=300, views=0, lsh_bits=32, shard_size=100,
                                 block_size=50))
    cache = TeacherCache(out)
    m = cache.manifest
    assert m.teacher.head is False and m.storage.logits == "none" and m.stats.cka_source == "features"
    assert cache.available_targets() == {"pooled", "gaussian", "lsh_codes"}
    assert teacher_accuracy_per_view(cache) == [] and "lsh/codes" in {r.name for r in array_rows(cache)}

    settings = RunSettings(epochs=1, batch_size=32, workers=0)
    with pytest.raises(MethodError, match="needs teacher logits"):
        check_run(TrainConfig(cache=str(out), student="test_resnet", methods=("ce", "kd"), out=str(tmp_path / "kd"),
                              settings=settings))
    methods = ("ce", "tcs:dims=16,keep=0.5,rounds=2,prune_start=0,prune_end=0.5", "elsh:lshl2=1")
    summary = train_student(TrainConfig(cache=str(out), student="test_resnet", methods=methods,
                                        out=str(tmp_path / "run"), settings=settings))

    plain = create_timm_model("test_resnet", 10, 1, m.teacher.input_size)
    plain.load_state_dict(torch.load(tmp_path / "run" / "student.pt", weights_only=True), strict=True)
    val = load_dataset("digits", "val")
    accuracy = evaluate_accuracy(plain, val, m.teacher.input_size, m.teacher.mean, m.teacher.std)
    assert summary.val_accuracy == accuracy  # the reported accuracy is the saved student's
    assert summary.params == sum(p.numel() for p in plain.parameters())


@pytest.mark.slow
def test_a_weak_teacher_whose_pca_is_narrower_than_the_classes_does_not_leave_tcs_at_chance(tmp_path: Path) -> None:
    """Issue 17's failing case: a 1-epoch resnet18 on digits whose PCA needs fewer components than classes for
    90 % of the variance; the default TCS run used to read that few coordinates and end at chance."""
    from pipeline.cache.reader import TeacherCache
    from pipeline.methods.tcs import components_for
    from pipeline.teacher.plan import CacheRequest
    from pipeline.teacher.cache_pass import run_cache_pass
    from pipeline.train.fit import FitConfig, fit_teacher
    from pipeline.train.config import RunSettings, TrainConfig
    from pipeline.train.loop import train_student

    checkpoint = tmp_path / "weak.pt"
    fit_teacher(FitConfig(dataset="digits", model="resnet18", out=str(checkpoint), epochs=1, workers=0, device="cpu"))
    cache = tmp_path / "cache"
    run_cache_pass(CacheRequest(dataset="digits", teacher="resnet18", checkpoint=str(checkpoint), out=str(cache),
                                views=0, device="cpu"))
    info = TeacherCache(cache)
    explained = info.statistics()["pca/explained_variance"]
    assert components_for(explained, 0.9) < info.manifest.dataset.num_classes  # the failing case's premise
    summary = train_student(TrainConfig(cache=str(cache), student="test_resnet", methods=("ce", "tcs"),
                                        out=str(tmp_path / "run"),
                                        settings=RunSettings(epochs=3, batch_size=32, workers=0, device="cpu")))
    chance = 1 / info.manifest.dataset.num_classes
    assert summary.val_accuracy > 3 * chance
