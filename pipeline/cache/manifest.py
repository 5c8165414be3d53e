"""The cache manifest (`<cache>/manifest.json`): identity, layout, shard records, status (docs/ARCHITECTURE.md §4).

A cache is reused only when its *identity* (teacher, dataset, view plan, storage options) equals the
request's; `identity_mismatch` names the first field that differs so the refusal can say which.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from pipeline.errors import DistilleryError
from pipeline.atomic import atomic_write_text

FORMAT_VERSION = 2
"""2: every per-sample array is stored once, in `arrays.zarr`; the shards' blocks carry the raw inputs only.
1: the blocks carried every per-sample row too (a second copy); still read, and repaired in its own format."""
READ_FORMATS = (1, 2)
MANIFEST_NAME = "manifest.json"
IDENTITY_SECTIONS = ("teacher", "dataset", "views", "storage")


class CacheError(DistilleryError):
    """A cache that cannot be used as asked; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class StorageSpec:
    """What the teacher pass stores and how (the `distillery cache` storage options)."""

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

    def __post_init__(self) -> None:
        if self.logits not in ("dense", "none") and not (
            self.logits.startswith("topk:") and self.logits[5:].isdigit() and int(self.logits[5:]) > 0
        ):
            raise CacheError(f"--logits must be dense, topk:K (K > 0) or none, not '{self.logits}'")
        if self.pooled_views not in ("all", "first"):
            raise CacheError(f"pooled_views must be 'all' or 'first', not '{self.pooled_views}'")
        if self.grid < 1:
            raise CacheError(f"--grid must be >= 1, not {self.grid}")
        if self.shard_size < 1 or self.block_size < 1:
            raise CacheError("--shard-size and the block size must be >= 1")
        if self.lsh_bits < 0 or self.lsh_bits % 8:
            raise CacheError(f"--lsh-bits must be a non-negative multiple of 8, not {self.lsh_bits}")
        if self.featmaps and self.tap is None:
            raise CacheError("--featmaps stores the map of the tapped stage; give --tap auto|STAGE, not none")
        if self.teacher_tail < 0 or (self.teacher_tail and not self.featmaps):
            raise CacheError(f"--teacher-tail {self.teacher_tail}: the tail's outputs mimic the stored feature maps, "
                             f"so it needs --featmaps and a count >= 1 (0 saves no tail)")

    @property
    def topk(self) -> int | None:
        return int(self.logits[5:]) if self.logits.startswith("topk:") else None


@dataclass(frozen=True)
class ShardRecord:
    """One finished shard: its sample range and the checksums a rerun verifies before skipping it."""

    index: int
    start: int
    stop: int
    file: str  # relative to the cache root
    sha256: str
    bytes: int
    rows_sha256: str  # digest of this shard's rows in every per-sample zarr array
    # Written since the integrity checks (README "Security model and integrity"); empty in older records.
    arrays_sha256: dict[str, str] = field(default_factory=dict)  # per array: digest of this shard's rows
    blocks_sha256: list[str] = field(default_factory=list)  # per tar member, in order: sha256 of its bytes

    @property
    def count(self) -> int:
        return self.stop - self.start


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


@dataclass
class Manifest:
    teacher: dict[str, Any]
    dataset: dict[str, Any]
    views: dict[str, Any]
    storage: dict[str, Any]
    arrays: dict[str, dict[str, Any]]  # name -> {"shape": [...], "dtype": "..."}
    shards: list[dict[str, Any]] = field(default_factory=list)  # planned ranges, then records
    stats: dict[str, Any] = field(default_factory=dict)
    status: str = "partial"
    format_version: int = FORMAT_VERSION
    versions: dict[str, str] = field(default_factory=library_versions)
    created: str = field(default_factory=now_iso)
    completed: str | None = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # side files (teacher_tail.pt): sha256, bytes
    # Dataset-level arrays (stats/*, lsh/codes) -> `array_digest`, written with them; empty in older caches.
    digests: dict[str, str] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        ident = {k: getattr(self, k) for k in IDENTITY_SECTIONS}
        # Where the checkpoint lies is provenance, not identity: its sha256 is what matters.
        ident["teacher"] = {k: v for k, v in self.teacher.items() if k != "checkpoint"}
        return ident

    def storage_spec(self) -> StorageSpec:
        return StorageSpec(**self.storage)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    def save(self, root: str | Path) -> None:
        """Atomic write (temp file, then rename) so a reader never sees half a manifest."""
        path = Path(root) / MANIFEST_NAME
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, root: str | Path) -> Manifest:
        path = Path(root) / MANIFEST_NAME
        if not path.is_file():
            raise CacheError(f"{root} is not a teacher cache (no {MANIFEST_NAME}); create one with `distillery cache`")
        if not path.resolve().is_relative_to(Path(root).resolve()):
            raise CacheError(f"{path} is a symlink to a file outside {root}; the cache is refused (damaged or "
                             f"crafted): re-create it with `distillery cache`")
        try:
            data = json.loads(path.read_bytes())
        except ValueError as e:  # not JSON, or not UTF-8
            raise CacheError(f"{path} is not valid JSON ({e}); delete the cache and re-run `distillery cache`") from e
        if not isinstance(data, dict):
            raise CacheError(f"{path} is not a cache manifest (a JSON object); delete the cache and re-run "
                             f"`distillery cache`")
        if data.get("format_version") not in READ_FORMATS:
            raise CacheError(f"{root} has cache format {data.get('format_version')}, this Distillery reads "
                             f"{' and '.join(map(str, READ_FORMATS))}; re-run `distillery cache` into a new --out")
        try:
            manifest = cls(**data)
            manifest.records()
            num_samples = manifest.dataset["num_samples"]
        except (TypeError, KeyError) as e:  # missing or unknown fields: a damaged or crafted manifest
            raise CacheError(f"{path} does not have the fields of a cache manifest ({e}); delete the cache and "
                             f"re-run `distillery cache`") from None
        wrong = manifest.wrongly_typed()
        if wrong:
            raise CacheError(f"{path}: field {wrong} has the wrong type (damaged or edited); delete the cache and "
                             f"re-run `distillery cache`")
        if not _ranges_cover(manifest.shards, num_samples):
            raise CacheError(f"{path}: the shard ranges do not cover samples [0, dataset.num_samples) in order "
                             f"(damaged or edited); delete the cache and re-run `distillery cache`")
        return manifest

    def wrongly_typed(self) -> str | None:
        """The first section (or array entry) whose JSON type is not the one this module writes, if any."""
        for name in ("teacher", "dataset", "views", "storage", "arrays", "stats", "files", "digests"):
            if not isinstance(getattr(self, name), dict):
                return name
        if not isinstance(self.shards, list) or not all(isinstance(s, dict) for s in self.shards):
            return "shards"
        for name, meta in self.arrays.items():
            shape = meta.get("shape") if isinstance(meta, dict) else None
            if not (isinstance(shape, list) and shape and all(isinstance(d, int) for d in shape)
                    and isinstance(meta.get("dtype"), str)):
                return f"arrays.{name}"
        if not all(isinstance(v, dict) for v in self.files.values()):
            return "files"
        if not isinstance(self.stats.get("lsh", {}), dict) or not isinstance(self.stats.get("arrays", []), list):
            return "stats"
        return None

    def records(self) -> list[ShardRecord]:
        """The finished shards' records (a complete cache has one per shard)."""
        return [ShardRecord(**s) for s in self.shards if "file" in s]


def _ranges_cover(shards: list[dict[str, Any]], num_samples: object) -> bool:
    """Whether shard i covers [start, stop) with each start the previous stop, from 0 to `num_samples`."""
    stop = 0
    for i, s in enumerate(shards):
        if not isinstance(s, dict) or s.get("index") != i or s.get("start") != stop:
            return False
        if not isinstance(s.get("stop"), int) or s["stop"] <= stop:
            return False
        stop = s["stop"]
    return bool(shards) and isinstance(num_samples, int) and stop == num_samples


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
