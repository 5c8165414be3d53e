"""Image datasets with stable integer sample ids (docs/ARCHITECTURE.md#data-flow, docs/cache-format.md#contract, docs/ARCHITECTURE.md#command-line-contract).

Every artifact in a teacher cache is keyed by sample id + view id (docs/ARCHITECTURE.md#data-flow), so a dataset
exposes stable, unique, non-negative int64 ids next to its labels and raw uint8 images. Ids are unique
across the train and val splits of one dataset, so a cache of one split can never be confused with
a cache of the other.

``--dataset NAME[:ARGUMENT]`` names a registered `DatasetKind` (its loader and help): ``digits``,
``fashion-mnist[:DIR]`` are registered here (``imagefolder:DIR`` in `pipeline.data.imagefolder`), and `dataset_help` lists every kind for
the command line (docs/ARCHITECTURE.md#where-new-things-go says how to add one).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from pipeline.errors import DistilleryError, did_you_mean

__all__ = [
    "ArrayDataset",
    "DATASET_KINDS",
    "DatasetError",
    "DatasetKind",
    "ImageDataset",
    "dataset_help",
    "load_dataset",
    "register_dataset_kind",
    "stratified_subset",
]

SPLITS = ("train", "val")
_SPLIT_ALIASES = {"test": "val"}

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# IDX file stems per split; val ids start after the train ids so they stay unique across splits.
_FASHION_FILES = {"train": ("train", 0), "val": ("t10k", 60_000)}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049

BAD_IMAGE_POLICIES = ("fail", "skip")
BAD_IMAGE_HELP = ("an undecodable file in an image folder (any split, checked before any work): 'fail' names it, "
                  "'skip' leaves it out and reports how many")  # --on-bad-image of `fit-teacher` and `cache`
_VAL_FRACTION = 0.2


class DatasetError(DistilleryError):
    """Bad dataset spec, split, subset or files; the message says what is wrong and what to do."""


def samples_fingerprint(ids: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> str:
    """sha256 of ids (int64 LE) + labels (int32 LE) + class names (docs/cache-format.md#contract): a dataset's
    identity, and what a cache's stored ids and labels are checked against (docs/cache-format.md#security)."""
    digest = hashlib.sha256()
    digest.update(np.asarray(ids).astype("<i8").tobytes())
    digest.update(np.asarray(labels).astype("<i4").tobytes())
    digest.update("\n".join(class_names).encode("utf-8"))
    return digest.hexdigest()


@dataclass(eq=False)
class ImageDataset(ABC):
    """One split of an image dataset: ids, labels and raw uint8 images addressed by position.

    ``ids`` are the stable sample ids every cache artifact is keyed by (docs/ARCHITECTURE.md#data-flow); positions are
    only the stored order. Subclasses store the per-row payload named in ``_row_fields``.
    """

    name: str
    split: str
    ids: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    channels: int
    skipped: tuple[str, ...] = dataclasses.field(default=(), kw_only=True)
    """Undecodable files left out under ``--on-bad-image skip`` (image folders), relative to the folder: this
    split's, or every one for a folder without train/ and val/ subfolders (they belonged to no split yet)."""

    # Per-row payload fields that ``subset`` must index alongside ids and labels.
    _row_fields: ClassVar[tuple[str, ...]] = ()
    ENCODED: ClassVar[bool] = False
    """Whether rows come from encoded files (``encoded`` gives their bytes): a cache stores those by default."""

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int64)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.class_names = list(self.class_names)
        where = f"{self.name} ({self.split})"
        if self.ids.ndim != 1 or self.labels.shape != self.ids.shape:
            raise DatasetError(f"{where}: ids and labels must be 1-D arrays of equal length, "
                               f"got shapes {self.ids.shape} and {self.labels.shape}")
        if len(self.ids) == 0:
            raise DatasetError(f"{where}: no samples; check the dataset path and the subset size")
        if self.ids.min() < 0 or len(np.unique(self.ids)) != len(self.ids):
            raise DatasetError(f"{where}: sample ids must be unique and non-negative")
        if self.labels.min() < 0 or self.labels.max() >= len(self.class_names):
            raise DatasetError(f"{where}: labels must lie in [0, {len(self.class_names)}) "
                               f"(one per class name)")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.ids)

    @abstractmethod
    def raw(self, position: int) -> np.ndarray:
        """The raw image at ``position`` in stored order, uint8 (H, W, channels)."""

    def encoded(self, position: int) -> bytes | None:
        """The encoded file behind the row at ``position`` as it lies on disk, or None when it has none."""
        return None

    def relative(self, position: int) -> str | None:
        """That file's path relative to the dataset's folder, or None when it has none."""
        return None

    def with_max_side(self, max_side: int | None, min_side: int | None = None) -> ImageDataset:
        """This split with every image decoded to a longer side of at most `max_side`, then reduced while both
        sides keep `min_side` (a cache's `--max-side` and `decode_min_side`, for the images it evaluates on;
        `pipeline.data.decode.decoded_size`): files are decoded straight to that size; in-memory arrays,
        small by nature, are returned as they are."""
        return self

    @abstractmethod
    def _pixel_batches(self) -> Iterator[np.ndarray]:
        """uint8 arrays whose last axis is the channel axis; ``pixel_stats`` pools them."""

    def fingerprint(self) -> str:
        """`samples_fingerprint` of this dataset, the cache identity (docs/cache-format.md#contract)."""
        return samples_fingerprint(self.ids, self.labels, self.class_names)

    def subset(self, positions: np.ndarray) -> ImageDataset:
        """The rows at ``positions``, in the given order, as a dataset of the same kind."""
        positions = np.asarray(positions)
        if positions.ndim != 1 or not np.issubdtype(positions.dtype, np.integer):
            raise DatasetError(f"{self.name}: subset positions must be a 1-D integer array")
        if len(positions) and (positions.min() < 0 or positions.max() >= len(self)):
            raise DatasetError(f"{self.name}: subset positions must lie in [0, {len(self)})")
        rows = {field: getattr(self, field)[positions]
                for field in ("ids", "labels", *self._row_fields)}
        return dataclasses.replace(self, **rows)

    def pixel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std in [0, 1] units, for the normalisation of rendered views (docs/ARCHITECTURE.md#views).

        Pools 256-bin histograms, so the result is exact for in-memory data whatever its size.
        """
        histograms = np.zeros((self.channels, 256), dtype=np.int64)
        for batch in self._pixel_batches():
            pixels = batch.reshape(-1, self.channels)
            for channel in range(self.channels):
                histograms[channel] += np.bincount(pixels[:, channel], minlength=256)
        levels = np.arange(256, dtype=np.int64)
        means, stds = [], []
        for counts in histograms:
            # Python ints: the squared sums overflow int64 on large datasets.
            n = int(counts.sum())
            total = int(counts @ levels)
            total_sq = int(counts @ (levels * levels))
            variance = (n * total_sq - total * total) / (n * n)
            means.append(total / n / 255.0)
            # A constant channel would make normalisation divide by zero; one grey level is the
            # smallest spread 8-bit data can express.
            stds.append(max(variance ** 0.5, 1.0) / 255.0)
        return tuple(means), tuple(stds)


@dataclass(eq=False)
class ArrayDataset(ImageDataset):
    """Images held in memory as uint8 (N, H, W, C)."""

    images: np.ndarray = dataclasses.field(kw_only=True)

    _row_fields: ClassVar[tuple[str, ...]] = ("images",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.images.dtype != np.uint8 or self.images.ndim != 4
                or self.images.shape[0] != len(self.ids) or self.images.shape[3] != self.channels):
            raise DatasetError(f"{self.name}: images must be uint8 (N, H, W, {self.channels}) with "
                               f"N = {len(self.ids)}, got {self.images.dtype} {self.images.shape}")

    def raw(self, position: int) -> np.ndarray:
        return self.images[position]

    def _pixel_batches(self) -> Iterator[np.ndarray]:
        yield self.images


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted positions of a seeded subset of ``n`` rows, stratified by label (docs/ARCHITECTURE.md#command-line-contract).

    Each class gets its proportional share (largest remainder) and at least one row, so the total is
    exactly ``n``. Positions come back ascending so the subset keeps the stored order.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if not len(classes) <= n <= len(labels):
        raise DatasetError(f"subset {n} must lie between the number of classes present "
                           f"({len(classes)}) and the dataset size ({len(labels)}); pick another --subset")
    quota = n * counts / len(labels)
    alloc = np.maximum(np.floor(quota).astype(np.int64), 1)
    # Move one row at a time to or from the class whose allocation strays furthest from its quota.
    while alloc.sum() != n:
        if alloc.sum() < n:
            alloc[np.argmax(np.where(alloc < counts, quota - alloc, -np.inf))] += 1
        else:
            alloc[np.argmax(np.where(alloc > 1, alloc - quota, -np.inf))] -= 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == cls), size=k, replace=False)
              for cls, k in zip(classes, alloc)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def split_positions(labels: np.ndarray, split: str, where: str) -> np.ndarray:
    """Sorted positions of ``split`` in the fixed stratified 80/20 train/val split."""
    from sklearn.model_selection import train_test_split  # scikit-learn takes seconds to import: only when used

    try:
        train, val = train_test_split(np.arange(len(labels)), test_size=_VAL_FRACTION,
                                      stratify=labels, random_state=0)
    except ValueError as exc:
        raise DatasetError(f"{where}: too few images per class for a stratified 80/20 split ({exc}); "
                           f"add images or provide train/ and val/ subfolders") from None
    return np.sort(train if split == "train" else val)


def _load_digits(split: str) -> ImageDataset:
    from sklearn.datasets import load_digits  # scikit-learn takes seconds to import: only when used

    bunch = load_digits()
    # load_digits stores 4-bit intensities 0..16; stretch them onto the 8-bit range.
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int64)
    positions = split_positions(labels, split, "digits")
    return ArrayDataset(name="digits", split=split, ids=positions, labels=labels[positions],
                        class_names=[str(digit) for digit in range(10)], channels=1,
                        images=images[positions])


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Decode one gzip IDX file (big-endian header: magic, then one uint32 per dimension)."""
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"fashion-mnist: cannot read {path} ({exc}); reinstall "
                           f"dataset-fashion-mnist or replace the file") from None
    header_size = 4 * (1 + ndim)
    if len(data) < header_size or struct.unpack(">i", data[:4])[0] != magic:
        raise DatasetError(f"fashion-mnist: {path} is not an IDX file (expected magic {magic}); "
                           f"reinstall dataset-fashion-mnist or replace the file")
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    if len(data) != header_size + int(np.prod(shape)):
        raise DatasetError(f"fashion-mnist: {path} is truncated or has trailing bytes "
                           f"(header says {shape}); reinstall dataset-fashion-mnist")
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


@functools.lru_cache(maxsize=4)
def _fashion_arrays(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Decoded (images N x 28 x 28 x 1, labels N) of one split, cached: decoding 60k takes a moment."""
    stem, _ = _FASHION_FILES[split]
    root = Path(directory)
    image_path = root / f"{stem}-images-idx3-ubyte.gz"
    label_path = root / f"{stem}-labels-idx1-ubyte.gz"
    if not image_path.is_file() or not label_path.is_file():
        raise DatasetError(f"fashion-mnist: no IDX files in {directory}; install Debian's "
                           f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
                           f"or pass fashion-mnist:DIR")
    images = _read_idx(image_path, _IDX_IMAGES_MAGIC, 3)
    labels = _read_idx(label_path, _IDX_LABELS_MAGIC, 1)
    if len(images) != len(labels) or labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
        raise DatasetError(f"fashion-mnist: {image_path.name} and {label_path.name} disagree "
                           f"({len(images)} images, {len(labels)} labels, max label "
                           f"{labels.max(initial=0)}); reinstall dataset-fashion-mnist")
    labels = labels.astype(np.int64)
    # Every caller shares these cached arrays; read-only (as frombuffer's images already are) keeps
    # one caller from corrupting another's data.
    labels.setflags(write=False)
    return images[..., None], labels


def _load_fashion_mnist(directory: str, split: str) -> ImageDataset:
    directory = str(Path(directory).expanduser().resolve())
    images, labels = _fashion_arrays(directory, split)
    _, first_id = _FASHION_FILES[split]
    return ArrayDataset(name=f"fashion-mnist:{directory}", split=split,
                        ids=np.arange(first_id, first_id + len(labels), dtype=np.int64),
                        labels=labels, class_names=list(FASHION_MNIST_CLASSES), channels=1,
                        images=images)


def check_bad_image_policy(policy: str) -> None:
    if policy not in BAD_IMAGE_POLICIES:
        raise DatasetError(f"--on-bad-image must be one of {', '.join(BAD_IMAGE_POLICIES)}, not {policy!r}")


DatasetLoader = Callable[[str, str, str], ImageDataset]
"""``loader(argument, split, on_bad_image)``: one split of a dataset kind (see `DatasetKind`)."""


@dataclass(frozen=True)
class DatasetKind:
    """One kind of dataset ``--dataset`` names: ``NAME``, ``NAME:ARGUMENT``, or either when it has a default.

    ``loader(argument, split, on_bad_image)`` returns the ``train`` or ``val`` split, ids unique across both;
    ``on_bad_image`` (``fail`` or ``skip``) is for kinds that decode files. The dataset's ``name`` must be a
    spec that loads it again: a cache records it, and `train`, `verify` and `inspect` reload the data by it.
    ``argument`` is the metavar of what follows the colon ("": the kind takes none), ``default`` the argument
    used when the spec gives none (None: it must be given); ``help`` says what the kind is, for ``--help``.
    """

    name: str
    loader: DatasetLoader
    help: str
    argument: str = ""
    default: str | None = None

    @property
    def usage(self) -> str:
        """How a spec names this kind: ``digits``, ``fashion-mnist[:DIR]``, ``imagefolder:DIR``."""
        if not self.argument:
            return self.name
        return f"{self.name}[:{self.argument}]" if self.default is not None else f"{self.name}:{self.argument}"


DATASET_KINDS: dict[str, DatasetKind] = {}
"""Registered dataset kinds by name, in the order ``--help`` lists them."""


def register_dataset_kind(kind: DatasetKind) -> DatasetKind:
    """Add ``kind`` to :data:`DATASET_KINDS` (its name must be new and hold no colon)."""
    if not kind.name or ":" in kind.name:
        raise TypeError(f"dataset kind name {kind.name!r} must be non-empty and hold no ':'")
    if kind.name in DATASET_KINDS:
        raise TypeError(f"dataset kind {kind.name!r} is already registered")
    DATASET_KINDS[kind.name] = kind
    return kind


def dataset_help() -> str:
    """Every registered kind, how a spec names it and what it is: the ``--dataset`` help of the command line."""
    return " | ".join(f"{kind.usage} ({kind.help})" for kind in DATASET_KINDS.values())


def _dataset_kind(spec: str) -> tuple[DatasetKind, str]:
    """The kind ``spec`` names and the argument its loader gets (the kind's default when the spec has none)."""
    name, _, argument = spec.partition(":")
    kind = DATASET_KINDS.get(name)
    if kind is None or (argument and not kind.argument) or (not argument and kind.argument and kind.default is None):
        raise DatasetError(f"unknown dataset {spec!r}{did_you_mean(name, DATASET_KINDS)}; valid names: "
                           f"{', '.join(k.usage for k in DATASET_KINDS.values())}")
    return kind, argument or kind.default or ""


def load_dataset(spec: str, split: str = "train", subset: int | None = None,
                 seed: int = 0, on_bad_image: str = "fail") -> ImageDataset:
    """Load one split of the dataset named by ``spec`` (docs/ARCHITECTURE.md#command-line-contract).

    ``split`` is ``train`` or ``val`` (``test`` is accepted for ``val``). ``subset`` keeps a seeded,
    stratified subset of that many samples in stored order (``--subset N``). ``on_bad_image`` (image
    folders): ``fail`` refuses undecodable files in any split, naming them; ``skip`` leaves them out and
    lists this split's in ``skipped``.
    """
    kind, argument = _dataset_kind(spec)
    split = _SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; use one of: train, val")
    check_bad_image_policy(on_bad_image)
    dataset = kind.loader(argument, split, on_bad_image)
    if subset is not None:
        dataset = dataset.subset(stratified_subset(dataset.labels, subset, seed))
    return dataset


register_dataset_kind(DatasetKind(
    "digits", lambda argument, split, on_bad_image: _load_digits(split),
    help="scikit-learn's 8x8 handwritten digits, embedded"))
register_dataset_kind(DatasetKind(
    "fashion-mnist", lambda directory, split, on_bad_image: _load_fashion_mnist(directory, split),
    help=f"Fashion-MNIST's IDX .gz files in DIR, default {FASHION_MNIST_DIR}", argument="DIR",
    default=FASHION_MNIST_DIR))
