"""The read side of a teacher cache (docs/cache-format.md#contract): `TeacherCache` for everyone who reads one
(training, `inspect`, `verify`, `stats`, `neighbors`), and `BlockReader`, the one place that turns a shard's
blocks into rows (the student stream schedules, shuffles and batches what it yields).

A cache is untrusted input: paths are confined to it and every array, shard file and block is checked
against the digest recorded when it was written before it is used (docs/cache-format.md#security).
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
import zarr

from pipeline.bounded import read_bytes, read_json
from pipeline.cache.blocks import block_key, decode_block, iter_tar_members
from pipeline.cache.codecs import read_zstd_bounded
from pipeline.cache.inputs import INPUT_KEYS, InputCodec, raw_count
from pipeline.cache.integrity import (REFUSED, array_digest, confined_path, inside, non_finite_rows, repair_hint,
                                      rows_digest)
from pipeline.cache.layout import (LSH_INDEX_NAME, MAX_METADATA_BYTES, MAX_TAIL_BYTES, SHARDS_DIR, TAIL_NAME,
                                   CacheFiles, block_sizes, open_arrays)
from pipeline.cache.manifest import CacheError, Manifest
from pipeline.cache.targets import FEATMAPS, LOGITS, SAMPLE_ARRAYS, TARGETS, Served
from pipeline.checksums import sha256_bytes, sha256_file
from pipeline.nets.tail import check_teacher_tail
from pipeline.nets.tapped import ModelError
from pipeline.data.datasets import samples_fingerprint
from pipeline.object_store import ObjectPath

# At import, not only when a group opens: a DataLoader worker (a fork server's child) parses the arrays'
# metadata again when it reads them, and imports this module when it unpickles the reader, never calling
# `open_arrays`.
read_zstd_bounded()


class TeacherCache(CacheFiles):
    """Read side of a teacher cache: manifest, zarr arrays, shard files, target reconstruction."""

    def __init__(self, root: str | Path, require_complete: bool = True) -> None:
        super().__init__(root, Manifest.load(root))
        if require_complete and self.manifest.status != "complete":
            raise CacheError(f"{self.root} is a partial cache (the teacher pass did not finish); "
                             f"re-run the same `distillery cache` command to complete it")
        self.check_metadata()
        self.group = open_arrays(self.zarr_path, mode="r")
        self.check_layout()
        if self.manifest.status == "complete":
            self.check_samples()

    def check_metadata(self) -> None:
        """Every `zarr.json` the arrays are opened through, read bounded before zarr parses it (size, UTF-8,
        nesting: zarr's own parse ends in a RecursionError), and each array's shape and chunks bounded by
        what the manifest implies before anything is allocated: a statistics array has no more elements than
        its dimensions (classes, feature widths, LSH bits, N) allow, no chunk is larger than its array or
        a shard (zarr allocates a whole chunk to decode it), and chunks are stored as the cache writes them (raw
        bytes, then zstd, which `pipeline.cache.codecs.BoundedZstdCodec` decodes to the chunk's size at most)."""
        names = [*self.manifest.arrays, *self.manifest.stats.arrays]
        nodes = {""} | {"/".join(n.split("/")[:i]) for n in names for i in range(1, n.count("/") + 2)}
        dims = [self.manifest.dataset.num_classes, self.manifest.storage.lsh_bits,
                *(meta.shape[-1] for meta in self.manifest.arrays.values())]
        statistics_limit = max(dims) ** 2 + self.num_samples * self.manifest.storage.lsh_bits // 8
        hint = "the cache is damaged or crafted: delete it and re-run `distillery cache`"
        for node in sorted(nodes):
            path = self.zarr_path / node / "zarr.json" if node else self.zarr_path / "zarr.json"
            if not path.exists():
                continue  # zarr names what is missing when it is opened
            meta = read_json(path, MAX_METADATA_BYTES, CacheError, hint)
            if not isinstance(meta, dict) or meta.get("node_type") != "array":
                continue
            shape, chunks = meta.get("shape"), meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
            # Along N a chunk is a shard (`storage.shard_size`, more than N in a small cache); else the array.
            sized = _sizes(shape) and _sizes(chunks) and len(chunks) == len(shape)
            if not sized or any(c > max(d, 1, self.manifest.storage.shard_size if axis == 0 else 1)
                                for axis, (c, d) in enumerate(zip(chunks, shape))):
                raise CacheError(f"{path}: shape {shape} with chunks {chunks} is not an array this cache writes; {hint}")
            codecs = [c.get("name") if isinstance(c, dict) else c for c in meta.get("codecs") or []]
            if codecs not in (["bytes"], ["bytes", "zstd"]):  # gzip or blosc would inflate without a bound
                raise CacheError(f"{path}: codecs {codecs} are not the ones this cache writes (bytes, then zstd); "
                                 f"{hint}")
            # A per-sample array's shape is compared with the manifest's by `check_layout` (opening allocates
            # nothing); a statistics array's only bound is the manifest's dimensions.
            if node not in self.manifest.arrays and math.prod(shape) > statistics_limit:
                raise CacheError(f"{path} declares shape {shape}, more than the manifest implies (at most "
                                 f"{statistics_limit:,} elements); {hint}")

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

    def check_samples(self) -> None:
        """The stored ids and labels mean what the manifest records (docs/cache-format.md#security): labels in
        [0, C), ids distinct, and the dataset fingerprint recomputed from them. Digests cannot tell a label
        shifted by one from the teacher's if the forger recomputed them; the fingerprint the manifest records
        (and `verify` compares with the dataset itself) can."""
        try:
            ids, labels, d = self.read("samples/ids"), self.read("samples/labels"), self.manifest.dataset
        except CacheError:  # damaged rows (not their digests): named with their repair where they are read
            return
        outside = np.flatnonzero((labels < 0) | (labels >= d.num_classes))
        if len(outside):
            raise CacheError(f"{self.zarr_path / 'samples/labels'}: row {outside[0]} holds label {labels[outside[0]]}, "
                             f"outside the manifest's {d.num_classes} classes ({len(outside)} such rows); {REFUSED}")
        if len(np.unique(ids)) != len(ids):
            raise CacheError(f"{self.zarr_path / 'samples/ids'} names a sample twice; {REFUSED}")
        if samples_fingerprint(ids, labels, d.class_names) != d.fingerprint:
            raise CacheError(f"{self.root}: the stored ids and labels are not the ones dataset.fingerprint records "
                             f"(rows changed or reordered after the teacher pass); {REFUSED}")

    def check_finite(self, where: str, name: str, value: np.ndarray) -> None:
        """Refuse stored teacher rows holding NaN or inf: the writer refuses them, so they were put there, and
        training on them would end in a NaN loss blamed on the learning rate."""
        bad = non_finite_rows(value)
        if len(bad):
            raise CacheError(f"{self.zarr_path / name}: {where}{len(bad)} rows hold NaN or inf (the cache's "
                             f"values, not a training problem); {REFUSED}")

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
        self.check_finite("", name, value)
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
        for name, value in rows.items():
            self.check_finite(f"shard {index}: ", name, value)
        return rows

    def lsh_index(self) -> faiss.IndexBinary:
        """The faiss binary index over the view-0 LSH codes (row i = stored sample i), checked against the
        manifest's sha256."""
        record = self.manifest.stats.lsh
        path = self.root / LSH_INDEX_NAME
        if record is None or not path.is_file() or not inside(path, self.root):
            raise CacheError(f"{self.root} has no LSH index; build one without the teacher: "
                             f"`distillery stats {self.root} --lsh-bits 64`")
        n, width = self.num_samples, record.bits // 8
        data = read_bytes(path, len(FLAT_INDEX_HEADER.pack(b"", 0, 0, 0, 0, 0, 0)) + n * width, CacheError,
                          f"rebuild it with `distillery stats {self.root}`")
        if sha256_bytes(data) != record.index_sha256:
            raise CacheError(f"{path} fails its sha256 (corrupt or changed); rebuild it with "
                             f"`distillery stats {self.root}`")
        # faiss allocates what the header declares before reading it: the header must be the one a flat
        # binary index of N codes of `bits` has (IndexBinaryFlat: fourcc, d, code_size, ntotal, is_trained,
        # metric, then the codes' byte count).
        if data[:FLAT_INDEX_HEADER.size] != FLAT_INDEX_HEADER.pack(b"IBxF", record.bits, width, n, 1, 1, n * width):
            raise CacheError(f"{path} is not a flat index of {n} codes of {record.bits} bits; rebuild it with "
                             f"`distillery stats {self.root}`")
        return faiss.deserialize_index_binary(np.frombuffer(data, np.uint8))

    def statistics(self) -> dict[str, torch.Tensor]:
        """The dataset-level arrays (`stats/...`, docs/cache-format.md#contract), keyed without the `stats/` prefix."""
        names = [n for n in self.manifest.stats.arrays if n.startswith("stats/")]
        return {n.removeprefix("stats/"): torch.from_numpy(self.read(n)) for n in names}

    def teacher_tail(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """ScaleKD's teacher tail (spec, state dict) from `teacher_tail.pt`, after checking its sha256, its size
        and that the spec implies no more than its weights and the cached feature maps (`check_teacher_tail`)."""
        if "teacher_tail" not in self.manifest.files:
            raise CacheError(f"{self.root} stores no teacher tail; re-run `distillery cache` with --featmaps "
                             f"--teacher-tail N into a new --out (ScaleKD's tpp=true needs it)")
        if not self.tail_verifies() or not inside(self.root / TAIL_NAME, self.root):
            raise CacheError(f"{self.root / TAIL_NAME} is missing or fails its sha256; re-run the `distillery cache` "
                             f"command that made {self.root}")
        hint = f"re-run the `distillery cache` command that made {self.root}"
        if FEATMAPS not in self.available_targets():  # the manifest refuses --teacher-tail without --featmaps
            raise CacheError(f"{self.root} stores a teacher tail but no feature maps for it to produce; {hint}")
        data = read_bytes(self.root / TAIL_NAME, MAX_TAIL_BYTES, CacheError, hint)
        try:
            stored = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            spec, state = stored["spec"], stored["state_dict"]
        except Exception as e:  # noqa: BLE001 - whatever torch's unpickler or a forged layout raises
            raise CacheError(f"{self.root / TAIL_NAME} is not a teacher tail ({type(e).__name__}); {hint}") from None
        try:
            check_teacher_tail(spec, state if isinstance(state, dict) else {},
                               self.target_shapes(frozenset({FEATMAPS}))[FEATMAPS], self.manifest.teacher.input_size)
        except ModelError as e:
            raise CacheError(f"{self.root / TAIL_NAME}: {e}; {hint}") from None
        return spec, state

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


FLAT_INDEX_HEADER = struct.Struct("<4siiqBiQ")
"""How faiss serializes an IndexBinaryFlat ahead of its codes (`faiss/impl/index_write.cpp`)."""


def _sizes(value: object) -> bool:
    """Whether `value` is a list of non-negative integers (an array shape or chunk shape)."""
    return isinstance(value, list) and all(type(d) is int and d >= 0 for d in value)


@dataclass(frozen=True)
class Block:
    """One decoded block of a shard: its samples' stored inputs (`raw`, block keys `INPUT_KEYS`, read back by
    `codec`) and their per-sample rows (`rows`, keyed as `block_key` names the zarr arrays), in stored order."""

    raw: Mapping[str, np.ndarray]
    rows: Mapping[str, np.ndarray]
    codec: InputCodec = InputCodec()

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def ids(self) -> np.ndarray:
        return self.rows[block_key("samples/ids")]

    @property
    def labels(self) -> np.ndarray:
        return self.rows[block_key("samples/labels")]

    def image(self, i: int) -> np.ndarray:
        """Image `i` as uint8 (H, W, C) pixels: decoded from an encoded or source input, else a view into the
        block's bytes (copy it to keep it past the block)."""
        return self.codec.image(self.raw, i)


def _view_rows(arr: np.ndarray, views: np.ndarray) -> np.ndarray:
    """Row i at view `views[i]`; an array storing only view 0 (e.g. pooled features, LSH codes) gives
    view 0."""
    return arr[np.arange(len(views)), views if arr.shape[1] > 1 else 0]


class BlockReader:
    """Reads `cache` block by block, with the rows serving `targets` (logical names, `pipeline.cache.targets`).

    A shard's per-sample rows (ids, labels, targets) are read from zarr and checked against its record's
    digests, then its blocks of raw inputs, each checked against its sha256 before it is decoded, get their
    slice of those rows. Memory holds one shard of rows and one block of inputs, whatever the cache's size.
    A target written after the shards (the view-0 LSH codes) has no digest per shard: its zarr column is read
    whole (checked, N * bits / 8 bytes) and joined to each block by sample id.
    """

    def __init__(self, cache: TeacherCache, targets: frozenset[str]) -> None:
        missing = sorted(targets - cache.available_targets())
        if missing:
            raise ValueError(f"{cache.root} cannot serve targets {missing}")
        self.cache, self.targets = cache, frozenset(targets)
        later = sorted(t for t in targets if not cache.digested_per_shard(t))
        self.columns = {n: cache.read(n) for t in later for n in cache.target_arrays(t)}
        ids = cache.read("samples/ids") if self.columns else np.zeros(0, np.int64)
        self.order = np.argsort(ids, kind="stable")
        self.sorted_ids = ids[self.order]
        self.row_names = [*SAMPLE_ARRAYS, *(n for t in sorted(targets) if cache.digested_per_shard(t)
                                            for n in cache.target_arrays(t))]
        self.codec = InputCodec.of(cache.manifest)  # refuses another decoder before any block is read
        self.paths = cache.shard_paths()  # refuses a shard path outside the cache before any block is read
        self.sizes = block_sizes(cache.manifest.shards, cache.manifest.storage.block_size)

    def blocks(self, shard: int, first: int = 0, stop: int | None = None) -> Iterator[Block]:
        """Blocks [first, stop) of shard `shard` (default: all), each with its rows."""
        sizes, path, root = self.sizes[shard], self.paths[shard], self.cache.root
        stop = len(sizes) if stop is None else stop
        rows, offset, seen = self.cache.shard_rows(shard, self.row_names), sum(sizes[:first]), 0
        for j, (name, data) in enumerate(self.cache.shard_blocks(shard, path)):
            if j >= stop:
                break
            if j < first:
                continue
            raw = decode_block(data, f"{path}: block {name}", root, keys=INPUT_KEYS)
            count = raw_count(raw)
            if count != sizes[j]:
                raise CacheError(f"{path}: block {name} holds {count} samples, its record {sizes[j]}; "
                                 f"{repair_hint(root)}")
            block = {block_key(n): v[offset:offset + count] for n, v in rows.items()}
            yield Block(raw, block | self._column_rows(block[block_key("samples/ids")]), self.codec)
            offset, seen = offset + count, seen + 1
        if seen != stop - first:
            raise CacheError(f"{path} holds {first + seen} blocks, its record at least {stop}; {repair_hint(root)}")

    def _column_rows(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The rows of `ids` of every column held in RAM, keyed like a block's own rows."""
        if not self.columns:
            return {}
        rows = self.order[np.searchsorted(self.sorted_ids, ids)]
        return {block_key(n): a[rows] for n, a in self.columns.items()}

    def served(self, block: Block, views: np.ndarray) -> dict[str, Served]:
        """Each target of every row of `block` at view `views[i]`, served as `pipeline.cache.targets` says
        (top-k logits decoded, ...)."""
        out = {}
        for name in self.targets:
            chosen = {n: torch.from_numpy(_view_rows(block.rows[block_key(n)], views))
                      for n in self.cache.target_arrays(name)}
            out[name] = TARGETS[name].serve(chosen, self.cache.num_classes)
        return out
