"""Named experiments (`pipeline.lab.experiments`): result rows and their markdown, suites, teacher reuse, paired seeds.
The flow that runs one end to end is tested in tests/flows/test_experiments.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.lab.experiments import (ExperimentError, get_experiment, paired_difference, results_markdown,
                                      result_rows, reusable_teacher, suite_parts)
from pipeline.train.summary import TrainSummary


def test_result_rows_average_seeds_and_markdown_lists_them() -> None:
    def run(accuracy: float, seconds: float, step: float) -> TrainSummary:
        return TrainSummary(student="s", methods=["ce"], seed=0, val_accuracy=accuracy, train_seconds=seconds,
                            mean_step_seconds=step, peak_rss_bytes=1, params=1)

    runs = {"ce": [run(a, 10.0, 0.01) for a in (0.80, 0.82)], "ce+kd": [run(0.9, 12.0, 0.02)]}
    rows = result_rows(get_experiment("fmnist-5k"), runs)  # rows ce, ce+kd, ...; those without runs left out
    assert [r.methods for r in rows] == ["ce", "ce+kd"]
    assert rows[0].accuracy == pytest.approx(81.0) and rows[0].std == pytest.approx(2 ** 0.5)
    assert rows[1].std == 0.0
    table = results_markdown(rows).splitlines()
    assert table[2] == "| ce | 81.00 ± 1.41 | 80.00 / 82.00 | 10 | 10.0 |"


def test_the_tcs_suite_runs_supervised_and_self_supervised_parts_with_their_rows(tmp_path: Path) -> None:
    parts = suite_parts("tcs")
    assert [(p.name, p.teacher_objective) for p in parts] == [
        ("fmnist-5k", "supervised"), ("fmnist-5k-ssl", "ssl"), ("fmnist-fewshot", "supervised"),
        ("fmnist-fewshot-ssl", "ssl")]
    assert list(parts[0].rows) == ["ce", "ce+kd", "ce+tcs", "ce+tcs+elsh", "ce+tcs(decay)"]
    assert list(parts[1].rows) == ["ce", "ce+tcs", "ce+tcs+elsh", "ce+tcs(decay)"]
    assert parts[1].cache_options["teacher_head"] is False
    # Each teacher has its own checkpoint, and the ssl fit is asked for: a supervised checkpoint is not reused.
    assert parts[0].teacher_path(tmp_path) != parts[1].teacher_path(tmp_path)
    assert parts[1].fit_config(tmp_path).objective == "ssl"
    assert [p.name for p in suite_parts("tcs", ["ce+kd"])] == ["fmnist-5k", "fmnist-fewshot"]
    with pytest.raises(ExperimentError, match="experiment 'tcs' has no row 'ce\\+magic'"):
        suite_parts("tcs", ["ce+magic"])


def test_the_xarch_suite_shares_one_vit_teacher_fitted_with_its_own_patch_size(tmp_path: Path) -> None:
    vit_cnn, cnn_vit, vit_resnet18 = suite_parts("xarch")
    assert [(p.teacher, p.student) for p in (vit_cnn, cnn_vit, vit_resnet18)] == [
        ("test_vit", "test_resnet"), ("test_resnet", "test_vit"), ("test_vit", "resnet18")]
    # Both ViT-teacher parts reuse one checkpoint; it is not fmnist-5k's, and the fit asks for the patch size.
    assert vit_cnn.teacher_path(tmp_path) == vit_resnet18.teacher_path(tmp_path)
    assert vit_cnn.teacher_path(tmp_path) != get_experiment("fmnist-5k").teacher_path(tmp_path)
    fit = vit_cnn.fit_config(tmp_path)
    assert (fit.patch_size, fit.subset) == (8, 3000)
    # A checkpoint fitted at another patch size is another teacher.
    assert not reusable_teacher(fit.model_copy(update={"patch_size": 16}).model_dump(), fit)
    assert all(p.cache_options == {"featmaps": True, "teacher_tail": 1} for p in (vit_cnn, cnn_vit, vit_resnet18))
    assert list(vit_cnn.rows) == ["ce", "ce+kd", "ce+dkd", "ce+wkd_l+wkd_f", "ce+scalekd", "ce+scalekd(tpp)",
                                  "ce+tcs"]


def test_a_checkpoint_from_before_the_objective_setting_is_the_supervised_teacher(tmp_path: Path) -> None:
    supervised = get_experiment("fmnist-5k").fit_config(tmp_path)
    ssl = get_experiment("fmnist-5k-ssl").fit_config(tmp_path)
    old = {k: v for k, v in supervised.model_dump().items() if k not in ("objective", "temperature")}
    assert reusable_teacher(old, supervised) and not reusable_teacher(old, ssl)
    assert reusable_teacher(ssl.model_dump(), ssl) and not reusable_teacher(ssl.model_dump(), supervised)


def test_an_ssl_checkpoint_from_before_the_colour_distortion_is_not_reused_for_the_jittered_teacher(
        tmp_path: Path) -> None:
    supervised = get_experiment("fmnist-5k").fit_config(tmp_path)
    ssl = get_experiment("fmnist-5k-ssl").fit_config(tmp_path)
    before = {k: v for k, v in ssl.model_dump().items() if k != "jitter"}
    assert ssl.jitter > 0 and not reusable_teacher(before, ssl)
    assert reusable_teacher(before, ssl.model_copy(update={"jitter": 0.0}))
    # A supervised fit never read jitter: one from before it existed is still the supervised teacher.
    assert reusable_teacher({k: v for k, v in supervised.model_dump().items() if k != "jitter"}, supervised)


def test_paired_difference_is_the_mean_per_seed_gap_with_its_t_statistic() -> None:
    d = paired_difference([71.0, 72.0, 73.0, 70.0], [70.0, 70.0, 70.0, 70.0])  # gaps 1, 2, 3, 0
    assert (d.mean, d.above, d.n) == (1.5, 3, 4)
    assert d.std == pytest.approx(1.2909944)
    assert d.t == pytest.approx(1.5 / (1.2909944 / 2))
    assert paired_difference([2.0, 3.0], [1.0, 2.0]).t == float("inf")  # the same gain on every seed
    with pytest.raises(ExperimentError, match="the same 2 or more seeds in both rows, got 3 and 2"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])
