"""How a cache stores each sample's input, and how it is read back as pixels (docs/cache-format.md#inputs).

`--inputs` picks one of three layouts of a shard's blocks:

    raw       the decoded uint8 pixels (`raw`, `raw_shape`, `raw_offsets`): no decoding when read, ~H*W*C
              bytes a sample; small images (digits, Fashion-MNIST) where decoding costs more than it saves
    encoded   the image file's own bytes (`encoded`, `encoded_offsets`), passed through unchanged (~1x the
              dataset), or re-encoded once (JPEG at `quality`, PNG for grey) when `--max-side` shrinks it
    source    nothing but where the file is and what it was (`source_path`, `source_offsets`, `source_size`,
              `source_sha256`): read from the dataset's folder by path, refused when its size or sha256 changed

The teacher renders the pixels a student will decode (`StoredImages`: the stored bytes decoded, never the
original file), so both see bit-identical views; the decoder that made them (`decoder_identity`) is part of
the cache's identity, and `InputCodec.of` refuses another in one line before any pixel is decoded.

A dataset of files is decoded reduced (`decode_min_side`, `pipeline.data.decode`): only as many pixels as
the smallest view crop needs at the teacher's input size, whatever the camera. The rule is part of the
identity too; a cache without it (made before it) decodes at full size, as it always did.
"""

from __future__ import annotations

import dataclasses
import io
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from pipeline.bounded import read_bytes
from pipeline.cache.integrity import confined_path
from pipeline.cache.manifest import CacheError, Manifest, StorageSpec
from pipeline.checksums import sha256_bytes
from pipeline.data.datasets import ImageDataset
from pipeline.data.decode import (DECODE_ERRORS, decode_image, decoded_size, decoder_identity, encode_image,
                                  scaled_size, shrink)
from pipeline.data.imagefolder import folder_root

INPUT_MODES = ("raw", "encoded", "source")
DEFAULT_QUALITY = 90
INPUTS_HELP = ("how each sample's input is stored: raw (decoded pixels) | encoded (the file's own bytes; with "
               "--max-side, re-encoded once: encoded:quality=Q, default 90) | source (nothing: read from the "
               "dataset's folder, size and sha256 checked) | auto (raw for in-memory datasets, encoded for files)")
RAW_KEYS = frozenset({"raw", "raw_shape", "raw_offsets", "raw_hw"})
"""Block keys of the raw inputs, both encodings (`pack_raw`, and the padded one before it)."""
INPUT_KEYS = RAW_KEYS | {"encoded", "encoded_offsets", "source_path", "source_offsets", "source_size",
                         "source_sha256"}
_QUALITY = re.compile(r"encoded:quality=([0-9]+)")
SHARD_BYTES = 256 << 20
"""Default `--shard-bytes`: a shard's inputs are held in memory until it is written (with its packed copy)."""
MAX_SHARD_BYTES = 1 << 40
_SIZE_PROBES = 64  # images whose stored size bounds a shard's: an even sample, as pixel statistics take

Payload = np.ndarray | bytes | tuple[str, int, str]
"""What a block stores of one sample: raw pixels, encoded bytes, or a source file's (path, size, sha256)."""


def parse_inputs(text: str) -> tuple[str, int]:
    """`--inputs` as (mode, JPEG quality of a re-encode); one CacheError line for anything else."""
    if text in INPUT_MODES:
        return text, DEFAULT_QUALITY
    match = _QUALITY.fullmatch(text)
    if match and 1 <= int(match[1]) <= 100:
        return "encoded", int(match[1])
    raise CacheError(f"--inputs must be raw, encoded, encoded:quality=Q (Q in 1..100), source or auto, not {text!r}")


def resolve_inputs(text: str, dataset: ImageDataset) -> str:
    """`--inputs` for `dataset`: `auto` is encoded for datasets of encoded files, raw for in-memory arrays
    (encoded is ~1x the files, raw 11x for JPEGs; docs/results.md#inputs); `source` needs files in a folder."""
    if text == "auto":
        return "encoded" if dataset.ENCODED else "raw"
    mode, _ = parse_inputs(text)
    if mode == "source" and dataset.relative(0) is None:
        raise CacheError(f"--inputs source reads each image from its file, and {dataset.name} has none (it is held "
                         f"in memory); use --inputs raw or encoded")
    return text


def input_storage(text: str, max_side: int | None, dataset: ImageDataset,
                  min_side: int | None) -> dict[str, str | int | None]:
    """The storage section's `inputs`, `max_side`, `decoder` and `decode_min_side` for `--inputs text
    --max-side max_side` (`StorageSpec`), where views need `min_side` pixels a side (`ViewPlan.source_side`;
    None: decoded at full size): one spelling per layout, and raw full-size pixels written as no keys at
    all. In-memory arrays are never reduced: their images are small, and stored as they are."""
    mode, quality = parse_inputs(resolve_inputs(text, dataset))
    spelled = f"encoded:quality={quality}" if mode == "encoded" and quality != DEFAULT_QUALITY else mode
    return {"inputs": None if mode == "raw" else spelled, "max_side": max_side,
            "decoder": None if mode == "raw" else decoder_identity(),
            "decode_min_side": min_side if dataset.ENCODED else None}


def pack_raw(raws: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Raw images of possibly different sizes -> block arrays: `raw` their bytes one after the other (no
    padding: one large image does not grow the others), `raw_shape` (n, 3) their (H, W, C), `raw_offsets`
    (n + 1,) where each starts in `raw`."""
    shapes = np.array([r.shape for r in raws], dtype=np.int64).reshape(len(raws), 3)
    offsets = np.concatenate([[0], np.cumsum(shapes.prod(axis=1))])
    raw = np.concatenate([np.ascontiguousarray(r, dtype=np.uint8).ravel() for r in raws]) if raws else \
        np.zeros(0, np.uint8)
    return {"raw": raw, "raw_shape": shapes, "raw_offsets": offsets}


def unpack_raw(block: Mapping[str, np.ndarray], i: int) -> np.ndarray:
    """Raw image `i` of a decoded block. Blocks written before `pack_raw` stopped padding hold `raw` as
    (n, Hmax, Wmax, C) zero-padded with each image's (H, W) in `raw_hw`: still read."""
    raw = block["raw"]
    if "raw_offsets" in block:
        a, b = int(block["raw_offsets"][i]), int(block["raw_offsets"][i + 1])
        return raw[a:b].reshape(tuple(int(d) for d in block["raw_shape"][i]))
    hw = block["raw_hw"]
    return raw[i, : hw[i, 0], : hw[i, 1]]


def _pack_bytes(items: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in items], dtype=np.int64)]).astype(np.int64)
    return np.frombuffer(b"".join(items), dtype=np.uint8).copy(), offsets


def _unpack_bytes(data: np.ndarray, offsets: np.ndarray, i: int) -> bytes:
    return data[int(offsets[i]):int(offsets[i + 1])].tobytes()


def raw_count(block: Mapping[str, np.ndarray]) -> int:
    """How many samples a decoded block holds, whatever its layout."""
    for key in ("raw_shape", "raw_hw"):
        if key in block:
            return len(block[key])
    for key in ("encoded_offsets", "source_offsets"):
        if key in block:
            return len(block[key]) - 1
    raise KeyError("the block holds no inputs")


@dataclass(frozen=True)
class InputCodec:
    """One cache's input layout: what the teacher pass stores of a sample, and the pixels a reader gets back."""

    mode: str = "raw"
    quality: int = DEFAULT_QUALITY
    max_side: int | None = None
    channels: int = 3
    root: Path | None = None  # the dataset's folder, under `source`
    min_side: int | None = None  # `decode_min_side`: decoded reduced, each side kept >= this

    @classmethod
    def of(cls, manifest: Manifest) -> InputCodec:
        """The layout `manifest` records; refuses a decoder other than the one that made encoded or source
        inputs (it could decode other pixels than the teacher saw)."""
        from pipeline.data.views import ViewPlan  # imports torch: `cache --help` reads this module

        storage = manifest.storage
        mode, quality = parse_inputs(storage.inputs or "raw")
        if mode != "raw" and storage.decoder != decoder_identity():
            raise CacheError(f"this cache's {mode} inputs were decoded with {storage.decoder or 'an unrecorded decoder'}, "
                             f"this machine decodes with {decoder_identity()}: the pixels could differ from the ones "
                             f"the teacher saw; install that Pillow build or re-run `distillery cache` into a new --out")
        min_side, size = storage.decode_min_side, manifest.teacher.input_size
        needed = ViewPlan(**manifest.views.plan_fields()).source_side(size)
        if min_side not in (None, needed):
            raise CacheError(f"storage.decode_min_side is {min_side}, and this cache's views at input size {size} "
                             f"need {needed} px a side: its inputs would decode to other pixels than the teacher "
                             f"saw (damaged or edited manifest); re-run `distillery cache` into a new --out")
        root = folder_root(manifest.dataset.name) if mode == "source" else None
        if mode == "source" and root is None:
            raise CacheError(f"the cache's inputs are read from their source, and {manifest.dataset.name} is not a "
                             f"folder of files (damaged or edited manifest); re-run `distillery cache`")
        return cls(mode, quality, storage.max_side, manifest.dataset.channels, root, min_side)

    def store(self, dataset: ImageDataset, position: int) -> tuple[Payload, np.ndarray]:
        """What a block stores of the sample at `position`, and the pixels a reader will decode from it."""
        data = dataset.encoded(position)
        if self.mode == "raw":
            pixels = (shrink(dataset.raw(position), self.max_side, self.min_side) if data is None
                      else decode_image(data, self.channels, self.max_side, self.min_side))
            return pixels, pixels
        if self.mode == "source":
            return (dataset.relative(position), len(data), sha256_bytes(data)), self._decode(data, str(position))
        if data is None:  # an in-memory image: encoded once, read back as a reader will
            data = encode_image(shrink(dataset.raw(position), self.max_side), self.quality)
        else:
            with Image.open(io.BytesIO(data)) as image:  # the header only
                kept = scaled_size(*image.size, self.max_side) == image.size
            if not kept:  # passthrough keeps the file's own bytes; a `max_side` shrink is stored re-encoded
                data = encode_image(decode_image(data, self.channels, self.max_side), self.quality)
        return data, self._decode(data, str(position))

    def stored_bytes(self, dataset: ImageDataset, position: int) -> int:
        """About the bytes a block holds of the sample at `position`, from its file's header or array shape
        (nothing decoded): its pixels under raw, its file under encoded (at most its pixels where re-encoded),
        its path and digest under source."""
        if self.mode == "source":
            return len(dataset.relative(position).encode()) + 40
        data = dataset.encoded(position)
        if data is None:
            height, width, channels = dataset.raw(position).shape
        else:
            with Image.open(io.BytesIO(data)) as image:  # the header only
                (width, height), channels = image.size, self.channels
            if self.mode == "encoded" and scaled_size(width, height, self.max_side) == (width, height):
                return len(data)
        width, height = decoded_size(width, height, self.max_side, self.min_side)
        return width * height * channels

    def pack(self, payloads: list[Payload]) -> dict[str, np.ndarray]:
        """One block's arrays of the given samples' payloads."""
        if self.mode == "raw":
            return pack_raw(payloads)
        if self.mode == "encoded":
            data, offsets = _pack_bytes(payloads)
            return {"encoded": data, "encoded_offsets": offsets}
        paths, offsets = _pack_bytes([path.encode() for path, _, _ in payloads])
        return {"source_path": paths, "source_offsets": offsets,
                "source_size": np.array([size for _, size, _ in payloads], dtype=np.int64).reshape(-1),
                "source_sha256": np.array([np.frombuffer(bytes.fromhex(digest), np.uint8) for _, _, digest in payloads],
                                          dtype=np.uint8).reshape(-1, 32)}

    def image(self, block: Mapping[str, np.ndarray], i: int) -> np.ndarray:
        """Sample `i` of a decoded block as uint8 (H, W, C) pixels (a view into the block under raw)."""
        if "raw" in block:
            return unpack_raw(block, i)
        if "encoded" in block:
            return self._decode(_unpack_bytes(block["encoded"], block["encoded_offsets"], i), f"block sample {i}")
        relative = _unpack_bytes(block["source_path"], block["source_offsets"], i).decode("utf-8", "replace")
        path = confined_path(self.root, relative, f"block sample {i} source_path")
        size, digest = int(block["source_size"][i]), block["source_sha256"][i].tobytes().hex()
        hint = "restore it, or re-run `distillery cache` to cache the folder as it is now"
        data = read_bytes(path, size, CacheError, hint) if path.is_file() else None
        if data is None or len(data) != size or sha256_bytes(data) != digest:
            raise CacheError(f"{path} is missing or changed since the cache was written (size or sha256 differs); "
                             f"{hint}")
        return self._decode(data, str(path))

    def _decode(self, data: bytes, where: str) -> np.ndarray:
        try:
            return decode_image(data, self.channels, self.max_side, self.min_side)
        except DECODE_ERRORS as e:
            raise CacheError(f"{where}: stored input does not decode ({e}); re-run `distillery cache`") from None


def shard_size_within(storage: StorageSpec, dataset: ImageDataset, shard_bytes: int) -> int:
    """`storage.shard_size` lowered so that a shard's stored inputs stay within `shard_bytes`, sized by the
    largest of an even sample of up to 64 images (`InputCodec.stored_bytes`): a shard of large photos has
    fewer samples, one of thumbnails or in-memory digits the count asked for. Deterministic: `verify
    --repair` plans the same shards again."""
    mode, quality = parse_inputs(storage.inputs or "raw")
    codec = InputCodec(mode, quality, storage.max_side, dataset.channels, None, storage.decode_min_side)
    probes = np.unique(np.linspace(0, len(dataset) - 1, min(len(dataset), _SIZE_PROBES)).round().astype(np.int64))
    largest = max(codec.stored_bytes(dataset, int(p)) for p in probes)
    return max(1, min(storage.shard_size, shard_bytes // max(1, largest)))


@dataclass(eq=False)
class StoredImages(ImageDataset):
    """`source`'s rows as the cache stores them: `raw` is the pixels a reader decodes from the stored input
    (what the teacher pass renders), `payload` what the block stores. The last sample is kept decoded: the
    pass renders a sample's views one after the other."""

    source: ImageDataset = dataclasses.field(kw_only=True)
    codec: InputCodec = dataclasses.field(kw_only=True)

    _row_fields: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def of(cls, dataset: ImageDataset, codec: InputCodec) -> StoredImages:
        return cls(name=dataset.name, split=dataset.split, ids=dataset.ids, labels=dataset.labels,
                   class_names=dataset.class_names, channels=dataset.channels, source=dataset, codec=codec)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.payloads: dict[int, Payload] = {}
        self._last: tuple[int, np.ndarray] | None = None

    def raw(self, position: int) -> np.ndarray:
        if self._last is None or self._last[0] != position:
            payload, pixels = self.codec.store(self.source, position)
            self.payloads[position] = payload
            self._last = (position, pixels)
        return self._last[1]

    def payload(self, position: int) -> Payload:
        """The stored input of `position` (computed once, then handed over: the caller writes it)."""
        if position not in self.payloads:
            self.raw(position)
        return self.payloads.pop(position)

    def _pixel_batches(self) -> Iterator[np.ndarray]:
        yield from self.source._pixel_batches()
