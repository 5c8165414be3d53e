"""The cache writer (docs/cache-format.md#contract): creates or resumes a cache and writes it shard by shard,
then its statistics and side files, and marks it complete.

The teacher pass uses it one shard at a time; shard tasks may run concurrently, as each writes only its own
zarr chunks and files. One process writes a cache at a time: the teacher pass and `distillery stats` hold its
writer lock (`pipeline.cache.lock`) around every use of a writer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from pipeline.cache.blocks import block_digests, block_key, encode_block, write_tar_whole
from pipeline.cache.inputs import InputCodec, Payload
from pipeline.cache.integrity import array_digest, inside, non_finite_rows, rows_digest
from pipeline.cache.layout import (ARRAYS_NAME, LOCK_NAME, LSH_INDEX_NAME, SHARDS_DIR, STAGING_PREFIX, TAIL_NAME,
                                   CacheFiles, open_arrays)
from pipeline.cache.manifest import (CacheError, FileRecord, Manifest, ShardRecord, StatsSection,
                                     identity_mismatch, now_iso)
from pipeline.checksums import sha256_bytes, sha256_file
from pipeline.object_store import ObjectPath, location, write_whole, write_whole_bytes

# zstd level 1 stores float16 teacher outputs as small as zarr's default level 3 (within 1 %) in 2/3 of the
# time, and per-sample rows are written once per shard inside the teacher pass.
ROW_COMPRESSOR = zarr.codecs.ZstdCodec(level=1)


def as_stored_dtype(value: np.ndarray, dtype: str) -> np.ndarray:
    """`value` as a contiguous array of `dtype`. float32 -> float16 goes through torch: its rounding (to
    nearest even) is numpy's bit for bit (tests/cache/test_writer.py), and on CPU ~9x faster."""
    value = np.asarray(value)
    if np.dtype(dtype) == np.float16 and value.dtype == np.float32:
        return torch.from_numpy(np.ascontiguousarray(value)).half().numpy()
    return np.ascontiguousarray(value, dtype=dtype)


def stored_with_identity(root: Path | ObjectPath, manifest: Manifest) -> Manifest | None:
    """The manifest of the cache already at `root`, None when there is none; refused (one line) when its
    identity differs from `manifest`'s: checked before any work (`check_request`) and again when writing."""
    if not (root / "manifest.json").exists():
        return None
    stored = Manifest.load(root)
    diff = identity_mismatch(stored.identity(), manifest.identity())
    if diff:
        raise CacheError(f"{root} holds a cache made with a different {diff}; choose another --out or delete {root}")
    return stored


class CacheWriter(CacheFiles):
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
        stored = stored_with_identity(root, manifest)
        if stored is not None:
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
                    inputs: list[Payload]) -> ShardRecord:
        """Write rows [start, stop) of every per-sample array, then the tar of `inputs` (what
        `InputCodec.store` gives of each sample), then the record (last)."""
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
        codec = InputCodec.of(self.manifest)
        members = []
        for b0 in range(0, stop - start, block):
            b1 = min(b0 + block, stop - start)
            arrays = codec.pack(inputs[b0:b1])
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
