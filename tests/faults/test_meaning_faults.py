"""Meaning, not just bytes (issue 29, classes 2 and 5): a forger who changes what a cache holds and recomputes
every digest. What the manifest records is recomputed from the stored rows (the dataset fingerprint from ids,
labels and class names; labels within the classes; finite teacher rows), and what reaches a constructor or a
division (teacher.model_kwargs, mean, std, sizes) is allow-listed with its range."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from forgery import forge_array, forge_manifest, tree_bytes
from pipeline.cache.manifest import CacheError, Manifest
from pipeline.cache.reader import TeacherCache
from pipeline.cache.targets import LOGITS
from pipeline.data.datasets import samples_fingerprint
from pipeline.teacher.verify import verify_cache
from pipeline.train.loop import open_cache
from pipeline.train.stream import CacheStream
from test_cache_faults import cli_error, one_line, run_cli


def refused(call) -> str:
    with pytest.raises(CacheError) as caught:
        call()
    return one_line(caught.value)


def shifted(labels: np.ndarray) -> np.ndarray:
    return (labels + 1) % 10


def swapped(ids: np.ndarray) -> np.ndarray:
    out = ids.copy()
    out[[0, 1]] = out[[1, 0]]
    return out


@pytest.mark.parametrize("array, change", [("samples/labels", shifted), ("samples/ids", swapped)],
                         ids=["labels-shifted-by-one", "ids-swapped-in-a-shard"])
def test_rows_changed_with_digests_recomputed_do_not_give_the_recorded_fingerprint(forged: Path, array,
                                                                                    change) -> None:
    forge_array(forged, array, change)
    message = refused(lambda: TeacherCache(str(forged)))
    assert "not the ones dataset.fingerprint records" in message and "re-create it with `distillery cache`" in message


def test_a_label_outside_the_classes_is_refused_before_training(forged: Path) -> None:
    """The issue's label of 1000: it verified, then crashed training with an IndexError."""
    forge_array(forged, "samples/labels", lambda labels: np.where(np.arange(len(labels)) == 7, 1000, labels))
    message = refused(lambda: open_cache(str(forged)))
    assert "row 7 holds label 1000, outside the manifest's 10 classes" in message


def test_verify_compares_a_recomputed_fingerprint_with_the_dataset(forged: Path) -> None:
    """The forger who also recomputes `dataset.fingerprint`: the cache agrees with itself, not with the
    dataset; `verify` (which loads the dataset to re-render samples) says so in one line."""
    def relabel(m: dict) -> None:
        cache = TeacherCache(str(forged))
        ids, labels = cache.read("samples/ids"), cache.read("samples/labels")
        m["dataset"]["fingerprint"] = samples_fingerprint(ids, shifted(labels), m["dataset"]["class_names"])

    forge_manifest(forged, relabel)
    forge_array(forged, "samples/labels", shifted)
    message = refused(lambda: verify_cache(str(forged), samples=120))
    assert "is not the one" in message and "the cache's samples were altered" in message


@pytest.mark.parametrize("workers", [0, 1])
def test_nan_teacher_rows_are_the_caches_fault_not_the_learning_rate(forged: Path, workers: int) -> None:
    forge_array(forged, "logits/dense", lambda v: np.where(np.arange(len(v))[:, None, None] == 45, np.nan, v))
    stream = CacheStream(open_cache(str(forged)), size=16, targets=frozenset({LOGITS}), seed=0)
    with pytest.raises(Exception) as caught:
        for _ in stream.loader(0, batch_size=32, workers=workers):
            pass
    from pipeline.errors import one_line as shown
    message = shown(caught.value)
    assert "\n" not in message and "logits/dense: shard 1: 1 rows hold NaN or inf" in message, message
    assert "--lr" not in message and "re-create it with `distillery cache`" in message


def test_train_names_the_cache_for_an_infinite_teacher_row(forged: Path, tmp_path: Path) -> None:
    forge_array(forged, "logits/dense", lambda v: np.where(np.arange(len(v))[:, None, None] == 3, np.inf, v))
    line = cli_error(run_cli("train", "--cache", str(forged), "--student", "test_resnet", "--method", "kd",
                             "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run")))
    assert "rows hold NaN or inf (the cache's values, not a training problem)" in line and "--lr" not in line


@pytest.mark.parametrize("field, value, expected", [
    ("std", [0.0], "each std > 0"),
    ("std", [1e-3, 1.0], "hold in_chans (1) finite values"),
    ("mean", [1e308 * 10], "Infinity is not a number JSON allows"),
    ("input_size", 100000, "teacher.input_size must lie in [8, 1024], not 100000"),
    ("num_classes", 10 ** 9, "teacher.num_classes must lie in [0, 100000]"),
    ("in_chans", 7, "teacher.in_chans be 1 or 3"),
    ("model_kwargs", {"checkpoint_path": "/etc/passwd"}, "teacher.model_kwargs has 'checkpoint_path', not an argument"),
    ("model_kwargs", {"pretrained_cfg_overlay": {"file": "/etc/passwd"}}, "not an argument a cache passes"),
    ("model_kwargs", {"img_size": "/etc/passwd"}, "teacher.model_kwargs.img_size must be an integer in [8, 1024]"),
    ("model_kwargs", {"img_size": 10 ** 6}, "teacher.model_kwargs.img_size must be an integer in [8, 1024]"),
])
def test_teacher_section_is_allow_listed_with_types_and_ranges(forged: Path, field, value, expected) -> None:
    forge_manifest(forged, lambda m: m["teacher"].update({field: value}))
    before = tree_bytes(forged)
    message = refused(lambda: Manifest.load(forged))
    assert expected in message and "re-run `distillery cache`" in message, message
    assert tree_bytes(forged) == before


def test_verify_never_hands_a_crafted_checkpoint_path_to_timm(forged: Path) -> None:
    """The issue's example: `{"checkpoint_path": "/etc/passwd"}` made `verify` read a file outside the cache."""
    forge_manifest(forged, lambda m: m["teacher"]["model_kwargs"].update(checkpoint_path="/etc/passwd"))
    line = cli_error(run_cli("verify", str(forged), "--samples", "120"))
    assert "teacher.model_kwargs has 'checkpoint_path'" in line


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d.update(class_names=d["class_names"][:9]), "equal the number of dataset.class_names (9)"),
    (lambda d: d.update(num_classes=0, class_names=[]), "dataset.num_classes (0) must lie in [1, 100000]"),
])
def test_dataset_section_agrees_with_itself(forged: Path, edit, expected) -> None:
    forge_manifest(forged, lambda m: edit(m["dataset"]))
    assert expected in refused(lambda: Manifest.load(forged))
