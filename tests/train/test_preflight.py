"""Warnings before wasted work (pipeline/preflight.py), each through the command line where it needs no flow run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache.reader import TeacherCache
from pipeline.cache.summary import teacher_accuracy_per_view
from pipeline.preflight import (CHANCE_MARGIN, PreflightError, checkpoint_dataset, teacher_near_chance,
                                untrained_classifier)
from pipeline.train.config import StudentSpec

OTHER_DATASET = f"imagefolder:{Path(__file__).parents[2] / 'data' / 'digits-imagefolder'}"


def test_a_checkpoint_fitted_on_another_dataset_is_refused_before_the_pass_unless_allowed(digits_teacher: Path,
                                                                                          tmp_path: Path, cli):
    assert checkpoint_dataset(digits_teacher, "digits") is None  # fit-teacher recorded the train split's fingerprint
    code, out = cli("cache", "--dataset", OTHER_DATASET, "--checkpoint", str(digits_teacher), "--out",
                    str(tmp_path / "c"), "--teacher-head", "none", "--device", "cpu")
    assert code == 2 and out.count("\n") == 1, out
    assert out.startswith(f"error: checkpoint {digits_teacher} was fitted on 'digits', not on {OTHER_DATASET}")
    assert out.rstrip().endswith("or pass --allow-other-dataset to cache it anyway (e.g. its features with "
                                 "--teacher-head none)")
    assert not (tmp_path / "c").exists()
    allowed = checkpoint_dataset(digits_teacher, OTHER_DATASET, allow_other=True)
    assert allowed.startswith(f"checkpoint {digits_teacher} was fitted on 'digits'")


def test_a_checkpoint_without_a_recorded_fingerprint_is_a_warning_that_it_cannot_be_checked(digits_teacher: Path,
                                                                                            tmp_path: Path):
    old = torch.load(digits_teacher, weights_only=True)
    del old["train_fingerprint"]
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(PreflightError):
        checkpoint_dataset(digits_teacher, OTHER_DATASET)
    warning = checkpoint_dataset(tmp_path / "old.pt", OTHER_DATASET)
    assert warning == (f"checkpoint {tmp_path / 'old.pt'} records no dataset fingerprint (fitted before Distillery "
                       f"recorded one; it names dataset 'digits'): cannot check it was trained on {OTHER_DATASET}")


def chance_and_accuracy(root: Path) -> tuple[float, float]:
    cache = TeacherCache(root)
    labels = cache.read("samples/labels")
    return float(np.bincount(labels).max() / len(labels)), teacher_accuracy_per_view(cache)[0]["accuracy"]


def test_a_teacher_near_chance_on_view_0_is_a_warning_and_a_trained_one_is_not(make_cache, digits_cache: Path):
    random_teacher = make_cache("random")  # random logits: a teacher that has learnt nothing
    chance, accuracy = chance_and_accuracy(random_teacher)
    assert accuracy < chance + CHANCE_MARGIN * (1 - chance)
    warning = teacher_near_chance(TeacherCache(random_teacher))
    assert warning.startswith(f"the teacher of {random_teacher} is near chance: {accuracy:.2%} on the clean view of "
                              f"the cached train samples, chance {chance:.2%}")
    chance, accuracy = chance_and_accuracy(digits_cache)
    assert (teacher_near_chance(TeacherCache(digits_cache)) is None) == (accuracy >= chance + CHANCE_MARGIN * (1 - chance))
    assert teacher_near_chance(TeacherCache(make_cache("headless", logits="none"))) is None  # nothing to measure


def test_methods_that_leave_the_classifier_untrained_are_refused_unless_allowed(digits_cache: Path, tmp_path: Path,
                                                                              cli):
    code, out = cli("train", "--cache", str(digits_cache), "--student", "test_resnet", "--method", "tcs",
                    "--out", str(tmp_path / "r"))
    assert code == 2 and out.count("\n") == 1, out
    assert out.startswith("error: test_resnet with tcs: no method trains the classifier (only ce, dkd, kd, scalekd, "
                          "wkd_l do), so it would stay at chance; add --method ce")
    assert not (tmp_path / "r").exists()
    feature_only = [StudentSpec(student="test_resnet", methods=("fitnet", "scalekd:kd=0"))]
    with pytest.raises(PreflightError):
        untrained_classifier(feature_only)
    assert untrained_classifier(feature_only, allow=True).startswith("test_resnet with fitnet+scalekd:kd=0: no method")
    # KD alone trains the classifier toward the teacher's outputs: not refused.
    assert untrained_classifier([StudentSpec(student="test_resnet", methods=("kd",)),
                                 StudentSpec(student="test_resnet", methods=("tcs", "ce"))]) is None


@pytest.mark.parametrize("run_dir", ["test_resnet-ce-s0", "."], ids=["own-subdirectory", "flat-earlier-layout"])
def test_resuming_a_finished_run_says_it_is_complete_and_trains_nothing(make_cache, tmp_path: Path, cli,
                                                                        run_dir: str):
    """On --out, the student's own run directory; a run written straight into --out by an earlier version is
    resumed in place."""
    from pipeline.train.config import RunSettings, TrainConfig
    from pipeline.train.loop import train_student

    cache = make_cache("small", n=80, views=1)
    out = tmp_path / "runs" / run_dir  # "." names runs itself
    summary = train_student(TrainConfig(cache=str(cache), student="test_resnet", methods=("ce",), out=str(out),
                                        settings=RunSettings(epochs=1, workers=0, device="cpu")))
    before = (out / "summary.json").read_text()
    # No Prefect server here: a flow start would fail, so nothing but the message can happen.
    code, text = cli("train", "--cache", str(cache), "--student", "test_resnet", "--method", "ce", "--epochs", "1",
                     "--workers", "0", "--resume", "--out", str(tmp_path / "runs"))
    assert code == 0, text
    complete = f"{out}: already complete (1 epochs, val accuracy {summary.val_accuracy:.2%}); nothing to train"
    assert complete in text, text
    assert (out / "summary.json").read_text() == before and json.loads(before)["epochs"] == 1
