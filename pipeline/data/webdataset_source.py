"""Webdataset shards as a dataset kind: ``--dataset wds:TRAIN|VAL`` or ``wds:DIR`` (docs/guide.md#webdataset).

A webdataset shard is a plain tar whose members are grouped into samples by key: ``n01440764_10026.jpg`` and
``n01440764_10026.cls`` are the image and the class index of sample ``n01440764_10026``. The shards are local
files or objects at fsspec URLs (``s3://bucket/train-{0000..0146}.tar``), named by a pattern with brace
expansion (``{0000..0146}``, ``{a,b}``) and globs (``*``).

Before any work a split is listed: each shard is read once, in order, for its members' offsets and sizes, its
class members and a check that each image decodes (at 1/8 scale where the format allows: every byte is still
entropy-decoded, so a corrupt or truncated file is found). Nothing of the images is kept but where they are:
`WebDataset.raw` reads one member by offset, so the teacher pass, which asks for the samples in stored order,
reads each shard once more from front to back. The listing is remembered per shard, keyed by the shard's
path or URL, size and mtime or ETag (under $DISTILLERY_IMAGE_CHECKS, as an image folder's checks are), so
the next command over unchanged shards (`cache` after `fit-teacher`, each `train` of a sweep loading the val
split) reads no shard to list it: one stat or HEAD per shard, then only the pass's own read.

Shards are untrusted bytes, held to the cache's rules (docs/cache-format.md#security): members of bounded size
and count, no links or devices, no absolute or ``..`` member names, no compressed tars (a gzip bomb needs a
decompressor), an image's pixel count bounded before it is decoded; each refusal is one line naming the shard
and the sample key.

Sample ids are 63 bits of the BLAKE2b hash of (split, shard file name, key): the same for the same shards
wherever they are stored, unchanged by adding or reordering shards, and distinct between the splits.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import io
import os
import re
import tarfile
import threading
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, ClassVar

import numpy as np
from PIL import Image

from pipeline.bounded import MIB, open_regular, read_json, read_text
from pipeline.data.datasets import DatasetError, DatasetKind, ImageDataset, register_dataset_kind
from pipeline.data.decode import DECODE_ERRORS, decode_image
from pipeline.data.imagefolder import checks_folder, remember
from pipeline.object_store import ObjectPath, is_url, location

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})
CLASS_EXTENSION = "cls"
CLASSES_FILE = "classes.txt"
"""Beside the train shards: one class name per line, line i naming class index i."""
SPLIT_SEPARATOR = "|"
DIR_PATTERNS = {"train": "train-*.tar", "val": "val-*.tar"}

MAX_SHARDS = 1 << 16
MAX_SHARD_BYTES = 1 << 40
MAX_MEMBERS = 1 << 20
"""Members per shard: webdataset shards hold thousands; a million is a tar made to exhaust the listing."""
MAX_IMAGE_BYTES = 64 * MIB
MAX_CLASS_BYTES = 32
MAX_CLASSES_FILE_BYTES = 4 * MIB
MAX_PIXELS = 1 << 26
"""67 Mpx, 5x a 12 MP phone photo and below PIL's own bomb warning: a larger image is refused from its header,
before it is decoded."""
_CHECK_WINDOW = 64  # images being checked at once, so the listing holds at most this many encoded images
_ID_MASK = (1 << 63) - 1
_STATS_MAX_IMAGES = 512
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")
_HINT = "fix or rebuild the shard"
_LISTING_FORMAT = 1  # raised when what a listing records (or how its images are checked) changes
_LISTING_FIELDS = ("keys", "offsets", "sizes", "labels", "errors")
_MAX_LISTING_BYTES = 256 * MIB  # ~150 bytes a sample at MAX_MEMBERS


def expand_braces(pattern: str) -> list[str]:
    """Every string ``pattern`` names, in order: ``{0000..0146}`` (zero-padded as written) and ``{a,b}``."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
    numbers = _RANGE.fullmatch(body)
    if numbers:
        low, high = int(numbers.group(1)), int(numbers.group(2))
        if low > high or high - low >= MAX_SHARDS:
            raise DatasetError(f"wds: the range {{{body}}} must go up and name at most {MAX_SHARDS:,} shards")
        choices = [f"{n:0{len(numbers.group(1))}d}" for n in range(low, high + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise DatasetError(f"wds: {{{body}}} in {pattern!r} is neither a range {{0000..0099}} nor a list {{a,b}}")
    expanded: list[str] = []
    for choice in choices:
        expanded.extend(expand_braces(head + choice + tail))
        if len(expanded) > MAX_SHARDS:
            raise DatasetError(f"wds: {pattern!r} names more than {MAX_SHARDS:,} shards")
    return expanded


def _matches(pattern: str) -> list[str]:
    """The shards ``pattern`` (braces expanded) names: globs listed, sorted; other names as they are."""
    if not any(c in pattern for c in "*?["):
        return [pattern]
    if is_url(pattern):
        base = ObjectPath.from_url(pattern)
        return sorted(base.fs.unstrip_protocol(key) for key in base.fs.glob(base.key))
    return sorted(glob.glob(pattern))


@dataclass(frozen=True)
class ShardSpec:
    """What ``wds:ARGUMENT`` names: the train and val shard patterns and where ``classes.txt`` lives."""

    train: str
    val: str
    name: str

    @classmethod
    def parse(cls, argument: str) -> ShardSpec:
        parts = argument.split(SPLIT_SEPARATOR)
        if not argument or len(parts) > 2 or not all(parts):
            raise DatasetError(f"wds:{argument}: give wds:TRAIN_PATTERN{SPLIT_SEPARATOR}VAL_PATTERN or wds:DIR "
                               f"(DIR holding {DIR_PATTERNS['train']} and {DIR_PATTERNS['val']})")
        parts = [p if is_url(p) else os.path.abspath(os.path.expanduser(p)) for p in parts]
        if len(parts) == 2:
            return cls(train=parts[0], val=parts[1], name=f"wds:{SPLIT_SEPARATOR.join(parts)}")
        root = parts[0].rstrip("/")
        if root.endswith(".tar") or any(c in root for c in "{*?["):
            raise DatasetError(f"wds:{argument}: names the shards of one split only; add the val shards as "
                               f"wds:TRAIN_PATTERN{SPLIT_SEPARATOR}VAL_PATTERN (quote it in a shell)")
        return cls(train=f"{root}/{DIR_PATTERNS['train']}", val=f"{root}/{DIR_PATTERNS['val']}",
                   name=f"wds:{root}")

    def shards(self, split: str) -> list[str]:
        pattern = self.train if split == "train" else self.val
        found = [shard for name in expand_braces(pattern) for shard in _matches(name)]
        if not found:
            raise DatasetError(f"{self.name}: no {split} shards match {pattern}; check the pattern")
        if len(found) > MAX_SHARDS:
            raise DatasetError(f"{self.name}: {len(found):,} {split} shards, more than {MAX_SHARDS:,}")
        names = [PurePosixPath(s).name for s in found]
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise DatasetError(f"{self.name}: two {split} shards are named {twice}; sample ids come from shard "
                               f"file names, which must differ")
        return found

    def class_names(self) -> list[str]:
        first = location(self.shards("train")[0])
        path = first.parent / CLASSES_FILE
        hint = f"put {CLASSES_FILE} (one class name per line, line i names class index i) beside the train shards"
        try:
            text = read_text(path, MAX_CLASSES_FILE_BYTES, DatasetError, hint)
        except DatasetError:
            if not path.exists():
                raise DatasetError(f"{self.name}: no {path}; {hint}") from None
            raise
        names = [line.strip() for line in text.splitlines() if line.strip()]
        if not names or len(set(names)) != len(names):
            raise DatasetError(f"{path}: class names must be non-empty and distinct; {hint}")
        return names


def _stamp(shard: str) -> tuple[int, str]:
    """(size, version) of a shard: mtime locally, the store's ETag or modification time at a URL."""
    try:
        if is_url(shard):
            path = ObjectPath.from_url(shard)
            info = path.fs.info(path.key)
            return int(info["size"]), str(info.get("ETag") or info.get("LastModified") or info.get("mtime") or "")
        st = os.stat(shard)
        return st.st_size, str(st.st_mtime_ns)
    except FileNotFoundError:
        raise DatasetError(f"wds: shard {shard} does not exist; check the pattern") from None
    except OSError as e:
        raise DatasetError(f"wds: cannot read shard {shard} ({type(e).__name__}: {e})") from None


def _open_shard(shard: str) -> BinaryIO:
    hint = "shards must be regular files"
    if is_url(shard):
        return ObjectPath.from_url(shard).open("rb")
    return open_regular(Path(shard), MAX_SHARD_BYTES, DatasetError, hint)


def image_error(data: bytes) -> str | None:
    """Why encoded image ``data`` cannot be decoded, or None. JPEGs are decoded at 1/8 scale (libjpeg's DCT
    scaling still reads every coefficient, so corruption and truncation show); other formats in full."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                return f"{image.width}x{image.height} pixels, more than the {MAX_PIXELS:,} an image may have"
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except DECODE_ERRORS as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


@dataclass
class _Sample:
    image: tuple[int, int] | None = None  # (offset, size) of its image member
    label: int | None = None


@dataclass(frozen=True)
class ShardListing:
    """One shard's samples in stored order: keys, image offsets and sizes, class indices, and why each image
    does not decode (None: it does)."""

    keys: tuple[str, ...]
    offsets: np.ndarray
    sizes: np.ndarray
    labels: np.ndarray
    errors: tuple[str | None, ...]


def _member_key(shard: str, info: tarfile.TarInfo) -> tuple[str, str]:
    """(sample key, lower-case extension) of a regular member; refuses links, devices and unsafe names."""
    where = f"shard {shard} member {info.name!r}"
    if not info.isfile() or info.issparse():
        raise DatasetError(f"{where} is a {'link' if info.issym() or info.islnk() else 'sparse or special file'}; "
                           f"shards hold regular files only; {_HINT}")
    path = PurePosixPath(info.name)
    if path.is_absolute() or ".." in path.parts:
        raise DatasetError(f"{where} points outside the shard (absolute or '..'); {_HINT}")
    stem, _, extension = path.name.partition(".")
    return str(path.parent / stem) if str(path.parent) != "." else stem, extension.lower()


def _list_members(shard: str, tar: tarfile.TarFile,
                  check: ThreadPoolExecutor) -> tuple[dict[str, _Sample], dict[str, Future]]:
    """Each sample's image and class members, in stored order, and the checks of its image (`image_error`)."""
    samples: dict[str, _Sample] = {}
    checks: dict[str, Future] = {}
    window: deque[Future] = deque()
    for count, info in enumerate(tar):
        if count >= MAX_MEMBERS:
            raise DatasetError(f"shard {shard} has more than {MAX_MEMBERS:,} members; split it")
        if info.isdir():
            continue
        key, extension = _member_key(shard, info)
        if extension not in IMAGE_EXTENSIONS and extension != CLASS_EXTENSION:
            continue  # metadata (.json, .txt, ...) is not read
        sample = samples.setdefault(key, _Sample())
        limit = MAX_CLASS_BYTES if extension == CLASS_EXTENSION else MAX_IMAGE_BYTES
        if info.size > limit:
            raise DatasetError(f"shard {shard} sample {key}: its .{extension} member is {info.size:,} bytes, more "
                               f"than the {limit:,} it may be; {_HINT}")
        if (sample.label if extension == CLASS_EXTENSION else sample.image) is not None:
            raise DatasetError(f"shard {shard} sample {key}: two {'class' if extension == CLASS_EXTENSION else 'image'} "
                               f"members; give each sample one image and one .cls; {_HINT}")
        data = tar.extractfile(info).read(limit)
        if extension == CLASS_EXTENSION:
            text = data.decode("ascii", "replace").strip()
            if not re.fullmatch(r"-?\d+", text):
                raise DatasetError(f"shard {shard} sample {key}: its .cls member holds {text[:20]!r}, not a class "
                                   f"index; {_HINT}")
            sample.label = int(text)
        else:
            sample.image = (info.offset_data, info.size)
            checks[key] = check.submit(image_error, data)
            window.append(checks[key])
            if len(window) > _CHECK_WINDOW:  # hold no more than a window of encoded images
                window.popleft().result()
    return samples, checks


@functools.lru_cache(maxsize=4096)
def list_shard(shard: str, stamp: tuple[int, str]) -> ShardListing:
    """The samples of ``shard``: as remembered for this ``stamp`` (`_stamp`), or read once, front to back, and
    remembered. The stamp keys both the per-process cache and the record, so a shard that changed is listed
    again."""
    # A store that reports no version (neither ETag nor modification time) leaves only the size to key a
    # record by, which an edit that keeps the size would not change: such a shard is listed per process.
    if not stamp[1]:
        return _read_listing(shard)
    listing = _remembered(shard, stamp)
    if listing is None:
        listing = _read_listing(shard)
        remember(_listing_path(shard), {"format": _LISTING_FORMAT, "shard": shard, "stamp": list(stamp),
                                        "keys": list(listing.keys), "offsets": listing.offsets.tolist(),
                                        "sizes": listing.sizes.tolist(), "labels": listing.labels.tolist(),
                                        "errors": list(listing.errors)})
    return listing


def _read_listing(shard: str) -> ShardListing:
    try:
        with _open_shard(shard) as raw, tarfile.open(fileobj=raw, mode="r:") as tar, \
                ThreadPoolExecutor() as check:  # PIL releases the GIL while decoding
            samples, checks = _list_members(shard, tar, check)
            errors = {key: future.result() for key, future in checks.items()}
    except tarfile.TarError as e:
        raise DatasetError(f"shard {shard} is not an uncompressed tar ({e}); {_HINT}") from None
    except (OSError, EOFError) as e:
        raise DatasetError(f"shard {shard} cannot be read ({type(e).__name__}: {e}); {_HINT}") from None
    for key, sample in samples.items():
        if sample.image is None:
            raise DatasetError(f"shard {shard} sample {key}: a .cls member without an image "
                               f"({', '.join(sorted(IMAGE_EXTENSIONS))}); {_HINT}")
        if sample.label is None:
            raise DatasetError(f"shard {shard} sample {key}: an image without a class (no .cls member); {_HINT}")
    images = [sample.image for sample in samples.values()]
    return ShardListing(keys=tuple(samples), offsets=np.array([o for o, _ in images], np.int64),
                        sizes=np.array([s for _, s in images], np.int64),
                        labels=np.array([sample.label for sample in samples.values()], np.int64),
                        errors=tuple(errors[key] for key in samples))


def _listing_path(shard: str) -> Path:
    return checks_folder() / "wds" / (hashlib.sha256(shard.encode()).hexdigest()[:32] + ".json")


def _ints(values: object, low: int, high: int) -> bool:
    return isinstance(values, list) and all(type(v) is int and low <= v <= high for v in values)


def _remembered(shard: str, stamp: tuple[int, str]) -> ShardListing | None:
    """The listing recorded for ``shard`` as it is now, or None: no record, one of another stamp, or one that
    is not a listing this shard could have (then it is listed again). The record is this project's own file,
    still read bounded and trusted for nothing a listing of the shard could not say."""
    try:
        record = read_json(_listing_path(shard), _MAX_LISTING_BYTES, DatasetError, "it is listed again")
    except DatasetError:
        return None
    if not (isinstance(record, dict) and record.get("format") == _LISTING_FORMAT and record.get("shard") == shard
            and record.get("stamp") == list(stamp)):
        return None
    keys, offsets, sizes, labels, errors = (record.get(name) for name in _LISTING_FIELDS)
    if not (isinstance(keys, list) and len(keys) <= MAX_MEMBERS and len(set(keys)) == len(keys)
            and all(type(k) is str and k.isprintable() for k in keys) and _ints(sizes, 0, MAX_IMAGE_BYTES) and _ints(offsets, 0, stamp[0])
            and _ints(labels, -(1 << 62), 1 << 62) and isinstance(errors, list)
            and all(e is None or type(e) is str for e in errors)
            and len(keys) == len(offsets) == len(sizes) == len(labels) == len(errors)
            and all(o + n <= stamp[0] for o, n in zip(offsets, sizes))):
        return None
    return ShardListing(keys=tuple(keys), offsets=np.array(offsets, np.int64).reshape(-1),
                        sizes=np.array(sizes, np.int64).reshape(-1), labels=np.array(labels, np.int64).reshape(-1),
                        errors=tuple(errors))


def sample_id(split: str, shard: str, key: str) -> int:
    """63 bits of BLAKE2b over (split, shard file name, key): stable wherever the shard is stored."""
    text = f"{split}\0{PurePosixPath(shard).name}\0{key}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") & _ID_MASK


_MAX_OPEN_SHARDS = 16
_open = threading.local()  # per thread: a task runner's threads never share a file position or close one in use


def _read_member(shard: str, stamp: tuple[int, str], offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of ``shard``, through one open handle per shard, thread and process: a pass
    in stored order reads each shard front to back (at a URL, through fsspec's read-ahead). A shard that is
    not as it was listed (``stamp``) is refused when it is opened."""
    handles: OrderedDict[tuple[int, str, tuple[int, str]], BinaryIO] | None = getattr(_open, "handles", None)
    if handles is None:
        handles = _open.handles = OrderedDict()
    handle_key = (os.getpid(), shard, stamp)  # a forked worker opens its own; a shard listed again, too
    if handle_key not in handles:
        if _stamp(shard) != stamp:
            raise DatasetError(f"wds: shard {shard} changed since it was listed; run again")
        handles[handle_key] = _open_shard(shard)
        if len(handles) > _MAX_OPEN_SHARDS:  # a pass moves from shard to shard: the oldest is done with
            handles.popitem(last=False)[1].close()
    handles.move_to_end(handle_key)
    handle = handles[handle_key]
    handle.seek(offset)
    return handle.read(size)


def _decode(data: bytes, where: str, max_side: int | None, min_side: int | None) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:  # the header only: the size is bounded before decoding
            error = (f"{image.width}x{image.height} pixels, more than {MAX_PIXELS:,}"
                     if image.width * image.height > MAX_PIXELS else None)
        pixels = None if error else decode_image(data, 3, max_side, min_side)
    except DECODE_ERRORS as exc:
        error, pixels = f"the image does not decode ({exc})", None
    if pixels is None:
        raise DatasetError(f"{where}: {error}; {_HINT}")
    return pixels


@dataclass(eq=False)
class WebDataset(ImageDataset):
    """Samples of webdataset shards, decoded with PIL on demand, always as RGB (channels = 3)."""

    shard_paths: tuple[str, ...] = field(kw_only=True)
    shard_stamps: tuple[tuple[int, str], ...] = field(kw_only=True)
    shard_index: np.ndarray = field(kw_only=True)
    keys: np.ndarray = field(kw_only=True)
    offsets: np.ndarray = field(kw_only=True)
    sizes: np.ndarray = field(kw_only=True)

    max_side: int | None = field(kw_only=True, default=None)
    """`raw` decodes to a longer side of at most this (None: full size)."""
    min_side: int | None = field(kw_only=True, default=None)
    """`raw` then reduces each side no further than this (`decode_image`; None: not at all)."""

    _row_fields: ClassVar[tuple[str, ...]] = ("shard_index", "keys", "offsets", "sizes")
    ENCODED: ClassVar[bool] = True

    def where(self, position: int) -> str:
        return f"shard {self.shard_paths[self.shard_index[position]]} sample {self.keys[position]}"

    def encoded(self, position: int) -> bytes:
        shard = int(self.shard_index[position])
        return _read_member(self.shard_paths[shard], self.shard_stamps[shard], int(self.offsets[position]),
                            int(self.sizes[position]))

    def raw(self, position: int) -> np.ndarray:
        return _decode(self.encoded(position), self.where(position), self.max_side, self.min_side)

    def with_max_side(self, max_side: int | None, min_side: int | None = None) -> WebDataset:
        return dataclasses.replace(self, max_side=max_side, min_side=min_side)

    def _pixel_batches(self) -> Iterator[np.ndarray]:
        # An even sample of the images gives the two numbers per channel without decoding every one.
        count = min(len(self), _STATS_MAX_IMAGES)
        for position in np.unique(np.linspace(0, len(self) - 1, count).round().astype(np.int64)):
            yield self.raw(int(position))


def load_webdataset(argument: str, split: str, on_bad_image: str = "fail") -> WebDataset:
    """One split of ``wds:ARGUMENT`` (docs/guide.md#webdataset): every shard listed and its images checked."""
    spec = ShardSpec.parse(argument)
    class_names = spec.class_names()
    shards = spec.shards(split)
    stamps = [_stamp(shard) for shard in shards]
    listings = [list_shard(shard, stamp) for shard, stamp in zip(shards, stamps)]
    for shard, listing in zip(shards, listings):
        outside = np.flatnonzero((listing.labels < 0) | (listing.labels >= len(class_names)))
        if len(outside):
            first = int(outside[0])
            raise DatasetError(f"shard {shard} sample {listing.keys[first]}: class "
                               f"index {listing.labels[first]} is outside [0, {len(class_names)}) "
                               f"({CLASSES_FILE} names {len(class_names)} classes); {_HINT}")
    where = [(i, key) for i, listing in enumerate(listings) for key in listing.keys]
    errors = [e for listing in listings for e in listing.errors]
    bad = [f"{shards[i]}/{key} ({why})" for (i, key), why in zip(where, errors) if why]
    if bad and on_bad_image == "fail":
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DatasetError(f"{spec.name}: {len(bad)} {split} image(s) do not decode: {'; '.join(bad[:3])}{more}; "
                           f"{_HINT}, or pass --on-bad-image skip to leave them out")
    good = np.array([why is None for why in errors], dtype=bool)
    if not good.any():
        raise DatasetError(f"{spec.name}: no decodable {split} images; check the shards")
    return WebDataset(
        name=spec.name, split=split, class_names=class_names, channels=3, skipped=tuple(bad),
        ids=np.array([sample_id(split, shards[i], key) for i, key in where], np.int64)[good],
        labels=np.concatenate([listing.labels for listing in listings])[good],
        shard_paths=tuple(shards), shard_stamps=tuple(stamps),
        shard_index=np.array([i for i, _ in where], np.int64)[good],
        keys=np.array([key for _, key in where], dtype=object)[good],
        offsets=np.concatenate([listing.offsets for listing in listings])[good],
        sizes=np.concatenate([listing.sizes for listing in listings])[good])


register_dataset_kind(DatasetKind(
    "wds", load_webdataset, argument=f"TRAIN{SPLIT_SEPARATOR}VAL",
    help=f"webdataset tars (.jpg/.png/.webp + .cls members) at paths or URLs, braces and globs expanded; or DIR "
         f"with {DIR_PATTERNS['train']} and {DIR_PATTERNS['val']}; {CLASSES_FILE} beside the train shards"))
