"""The teacher cache on disk: the one place that knows its file formats (DESIGN.md §4).

```
<cache>/manifest.json               identity, layout, shard records, status
<cache>/arrays.zarr                 zarr v3 group; per-sample arrays chunked along N by shard
<cache>/shards/train-%06d.tar       webdataset shards: blocks of raw inputs + labels + per-view targets
<cache>/shards/train-%06d.json      a finished shard's record (written last; a rerun verifies it)
<cache>/lsh.faiss                   faiss binary index over the view-0 LSH codes (with --lsh-bits)
<cache>/teacher_tail.pt             optional: ScaleKD's frozen teacher tail (spec + state dict), see §6.7
```

`CacheWriter` is used by the teacher pass, one shard at a time (shard tasks may run concurrently: each
writes only its own zarr chunks and files). `TeacherCache` is the read side for everyone else.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO

import faiss
import numpy as np
import torch
import zarr

from pipeline.cache.codecs import topk_decode
from pipeline.atomic import atomic_write, atomic_write_bytes, atomic_write_text
from pipeline.checksums import sha256_file
from pipeline.cache.manifest import CacheError, Manifest, ShardRecord, identity_mismatch, now_iso

ARRAYS_NAME = "arrays.zarr"
LSH_INDEX_NAME = "lsh.faiss"
LSH_ARRAYS = ("lsh/codes", "stats/lsh/planes", "stats/lsh/thresholds")
SHARDS_DIR = "shards"
SHARD_PATTERN = "train-{:06d}.tar"
TAIL_NAME = "teacher_tail.pt"
# zstd level 1 stores float16 teacher outputs as small as zarr's default level 3 (within 1 %) in 2/3 of the
# time, and per-sample rows are written once per shard inside the teacher pass.
ROW_COMPRESSOR = zarr.codecs.ZstdCodec(level=1)

# Logical targets a method may need -> the arrays that serve them (see pipeline.methods.base).
TARGET_ARRAYS: dict[str, tuple[str, ...]] = {
    "logits": ("logits/dense",),
    "logits_topk": ("logits/topk_values", "logits/topk_indices", "logits/tail_logsumexp"),
    "pooled": ("features/pooled",),
    "gaussian": ("gaussian/mean", "gaussian/std"),
    "lsh_codes": ("lsh/codes",),
    "featmaps": ("featmaps/{tap}",),  # named by the stored tap: `TeacherCache.target_arrays` fills it in
}


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


def decode_block(data: bytes) -> dict[str, np.ndarray]:
    out = {}
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            with zf.open(info) as f:
                out[info.filename.removesuffix(".npy")] = np.lib.format.read_array(
                    io.BytesIO(f.read()), allow_pickle=False)
    return out


def block_key(name: str) -> str:
    """zarr array path -> key inside a block (`logits/dense` -> `logits.dense`)."""
    return name.replace("/", ".")


def pack_raw(raws: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Raw images of possibly different sizes -> one zero-padded uint8 array + their (H, W)."""
    hw = np.array([r.shape[:2] for r in raws], dtype=np.int32)
    out = np.zeros((len(raws), hw[:, 0].max(), hw[:, 1].max(), raws[0].shape[2]), dtype=np.uint8)
    for i, r in enumerate(raws):
        out[i, : r.shape[0], : r.shape[1]] = r
    return out, hw


def unpack_raw(raw: np.ndarray, hw: np.ndarray, i: int) -> np.ndarray:
    return raw[i, : hw[i, 0], : hw[i, 1]]


def write_tar_atomic(path: Path, members: list[tuple[str, bytes]]) -> None:
    """Write a tar with mtime 0 under a temp name, then rename: a shard file is whole or absent."""
    def write(f: BinaryIO) -> None:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))

    atomic_write(path, write)


def iter_tar_members(path: str | Path) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(path, "r") as tar:
        for info in tar:
            f = tar.extractfile(info)
            if f is not None:
                yield info.name, f.read()


class _CacheFiles:
    """Paths and zarr access shared by the writer and the reader."""

    manifest: Manifest

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

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
        return record is not None and path.is_file() and sha256_file(path) == record["sha256"]

    def stored_rows_digest(self, start: int, stop: int) -> str:
        """`rows_digest` of rows [start, stop) as zarr holds them now."""
        return rows_digest({name: self.group[name][start:stop] for name in self.manifest.arrays})


def as_stored_dtype(value: np.ndarray, dtype: str) -> np.ndarray:
    """`value` as a contiguous array of `dtype`. float32 -> float16 goes through torch: its rounding (to
    nearest even) is numpy's bit for bit (tests/cache/test_store.py), and on CPU ~9x faster."""
    value = np.asarray(value)
    if np.dtype(dtype) == np.float16 and value.dtype == np.float32:
        return torch.from_numpy(np.ascontiguousarray(value)).half().numpy()
    return np.ascontiguousarray(value, dtype=dtype)


def rows_digest(rows: Mapping[str, np.ndarray]) -> str:
    """sha256 over the arrays' names and bytes, in name order: a shard's rows as a record keeps them."""
    h = hashlib.sha256()
    for name in sorted(rows):
        h.update(name.encode())
        h.update(np.ascontiguousarray(rows[name]).data)
    return h.hexdigest()


class CacheWriter(_CacheFiles):
    """Creates (or resumes) a cache and writes it shard by shard."""

    def __init__(self, root: str | Path, manifest: Manifest) -> None:
        super().__init__(root)
        self.manifest = manifest
        self.group = zarr.open_group(store=str(self.zarr_path), mode="a")

    @classmethod
    def create_or_resume(cls, root: str | Path, manifest: Manifest) -> CacheWriter:
        """Open a cache for writing. An existing cache must have the same identity, else it is refused.

        `manifest.arrays` describes the per-sample arrays (name -> shape, dtype); `manifest.shards`
        the planned shard ranges. A complete cache with the same identity is returned as is.
        """
        root = Path(root)
        if (root / "manifest.json").exists():
            stored = Manifest.load(root)
            diff = identity_mismatch(stored.identity(), manifest.identity())
            if diff:
                raise CacheError(f"{root} holds a cache made with a different {diff}; "
                                 f"choose another --out or delete {root}")
            return cls(root, stored)
        if root.exists() and any(root.iterdir()):
            raise CacheError(f"{root} exists and is not a teacher cache; choose another --out")
        (root / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        writer = cls(root, manifest)
        shard_size = manifest.storage["shard_size"]
        for name, meta in manifest.arrays.items():
            shape = tuple(meta["shape"])
            writer.group.create_array(name, shape=shape, chunks=(shard_size, *shape[1:]), dtype=meta["dtype"],
                                      fill_value=0, compressors=ROW_COMPRESSOR,
                                      config={"write_empty_chunks": True})
        manifest.save(root)
        return writer

    @property
    def per_sample_arrays(self) -> list[str]:
        return list(self.manifest.arrays)

    def finished_record(self, index: int) -> ShardRecord | None:
        """The shard's record if its files exist and verify (tar sha256 and zarr rows), else None."""
        path = self.record_path(index)
        if not path.is_file():
            return None
        record = ShardRecord(**json.loads(path.read_text()))
        shard = self.shard_path(index)
        if not shard.is_file() or sha256_file(shard) != record.sha256:
            return None
        if self.stored_rows_digest(record.start, record.stop) != record.rows_sha256:
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
        rows = {name: as_stored_dtype(rows[name], meta["dtype"]) for name, meta in layout.items()}
        for name, meta in layout.items():
            if rows[name].shape != (stop - start, *meta["shape"][1:]):
                raise CacheError(f"shard {index}: {name} has shape {rows[name].shape}, "
                                 f"expected {(stop - start, *meta['shape'][1:])}")
            self.group[name][start:stop] = rows[name]
        raw, raw_hw = pack_raw(raws)
        block = self.manifest.storage["block_size"]
        members = []
        for b0 in range(0, stop - start, block):
            b1 = min(b0 + block, stop - start)
            arrays = {block_key(n): rows[n][b0:b1] for n in self.per_sample_arrays}
            arrays.update(raw=raw[b0:b1], raw_hw=raw_hw[b0:b1])
            members.append((f"{index:06d}-{b0 // block:06d}.npz", encode_block(arrays)))
        path = self.shard_path(index)
        write_tar_atomic(path, members)
        record = ShardRecord(index=index, start=start, stop=stop, file=str(path.relative_to(self.root)),
                             sha256=sha256_file(path), bytes=path.stat().st_size,
                             rows_sha256=rows_digest(rows))
        atomic_write_text(self.record_path(index), json.dumps(asdict(record)))
        return record

    def write_teacher_tail(self, spec: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> None:
        """Save ScaleKD's teacher tail (DESIGN.md §6.7) atomically and record its sha256 in the manifest.

        `spec` must be plain JSON-able values: the file is read back with `torch.load(weights_only=True)`.
        """
        json.dumps(spec)  # a TypeError here beats an unreadable file later
        path = self.root / TAIL_NAME
        atomic_write(path, lambda f: torch.save({"spec": dict(spec), "state_dict": dict(state_dict)}, f))
        self.manifest.files["teacher_tail"] = {"file": TAIL_NAME, "sha256": sha256_file(path),
                                               "bytes": path.stat().st_size, "family": spec["family"],
                                               "stages": list(spec["stages"])}
        self.manifest.save(self.root)

    def write_stats(self, arrays: Mapping[str, np.ndarray], info: Mapping[str, Any]) -> None:
        """Dataset-level statistics (`stats/...`); replaces earlier ones of the same name."""
        for name, value in arrays.items():
            value = np.asarray(value)
            self.group.create_array(name, shape=value.shape, dtype=value.dtype, overwrite=True,
                                    chunks=value.shape or None)[...] = value
        self.manifest.stats.update(info)

    def write_lsh(self, planes: np.ndarray, thresholds: np.ndarray, codes: np.ndarray,
                  index: faiss.IndexBinary) -> dict[str, Any]:
        """LSH planes and thresholds (`stats/lsh/...`), the view-0 codes `lsh/codes` (N, 1, bits/8) uint8 and
        the neighbour index `lsh.faiss`. Written after the shards (the planes need every feature), so the
        codes live in zarr only, chunked along N by shard like the per-sample arrays. Returns the manifest
        record of the index (its file and sha256); the caller lists the arrays with the other statistics.
        """
        self.write_stats({"stats/lsh/planes": planes, "stats/lsh/thresholds": thresholds}, {})
        self.group.create_array("lsh/codes", shape=codes.shape, dtype="uint8", overwrite=True, fill_value=0,
                                chunks=(self.manifest.storage["shard_size"], *codes.shape[1:]))[...] = codes
        path = self.root / LSH_INDEX_NAME
        atomic_write_bytes(path, faiss.serialize_index_binary(index).tobytes())
        return {"index": LSH_INDEX_NAME, "index_sha256": sha256_file(path)}

    def drop_lsh(self) -> None:
        """Remove the LSH arrays and index (statistics recomputed without LSH)."""
        for name in LSH_ARRAYS:
            if name in self.group:
                del self.group[name]
        (self.root / LSH_INDEX_NAME).unlink(missing_ok=True)

    def finalize(self, records: list[ShardRecord]) -> Manifest:
        """Mark the cache complete: every planned shard has a verified record."""
        planned = {s["index"] for s in self.manifest.shards}
        done = {r.index for r in records}
        if planned != done:
            raise CacheError(f"cannot complete the cache: shards {sorted(planned - done)} are not written")
        self.manifest.shards = [asdict(r) for r in sorted(records, key=lambda r: r.index)]
        self.manifest.status = "complete"
        self.manifest.completed = now_iso()
        self.manifest.save(self.root)
        return self.manifest

    def mark_partial(self) -> None:
        """Recomputing statistics in place: the cache is not complete until they are all written."""
        self.manifest.status = "partial"
        self.manifest.save(self.root)


class TeacherCache(_CacheFiles):
    """Read side of a teacher cache: manifest, zarr arrays, shard files, target reconstruction."""

    def __init__(self, root: str | Path, require_complete: bool = True) -> None:
        super().__init__(root)
        self.manifest = Manifest.load(self.root)
        if require_complete and self.manifest.status != "complete":
            raise CacheError(f"{self.root} is a partial cache (the teacher pass did not finish); "
                             f"re-run the same `distillery cache` command to complete it")
        self.group = zarr.open_group(store=str(self.zarr_path), mode="r")

    @property
    def num_samples(self) -> int:
        return int(self.manifest.dataset["num_samples"])

    @property
    def num_views(self) -> int:
        return int(self.manifest.views["num_augmented"]) + 1

    @property
    def num_classes(self) -> int:
        return int(self.manifest.dataset["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.dataset["class_names"])

    def has(self, name: str) -> bool:
        return name in self.manifest.arrays or name in self.manifest.stats.get("arrays", [])

    def array(self, name: str) -> zarr.Array:
        if name not in self.group:
            raise CacheError(f"{self.root} has no array '{name}'")
        return self.group[name]

    def read(self, name: str) -> np.ndarray:
        return np.asarray(self.array(name)[...])

    def target_arrays(self, target: str) -> tuple[str, ...]:
        """The arrays serving a logical target in this cache (`featmaps` -> `featmaps/<stored tap>`)."""
        return tuple(n.format(tap=self.manifest.storage.get("tap")) for n in TARGET_ARRAYS[target])

    def available_targets(self) -> frozenset[str]:
        """Logical target names this cache can serve (dense or top-k logits both serve 'logits')."""
        found = {t for t in TARGET_ARRAYS if all(self.has(n) for n in self.target_arrays(t))}
        if "logits_topk" in found:
            found.add("logits")
        found.discard("logits_topk")
        return frozenset(found)

    def target_shapes(self, targets: frozenset[str]) -> dict[str, tuple[int, ...]]:
        """Per-sample shape of each logical target served (batch axis left out): logits (C,), pooled (D,),
        gaussian (G*G, Cf) (shape of the mean; the std has the same), lsh_codes (bits/8,), featmaps (Cf, H, W)."""
        shapes = {}
        for target in targets:
            if target == "logits":
                shapes[target] = (self.num_classes,)
            else:
                shapes[target] = tuple(self.array(self.target_arrays(target)[0]).shape[2:])
        return shapes

    def in_shards(self, target: str) -> bool:
        """Whether the webdataset shards carry `target`: not when it is written after them with the
        statistics (the LSH codes), in zarr only."""
        return not any(n in self.manifest.stats.get("arrays", []) for n in TARGET_ARRAYS[target])

    def lsh_index(self) -> faiss.IndexBinary:
        """The faiss binary index over the view-0 LSH codes (row i = stored sample i), checked against the
        manifest's sha256."""
        record = self.manifest.stats.get("lsh")
        path = self.root / LSH_INDEX_NAME
        if record is None or not path.is_file():
            raise CacheError(f"{self.root} has no LSH index; build one without the teacher: "
                             f"`distillery stats {self.root} --lsh-bits 64`")
        if sha256_file(path) != record["index_sha256"]:
            raise CacheError(f"{path} fails its sha256 (corrupt or changed); rebuild it with "
                             f"`distillery stats {self.root}`")
        return faiss.read_index_binary(str(path))

    def statistics(self) -> dict[str, torch.Tensor]:
        """The dataset-level arrays (`stats/...`, DESIGN.md §4), keyed without the `stats/` prefix."""
        names = [n for n in self.manifest.stats.get("arrays", []) if n.startswith("stats/")]
        return {n.removeprefix("stats/"): torch.from_numpy(self.read(n)) for n in names}

    def teacher_tail(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """ScaleKD's teacher tail (spec, state dict) from `teacher_tail.pt`, after checking its sha256."""
        if "teacher_tail" not in self.manifest.files:
            raise CacheError(f"{self.root} stores no teacher tail; re-run `distillery cache` with --featmaps "
                             f"--teacher-tail N into a new --out (ScaleKD's tpp=true needs it)")
        if not self.tail_verifies():
            raise CacheError(f"{self.root / TAIL_NAME} is missing or fails its sha256; re-run the `distillery cache` "
                             f"command that made {self.root}")
        stored = torch.load(self.root / TAIL_NAME, map_location="cpu", weights_only=True)
        return stored["spec"], stored["state_dict"]

    def shard_paths(self) -> list[Path]:
        return [self.root / s["file"] for s in self.manifest.shards]

    def verify_shards(self) -> list[str]:
        """Problems found re-hashing every shard file against the manifest (empty list: all good)."""
        problems = []
        for s in self.manifest.shards:
            path = self.root / s["file"]
            if not path.is_file():
                problems.append(f"shard {s['index']}: {path} is missing")
            elif sha256_file(path) != s["sha256"]:
                problems.append(f"shard {s['index']}: {path} fails its sha256 (corrupt or changed)")
        return problems

    def dense_logits(self, rows: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Logits (N, V, C) float32: dense as stored, or reconstructed from top-k (DESIGN.md §4).

        `rows` may hold block arrays (keys as in `block_key`) to reconstruct a block instead of the
        whole cache.
        """
        def get(name: str) -> np.ndarray:
            return rows[block_key(name)] if rows is not None else self.read(name)

        if "logits/dense" in self.manifest.arrays:
            return get("logits/dense").astype(np.float32)
        if "logits/topk_values" in self.manifest.arrays:
            return topk_decode(torch.from_numpy(get("logits/topk_values").astype(np.float32)),
                               torch.from_numpy(get("logits/topk_indices").astype(np.int64)),
                               torch.from_numpy(get("logits/tail_logsumexp").astype(np.float32)),
                               self.num_classes).numpy()
        raise CacheError(f"{self.root} stores no logits (head-less teacher); re-run `distillery cache` "
                         f"with --logits dense|topk:K")
