"""Warnings before wasted work: what the command line checks before a teacher pass or a training run starts
(README, "Command line" and "Training students").

Each check is either a refusal (:class:`PreflightError`, one line with the override flag) where the result
would be worthless and the mistake is near certain, or a warning line where the user may know better:

- a checkpoint fitted on another dataset than the one being cached (refused: ``--allow-other-dataset``);
- a run whose methods leave the student's classifier untrained (refused: ``--allow-untrained-classifier``);
- a teacher near chance on the cached samples' clean view (a warning: a weak teacher can be the experiment);
- ``train --resume`` of runs that are already complete (said as such; nothing is trained again).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.cache.reader import TeacherCache
from pipeline.cache.summary import teacher_accuracy_per_view
from pipeline.data.datasets import load_dataset
from pipeline.errors import DistilleryError
from pipeline.methods import list_methods, method_class
from pipeline.object_store import location
from pipeline.teacher.checkpoint import TeacherCheckpoint
from pipeline.train.config import StudentSpec, TrainConfig
from pipeline.train.rundir import SUMMARY
from pipeline.train.summary import TrainSummary

CHANCE_MARGIN = 0.1
"""A teacher is near chance when its accuracy is below ``chance + CHANCE_MARGIN * (1 - chance)``: less than a
tenth of the way from guessing the most common class to perfect (19 % on ten balanced classes)."""


class PreflightError(DistilleryError):
    """Work that would be wasted; the message names the flag that asks for it anyway."""


def checkpoint_dataset(checkpoint: str | Path, dataset: str, on_bad_image: str = "fail",
                       allow_other: bool = False) -> str | None:
    """Refuse a checkpoint whose recorded training data is not ``dataset``'s train split.

    `fit-teacher` records ``train_fingerprint`` (the fingerprint of the full train split, ids + labels +
    class names, whatever ``--subset`` it fitted on); the same fingerprint of ``dataset`` must match it.
    Returns a warning line where it cannot be checked (a checkpoint made before the fingerprint was
    recorded) or where ``allow_other`` lets a mismatch through; None when it matches.
    """
    ckpt = TeacherCheckpoint.load(checkpoint)
    recorded = ckpt.train_fingerprint
    train = load_dataset(dataset, "train", on_bad_image=on_bad_image)
    if recorded is None:
        return (f"checkpoint {checkpoint} records no dataset fingerprint (fitted before Distillery recorded one; "
                f"it names dataset {ckpt.dataset!r}): cannot check it was trained on {train.name}")
    if recorded == train.fingerprint():
        return None
    message = (f"checkpoint {checkpoint} was fitted on {ckpt.dataset!r}, not on "
               f"{train.name} (train-split fingerprints {str(recorded)[:12]} and {train.fingerprint()[:12]} differ)")
    if allow_other:
        return message
    raise PreflightError(f"{message}; use a checkpoint fitted on this dataset (distillery fit-teacher --dataset "
                         f"{dataset}), or pass --allow-other-dataset to cache it anyway (e.g. its features with "
                         f"--teacher-head none)")


def teacher_near_chance(cache: TeacherCache) -> str | None:
    """A warning line when the cached teacher's view-0 accuracy on the cached samples is near chance (see
    `CHANCE_MARGIN`), None otherwise or without logits. Chance is the share of the most common class."""
    accuracy = next((row["accuracy"] for row in teacher_accuracy_per_view(cache) if row["view"] == 0), None)
    if accuracy is None:
        return None
    counts = np.bincount(cache.read("samples/labels"))
    chance = float(counts.max() / counts.sum())
    if accuracy >= chance + CHANCE_MARGIN * (1 - chance):
        return None
    return (f"the teacher of {cache.root} is near chance: {accuracy:.2%} on the clean view of the cached "
            f"{cache.manifest.dataset.split} samples, chance {chance:.2%}; students distilled from it learn "
            f"little: refit it with more epochs (distillery fit-teacher) and cache again")


def untrained_classifier(students: list[StudentSpec], allow: bool = False) -> str | None:
    """Refuse a student whose methods all leave the classifier untrained (`Method.trains_classifier`: only
    methods whose loss reaches the logits train it; ``tcs`` alone trains its coordinates, never its classifier).
    With ``allow`` (training features alone on purpose) a warning line instead."""
    for student in students:
        if any(spec.trains_classifier for spec in student.methods):
            continue
        trainers = [name for name in list_methods() if method_class(name).trains_classifier({})]
        message = (f"{student.student} with {'+'.join(map(str, student.methods))}: no method trains the classifier "
                   f"(only {', '.join(trainers)} do), so it would stay at chance")
        if allow:
            return message
        raise PreflightError(f"{message}; add --method ce (or compose one of them), or pass "
                             f"--allow-untrained-classifier to train the features alone")
    return None


def completed_run(config: TrainConfig) -> TrainSummary | None:
    """The summary of a run that ``--resume`` would find complete, None otherwise.

    Call after `check_run` accepted the config: its checkpoint then has this config's identity, and
    summary.json, written only after the last epoch, says it finished.
    """
    summary = location(config.out) / SUMMARY
    if not (config.settings.resume and summary.is_file()):
        return None
    return TrainSummary.read(summary)
