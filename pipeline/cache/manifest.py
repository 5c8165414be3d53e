"""The cache manifest (`<cache>/manifest.json`): identity, layout, shard records, status (docs/cache-format.md#contract).

A cache is reused only when its *identity* (teacher, dataset, view plan, storage options) equals the
request's; `identity_mismatch` names the first field that differs so the refusal can say which.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import contextvars
import copy
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from pipeline.object_store import ObjectPath, location, write_whole_bytes
from pipeline.bounded import read_json
from pipeline.cache.bounds import (MAX_CLASSES, MAX_GRID, MAX_LSH_BITS, MAX_MANIFEST_BYTES, MAX_SAMPLES,
                                   MAX_SHARD_SIZE, MAX_STAGES, MAX_VIEWS, MODEL_KWARGS, STATISTICS_ARRAYS,
                                   reachable_file)
from pipeline.errors import DistilleryError
from pipeline.options import MAX_INPUT_SIZE, one_line_error

FORMAT_VERSION = 2
"""2: every per-sample array is stored once, in `arrays.zarr`; the shards' blocks carry the raw inputs only.
1: the blocks carried every per-sample row too (a second copy); still read, and repaired in its own format."""
READ_FORMATS = (1, 2)
MANIFEST_NAME = "manifest.json"
IDENTITY_SECTIONS = ("teacher", "dataset", "views", "storage")

class CacheError(DistilleryError):
    """A cache that cannot be used as asked; the message says what is wrong and what to do."""


_READING = contextvars.ContextVar("reading_a_manifest", default=False)


class Section(BaseModel):
    """A typed manifest section. Keys a manifest has and this model does not declare are kept (a newer or
    older writer's), and only the keys a manifest has are written back, so a manifest reads and saves byte
    for byte (`tests/cache/test_old_cache.py`)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=(), validate_assignment=True)
    WRITES_DEFAULTS: ClassVar[bool] = True
    """Whether a section built by code writes its defaults too (False: only the keys it was given)."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:  # one line, as from every other config; within a manifest, it says where
            if _READING.get():
                raise
            raise one_line_error(e) from None
        if not _READING.get() and self.WRITES_DEFAULTS:
            self.__pydantic_fields_set__.update(type(self).model_fields)

    @classmethod
    def read(cls, data: dict[str, Any]) -> Self:
        """Read from a manifest: only the keys it has are written back."""
        reading = _READING.set(True)  # pydantic validates through `__init__`, which must not add keys then
        try:
            return cls(**data)
        except ValidationError as e:
            raise one_line_error(e) from None
        finally:
            _READING.reset(reading)

    def to_dict(self) -> dict[str, Any]:
        return {k: _plain(getattr(self, k)) for k in self.model_dump(exclude_unset=True)}


def _plain(value: Any) -> Any:
    """`value` as its JSON holds it: sections as their dicts, containers copied."""
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return copy.deepcopy(value)


class TeacherSection(Section):
    """`teacher`: the `TeacherSpec` that made the cache, its stage names and pooled width."""

    model: str
    num_classes: int
    in_chans: int
    input_size: int
    mean: list[int | float]
    std: list[int | float]
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    taps: list[str] = Field(default_factory=list)
    head: bool = True
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None
    weights_sha256: str | None = None
    weights_revision: str | None = None
    preprocessing: dict[str, Any] | None = None
    class_map: dict[str, Any] | None = None
    class_map_sha256: str | None = None
    stages: list[str] = Field(default_factory=list)
    pooled_dim: int | None = None

    @model_validator(mode="after")
    def _check(self) -> TeacherSection:
        # What reaches a constructor or a division is allow-listed with its range (docs/cache-format.md#security):
        # a crafted `model_kwargs` must not hand timm a path, a zero `std` must not become a NaN loss.
        if not 0 <= self.num_classes <= MAX_CLASSES or self.in_chans not in (1, 3):  # 0: a head-less teacher
            raise CacheError(f"teacher.num_classes must lie in [0, {MAX_CLASSES}] and teacher.in_chans be 1 or 3, "
                             f"not {self.num_classes} and {self.in_chans}")
        if not 8 <= self.input_size <= MAX_INPUT_SIZE:
            raise CacheError(f"teacher.input_size must lie in [8, {MAX_INPUT_SIZE}], not {self.input_size}")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans or not all(
                math.isfinite(m) and 0 < s < math.inf for m, s in zip(self.mean, self.std)):
            raise CacheError(f"teacher.mean and teacher.std must hold in_chans ({self.in_chans}) finite values, "
                             f"each std > 0, not {self.mean} and {self.std}")
        for key, value in self.model_kwargs.items():
            if key not in MODEL_KWARGS:
                raise CacheError(f"teacher.model_kwargs has {key!r}, not an argument a cache passes to its teacher "
                                 f"(only {', '.join(sorted(MODEL_KWARGS))})")
            low, high = MODEL_KWARGS[key]
            if type(value) is not int or not low <= value <= high:
                raise CacheError(f"teacher.model_kwargs.{key} must be an integer in [{low}, {high}], "
                                 f"not {value!r}")
        if len(self.taps) > MAX_STAGES or len(self.stages) > MAX_STAGES:
            raise CacheError(f"teacher.taps and teacher.stages list at most {MAX_STAGES} stages")
        return self

    @property
    def logit_classes(self) -> int:
        """Width of the stored logits: the dataset classes of a class map, else the teacher's head."""
        return len(self.class_map["classes"]) if self.class_map else self.num_classes


class DatasetSection(Section):
    """`dataset`: which samples, in which order (`fingerprint`), with which classes."""

    name: str
    split: str
    num_samples: int
    num_classes: int
    class_names: list[str]
    channels: int
    fingerprint: str
    subset: int | None = None
    subset_seed: int = 0
    on_bad_image: str | None = None  # written only when images were skipped: "skip"
    skipped: list[str] | None = None  # their paths

    @model_validator(mode="after")
    def _check(self) -> DatasetSection:
        if not 1 <= self.num_classes <= MAX_CLASSES or len(self.class_names) != self.num_classes:
            raise CacheError(f"dataset.num_classes ({self.num_classes}) must lie in [1, {MAX_CLASSES}] and equal "
                             f"the number of dataset.class_names ({len(self.class_names)})")
        if not 1 <= self.num_samples <= MAX_SAMPLES or self.channels not in (1, 3):
            raise CacheError(f"dataset.num_samples must lie in [1, {MAX_SAMPLES}] and dataset.channels be 1 or 3, not "
                             f"{self.num_samples} and {self.channels}")
        return self


class ViewsSection(Section):
    """`views`: the `ViewPlan` (docs/ARCHITECTURE.md#views) and its recipe, for people."""

    @model_validator(mode="after")
    def _check(self) -> ViewsSection:
        if not 0 <= self.num_augmented <= MAX_VIEWS:
            raise CacheError(f"views.num_augmented must lie in [0, {MAX_VIEWS}], not {self.num_augmented}")
        return self

    num_augmented: int
    seed: int
    scale: list[int | float]
    ratio: list[int | float]
    flip: bool = True
    clean_crop: float = 1.0  # written only when a teacher's crop_pct set it (docs/guide.md#your-own-teacher)
    interpolation: str = "bilinear"  # likewise, from the teacher's pretrained config
    resize: Literal["float32", "uint8"] = "float32"  # written by new caches: "uint8" (`ViewPlan.resize`)
    recipe: str | None = None

    def plan_fields(self) -> dict[str, Any]:
        """The `ViewPlan` arguments (the recipe is derived)."""
        return {k: v for k, v in self.to_dict().items() if k != "recipe"}


class StorageSpec(Section):
    """`storage`: what the teacher pass stores and how (the `distillery cache` storage options)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=(), frozen=True)

    logits: str = "dense"  # "dense" | "topk:K" | "none" (head-less teacher)
    pooled_views: str = "all"  # "all" stored views, or "first" (view 0 only)
    tap: str | None = None  # resolved stage name whose Gaussian statistics (and map) are stored
    grid: int = 1
    featmaps: bool = False
    lsh_bits: int = 0
    shard_size: int = 1024
    block_size: int = 256
    teacher_tail: int = 0  # teacher stages ending at the tap saved as `teacher_tail.pt` (ScaleKD TPP); 0: none
    # `--store`: comma-separated per-sample targets kept (`pipeline.cache.targets`); None: every one the
    # options above produce. None is also what a cache written before `--store` reads as (same identity).
    store: str | None = None
    # `--inputs` and `--max-side` (`pipeline.cache.inputs`, docs/cache-format.md#inputs) and the decoder that turns
    # encoded or source inputs into pixels. None: raw pixels at full size, as caches written before them read.
    inputs: str | None = None
    max_side: int | None = None
    decoder: str | None = None
    decode_min_side: int | None = None  # files decoded reduced, each side kept >= this (`InputCodec`); None: not

    def to_dict(self) -> dict[str, Any]:
        # A default option is written as no key at all: the JSON (and identity) of a cache that keeps every
        # target and raw full-size inputs stays what it was before the options existed.
        out = super().to_dict()
        for key in ("store", "inputs", "max_side", "decoder", "decode_min_side"):
            if out.get(key, "") is None:
                del out[key]
        return out

    @model_validator(mode="after")
    def _check(self) -> StorageSpec:
        if self.logits not in ("dense", "none") and not (
            self.logits.startswith("topk:") and self.logits[5:].isdigit() and int(self.logits[5:]) > 0
        ):
            raise CacheError(f"--logits must be dense, topk:K (K > 0) or none, not '{self.logits}'")
        if self.pooled_views not in ("all", "first"):
            raise CacheError(f"pooled_views must be 'all' or 'first', not '{self.pooled_views}'")
        if self.grid < 1:
            raise CacheError(f"--grid must be >= 1, not {self.grid}")
        if self.max_side is not None and self.max_side < 1:
            raise CacheError(f"--max-side must be >= 1 pixel, not {self.max_side}; leave it out to keep full size")
        if not 1 <= self.shard_size <= MAX_SHARD_SIZE or not 1 <= self.block_size <= MAX_SHARD_SIZE:
            raise CacheError(f"--shard-size and the block size must lie in [1, {MAX_SHARD_SIZE}]")
        if not 0 <= self.lsh_bits <= MAX_LSH_BITS or self.lsh_bits % 8:
            raise CacheError(f"--lsh-bits must be a multiple of 8 in [0, {MAX_LSH_BITS}], not {self.lsh_bits}")
        if not 1 <= self.grid <= MAX_GRID or not 0 <= self.teacher_tail <= MAX_STAGES:
            raise CacheError(f"--grid must lie in [1, {MAX_GRID}] and --teacher-tail in [0, {MAX_STAGES}]")
        if self.featmaps and self.tap is None:
            raise CacheError("--featmaps stores the map of the tapped stage; give --tap auto|STAGE, not none")
        if self.teacher_tail < 0 or (self.teacher_tail and not self.featmaps):
            raise CacheError(f"--teacher-tail {self.teacher_tail}: the tail's outputs mimic the stored feature maps, "
                             f"so it needs --featmaps and a count >= 1 (0 saves no tail)")
        return self

    @property
    def topk(self) -> int | None:
        return int(self.logits[5:]) if self.logits.startswith("topk:") else None

    def replace(self, **changes: Any) -> StorageSpec:
        """A copy with `changes`, checked again; the keys written stay those the section had, plus `changes`."""
        return StorageSpec.read({**self.to_dict(), **changes})


class ArraySpec(Section):
    """`arrays[name]`: a per-sample zarr array's shape (samples first) and dtype."""

    model_config = ConfigDict(strict=True)

    shape: list[int]
    dtype: str

    @model_validator(mode="after")
    def _check(self) -> ArraySpec:
        if not self.shape:
            raise CacheError("an array's shape lists at least its sample count")
        return self


class ShardRange(Section):
    """`shards[i]` as planned: sample range [start, stop) of shard `index`, not yet written."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    index: int
    start: int
    stop: int

    @property
    def count(self) -> int:
        return self.stop - self.start


class ShardRecord(ShardRange):
    """One finished shard: its sample range and the checksums a rerun verifies before skipping it."""

    file: str  # relative to the cache root
    sha256: str
    bytes: int
    rows_sha256: str  # digest of this shard's rows in every per-sample zarr array
    # Written since the integrity checks (README "Security model and integrity"); absent in older records.
    arrays_sha256: dict[str, str] = Field(default_factory=dict)  # per array: digest of this shard's rows
    blocks_sha256: list[str] = Field(default_factory=list)  # per tar member, in order: sha256 of its bytes

    def planned(self) -> ShardRange:
        """The range alone, as a cache's plan lists it."""
        return ShardRange(index=self.index, start=self.start, stop=self.stop)


class FileRecord(Section):
    """`files[name]`: a side file of the cache (`teacher_tail.pt`) and the digest it is checked against."""

    model_config = ConfigDict(strict=True)

    file: str
    sha256: str
    bytes: int
    family: str | None = None  # teacher_tail: the tail's model family and stages
    stages: list[str] | None = None


class LshRecord(Section):
    """`stats.lsh`: the LSH codes' bits, how many rows trained the planes, and the faiss index file."""

    model_config = ConfigDict(strict=True)

    bits: int
    train_rows: int
    index: str
    index_sha256: str


class StatsSection(Section):
    """`stats`: which dataset-level arrays exist and the numbers they came with (docs/cache-format.md#contract).
    Written in the order its writer gave (which changed between versions), so every cache saves as it read."""

    model_config = ConfigDict(strict=True)
    WRITES_DEFAULTS: ClassVar[bool] = False  # a key is written only when its statistic was computed

    _order: tuple[str, ...] = PrivateAttr(default=())

    arrays: list[str] = Field(default_factory=list)
    cka_source: str | None = None
    cka_samples_per_class: int | None = None  # the most rows any class pair's CKA used (pipeline.stats.cka)
    cka_undefined_classes: list[int] | None = None  # classes with no interrelations (1 sample, identical samples)
    pca_components_90: int | None = None
    features_count: int | None = None
    lsh: LshRecord | None = None

    @model_validator(mode="after")
    def _check(self) -> StatsSection:
        _only_statistics(self.arrays, "stats.arrays")
        return self

    @model_validator(mode="wrap")
    @classmethod
    def _keep_order(cls, data: Any, handler: Any) -> StatsSection:
        section = handler(data)
        if isinstance(data, dict):
            section._order = tuple(data)
        return section

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        return {k: out[k] for k in sorted(out, key=lambda k: self._order.index(k) if k in self._order else 99)}


def _only_statistics(names: Any, field: str) -> None:
    unknown = sorted(set(names) - STATISTICS_ARRAYS)
    if unknown:
        raise CacheError(f"{field} lists {unknown[0]!r}, not a statistics array (damaged or crafted)")


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) of each shard of `n` samples, `shard_size` each (the last one may be shorter)."""
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str]:
    import faiss
    import numpy
    import timm
    import torch
    import webdataset
    import zarr

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "numpy": numpy.__version__, "zarr": zarr.__version__, "webdataset": webdataset.__version__,
            "faiss": faiss.__version__}


class Manifest(BaseModel):
    """The whole manifest; built by the teacher pass's plan, read by `load`."""

    model_config = ConfigDict(strict=True, extra="forbid")

    teacher: TeacherSection
    dataset: DatasetSection
    views: ViewsSection
    storage: StorageSpec
    arrays: dict[str, ArraySpec]  # the per-sample arrays, by zarr path
    shards: list[ShardRecord | ShardRange] = Field(default_factory=list)  # planned ranges, then records
    stats: StatsSection = Field(default_factory=lambda: StatsSection.read({}))
    status: str = "partial"
    format_version: int = FORMAT_VERSION
    versions: dict[str, str] = Field(default_factory=library_versions)
    created: str = Field(default_factory=now_iso)
    completed: str | None = None
    files: dict[str, FileRecord] = Field(default_factory=dict)  # side files (teacher_tail.pt)
    # Dataset-level arrays (stats/*, lsh/codes) -> `array_digest`, written with them; empty in older caches.
    digests: dict[str, str] = Field(default_factory=dict)

    def __init__(self, **data: Any) -> None:
        """Sections given as dicts (a file's or a writer's) keep only the keys they have."""
        reading = _READING.set(True)  # pydantic builds them through `Section.__init__`
        try:
            super().__init__(**data)
        finally:
            _READING.reset(reading)

    def identity(self) -> dict[str, Any]:
        ident = {k: getattr(self, k).to_dict() for k in IDENTITY_SECTIONS}
        # Where the checkpoint lies is provenance, not identity: its sha256 is what matters.
        del ident["teacher"]["checkpoint"]
        return ident

    def fingerprint(self) -> str:
        """sha256 of `identity()`: the cache's identity in one string. A student run records it (a resumed run
        must find the same teacher, data, views and storage), and flows key a cache's artifacts and events by
        it; run directories hold it, so the formula never changes."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """The manifest as its JSON holds it."""
        return {name: _plain(getattr(self, name)) for name in type(self).model_fields}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def save(self, root: str | Path | ObjectPath) -> None:
        """Written whole (temp file and rename locally, one PUT on object storage) so a reader never sees half
        a manifest."""
        write_whole_bytes(location(root) / MANIFEST_NAME, self.to_json().encode())

    @classmethod
    def load(cls, root: str | Path | ObjectPath) -> Manifest:
        path = location(root) / MANIFEST_NAME
        if not reachable_file(path, CacheError):
            raise CacheError(f"{root} is not a teacher cache (no {MANIFEST_NAME}); create one with `distillery cache`")
        if not path.resolve().is_relative_to(location(root).resolve()):
            raise CacheError(f"{path} is a symlink to a file outside {root}; the cache is refused (damaged or "
                             f"crafted): re-create it with `distillery cache`")
        data = read_json(path, MAX_MANIFEST_BYTES, CacheError, "delete the cache and re-run `distillery cache`")
        if not isinstance(data, dict):
            raise CacheError(f"{path} is not a cache manifest (a JSON object); delete the cache and re-run "
                             f"`distillery cache`")
        if data.get("format_version") not in READ_FORMATS:
            raise CacheError(f"{root} has cache format {data.get('format_version')}, this Distillery reads "
                             f"{' and '.join(map(str, READ_FORMATS))}; re-run `distillery cache` into a new --out")
        try:
            manifest = cls(**data)
        except ValidationError as e:
            raise CacheError(f"{path}{_problem(e)}; delete the cache and re-run `distillery cache`") from None
        try:
            _only_statistics(manifest.digests, "digests")
        except CacheError as e:
            raise CacheError(f"{path}: {e}; delete the cache and re-run `distillery cache`") from None
        if not _ranges_cover(manifest.shards, manifest.dataset.num_samples, manifest.storage.shard_size):
            raise CacheError(f"{path}: the shard ranges do not cover samples [0, dataset.num_samples) in order, at most "
                             f"storage.shard_size each (damaged or edited); delete the cache and re-run `distillery cache`")
        return manifest

    def records(self) -> list[ShardRecord]:
        """The finished shards' records (a complete cache has one per shard)."""
        return [s for s in self.shards if isinstance(s, ShardRecord)]


def _problem(error: ValidationError) -> str:
    """What a manifest that does not validate gets wrong, from its first error (the message's middle)."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"][:2])
    original = first.get("ctx", {}).get("error")
    if isinstance(original, DistilleryError):  # a section's field out of its range
        return f": a section does not hold what a cache manifest holds ({original})"
    if first["type"] in ("missing", "extra_forbidden") or first["loc"][0] == "shards":
        return f" does not have the fields of a cache manifest ({first['type']}: {where})"
    return f": field {where} has the wrong type (damaged or edited)"


def _ranges_cover(shards: list[ShardRange], num_samples: int, shard_size: int) -> bool:
    """Whether shard i covers [start, stop), at most `shard_size` samples, with each start the previous stop,
    from 0 to `num_samples` (so N is no larger than the records the manifest holds can cover)."""
    stop = 0
    for i, s in enumerate(shards):
        if s.index != i or s.start != stop or not 0 < s.stop - stop <= shard_size:
            return False
        stop = s.stop
    return bool(shards) and stop == num_samples


def identity_mismatch(stored: dict[str, Any], requested: dict[str, Any], prefix: str = "",
                      stored_as: str = "cache") -> str | None:
    """The dotted name of the first field that differs between two identities, or None if equal.

    `stored_as` names the stored side in the message (a cache, or a student run's checkpoint).
    """
    # Section order (teacher, dataset, views, storage) so the root cause is named, not a consequence.
    for key in [*stored, *(k for k in requested if k not in stored)]:
        a, b = stored.get(key), requested.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            found = identity_mismatch(a, b, prefix=f"{name}.", stored_as=stored_as)
            if found:
                return found
        elif a != b:
            return f"{name} ({stored_as}: {_short(a)}, requested: {_short(b)})"
    return None


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."
