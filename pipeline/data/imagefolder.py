"""``imagefolder:DIR``: one subfolder of images per class, listed lazily and checked once (docs/cache-format.md#inputs).

Listing a folder reads directories only. Whether each file decodes is established once and remembered in a
check file keyed by (relative path, size, mtime) (`CheckedFiles`), so a second command over the same folder
(another student of a sweep evaluating on the val split) stats the files and opens none; a file that
changed is decoded again. With train/ and val/ subfolders, loading one split checks that split's files
only: `train` from a cache, which loads the val split, never opens a training image. Pixels are decoded
only when a row is read (`FolderDataset.raw`), so nothing holds a split's pixels in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from pipeline.atomic import atomic_write_bytes
from pipeline.bounded import MIB, read_json
from pipeline.data.datasets import (SPLITS, DatasetError, DatasetKind, ImageDataset, register_dataset_kind,
                                    split_positions)
from pipeline.data.decode import decode_error, decode_image

__all__ = ["CHECKS_ENV", "CheckedFiles", "FolderDataset", "IMAGE_SUFFIXES", "checks_folder", "folder_root", "remember"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
CHECKS_ENV = "DISTILLERY_IMAGE_CHECKS"
"""Directory of the remembered checks (default ~/.cache/distillery/image-checks): one file per image folder, and
one per webdataset shard (`pipeline.data.webdataset_source`)."""
_CHECKS_LIMIT = 512 * MIB  # ~100 bytes a file: room for several ImageNets
_NAMED_BAD_IMAGES = 3  # an error line names this many undecodable files, then counts the rest
_STATS_MAX_IMAGES = 512
STATS_SIDE = 512


@dataclass(eq=False)
class FolderDataset(ImageDataset):
    """Images decoded from files on demand with Pillow, always as RGB (channels = 3)."""

    paths: np.ndarray = dataclasses.field(kw_only=True)
    root: str = dataclasses.field(kw_only=True, default="")
    """The folder the paths lie in (`relative` paths are relative to it)."""
    max_side: int | None = dataclasses.field(kw_only=True, default=None)
    """`raw` decodes to a longer side of at most this (None: full size)."""
    min_side: int | None = dataclasses.field(kw_only=True, default=None)
    """`raw` then reduces each side no further than this (`decode_image`; None: not at all)."""

    _row_fields: ClassVar[tuple[str, ...]] = ("paths",)
    ENCODED: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.paths = np.asarray(self.paths, dtype=object)
        if self.channels != 3 or self.paths.shape != self.ids.shape:
            raise DatasetError(f"{self.name}: a folder dataset needs one path per id and 3 channels")

    def raw(self, position: int) -> np.ndarray:
        return decode_image(Path(self.paths[position]), 3, self.max_side, self.min_side)

    def with_max_side(self, max_side: int | None, min_side: int | None = None) -> FolderDataset:
        return dataclasses.replace(self, max_side=max_side, min_side=min_side)

    def encoded(self, position: int) -> bytes:
        return Path(self.paths[position]).read_bytes()

    def relative(self, position: int) -> str:
        return Path(self.paths[position]).relative_to(self.root).as_posix()

    def _pixel_batches(self):  # noqa: ANN202 - ImageDataset's
        # Decoding a whole folder for two numbers per channel is wasteful; an even sample suffices.
        count = min(len(self), _STATS_MAX_IMAGES)
        # A camera's resolution adds nothing to two numbers per channel but memory: each at most STATS_SIDE.
        for position in np.unique(np.linspace(0, len(self) - 1, count).round().astype(np.int64)):
            yield decode_image(Path(self.paths[position]), 3, min(self.max_side or STATS_SIDE, STATS_SIDE))


def folder_root(dataset_name: str) -> Path | None:
    """The folder an ``imagefolder:DIR`` dataset name reads (None for any other kind)."""
    kind, _, argument = dataset_name.partition(":")
    return Path(argument) if kind == "imagefolder" and argument else None


def checks_folder() -> Path:
    """Where checks are remembered: `CHECKS_ENV`, else ~/.cache/distillery/image-checks."""
    return Path(os.environ.get(CHECKS_ENV) or Path.home() / ".cache" / "distillery" / "image-checks")


def remember(path: Path, record: object) -> None:
    """Write a check's `record` (JSON) to `path` under `checks_folder()`, creating the folder: unwritable,
    it only costs the next command its own check."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(record).encode())
    except OSError:
        pass


class CheckedFiles:
    """Which files of the folder `root` decode, remembered by (relative path, size, mtime).

    The record is this project's own file, still read bounded: a damaged one is ignored (the files are
    checked again), never trusted past what it says of files whose size and mtime still match.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = checks_folder() / (hashlib.sha256(str(root).encode()).hexdigest()[:32] + ".json")
        try:
            known = read_json(self.path, _CHECKS_LIMIT, DatasetError, "it is rebuilt")
        except DatasetError:
            known = {}
        self.known = known if isinstance(known, dict) else {}

    def errors(self, relative_paths: list[str]) -> list[str | None]:
        """Why each file does not decode (None: it does), decoding only files not checked as they are now."""
        stamps = {}
        for relative in relative_paths:
            stat = (self.root / relative).stat()
            stamps[relative] = [stat.st_size, stat.st_mtime_ns]
        fresh = [r for r in relative_paths
                 if not (isinstance(self.known.get(r), list) and self.known[r][:2] == stamps[r])]
        if fresh:
            # Pillow releases the GIL while decoding: threads check a large folder on every core.
            with ThreadPoolExecutor() as pool:
                for relative, why in zip(fresh, pool.map(decode_error, [self.root / r for r in fresh])):
                    self.known[relative] = [*stamps[relative], why]
            remember(self.path, self.known)
        return [self.known[r][2] for r in relative_paths]


def _class_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(class_dir: Path) -> list[str]:
    """Image paths under one class folder, relative to it (posix), sorted."""
    return sorted(p.relative_to(class_dir).as_posix() for p in class_dir.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _bad_images_error(name: str, bad: list[tuple[str, str]]) -> DatasetError:
    named = "; ".join(f"{path} ({why})" for path, why in bad[:_NAMED_BAD_IMAGES])
    more = f"; and {len(bad) - _NAMED_BAD_IMAGES} more" if len(bad) > _NAMED_BAD_IMAGES else ""
    return DatasetError(f"{name}: {len(bad)} undecodable image file(s): {named}{more}; fix or remove them, or "
                        f"pass --on-bad-image skip to leave them out")


def _load_imagefolder(directory: str, split: str, on_bad_image: str = "fail") -> ImageDataset:
    """One split of the folder, its files checked (`CheckedFiles`) before any work: with train/ and val/
    subfolders, the files of that split; without, every file (the split is drawn from the good ones).

    Ids index the sorted list of all files of every split (good or not), so skipping a bad file leaves the
    others' ids as they were. Files without an image suffix are not part of the dataset.
    """
    root = Path(directory).expanduser().resolve()
    name = f"imagefolder:{root}"
    if not root.is_dir():
        raise DatasetError(f"{name}: not a directory; pass imagefolder:DIR with one subfolder per class")
    has_splits = (root / "train").is_dir() and (root / "val").is_dir()
    split_dirs = list(SPLITS) if has_splits else [""]
    class_names = _class_dirs(root / "train" if has_splits else root)
    if not class_names:
        raise DatasetError(f"{name}: no class subfolders; put images under DIR/<class>/ "
                           f"or DIR/train/<class>/ and DIR/val/<class>/")
    checked = {split} if has_splits else {""}
    # Ids index the sorted (split dir, class, relative path) list over all splits: stable and unique.
    records = []
    for split_dir in split_dirs:
        for class_dir in _class_dirs(root / split_dir):
            if class_dir not in class_names:
                raise DatasetError(f"{name}: class folder {split_dir}/{class_dir} has no "
                                   f"counterpart in train/; add it there or remove it")
            files = _image_files(root / split_dir / class_dir)
            if not files and split_dir in checked:
                raise DatasetError(f"{name}: class folder {Path(split_dir, class_dir).as_posix()} has no images "
                                   f"({', '.join(sorted(IMAGE_SUFFIXES))}); add some or remove the folder")
            records.extend((split_dir, class_dir, relative) for relative in files)
    records.sort()
    relative_paths = [Path(s, c, r).as_posix() for s, c, r in records]
    in_split = np.array([s in checked for s, _, _ in records], dtype=bool)
    errors = dict(zip((p for p, here in zip(relative_paths, in_split) if here),
                      CheckedFiles(root).errors([p for p, here in zip(relative_paths, in_split) if here])))
    bad = [(p, errors[p]) for p in relative_paths if errors.get(p) is not None]
    if bad and on_bad_image == "fail":
        raise _bad_images_error(name, bad)
    good = np.array([errors.get(p, "unchecked") is None for p in relative_paths], dtype=bool)
    emptied = sorted({(s, c) for (s, c, _), here in zip(records, in_split) if here}
                     - {(s, c) for (s, c, _), ok in zip(records, good) if ok})
    if emptied:
        raise DatasetError(f"{name}: class folder {Path(*emptied[0]).as_posix()} has no decodable images; "
                           f"add some or remove the folder")
    paths = np.array([str(root / p) for p in relative_paths], dtype=object)
    labels = np.array([class_names.index(c) for _, c, _ in records], dtype=np.int64)
    if has_splits:
        positions = np.flatnonzero(in_split & good)
    else:
        kept = np.flatnonzero(good)
        positions = kept[split_positions(labels[kept], split, name)]
    skipped = tuple(p for p, ok, here in zip(relative_paths, good, in_split) if here and not ok)
    if len(positions) == 0:
        raise DatasetError(f"{name}: no {split} images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                           f"add images under the class subfolders")
    return FolderDataset(name=name, split=split, ids=positions, labels=labels[positions],
                         class_names=class_names, channels=3, paths=paths[positions], skipped=skipped,
                         root=str(root))


register_dataset_kind(DatasetKind(
    "imagefolder", _load_imagefolder, help="one subfolder of images per class; DIR/train and DIR/val when present",
    argument="DIR"))
