"""Where every file of a teacher cache lives (docs/cache-format.md#contract), and the access the writer and the
reader share: paths confined to the cache, zarr opened in one place, shard records and their row checks.

```
<cache>/manifest.json               identity, layout, shard records, status
<cache>/arrays.zarr                 zarr v3 group: every per-sample array (ids, labels, targets) chunked along
                                    N by shard, the only copy; dataset-level statistics
<cache>/shards/train-%06d.tar       webdataset shards: blocks of raw inputs (format 1: + a copy of every row)
<cache>/shards/train-%06d.json      a finished shard's record (written last; a rerun verifies it)
<cache>/lsh.faiss                   faiss binary index over the view-0 LSH codes (with --lsh-bits)
<cache>/teacher_tail.pt             optional: ScaleKD's frozen teacher tail (spec + state dict), see docs/methods.md#scalekd
```

The block codec and the tar files are `pipeline.cache.blocks`; `CacheWriter` (`pipeline.cache.writer`) writes a
cache, `TeacherCache` (`pipeline.cache.reader`) reads it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.bounded import read_json
from pipeline.cache.integrity import confined_path, inside, rows_digest
from pipeline.cache.manifest import CacheError, Manifest, ShardRange, ShardRecord
from pipeline.checksums import sha256_file
from pipeline.object_store import ObjectPath, location

if TYPE_CHECKING:  # zarr is opened by the writer and the reader; a run directory names `ARRAYS_NAME` without it
    import zarr

ARRAYS_NAME = "arrays.zarr"
LSH_INDEX_NAME = "lsh.faiss"
LSH_STATS_ARRAYS = ("lsh/codes", "stats/lsh/planes", "stats/lsh/thresholds")  # written by `distillery stats`
LOCK_NAME = ".writer.lock"
STAGING_PREFIX = ".stats-staging-"
SHARDS_DIR = "shards"
SHARD_PATTERN = "train-{:06d}.tar"
TAIL_NAME = "teacher_tail.pt"
MAX_METADATA_BYTES = 1 << 20
"""The largest `zarr.json` read (the cache's own are under 1 KiB)."""
MAX_RECORD_BYTES = 1 << 20
MAX_TAIL_BYTES = 2 << 30
"""The largest `teacher_tail.pt` read: the last stage of a ConvNeXt-XL, about the largest a timm teacher has, is
0.45 GB in float32."""
"""The largest shard record read: one lists a sha256 per block, about 70 bytes each."""


def block_sizes(shards: list[ShardRange], block_size: int) -> list[list[int]]:
    """Samples per block of each shard: the writer cuts a shard every `block_size`."""
    return [[min(block_size, s.count - b) for b in range(0, s.count, block_size)] for s in shards]


def open_arrays(path: Path | ObjectPath, mode: str) -> zarr.Group:
    """The cache's zarr group (a URL opens through zarr's FsspecStore); metadata that does not parse is one
    CacheError naming the file. Chunks decode with the bounded zstd codec (`read_zstd_bounded`)."""
    import zarr

    from pipeline.cache.codecs import read_zstd_bounded

    read_zstd_bounded()
    try:
        return zarr.open_group(store=str(path), mode=mode)
    except (ValueError, TypeError, KeyError, OSError, zarr.errors.BaseZarrError) as e:
        raise CacheError(f"{path} cannot be opened as a zarr group ({type(e).__name__}: {e}); the cache is "
                         f"damaged: delete it and re-run `distillery cache`") from None


class CacheFiles:
    """Paths and zarr access shared by the writer and the reader (each opens `group` in its own mode)."""

    group: zarr.Group

    def __init__(self, root: str | Path | ObjectPath, manifest: Manifest) -> None:
        self.root = location(root)
        self.manifest = manifest
        self.check_paths()

    def check_paths(self) -> None:
        """Refuse a manifest naming a file outside the cache: shard files must resolve inside `shards/`, the
        side files are the fixed names this module writes, and `arrays.zarr` must not lead elsewhere."""
        for record in self.manifest.records():
            confined_path(self.root, record.file, f"manifest shards[{record.index}].file", under=SHARDS_DIR)
        tail, lsh = self.manifest.files.get("teacher_tail"), self.manifest.stats.lsh
        fixed = {"files.teacher_tail.file": tail.file if tail else TAIL_NAME,
                 "stats.lsh.index": lsh.index if lsh else LSH_INDEX_NAME}
        for field, name in fixed.items():
            if name not in (TAIL_NAME, LSH_INDEX_NAME):
                raise CacheError(f"{self.root}: manifest {field} ({name!r}) is not a file this cache writes; the "
                                 f"cache is refused (damaged or crafted): re-create it with `distillery cache`")
        for name in (ARRAYS_NAME, TAIL_NAME, LSH_INDEX_NAME, SHARDS_DIR):
            path = self.root / name
            if path.exists() and not inside(path, self.root):
                raise CacheError(f"{path} resolves outside {self.root} (a symlink?); the cache is refused "
                                 f"(damaged or crafted): re-create it with `distillery cache`")

    @property
    def zarr_path(self) -> Path:
        return self.root / ARRAYS_NAME

    def shard_path(self, index: int) -> Path:
        return self.root / SHARDS_DIR / SHARD_PATTERN.format(index)

    def record_path(self, index: int) -> Path:
        return self.shard_path(index).with_suffix(".json")

    def tail_verifies(self) -> bool:
        """Whether `teacher_tail.pt` is recorded in the manifest and its file still has that sha256."""
        record = self.manifest.files.get("teacher_tail")
        path = self.root / TAIL_NAME
        return record is not None and path.is_file() and sha256_file(path) == record.sha256

    def shard_record(self, index: int) -> ShardRecord | None:
        """Shard `index`'s record: the manifest's once the cache is finalized, else the one written beside
        the shard (None when that is missing or unreadable)."""
        listed = self.manifest.shards[index]
        if isinstance(listed, ShardRecord):
            return listed
        try:
            return ShardRecord.read(read_json(self.record_path(index), MAX_RECORD_BYTES, CacheError, "rewritten"))
        except (ValueError, TypeError):  # CacheError included: a record that does not read is rewritten
            return None

    def stored_rows_digest(self, start: int, stop: int) -> str:
        """`rows_digest` of rows [start, stop) as zarr holds them now."""
        return rows_digest({name: self.group[name][start:stop] for name in self.manifest.arrays})

    def rows_problem(self, record: ShardRecord, names: Sequence[str] | None = None,
                     rows: Mapping[str, np.ndarray] | None = None) -> str | None:
        """What is wrong with shard `record`'s rows in zarr (None: they match the record). Records written
        since per-array digests exist check only `names` (default: all; `rows`: those already read) and name
        the array that differs; older ones check every array at once."""
        where = f"shard {record.index} (rows {record.start}-{record.stop})"
        if not record.arrays_sha256:
            if self.stored_rows_digest(record.start, record.stop) != record.rows_sha256:
                return f"{where}: zarr rows differ from the shard record (a lost or changed chunk)"
            return None
        for name in sorted(self.manifest.arrays) if names is None else names:
            value = rows[name] if rows is not None and name in rows else self.group[name][record.start:record.stop]
            if rows_digest({name: value}) != record.arrays_sha256.get(name):
                return f"{where}: array {name} differs from its digest (a lost or changed zarr chunk)"
        return None
