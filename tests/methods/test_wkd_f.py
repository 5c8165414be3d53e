import math

import numpy as np
import pytest
import scipy.linalg
import torch

from pipeline.methods import (
    GAUSSIAN,
    LOGITS,
    CacheInfo,
    MethodError,
    StudentInfo,
    StudentOutputs,
    TrainingProgress,
    create_method,
)

START = TrainingProgress(epoch=0, step=0, steps_per_epoch=10, total_epochs=4)


def cache(grid: int, channels: int) -> CacheInfo:
    return CacheInfo(num_classes=10, pooled_dim=None, available=frozenset({GAUSSIAN}),
                     target_shapes={GAUSSIAN: (grid * grid, channels)})


def student(channels: int, height: int, width: int) -> StudentInfo:
    return StudentInfo(pooled_dim=8, taps={-1: "stage4"}, feature_shapes={"stage4": (channels, height, width)})


def teacher_gaussians(batch: int, grid: int, channels: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(batch, grid * grid, channels, generator=g, dtype=torch.float64)
    std = torch.rand(batch, grid * grid, channels, generator=g, dtype=torch.float64) + 0.1
    return mean, std


def outputs(fmap: torch.Tensor) -> StudentOutputs:
    return StudentOutputs(logits=torch.zeros(len(fmap), 10), pooled=torch.zeros(len(fmap), 8),
                          feature_maps={"stage4": fmap})


def reference_w2(projected: np.ndarray, mean_t: np.ndarray, std_t: np.ndarray, grid: int) -> tuple[float, float]:
    """Mean and covariance parts of W2^2 between N(mu_s, diag sigma_s^2) and N(mu_t, diag sigma_t^2), from the
    general Gaussian formula tr(S1 + S2 - 2 (S2^1/2 S1 S2^1/2)^1/2), averaged over samples and cells."""
    n, _, h, w = projected.shape
    mean_part = cov_part = 0.0
    for i in range(n):
        for gy in range(grid):
            y0, y1 = math.floor(gy * h / grid), math.ceil((gy + 1) * h / grid)
            for gx in range(grid):
                x0, x1 = math.floor(gx * w / grid), math.ceil((gx + 1) * w / grid)
                cell = projected[i, :, y0:y1, x0:x1].reshape(projected.shape[1], -1)
                mu_s = cell.mean(axis=1)
                s1 = np.diag(cell.var(axis=1, ddof=1) + 1e-5)
                s2 = np.diag(std_t[i, gy * grid + gx] ** 2)
                root = scipy.linalg.sqrtm(s2)
                cross = scipy.linalg.sqrtm(root @ s1 @ root)
                mean_part += float(np.sum((mu_s - mean_t[i, gy * grid + gx]) ** 2))
                cov_part += float(np.real(np.trace(s1 + s2 - 2 * cross)))
    cells = n * grid * grid
    return mean_part / cells, cov_part / cells


@pytest.mark.parametrize(("grid", "height", "width"), [(1, 3, 4), (2, 7, 6), (3, 8, 9)])
def test_terms_are_the_closed_form_w2_between_diagonal_gaussians(grid, height, width):
    torch.manual_seed(grid)
    method = create_method("wkd_f:weight=1.5,gamma=3", cache(grid, 4), student(5, height, width)).double()
    fmap = torch.randn(3, 5, height, width, dtype=torch.float64)
    mean_t, std_t = teacher_gaussians(3, grid, 4, seed=grid)
    out = method(outputs(fmap), {GAUSSIAN: (mean_t, std_t)}, torch.zeros(3, dtype=torch.long), START)
    with torch.no_grad():
        projected = method.projector(fmap).numpy()
    mean_part, cov_part = reference_w2(projected, mean_t.numpy(), std_t.numpy(), grid)
    assert out["wkd_f_mean"].item() == pytest.approx(1.5 * 3 * mean_part, rel=1e-6)
    assert out["wkd_f_std"].item() == pytest.approx(1.5 * cov_part, rel=1e-6)


def test_student_and_teacher_maps_may_differ_in_size_and_channels():
    method = create_method("wkd_f", cache(2, 6), student(3, 5, 5))
    fmap = torch.randn(4, 3, 5, 5, requires_grad=True)
    out = method(outputs(fmap), {GAUSSIAN: teacher_gaussians(4, 2, 6)}, torch.zeros(4, dtype=torch.long), START)
    sum(out.values()).backward()
    assert torch.isfinite(fmap.grad).all() and fmap.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.projector.parameters())


@pytest.mark.parametrize(("grid", "size"), [(4, 2), (2, 2), (3, 3)])
def test_student_map_too_small_for_the_grid_is_refused_at_build(grid, size):
    with pytest.raises(MethodError, match=rf"{size}x{size}.*{grid}x{grid} grid.*--input-size.*--grid") as info:
        create_method("wkd_f", cache(grid, 8), student(16, size, size))
    assert "\n" not in str(info.value)


def test_smallest_workable_map_trains():
    # 3x3 in a 2x2 grid: adaptive cells [0, 2) and [1, 3) overlap, each holds 2x2 positions.
    method = create_method("wkd_f", cache(2, 4), student(3, 3, 3))
    fmap = torch.randn(2, 3, 3, 3, requires_grad=True)
    out = method(outputs(fmap), {GAUSSIAN: teacher_gaussians(2, 2, 4)}, torch.zeros(2, dtype=torch.long), START)
    sum(out.values()).backward()
    assert torch.isfinite(fmap.grad).all()


def test_bottleneck_projector_and_relu_option():
    method = create_method("wkd_f:projector=bottleneck,hidden=7,relu=false", cache(1, 4), student(3, 4, 4))
    convs = [m for m in method.projector if isinstance(m, torch.nn.Conv2d)]
    shapes = [(c.in_channels, c.out_channels, c.kernel_size) for c in convs]
    assert shapes == [(3, 7, (1, 1)), (7, 7, (3, 3)), (7, 4, (1, 1))]
    assert not isinstance(method.projector[-1], torch.nn.ReLU)
    projected = method.projector(torch.randn(2, 3, 4, 4))
    assert projected.shape == (2, 4, 4, 4) and (projected < 0).any()
    assert isinstance(create_method("wkd_f", cache(1, 4), student(3, 4, 4)).projector[-1], torch.nn.ReLU)


def test_weight_follows_the_cosine_decay():
    method = create_method("wkd_f", cache(1, 4), student(3, 4, 4)).eval()
    fmap = torch.randn(2, 3, 4, 4)
    targets = {GAUSSIAN: teacher_gaussians(2, 1, 4)}
    labels = torch.zeros(2, dtype=torch.long)
    first = method(outputs(fmap), targets, labels, START)
    halfway = TrainingProgress(epoch=2, step=0, steps_per_epoch=10, total_epochs=4)
    middle = method(outputs(fmap), targets, labels, halfway)
    for name in ("wkd_f_mean", "wkd_f_std"):
        assert middle[name].item() == pytest.approx(0.5 * first[name].item(), rel=1e-6)


def test_bad_options_and_caches_are_refused():
    with pytest.raises(MethodError, match="projector must be one of conv1x1, bottleneck"):
        create_method("wkd_f:projector=mlp", cache(1, 4), student(3, 4, 4))
    with pytest.raises(MethodError, match="method 'wkd_f': option 'hidden' must be >= 1 and <= 8192, not 0"):
        create_method("wkd_f:hidden=0", cache(1, 4), student(3, 4, 4))
    no_gaussians = CacheInfo(num_classes=10, pooled_dim=None, available=frozenset({LOGITS}))
    with pytest.raises(MethodError, match="--tap STAGE --grid G"):
        create_method("wkd_f", no_gaussians, student(3, 4, 4))


def test_stage_option_reads_an_earlier_student_stage():
    info = StudentInfo(pooled_dim=8, taps={-1: "stage4", -2: "stage3"},
                       feature_shapes={"stage4": (16, 1, 1), "stage3": (8, 4, 4)},
                       stage_shapes=((8, 4, 4), (16, 1, 1)))
    with pytest.raises(MethodError, match=r"1x1.*wkd_f:stage=-2"):
        create_method("wkd_f", cache(2, 4), info)
    method = create_method("wkd_f:stage=-2", cache(2, 4), info)
    fmap = torch.randn(2, 8, 4, 4, requires_grad=True)
    batch = StudentOutputs(logits=torch.zeros(2, 10), pooled=torch.zeros(2, 8),
                           feature_maps={"stage4": torch.randn(2, 16, 1, 1), "stage3": fmap})
    out = method(batch, {GAUSSIAN: teacher_gaussians(2, 2, 4)}, torch.zeros(2, dtype=torch.long), START)
    sum(out.values()).backward()
    assert fmap.grad is not None and fmap.grad.abs().sum() > 0
    with pytest.raises(MethodError, match="counts from the deepest"):
        create_method("wkd_f:stage=1", cache(2, 4), info)


def test_a_stage_counted_from_the_shallow_end_is_refused() -> None:
    from pipeline.methods.wkd_f import WKDF

    assert WKDF.taps_for({}) == (-1,) and WKDF.taps_for({"stage": -2}) == (-2,)
    with pytest.raises(MethodError, match="method 'wkd_f': stage counts from the deepest stage"):
        WKDF.taps_for({"stage": 0})


def test_the_refusal_names_the_deepest_stage_that_fits_the_grid_computed_not_guessed():
    # The stage before the deepest (2x2) does not fit a 2x2 grid either: only stage -3 does.
    info = StudentInfo(pooled_dim=8, taps={-1: "s3"}, feature_shapes={"s3": (16, 1, 1)},
                       stage_shapes=((4, 4, 4), (8, 2, 2), (16, 1, 1)))
    with pytest.raises(MethodError, match=r"read stage -3, the deepest whose map fits \(wkd_f:stage=-3\)"):
        create_method("wkd_f", cache(2, 4), info)
    fitting = StudentInfo(pooled_dim=8, taps={-3: "s1"}, feature_shapes={"s1": (4, 4, 4)},
                          stage_shapes=info.stage_shapes)
    create_method("wkd_f:stage=-3", cache(2, 4), fitting)  # what the refusal suggested is accepted
    with pytest.raises(MethodError, match="no stage of this student fits at this input size"):
        create_method("wkd_f", cache(8, 4), info)


def test_a_real_students_refusal_suggests_a_stage_that_is_then_accepted():
    import re

    from pipeline.train.student import Student

    grid = 2
    deep = Student("test_resnet", 10, 1, 32, taps=(-1,)).info()
    with pytest.raises(MethodError) as refused:
        create_method("wkd_f", cache(grid, 4), deep)
    stage = int(re.search(r"wkd_f:stage=(-\d+)", str(refused.value)).group(1))
    suggested = Student("test_resnet", 10, 1, 32, taps=(stage,)).info()
    assert create_method(f"wkd_f:stage={stage}", cache(grid, 4), suggested).stage == suggested.taps[stage]
    if stage < -2:  # every stage between the suggestion and the deepest is refused too
        with pytest.raises(MethodError):
            create_method(f"wkd_f:stage={stage + 1}", cache(grid, 4),
                          Student("test_resnet", 10, 1, 32, taps=(stage + 1,)).info())
