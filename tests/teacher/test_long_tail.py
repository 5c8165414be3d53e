"""A long-tailed image folder (a 1-image class, a class of 15 identical images, a 2-image class beside three
12-image classes) caches and trains: the rare classes lose only their own interrelations, and those of the large
classes are the ones the same folder without the rare classes gets (issue 28)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from pipeline.cache.reader import TeacherCache
from pipeline.teacher.cache_pass import run_cache_pass
from pipeline.teacher.plan import CacheRequest
from pipeline.train.config import RunSettings, TrainConfig
from pipeline.train.fit import FitConfig, fit_teacher
from pipeline.train.loop import train_student

FIXTURE = Path(__file__).resolve().parents[2] / "data" / "digits-imagefolder"


def long_tailed_folder(root: Path) -> Path:
    shutil.copytree(FIXTURE, root)
    images = sorted((FIXTURE / "train" / "one").iterdir())
    for split in ("train", "val"):
        for name in ("rare", "same", "pair"):
            (root / split / name).mkdir()
        shutil.copy(images[0], root / split / "rare" / images[0].name)
    for i in range(15):
        shutil.copy(images[1], root / "train" / "same" / f"{i}.png")
    for image in images[2:4]:
        shutil.copy(image, root / "train" / "pair" / image.name)
    shutil.copy(images[1], root / "val" / "same" / "0.png")
    shutil.copy(images[2], root / "val" / "pair" / "0.png")
    return root


def test_a_long_tailed_folder_caches_and_trains(tmp_path: Path, caplog) -> None:
    dataset = f"imagefolder:{long_tailed_folder(tmp_path / 'folder')}"
    checkpoint = tmp_path / "teacher.pt"
    fit_teacher(FitConfig(dataset=dataset, model="test_resnet", out=str(checkpoint), epochs=1, input_size=32,
                          batch_size=16, workers=0, device="cpu"))
    with caplog.at_level(logging.WARNING, logger="distillery"):
        run_cache_pass(CacheRequest(dataset=dataset, teacher="test_resnet", checkpoint=str(checkpoint),
                                    out=str(tmp_path / "cache"), views=1, shard_size=32, batch_size=16,
                                    block_size=8, cka_source="features", device="cpu"))
    # The folder without its rare classes is the fixture: the same teacher's pooled features of the same images
    # (its head, sized for six classes, left out), so the same interrelations are due for the large classes.
    run_cache_pass(CacheRequest(dataset=f"imagefolder:{FIXTURE}", teacher="test_resnet", checkpoint=str(checkpoint),
                                out=str(tmp_path / "without"), views=1, shard_size=36, batch_size=18, block_size=9,
                                teacher_head=False, cka_source="features", device="cpu"))
    cache = TeacherCache(tmp_path / "cache")
    names = cache.class_names
    rare, same = names.index("rare"), names.index("same")
    assert cache.manifest.stats.cka_undefined_classes == sorted([rare, same])
    warnings = [r.getMessage() for r in caplog.records if "interrelations are undefined" in r.getMessage()]
    assert len(warnings) == 1 and "'rare'): 1 sample" in warnings[0] and "'same')" in warnings[0]

    ir = cache.read("stats/cka/ir")
    without = TeacherCache(tmp_path / "without")
    assert without.class_names == ["one", "two", "zero"] and without.manifest.stats.cka_undefined_classes is None
    large = [names.index(n) for n in without.class_names]
    np.testing.assert_allclose(ir[np.ix_(large, large)], without.read("stats/cka/ir"), atol=1e-6)
    assert np.all(ir[rare, np.arange(len(names)) != rare] == 0) and np.all(np.isfinite(ir))

    summary = train_student(TrainConfig(cache=str(tmp_path / "cache"), student="test_resnet",
                                        methods=("ce", "wkd_l"), out=str(tmp_path / "run"),
                                        settings=RunSettings(epochs=1, batch_size=16, workers=0, device="cpu")))
    assert summary.steps >= 1 and 0 <= summary.val_accuracy <= 1


def test_a_single_image_caches_with_its_undefined_statistics_warned(tmp_path: Path, caplog) -> None:
    """The shortest tail: one training image. PCA (a covariance) and CKA need two samples; both are left
    out with one warning each, after the pass, which still completes."""
    images = sorted((FIXTURE / "train" / "one").iterdir())
    for split, image in (("train", images[0]), ("val", images[1])):
        (tmp_path / "folder" / split / "one").mkdir(parents=True)
        shutil.copy(image, tmp_path / "folder" / split / "one" / image.name)
    with caplog.at_level(logging.WARNING, logger="distillery"):
        run_cache_pass(CacheRequest(dataset=f"imagefolder:{tmp_path / 'folder'}", teacher="test_resnet",
                                    out=str(tmp_path / "cache"), views=1, input_size=16, device="cpu"))
    cache = TeacherCache(tmp_path / "cache")
    assert cache.manifest.status == "complete" and cache.manifest.stats.cka_undefined_classes == [0]
    assert not cache.has("stats/pca/components") and cache.read("stats/classes/count").tolist() == [1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("PCA of the pooled features is undefined for a single sample" in w for w in warnings) == 1
