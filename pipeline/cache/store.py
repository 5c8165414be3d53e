"""The teacher cache on disk: the one place that knows its file formats (docs/cache-format.md#contract).

```
<cache>/manifest.json               identity, layout, shard records, status
<cache>/arrays.zarr                 zarr v3 group: every per-sample array (ids, labels, targets) chunked along
                                    N by shard, the only copy; dataset-level statistics
<cache>/shards/train-%06d.tar       webdataset shards: blocks of raw inputs (format 1: + a copy of every row)
<cache>/shards/train-%06d.json      a finished shard's record (written last; a rerun verifies it)
<cache>/lsh.faiss                   faiss binary index over the view-0 LSH codes (with --lsh-bits)
<cache>/teacher_tail.pt             optional: ScaleKD's frozen teacher tail (spec + state dict), see docs/methods.md#scalekd
```

`CacheWriter` is used by the teacher pass, one shard at a time (shard tasks may run concurrently: each
writes only its own zarr chunks and files). `TeacherCache` is the read side for everyone else.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import faiss
import numpy as np
import torch
import zarr

from pipeline.checksums import sha256_bytes, sha256_file
from pipeline.cache.integrity import array_digest, confined_path, inside, non_finite_rows, rows_digest
from pipeline.cache.manifest import (CacheError, FileRecord, Manifest, ShardRecord, StatsSection,
                                     identity_mismatch, now_iso)
from pipeline.cache.targets import LOGITS, TARGETS
from pipeline.object_store import ObjectPath, location, open_binary, write_whole, write_whole_bytes

ARRAYS_NAME = "arrays.zarr"
LSH_INDEX_NAME = "lsh.faiss"
LSH_STATS_ARRAYS = ("lsh/codes", "stats/lsh/planes", "stats/lsh/thresholds")  # written by `distillery stats`
LOCK_NAME = ".writer.lock"
STAGING_PREFIX = ".stats-staging-"
SHARDS_DIR = "shards"
SHARD_PATTERN = "train-{:06d}.tar"
TAIL_NAME = "teacher_tail.pt"
# zstd level 1 stores float16 teacher outputs as small as zarr's default level 3 (within 1 %) in 2/3 of the
# time, and per-sample rows are written once per shard inside the teacher pass.
ROW_COMPRESSOR = zarr.codecs.ZstdCodec(level=1)

# ---------------------------------------------------------------------------------------------
# Block codec: a dict of plain numpy arrays <-> bytes. A zip of .npy members (like np.savez) but with
# fixed timestamps, so the same rows always give the same bytes (stable shard checksums), and read
# back with allow_pickle=False (no pickle on any read path).
# ---------------------------------------------------------------------------------------------


def encode_block(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            arr = np.ascontiguousarray(arrays[name])
            if arr.dtype == object:
                raise TypeError(f"block array {name} has dtype object; only plain numeric arrays are stored")
            member = io.BytesIO()
            np.lib.format.write_array(member, arr, allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
    return buf.getvalue()


def repair_hint(root: str | Path) -> str:
    """What to run when a shard or its rows are damaged (README "Security model and integrity")."""
    return (f"repair with `distillery verify {root} --repair` (needs the teacher checkpoint) or re-run the "
            f"`distillery cache` command that made it")


def decode_block(data: bytes, where: str = "block", root: str | Path | None = None,
                 keys: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of a block (of the cache at `root`), only `keys` when given; one that does not decode is one
    CacheError naming `where`."""
    out = {}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info in zf.infolist():
                if keys is not None and info.filename.removesuffix(".npy") not in keys:
                    continue
                with zf.open(info) as f:
                    out[info.filename.removesuffix(".npy")] = np.lib.format.read_array(
                        io.BytesIO(f.read()), allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
        fix = repair_hint(root) if root is not None else "the cache holding it is damaged"
        raise CacheError(f"{where} does not decode ({e}); {fix}") from None
    return out


def block_key(name: str) -> str:
    """zarr array path -> key inside a block (`logits/dense` -> `logits.dense`)."""
    return name.replace("/", ".")


RAW_KEYS = frozenset({"raw", "raw_shape", "raw_offsets", "raw_hw"})
"""Block keys of the raw inputs, both encodings (`pack_raw`, and the padded one before it)."""


def raw_count(block: Mapping[str, np.ndarray]) -> int:
    """How many samples a decoded block holds."""
    return len(block["raw_shape"] if "raw_shape" in block else block["raw_hw"])


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


def write_tar_whole(path: Path | ObjectPath, members: list[tuple[str, bytes]]) -> None:
    """Write a tar with mtime 0 whole (`write_whole`): a shard file is whole or absent."""
    def write(f: BinaryIO) -> None:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))

    write_whole(path, write)


def iter_tar_members(path: str | Path | ObjectPath) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular member of the shard tar at `path` (`<cache>/shards/...`), a local file
    or an object (read as one stream)."""
    try:
        with open_binary(path) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            for info in tar:
                f = tar.extractfile(info) if info.isfile() else None
                if f is not None:
                    yield info.name, f.read()
    except FileNotFoundError:
        raise CacheError(f"{path} is missing; {repair_hint(location(path).parent.parent)}") from None
    except (tarfile.TarError, EOFError) as e:
        raise CacheError(f"{path} is not a readable tar ({e}); {repair_hint(location(path).parent.parent)}") from None


def block_digests(path: Path | ObjectPath) -> list[str] | None:
    """sha256 of each member of the shard tar at `path`, in order; None if it is not a readable tar."""
    try:
        return [sha256_bytes(data) for _, data in iter_tar_members(path)]
    except CacheError:
        return None


def open_arrays(path: Path | ObjectPath, mode: str) -> zarr.Group:
    """The cache's zarr group (a URL opens through zarr's FsspecStore); metadata that does not parse is one
    CacheError naming the file."""
    try:
        return zarr.open_group(store=str(path), mode=mode)
    except (ValueError, TypeError, KeyError, OSError, zarr.errors.BaseZarrError) as e:
        raise CacheError(f"{path} cannot be opened as a zarr group ({type(e).__name__}: {e}); the cache is "
                         f"damaged: delete it and re-run `distillery cache`") from None


class _CacheFiles:
    """Paths and zarr access shared by the writer and the reader."""

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
            return ShardRecord.read(json.loads(self.record_path(index).read_bytes()))
        except (OSError, ValueError, TypeError):
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


def as_stored_dtype(value: np.ndarray, dtype: str) -> np.ndarray:
    """`value` as a contiguous array of `dtype`. float32 -> float16 goes through torch: its rounding (to
    nearest even) is numpy's bit for bit (tests/cache/test_store.py), and on CPU ~9x faster."""
    value = np.asarray(value)
    if np.dtype(dtype) == np.float16 and value.dtype == np.float32:
        return torch.from_numpy(np.ascontiguousarray(value)).half().numpy()
    return np.ascontiguousarray(value, dtype=dtype)


class CacheWriter(_CacheFiles):
    """Creates (or resumes) a cache and writes it shard by shard."""

    def __init__(self, root: str | Path, manifest: Manifest) -> None:
        super().__init__(root, manifest)
        self.group = open_arrays(self.zarr_path, mode="a")

    @classmethod
    def create_or_resume(cls, root: str | Path, manifest: Manifest) -> CacheWriter:
        """Open a cache for writing. An existing cache must have the same identity, else it is refused.

        `manifest.arrays` describes the per-sample arrays (name -> shape, dtype); `manifest.shards`
        the planned shard ranges. A complete cache with the same identity is returned as is.
        """
        root = location(root)
        if (root / "manifest.json").exists():
            stored = Manifest.load(root)
            diff = identity_mismatch(stored.identity(), manifest.identity())
            if diff:
                raise CacheError(f"{root} holds a cache made with a different {diff}; "
                                 f"choose another --out or delete {root}")
            return cls(root, stored)
        if root.exists() and any(p.name != LOCK_NAME for p in root.iterdir()):
            raise CacheError(f"{root} exists and is not a teacher cache; choose another --out")
        (root / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        writer = cls(root, manifest)
        shard_size = manifest.storage.shard_size
        for name, meta in manifest.arrays.items():
            shape = tuple(meta.shape)
            writer.group.create_array(name, shape=shape, chunks=(shard_size, *shape[1:]), dtype=meta.dtype,
                                      fill_value=0, compressors=ROW_COMPRESSOR,
                                      config={"write_empty_chunks": True})
        manifest.save(root)
        return writer

    @property
    def per_sample_arrays(self) -> list[str]:
        return list(self.manifest.arrays)

    def finished_record(self, index: int) -> ShardRecord | None:
        """The shard's record if its files exist and verify (tar sha256 and zarr rows), else None: a shard
        to (re)write."""
        path, shard = self.record_path(index), self.shard_path(index)
        if not path.is_file() or not inside(path, self.root / SHARDS_DIR):
            return None
        try:
            record = ShardRecord.read(json.loads(path.read_bytes()))
        except (ValueError, TypeError):  # a torn or damaged record: rewrite the shard
            return None
        planned = self.manifest.shards[index]
        if (record.index, record.start, record.stop, record.file) != (
                index, planned.start, planned.stop, str(shard.relative_to(self.root))):
            return None
        if not shard.is_file() or not inside(shard, self.root / SHARDS_DIR) or sha256_file(shard) != record.sha256:
            return None
        if record.blocks_sha256 and block_digests(shard) != record.blocks_sha256:
            return None
        if self.rows_problem(record) is not None:
            return None
        return record

    def write_shard(self, index: int, start: int, stop: int, rows: Mapping[str, np.ndarray],
                    raws: list[np.ndarray]) -> ShardRecord:
        """Write rows [start, stop) of every per-sample array, then the tar, then the record (last)."""
        missing = set(self.per_sample_arrays) - set(rows)
        if missing:
            raise CacheError(f"shard {index} is missing arrays {sorted(missing)}")
        # Exactly the bytes zarr will hold (its dtype, no broadcasting), so the record's digest can be
        # taken from memory instead of reading the shard back.
        layout = self.manifest.arrays
        rows = {name: as_stored_dtype(rows[name], meta.dtype) for name, meta in layout.items()}
        for name, meta in layout.items():
            if rows[name].shape != (stop - start, *meta.shape[1:]):
                raise CacheError(f"shard {index}: {name} has shape {rows[name].shape}, "
                                 f"expected {(stop - start, *meta.shape[1:])}")
            bad = non_finite_rows(rows[name])
            if len(bad):
                ids = rows["samples/ids"][bad[:5]].tolist() if "samples/ids" in rows else (start + bad[:5]).tolist()
                raise CacheError(f"shard {index}: {name} is not finite as {meta.dtype} for {len(bad)} samples "
                                 f"(ids {ids}{'...' if len(bad) > 5 else ''}): the teacher's values overflow the "
                                 f"stored dtype (float16 holds |x| <= 65504) or are NaN; check the checkpoint "
                                 f"(the cache stays partial)")
        for name in layout:
            self.group[name][start:stop] = rows[name]
        block = self.manifest.storage.block_size
        members = []
        for b0 in range(0, stop - start, block):
            b1 = min(b0 + block, stop - start)
            arrays = pack_raw(raws[b0:b1])
            if self.manifest.format_version == 1:  # its blocks copied every row; a repair rewrites the same bytes
                arrays.update({block_key(n): rows[n][b0:b1] for n in self.per_sample_arrays})
            members.append((f"{index:06d}-{b0 // block:06d}.npz", encode_block(arrays)))
        path = self.shard_path(index)
        write_tar_whole(path, members)
        record = ShardRecord(index=index, start=start, stop=stop, file=str(path.relative_to(self.root)),
                             sha256=sha256_file(path), bytes=path.stat().st_size,
                             rows_sha256=rows_digest(rows),
                             arrays_sha256={name: rows_digest({name: rows[name]}) for name in layout},
                             blocks_sha256=[sha256_bytes(data) for _, data in members])
        write_whole_bytes(self.record_path(index), json.dumps(record.to_dict()).encode())
        return record

    def write_teacher_tail(self, spec: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> None:
        """Save ScaleKD's teacher tail (docs/methods.md#scalekd) whole and record its sha256 in the manifest.

        `spec` must be plain JSON-able values: the file is read back with `torch.load(weights_only=True)`.
        """
        json.dumps(spec)  # a TypeError here beats an unreadable file later
        path = self.root / TAIL_NAME
        write_whole(path, lambda f: torch.save({"spec": dict(spec), "state_dict": dict(state_dict)}, f))
        self.manifest.files["teacher_tail"] = FileRecord(file=TAIL_NAME, sha256=sha256_file(path),
                                                         bytes=path.stat().st_size, family=spec["family"],
                                                         stages=list(spec["stages"]))
        self.manifest.save(self.root)

    def write_stats(self, arrays: Mapping[str, np.ndarray], stats: StatsSection,
                    lsh_index: bytes | None = None, storage: Mapping[str, Any] | None = None) -> None:
        """Replace the dataset-level arrays (`stats/...`, `lsh/codes`) and the manifest's `stats` section,
        committed only once all of it is written.

        The arrays are first written to a staging zarr group inside the cache, then each is moved into
        place (renames), then `lsh.faiss` (`lsh_index`; None: no index) and the manifest (new `stats`,
        their digests, `storage` updates) are written; arrays the old statistics listed and the new ones do
        not are removed last. A run killed while staging leaves the previous statistics untouched; one
        killed during the renames leaves arrays that fail their digests, which `distillery stats` rebuilds.
        An object store has no rename: there the arrays are written in place, and a run killed meanwhile
        leaves what one killed during the renames leaves.
        """
        local = not isinstance(self.root, ObjectPath)
        if local:
            self.remove_staging()
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.root))
        staged = zarr.open_group(store=str(staging / ARRAYS_NAME), mode="w") if local else self.group
        digests = {}
        for name, value in arrays.items():
            value = np.asarray(value)
            bad = non_finite_rows(value.reshape(1, -1))
            if len(bad):
                raise CacheError(f"statistics array {name} is not finite (NaN or inf in the stored rows it was "
                                 f"computed from); check the teacher checkpoint and re-run `distillery cache`")
            per_sample = not name.startswith("stats/") and value.ndim > 0
            chunks = (self.manifest.storage.shard_size, *value.shape[1:]) if per_sample else (value.shape or None)
            staged.create_array(name, shape=value.shape, dtype=value.dtype, chunks=chunks, fill_value=0,
                                overwrite=True)[...] = value
            digests[name] = array_digest(name, value)
        if local:
            trash = staging / "replaced"
            for name in arrays:
                target = self.zarr_path / name
                parent = name.rpartition("/")[0]
                if parent:
                    self.group.require_group(parent)
                if target.exists():
                    (trash / parent).mkdir(parents=True, exist_ok=True)
                    os.replace(target, trash / name)
                os.replace(staging / ARRAYS_NAME / name, target)
        if lsh_index is not None:
            write_whole_bytes(self.root / LSH_INDEX_NAME, lsh_index)
        removed = [n for n in self.manifest.stats.arrays if n not in stats.arrays]
        self.manifest.stats = stats
        self.manifest.digests = {n: d for n, d in self.manifest.digests.items() if n not in removed} | digests
        self.manifest.storage = self.manifest.storage.replace(**(storage or {}))
        self.manifest.save(self.root)
        for name in removed:
            if name in self.group and name not in arrays:
                del self.group[name]
        if stats.lsh is None:
            (self.root / LSH_INDEX_NAME).unlink(missing_ok=True)
        if local:
            shutil.rmtree(staging)

    def finalize(self, records: list[ShardRecord]) -> Manifest:
        """Mark the cache complete: every planned shard has a verified record."""
        planned = {s.index for s in self.manifest.shards}
        done = {r.index for r in records}
        if planned != done:
            raise CacheError(f"cannot complete the cache: shards {sorted(planned - done)} are not written")
        self.manifest.shards = sorted(records, key=lambda r: r.index)
        self.manifest.status = "complete"
        self.manifest.completed = now_iso()
        self.manifest.save(self.root)
        return self.manifest

    def remove_staging(self) -> None:
        """Remove statistics staged by a run killed before its commit (the caller holds the writer lock)."""
        for stale in self.root.glob(STAGING_PREFIX + "*"):
            shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink()

    def mark_partial(self) -> None:
        """Some shard is rewritten (a repair): the cache is not complete until it is finalized again."""
        self.manifest.status = "partial"
        self.manifest.save(self.root)


class TeacherCache(_CacheFiles):
    """Read side of a teacher cache: manifest, zarr arrays, shard files, target reconstruction."""

    def __init__(self, root: str | Path, require_complete: bool = True) -> None:
        super().__init__(root, Manifest.load(root))
        if require_complete and self.manifest.status != "complete":
            raise CacheError(f"{self.root} is a partial cache (the teacher pass did not finish); "
                             f"re-run the same `distillery cache` command to complete it")
        self.group = open_arrays(self.zarr_path, mode="r")
        self.check_layout()

    def check_layout(self) -> None:
        """Cheap checks on open (metadata only): every per-sample array the manifest lists exists with its
        recorded shape and dtype and N rows. Statistics are checked when read (`distillery stats` must open
        a cache whose statistics are damaged to rebuild them)."""
        n = self.num_samples
        for name, meta in self.manifest.arrays.items():
            arr = self.array(name)
            if list(arr.shape) != meta.shape or str(arr.dtype) != meta.dtype or arr.shape[0] != n:
                raise CacheError(f"{self.zarr_path / name} has shape {list(arr.shape)} {arr.dtype}, the manifest "
                                 f"says {meta.shape} {meta.dtype} with N={n} (damaged or edited); delete "
                                 f"the cache and re-run `distillery cache`")

    def check_array(self, name: str, value: np.ndarray) -> np.ndarray:
        """`value`, the whole of array `name`, checked against its digest: the manifest's for dataset-level
        arrays, the shard records' for per-sample ones (when the cache has them)."""
        if name in self.manifest.digests:
            if array_digest(name, value) != self.manifest.digests[name]:
                raise CacheError(f"{self.zarr_path / name} differs from its digest (a lost or changed zarr chunk); "
                                 f"rebuild the statistics with `distillery stats {self.root}`")
        elif name in self.manifest.arrays:
            for record in self.manifest.records():
                digest = record.arrays_sha256.get(name)
                if digest is not None and rows_digest({name: value[record.start:record.stop]}) != digest:
                    raise CacheError(f"{self.zarr_path / name}: rows of shard {record.index} differ from their "
                                     f"digest (a lost or changed zarr chunk); {repair_hint(self.root)}")
        return value

    @property
    def num_samples(self) -> int:
        return self.manifest.dataset.num_samples

    @property
    def num_views(self) -> int:
        return self.manifest.views.num_augmented + 1

    @property
    def num_classes(self) -> int:
        return self.manifest.dataset.num_classes

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.dataset.class_names)

    def has(self, name: str) -> bool:
        return name in self.manifest.arrays or name in self.manifest.stats.arrays

    def array(self, name: str) -> zarr.Array:
        """Array `name` as zarr holds it (unchecked: `read` checks a whole array against its digest)."""
        try:
            found = self.group[name] if name in self.group else None
        except (ValueError, TypeError, KeyError, zarr.errors.BaseZarrError) as e:
            raise CacheError(f"{self.zarr_path / name} has metadata that does not parse ({type(e).__name__}); the "
                             f"cache is damaged: delete it and re-run `distillery cache`") from None
        if not isinstance(found, zarr.Array):
            fix = (f"rebuild the statistics with `distillery stats {self.root}`" if name not in self.manifest.arrays
                   else "the cache is damaged: delete it and re-run `distillery cache`")
            raise CacheError(f"{self.root} has no array '{name}' (the manifest lists it); {fix}")
        return found

    def read(self, name: str) -> np.ndarray:
        """The whole array `name`, checked against its digest."""
        return self.check_array(name, np.asarray(self.array(name)[...]))

    def target_arrays(self, target: str) -> tuple[str, ...]:
        """The arrays serving a logical target in this cache (the layout it stores, `pipeline.cache.targets`;
        `featmaps` -> `featmaps/<stored tap>`); empty when it stores none."""
        return TARGETS[target].stored_layout(self.has, self.manifest.storage.tap) or ()

    def available_targets(self) -> frozenset[str]:
        """Logical target names this cache can serve (dense or top-k logits both serve 'logits')."""
        return frozenset(name for name in TARGETS if self.target_arrays(name))

    def target_shapes(self, targets: frozenset[str]) -> dict[str, tuple[int, ...]]:
        """Per-sample shape of each logical target served (batch axis left out): logits (C,), pooled (D,),
        gaussian (G*G, Cf) (shape of the mean; the std has the same), lsh_codes (bits/8,), featmaps (Cf, H, W)."""
        return {target: (self.num_classes,) if TARGETS[target].classes_wide
                else tuple(self.array(self.target_arrays(target)[0]).shape[2:]) for target in targets}

    def digested_per_shard(self, target: str) -> bool:
        """Whether `target`'s rows are written with the shards, digested in each shard's record: not when it
        is written after them with the statistics (the LSH codes, digested as a whole array)."""
        return TARGETS[target].produce is not None

    def shard_rows(self, index: int, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Rows [start, stop) of shard `index` of the per-sample arrays `names`, read from zarr (their one
        home) and checked against the shard's record first: one CacheError naming the array that differs."""
        record = self.shard_record(index)
        if record is None:
            raise CacheError(f"{self.root}: shard {index} has no record; {repair_hint(self.root)}")
        rows = {name: np.asarray(self.array(name)[record.start:record.stop]) for name in names}
        problem = self.rows_problem(record, names, rows)
        if problem:
            raise CacheError(f"{self.root}: {problem}; {repair_hint(self.root)}")
        return rows

    def lsh_index(self) -> faiss.IndexBinary:
        """The faiss binary index over the view-0 LSH codes (row i = stored sample i), checked against the
        manifest's sha256."""
        record = self.manifest.stats.lsh
        path = self.root / LSH_INDEX_NAME
        if record is None or not path.is_file() or not inside(path, self.root):
            raise CacheError(f"{self.root} has no LSH index; build one without the teacher: "
                             f"`distillery stats {self.root} --lsh-bits 64`")
        data = path.read_bytes()
        if sha256_bytes(data) != record.index_sha256:
            raise CacheError(f"{path} fails its sha256 (corrupt or changed); rebuild it with "
                             f"`distillery stats {self.root}`")
        return faiss.deserialize_index_binary(np.frombuffer(data, np.uint8))

    def statistics(self) -> dict[str, torch.Tensor]:
        """The dataset-level arrays (`stats/...`, docs/cache-format.md#contract), keyed without the `stats/` prefix."""
        names = [n for n in self.manifest.stats.arrays if n.startswith("stats/")]
        return {n.removeprefix("stats/"): torch.from_numpy(self.read(n)) for n in names}

    def teacher_tail(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """ScaleKD's teacher tail (spec, state dict) from `teacher_tail.pt`, after checking its sha256."""
        if "teacher_tail" not in self.manifest.files:
            raise CacheError(f"{self.root} stores no teacher tail; re-run `distillery cache` with --featmaps "
                             f"--teacher-tail N into a new --out (ScaleKD's tpp=true needs it)")
        if not self.tail_verifies() or not inside(self.root / TAIL_NAME, self.root):
            raise CacheError(f"{self.root / TAIL_NAME} is missing or fails its sha256; re-run the `distillery cache` "
                             f"command that made {self.root}")
        stored = torch.load(io.BytesIO((self.root / TAIL_NAME).read_bytes()), map_location="cpu", weights_only=True)
        return stored["spec"], stored["state_dict"]

    def shard_paths(self) -> list[Path | ObjectPath]:
        """The shard files, each confined to `<cache>/shards/` (checked again: symlinks may have changed)."""
        return [confined_path(self.root, s.file, f"manifest shards[{s.index}].file", under=SHARDS_DIR)
                for s in self.manifest.records()]

    def verify_shards(self) -> list[str]:
        """Problems found re-hashing every shard file against the manifest (empty list: all good)."""
        problems = []
        for record, path in zip(self.manifest.records(), self.shard_paths()):
            if not path.is_file():
                problems.append(f"shard {record.index}: {path} is missing")
            elif sha256_file(path) != record.sha256:
                problems.append(f"shard {record.index}: {path} fails its sha256 (corrupt or changed)")
        return problems

    def statistics_problems(self) -> list[str]:
        """Dataset-level arrays, the LSH index and the teacher tail against their digests (all read in
        full: they are small next to the per-sample arrays). Arrays written before digests existed are
        skipped: `undigested_statistics` lists them."""
        problems = []
        for name in self.manifest.stats.arrays:
            if name in self.manifest.digests:
                try:
                    self.read(name)
                except CacheError as e:
                    problems.append(str(e))
        lsh = self.manifest.stats.lsh
        path = self.root / LSH_INDEX_NAME
        if lsh and (not path.is_file() or sha256_file(path) != lsh.index_sha256):
            problems.append(f"{path} is missing or fails its sha256; rebuild it with `distillery stats {self.root}`")
        if "teacher_tail" in self.manifest.files and not self.tail_verifies():
            problems.append(f"{self.root / TAIL_NAME} is missing or fails its sha256; {repair_hint(self.root)}")
        return problems

    def undigested_statistics(self) -> list[str]:
        """Statistics arrays a cache written before digests existed does not digest."""
        return [n for n in self.manifest.stats.arrays if n not in self.manifest.digests
                and n not in self.manifest.arrays]

    def verify_integrity(self) -> list[str]:
        """Every check there is without the teacher (`distillery verify`): each shard file against its
        sha256, each block against its own and decoded, each shard's zarr rows against their digests, and
        `statistics_problems`. One line per problem, naming the file or array; empty: all good."""
        problems = self.verify_shards()
        for record in self.manifest.records():
            try:
                for name, data in self.shard_blocks(record.index):
                    decode_block(data, f"shard {record.index}: block {name}", self.root)
            except CacheError as e:
                if not any(p.startswith(f"shard {record.index}:") for p in problems):
                    problems.append(str(e))
            problem = self.rows_problem(record)
            if problem:
                problems.append(problem)
        return problems + self.statistics_problems()

    def shard_blocks(self, index: int, path: Path | ObjectPath | None = None) -> Iterator[tuple[str, bytes]]:
        """(member name, bytes) of shard `index`, each checked before it is returned: against its record's
        per-block sha256, or (older records) the whole file against the shard's sha256 first. `path`: the
        shard's file as `shard_paths` gave it, when the caller holds it already."""
        record = self.manifest.records()[index]
        path = self.shard_paths()[index] if path is None else path
        if not record.blocks_sha256 and sha256_file(path) != record.sha256:
            raise CacheError(f"shard {index}: {path} fails its sha256 (corrupt or changed); {repair_hint(self.root)}")
        count = 0
        for j, (name, data) in enumerate(iter_tar_members(path)):
            expected = record.blocks_sha256[j] if j < len(record.blocks_sha256) else None
            if record.blocks_sha256 and sha256_bytes(data) != expected:
                raise CacheError(f"shard {index}: block {name} of {path} fails its sha256 (corrupt or changed); "
                                 f"{repair_hint(self.root)}")
            count += 1
            yield name, data
        if record.blocks_sha256 and count != len(record.blocks_sha256):
            raise CacheError(f"shard {index}: {path} has {count} blocks, its record {len(record.blocks_sha256)}; "
                             f"{repair_hint(self.root)}")

    def dense_logits(self, rows: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Logits (N, V, C) float32: dense as stored, or reconstructed from top-k (docs/cache-format.md#contract).

        `rows` may hold block arrays (keys as in `block_key`) to reconstruct a block instead of the
        whole cache.
        """
        def get(name: str) -> torch.Tensor:
            return torch.from_numpy(rows[block_key(name)] if rows is not None else self.read(name))

        names = self.target_arrays(LOGITS)
        if not names:
            raise CacheError(f"{self.root} stores no logits (head-less teacher); re-run `distillery cache` "
                             f"with --logits dense|topk:K")
        return TARGETS[LOGITS].serve({n: get(n) for n in names}, self.num_classes).numpy()
