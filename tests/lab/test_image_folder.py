"""The synthetic ImageNet-like folder: its layout, sizes, seeding and statistics, read back as `imagefolder:`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.datasets import load_dataset
from pipeline.lab.image_folder import (HEIGHTS, PHOTO_SIZE, WIDTHS, FolderSpec, main, pink_noise, render_image,
                                       write_image_folder)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def test_folder_is_an_imagefolder_of_varied_jpegs_and_seeded(tmp_path: Path) -> None:
    spec = FolderSpec(train=6, val=3, classes=3, seed=4)
    root = write_image_folder(tmp_path / "a", spec)
    files = _files(root)
    assert sorted({name.rsplit("/", 1)[0] for name in files}) == [
        f"{split}/class{c}" for split in ("train", "val") for c in range(3)]
    sizes = {Image.open(root / name).size for name in files}
    assert all(WIDTHS[0] <= w <= WIDTHS[1] and HEIGHTS[0] <= h <= HEIGHTS[1] for w, h in sizes)
    assert len(sizes) > 1  # varied, as a real folder's
    assert files == _files(write_image_folder(tmp_path / "b", spec))  # same seed: the same bytes
    assert files != _files(write_image_folder(tmp_path / "c", FolderSpec(train=6, val=3, classes=3, seed=5)))
    train = load_dataset(f"imagefolder:{root}", "train")
    assert len(train) == 6 and train.class_names == ["class0", "class1", "class2"]
    assert list(np.bincount(train.labels)) == [2, 2, 2]
    assert train.raw(0).dtype == np.uint8 and train.raw(0).shape[2] == 3


def test_noise_has_a_natural_images_one_over_f_spectrum() -> None:
    noise = pink_noise(np.random.default_rng(1), 256, 256)
    amplitude = np.abs(np.fft.fft2(noise))
    f = np.hypot(np.fft.fftfreq(256)[:, None], np.fft.fftfreq(256)[None, :])
    band = (f > 0.02) & (f < 0.4)
    slope = np.polyfit(np.log(f[band]), np.log(amplitude[band]), 1)[0]
    assert slope == pytest.approx(-1.0, abs=0.1)


def test_photos_are_twelve_megapixels() -> None:
    image = render_image(FolderSpec(train=1, val=1, classes=1, photos=True), 0, np.random.default_rng(0))
    assert image.size == PHOTO_SIZE and image.mode == "RGB"


def test_command_refuses_a_class_without_images(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "x"), "--train", "2", "--val", "2", "--classes", "3"])
    assert exit_.value.code == 2
    assert "at least one train and one val image per class" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

