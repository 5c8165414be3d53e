"""Datasets with stable ids (docs/ARCHITECTURE.md#data-flow, docs/ARCHITECTURE.md#command-line-contract): digits, fashion-mnist, imagefolder, subsets."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.data.datasets import (
    DATASET_KINDS,
    FASHION_MNIST_DIR,
    ArrayDataset,
    DatasetError,
    DatasetKind,
    dataset_help,
    load_dataset,
    register_dataset_kind,
    stratified_subset,
)
from pipeline.data.imagefolder import FolderDataset

needs_fashion = pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST IDX files not in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)",
)


# --- digits -------------------------------------------------------------------------------------

def test_digits_splits_shapes_ids_and_labels():
    train, val = load_dataset("digits", "train"), load_dataset("digits", "val")
    assert isinstance(train, ArrayDataset)
    assert (len(train), len(val)) == (1437, 360)
    assert train.name == "digits" and train.split == "train" and val.split == "val"
    assert train.raw(0).shape == (8, 8, 1) and train.raw(0).dtype == np.uint8
    assert train.channels == 1 and train.num_classes == 10
    assert train.class_names == [str(d) for d in range(10)]
    # Ids are load_digits indices: disjoint across splits, together covering every sample once.
    assert not set(train.ids) & set(val.ids)
    assert sorted(np.concatenate([train.ids, val.ids])) == list(range(1797))
    assert np.all(np.diff(train.ids) > 0) and np.all(np.diff(val.ids) > 0)
    bunch = load_digits()
    np.testing.assert_array_equal(train.labels, bunch.target[train.ids])
    np.testing.assert_array_equal(val.raw(5)[..., 0], np.round(bunch.images[val.ids[5]] * 255 / 16))


def test_digits_split_is_stratified_and_deterministic():
    val = load_dataset("digits", "val")
    assert np.bincount(val.labels).min() >= 35  # ~36 per class in a stratified 20 %
    again = load_dataset("digits", "val")
    np.testing.assert_array_equal(val.ids, again.ids)
    assert val.fingerprint() == again.fingerprint()
    assert val.fingerprint() != load_dataset("digits", "train").fingerprint()


def test_pixel_stats_are_exact_for_arrays():
    train = load_dataset("digits")
    mean, std = train.pixel_stats()
    pixels = train.images.astype(np.float64) / 255
    assert mean == pytest.approx((pixels.mean(),), abs=1e-12)
    assert std == pytest.approx((pixels.std(),), abs=1e-12)


def test_subset_keeps_kind_and_given_order():
    train = load_dataset("digits")
    part = train.subset(np.array([5, 2, 9]))
    assert isinstance(part, ArrayDataset) and part.name == train.name
    np.testing.assert_array_equal(part.ids, train.ids[[5, 2, 9]])
    np.testing.assert_array_equal(part.raw(1), train.raw(2))
    with pytest.raises(DatasetError, match="positions"):
        train.subset(np.array([len(train)]))


def test_load_dataset_subset_is_stratified_and_seeded():
    first = load_dataset("digits", subset=50, seed=3)
    assert len(first) == 50 and np.bincount(first.labels).tolist() == [5] * 10
    np.testing.assert_array_equal(first.ids, load_dataset("digits", subset=50, seed=3).ids)
    assert not np.array_equal(first.ids, load_dataset("digits", subset=50, seed=4).ids)


def test_fingerprint_covers_ids_labels_and_class_names():
    train = load_dataset("digits").subset(np.arange(20))
    renamed = ArrayDataset(name=train.name, split=train.split, ids=train.ids, labels=train.labels,
                           class_names=[f"c{i}" for i in range(10)], channels=1, images=train.images)
    shifted = ArrayDataset(name=train.name, split=train.split, ids=train.ids + 1, labels=train.labels,
                           class_names=train.class_names, channels=1, images=train.images)
    assert len({train.fingerprint(), renamed.fingerprint(), shifted.fingerprint()}) == 3


def test_dataset_rejects_duplicate_ids():
    train = load_dataset("digits")
    with pytest.raises(DatasetError, match="unique"):
        train.subset(np.array([1, 1]))


# --- fashion-mnist ------------------------------------------------------------------------------

@needs_fashion
def test_fashion_mnist_shapes_ids_and_classes():
    train, val = load_dataset("fashion-mnist"), load_dataset("fashion-mnist", "test")
    assert train.name == f"fashion-mnist:{FASHION_MNIST_DIR}" and val.split == "val"
    assert (len(train), len(val)) == (60000, 10000)
    assert train.raw(0).shape == (28, 28, 1) and train.raw(0).dtype == np.uint8
    np.testing.assert_array_equal(train.ids, np.arange(60000))
    np.testing.assert_array_equal(val.ids, np.arange(60000, 70000))
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(val.labels).tolist() == [1000] * 10
    assert train.class_names[0] == "T-shirt/top" and train.class_names[9] == "Ankle boot"
    mean, std = train.pixel_stats()  # the widely quoted Fashion-MNIST normalisation
    assert mean[0] == pytest.approx(0.2860, abs=1e-3) and std[0] == pytest.approx(0.3530, abs=1e-3)


@needs_fashion
def test_fashion_mnist_explicit_dir_and_cached_arrays_are_read_only():
    train = load_dataset(f"fashion-mnist:{FASHION_MNIST_DIR}", subset=100, seed=0)
    assert len(train) == 100 and np.bincount(train.labels).tolist() == [10] * 10
    full = load_dataset("fashion-mnist")
    assert not full.images.flags.writeable and not full.labels.flags.writeable


def test_fashion_mnist_missing_dir_says_how_to_install(tmp_path):
    with pytest.raises(DatasetError, match=r"no IDX files in .*apt-get install dataset-fashion-mnist"):
        load_dataset(f"fashion-mnist:{tmp_path / 'nowhere'}")


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = struct.pack(f">i{array.ndim}I", magic, *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_and_rejects_corrupt_files(tmp_path):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2051, images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, np.array([0, 9, 4]))
    val = load_dataset(f"fashion-mnist:{tmp_path}", "val")
    assert val.labels.tolist() == [0, 9, 4] and val.ids.tolist() == [60000, 60001, 60002]
    np.testing.assert_array_equal(val.raw(2)[..., 0], images[2])

    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", 2049, images)  # labels magic on images
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", 2049, np.array([0, 1, 2]))
    with pytest.raises(DatasetError, match="not an IDX file"):
        load_dataset(f"fashion-mnist:{tmp_path}", "train")


def test_fashion_mnist_rejects_truncated_and_non_gzip_files(tmp_path):
    for split, stem in (("train", "train"), ("val", "t10k")):
        folder = tmp_path / split
        folder.mkdir()
        _write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", 2049, np.array([0, 1]))
        if split == "train":
            with gzip.open(folder / f"{stem}-images-idx3-ubyte.gz", "wb") as handle:
                handle.write(struct.pack(">i3I", 2051, 2, 28, 28) + bytes(100))
            match = "truncated"
        else:
            (folder / f"{stem}-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
            match = "cannot read"
        with pytest.raises(DatasetError, match=match):
            load_dataset(f"fashion-mnist:{folder}", split)


# --- imagefolder --------------------------------------------------------------------------------

def _write_png(path: Path, value: int, size: tuple[int, int] = (6, 4)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, color=value).save(path)


def test_imagefolder_without_splits(tmp_path):
    for c, cls in enumerate(["cat", "dog", "eel"]):
        for i in range(5):
            _write_png(tmp_path / cls / f"{i}.png", 40 * c + i)
    _write_png(tmp_path / "dog" / "nested" / "extra.PNG", 200)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    _write_png(tmp_path / ".hidden" / "x.png", 0)

    train = load_dataset(f"imagefolder:{tmp_path}", "train")
    val = load_dataset(f"imagefolder:{tmp_path}", "val")
    assert isinstance(train, FolderDataset)
    assert train.name == f"imagefolder:{tmp_path.resolve()}"
    assert train.class_names == ["cat", "dog", "eel"]
    assert (len(train), len(val)) == (12, 4)
    assert sorted(np.concatenate([train.ids, val.ids])) == list(range(16))
    assert set(val.labels) == {0, 1, 2}
    # Grayscale files come back as RGB, at their own size.
    assert train.raw(0).shape == (4, 6, 3) and train.raw(0).dtype == np.uint8 and train.channels == 3
    # Ids are positions in the sorted (class, relative path) list of all files.
    value_by_id = np.array([0, 1, 2, 3, 4, 40, 41, 42, 43, 44, 200, 80, 81, 82, 83, 84])
    label_by_id = np.repeat([0, 1, 2], [5, 6, 5])
    for split in (train, val):
        np.testing.assert_array_equal(split.labels, label_by_id[split.ids])
        assert [split.raw(p)[0, 0, 0] for p in range(len(split))] == value_by_id[split.ids].tolist()
    np.testing.assert_array_equal(train.ids, load_dataset(f"imagefolder:{tmp_path}").ids)


def test_imagefolder_with_train_val_subfolders(tmp_path):
    for split, count in (("train", 3), ("val", 2)):
        for cls in ("a", "b"):
            for i in range(count):
                _write_png(tmp_path / split / cls / f"{i}.png", 10 * i)
    Image.new("RGB", (5, 5)).save(tmp_path / "train" / "b" / "3.JPEG")
    train = load_dataset(f"imagefolder:{tmp_path}", "train")
    val = load_dataset(f"imagefolder:{tmp_path}", "val")
    assert train.ids.tolist() == list(range(7)) and val.ids.tolist() == list(range(7, 11))
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 1] and val.labels.tolist() == [0, 0, 1, 1]
    assert train.raw(6).shape == (5, 5, 3)
    part = train.subset(np.array([3, 0]))
    assert isinstance(part, FolderDataset) and part.labels.tolist() == [1, 0]


def test_imagefolder_pixel_stats_are_per_channel(tmp_path):
    for cls, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        path = tmp_path / "train" / cls / "0.png"
        path.parent.mkdir(parents=True)
        Image.new("RGB", (3, 3), color=colour).save(path)
        (tmp_path / "val" / cls).mkdir(parents=True)
        Image.new("RGB", (3, 3), color=colour).save(tmp_path / "val" / cls / "0.png")
    mean, std = load_dataset(f"imagefolder:{tmp_path}").pixel_stats()
    assert mean == pytest.approx((0.5, 0.0, 0.5)) and std[0] == pytest.approx(0.5)
    assert std[1] == pytest.approx(1 / 255)  # a constant channel is floored, never zero


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetError, match="not a directory"):
        load_dataset(f"imagefolder:{tmp_path / 'missing'}")
    with pytest.raises(DatasetError, match="no class subfolders"):
        load_dataset(f"imagefolder:{tmp_path}")
    (tmp_path / "a").mkdir()
    with pytest.raises(DatasetError, match=r"class folder a has no images \(.bmp, "):
        load_dataset(f"imagefolder:{tmp_path}")
    _write_png(tmp_path / "a" / "0.png", 1)
    with pytest.raises(DatasetError, match="too few images"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_imagefolder_val_class_missing_from_train(tmp_path):
    _write_png(tmp_path / "train" / "a" / "0.png", 1)
    _write_png(tmp_path / "val" / "b" / "0.png", 1)
    with pytest.raises(DatasetError, match="val/b has no counterpart in train"):
        load_dataset(f"imagefolder:{tmp_path}", "val")


def _split_folder(root: Path) -> None:
    """train/{a,b}/0..2.png and val/{a,b}/0..1.png: 10 decodable images."""
    for split, count in (("train", 3), ("val", 2)):
        for cls in ("a", "b"):
            for i in range(count):
                _write_png(root / split / cls / f"{i}.png", 10 * i)


BAD_FILES = {"zero-byte": b"", "text": b"not an image at all\n", "truncated": None}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
@pytest.mark.parametrize("bad_split", ["train", "val"])
def test_an_undecodable_image_is_refused_by_name_when_its_split_loads(tmp_path, kind, bad_split):
    """Each split checks its own files: `train` from a cache loads the val split and opens no training image."""
    _split_folder(tmp_path)
    good = (tmp_path / "train" / "a" / "0.png").read_bytes()
    data = good[: len(good) // 2] if BAD_FILES[kind] is None else BAD_FILES[kind]
    (tmp_path / bad_split / "b" / "9.png").write_bytes(data)
    with pytest.raises(DatasetError, match=rf"1 undecodable image file\(s\): {bad_split}/b/9.png \(.+\); fix "
                                           rf"or remove them, or pass --on-bad-image skip"):
        load_dataset(f"imagefolder:{tmp_path}", bad_split)
    other = load_dataset(f"imagefolder:{tmp_path}", "val" if bad_split == "train" else "train")
    assert all(bad_split not in p for p in other.paths)


def test_a_split_is_checked_once_and_a_changed_file_again(tmp_path, monkeypatch):
    import pipeline.data.imagefolder as imagefolder

    _split_folder(tmp_path)
    opened, decode_error = [], imagefolder.decode_error
    monkeypatch.setattr(imagefolder, "decode_error", lambda path: opened.append(path) or decode_error(path))
    load_dataset(f"imagefolder:{tmp_path}", "val")
    assert len(opened) == 4 and all("/val/" in str(p) for p in opened)
    load_dataset(f"imagefolder:{tmp_path}", "val")
    assert len(opened) == 4  # remembered: the second load stats the files and opens none
    _write_png(tmp_path / "val" / "a" / "0.png", 99, size=(5, 5))
    load_dataset(f"imagefolder:{tmp_path}", "val")
    assert [p.name for p in opened[4:]] == ["0.png"]


def test_skip_leaves_bad_images_out_counts_them_and_ids_do_not_depend_on_it(tmp_path):
    _split_folder(tmp_path)
    clean = {split: load_dataset(f"imagefolder:{tmp_path}", split) for split in ("train", "val")}
    (tmp_path / "val" / "a" / "1b.png").write_bytes(b"")
    (tmp_path / "train" / "b" / "00.png").write_bytes(b"\x89PNG")
    skipping = {split: load_dataset(f"imagefolder:{tmp_path}", split, on_bad_image="skip")
                for split in ("train", "val")}
    assert skipping["train"].skipped == ("train/b/00.png",) and skipping["val"].skipped == ("val/a/1b.png",)
    for split in ("train", "val"):
        assert list(skipping[split].paths) == list(clean[split].paths)
        assert skipping[split].labels.tolist() == clean[split].labels.tolist()
    # Once the two files are repaired, every other file keeps the id it had while they were skipped.
    _write_png(tmp_path / "val" / "a" / "1b.png", 7)
    _write_png(tmp_path / "train" / "b" / "00.png", 7)
    for split in ("train", "val"):
        repaired = load_dataset(f"imagefolder:{tmp_path}", split)
        assert repaired.skipped == () and len(repaired) == len(clean[split]) + 1
        id_of = dict(zip(repaired.paths, repaired.ids.tolist()))
        assert [id_of[p] for p in skipping[split].paths] == skipping[split].ids.tolist()


def test_many_bad_images_are_counted_and_the_first_named(tmp_path):
    _split_folder(tmp_path)
    for i in range(5):
        (tmp_path / "train" / "a" / f"x{i}.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"5 undecodable .*train/a/x0.png .*x2.png \([^)]*\); and 2 more; fix"):
        load_dataset(f"imagefolder:{tmp_path}", "train")


def test_an_empty_class_folder_is_refused_with_its_name(tmp_path):
    _split_folder(tmp_path)
    (tmp_path / "val" / "c").mkdir()
    (tmp_path / "train" / "c").mkdir()
    (tmp_path / "train" / "c" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=r"class folder train/c has no images"):
        load_dataset(f"imagefolder:{tmp_path}", "train")
    _write_png(tmp_path / "train" / "c" / "0.png", 3)
    with pytest.raises(DatasetError, match=r"class folder val/c has no images"):
        load_dataset(f"imagefolder:{tmp_path}", "val")
    (tmp_path / "val" / "c" / "0.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"class folder val/c has no decodable images"):
        load_dataset(f"imagefolder:{tmp_path}", "val", on_bad_image="skip")
    with pytest.raises(DatasetError, match=r"--on-bad-image must be one of fail, skip, not 'ignore'"):
        load_dataset(f"imagefolder:{tmp_path}", "train", on_bad_image="ignore")


# --- specs, splits and subsets ------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["cifar10", "digits:extra", "imagefolder", ""])
def test_unknown_dataset_lists_valid_names(spec):
    with pytest.raises(DatasetError, match=r"unknown dataset .*digits, fashion-mnist\[:DIR\], imagefolder:DIR"):
        load_dataset(spec)


def test_the_registry_lists_each_kind_as_a_spec_names_it_and_refuses_a_second_of_a_name():
    assert dataset_help() == " | ".join(f"{kind.usage} ({kind.help})" for kind in DATASET_KINDS.values())
    assert [kind.usage for kind in DATASET_KINDS.values()] == ["digits", "fashion-mnist[:DIR]", "imagefolder:DIR",
                                                                 "wds:TRAIN|VAL"]
    with pytest.raises(TypeError, match="dataset kind 'digits' is already registered"):
        register_dataset_kind(DatasetKind("digits", DATASET_KINDS["digits"].loader, help="again"))
    with pytest.raises(TypeError, match="must be non-empty and hold no ':'"):
        register_dataset_kind(DatasetKind("a:b", DATASET_KINDS["digits"].loader, help="colon"))
    assert "a:b" not in DATASET_KINDS and DATASET_KINDS["digits"].help != "again"


def test_unknown_split():
    with pytest.raises(DatasetError, match="unknown split 'dev'; use one of: train, val"):
        load_dataset("digits", "dev")


@pytest.mark.parametrize("n", [0, 9, 1438])
def test_bad_subset_size(n):
    with pytest.raises(DatasetError, match=f"subset {n} must lie between"):
        load_dataset("digits", subset=n)


def test_stratified_subset_proportions_sortedness_and_determinism():
    labels = np.repeat([0, 1, 2, 3], [600, 300, 95, 5])
    positions = stratified_subset(labels, 100, seed=7)
    assert len(positions) == 100 and len(np.unique(positions)) == 100
    assert np.all(np.diff(positions) > 0) and positions.dtype == np.int64
    assert np.bincount(labels[positions]).tolist() == [60, 30, 9, 1]
    np.testing.assert_array_equal(positions, stratified_subset(labels, 100, seed=7))
    assert not np.array_equal(positions, stratified_subset(labels, 100, seed=8))


def test_stratified_subset_gives_every_class_one_and_totals_exactly():
    labels = np.repeat([0, 1, 2, 3, 4], [996, 1, 1, 1, 1])
    for n in (5, 6, 17, 1000):
        positions = stratified_subset(labels, n, seed=0)
        assert len(positions) == n and set(labels[positions]) == {0, 1, 2, 3, 4}
    labels = np.repeat(np.arange(7), [13, 8, 5, 21, 3, 1, 9])
    for n in range(7, len(labels) + 1):
        counts = np.bincount(labels[stratified_subset(labels, n, seed=1)], minlength=7)
        assert counts.sum() == n and counts.min() >= 1
        assert np.all(np.abs(counts - n * np.bincount(labels) / len(labels)) < 2)
