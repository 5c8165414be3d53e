"""The student's training stream over a teacher cache's webdataset shards (docs/ARCHITECTURE.md#data-flow, docs/cache-format.md#contract).

    shards (blocks split by rank, then shards by DataLoader worker, then a seeded shard shuffle)
      -> the shard's per-sample rows (ids, labels, targets) from zarr, checked against its record's digests
      -> blocks `NNNNNN-MMMMMM.npz` of raw inputs, each checked against its record's sha256 before it is decoded
      -> samples, each keeping only the targets of this epoch's view
      -> seeded shuffle buffer
      -> re-render exactly that view from the raw input (`render_view`, the teacher's own function)
      -> {"input", "label", "id", "view", "targets"[, "teacher_input"]}

The view of a sample in an epoch is `epoch_views(seed, epoch, id)`, so every run with the same seed
sees the same (sample, view) pairs in the same order, whatever else it does (cached or online targets,
an interrupted and resumed run). Memory is bounded by the shuffle buffer, one block of inputs and one
shard of target rows per worker (zarr chunks a shard at a time and digests it whole; lower `--shard-size`
for large per-sample targets): no step reads the whole cache, so it does not grow with the number of
samples. The one exception is a target written after the shards (the view-0 LSH codes): its zarr column
is held in RAM (N * bits / 8 bytes) and joined to each block by sample id.

Shard files are opened here by `TeacherCache.shard_blocks` (a local file, or an object under the cache's
own URL through fsspec: README "Caches on object storage"), never handed to webdataset as URLs: a cache is
untrusted, and webdataset's URL openers interpret schemes (`pipe:` runs a shell). Webdataset's stages still split and shuffle the shard *indices*.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds

from pipeline.cache.manifest import CacheError, ShardRange
from pipeline.cache.store import RAW_KEYS, TeacherCache, block_key, decode_block, raw_count, repair_hint, unpack_raw
from pipeline.cache.targets import SAMPLE_ARRAYS
from pipeline.data.rendering import worker_context
from pipeline.data.views import ViewPlan, epoch_views, render_view
from pipeline.cache.targets import TARGETS, Served


def epoch_seed(seed: int, epoch: int) -> int:
    """One integer seed per (run seed, epoch) for the shuffles and torch's generator."""
    return seed * 1_000_003 + epoch


@dataclass(frozen=True)
class ShardPart:
    """Blocks [first, stop) of shard `shard`, holding `samples` samples: what one rank reads of that shard."""

    shard: int
    first: int
    stop: int
    samples: int


def block_sizes(shards: list[ShardRange], block_size: int) -> list[list[int]]:
    """Samples per block of each shard: the writer cuts a shard every `block_size`."""
    return [[min(block_size, s.count - b) for b in range(0, s.count, block_size)] for s in shards]


def rank_parts(blocks: list[list[int]], rank: int, world_size: int) -> list[ShardPart]:
    """What rank `rank` of `world_size` reads (README "Distributed students").

    The cache's blocks in shard order are cut into `world_size` contiguous runs: the block whose middle
    sample is at position m (of N) belongs to rank floor(m * world_size / N). So every block, and every
    sample id, goes to exactly one rank, however many shards there are, and each rank's sample count is
    within one block of N / world_size. A single process reads every shard whole.
    """
    total = sum(map(sum, blocks))
    parts, position = [], 0
    for shard, sizes in enumerate(blocks):
        mine = []
        for j, size in enumerate(sizes):
            if (2 * position + size) * world_size // (2 * total) == rank:
                mine.append(j)
            position += size
        if mine:
            parts.append(ShardPart(shard, mine[0], mine[-1] + 1, sum(sizes[mine[0]:mine[-1] + 1])))
    return parts


def split_parts(parts: list[ShardPart], workers: int) -> list[list[ShardPart]]:
    """The shard parts each DataLoader worker of a rank reads, in webdataset's `split_by_worker` order
    (worker::workers); never more workers than parts."""
    streams = max(1, min(workers, len(parts)))
    return [parts[w::streams] for w in range(streams)]


def stream_batches(streams: list[list[ShardPart]], batch_size: int) -> int:
    """Exact: each DataLoader worker batches its own parts, so each ends on a partial batch."""
    return sum(math.ceil(sum(p.samples for p in s) / batch_size) for s in streams)


def _view_rows(arr: np.ndarray, views: np.ndarray) -> np.ndarray:
    """Row i at view `views[i]`; an array storing only view 0 (e.g. pooled features, LSH codes) gives
    view 0."""
    return arr[np.arange(len(views)), views if arr.shape[1] > 1 else 0]


class _RamColumns:
    """Targets the shards do not carry (written after them): their zarr columns in RAM, by sample id."""

    def __init__(self, cache: TeacherCache, targets: frozenset[str]) -> None:
        self.arrays = {n: cache.read(n) for t in sorted(targets) for n in cache.target_arrays(t)}
        ids = cache.read("samples/ids") if self.arrays else np.zeros(0, np.int64)
        self.order = np.argsort(ids, kind="stable")
        self.sorted_ids = ids[self.order]

    def block(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The block's rows of every held column, keyed like the block's own arrays."""
        if not self.arrays:
            return {}
        rows = self.order[np.searchsorted(self.sorted_ids, ids)]
        return {block_key(n): a[rows] for n, a in self.arrays.items()}


class CacheStream:
    """Builds each epoch's loader over `cache` for a student rendering at `size`.

    `targets` are the logical target names to serve (`pipeline.cache.targets`); an online run passes
    none and, if the teacher renders at another size than the student, `teacher_size`.
    """

    def __init__(self, cache: TeacherCache, size: int, targets: frozenset[str], seed: int,
                 shuffle_buffer: int = 1024, teacher_size: int | None = None, rank: int = 0,
                 world_size: int = 1) -> None:
        missing = sorted(targets - cache.available_targets())
        if missing:
            raise ValueError(f"{cache.root} cannot serve targets {missing}")
        self.cache, self.size, self.targets, self.seed = cache, size, frozenset(targets), seed
        self.columns = _RamColumns(cache, frozenset(t for t in targets if not cache.digested_per_shard(t)))
        self.row_names = [*SAMPLE_ARRAYS, *(n for t in sorted(targets) if cache.digested_per_shard(t)
                                            for n in cache.target_arrays(t))]
        self.shuffle_buffer, self.teacher_size = shuffle_buffer, teacher_size
        teacher = cache.manifest.teacher
        self.mean, self.std = tuple(teacher.mean), tuple(teacher.std)
        self.plan = ViewPlan(**cache.manifest.views.plan_fields())
        self.paths = cache.shard_paths()  # refuses a shard path outside the cache before any epoch starts
        self.blocks = block_sizes(cache.manifest.shards, cache.manifest.storage.block_size)
        self.world_size = world_size
        self.parts = rank_parts(self.blocks, rank, world_size)

    def streams(self, workers: int) -> list[list[ShardPart]]:
        return split_parts(self.parts, workers)

    def batches_per_epoch(self, batch_size: int, workers: int) -> int:
        """This rank's batches per epoch (exact)."""
        return stream_batches(self.streams(workers), batch_size)

    def steps_per_epoch(self, batch_size: int, workers: int) -> int:
        """The most batches any rank has: the steps every rank takes, so DDP's all-reduces pair up."""
        return max(stream_batches(split_parts(rank_parts(self.blocks, r, self.world_size), workers), batch_size)
                   for r in range(self.world_size))

    def dataset(self, epoch: int) -> wds.DataPipeline:
        """The epoch's sample stream (an IterableDataset); deterministic for (seed, epoch)."""
        seed = epoch_seed(self.seed, epoch)
        # This rank's shard parts, not paths, travel through webdataset's stages (split by worker, then a
        # deterministic shuffle of the parts). Not `split_by_node`: `rank_parts` has split by rank already.
        parts = [f"{p.shard}:{p.first}:{p.stop}" for p in self.parts]
        shuffle = ([wds.filters.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=seed)]
                   if self.shuffle_buffer >= 1 else [])
        return wds.DataPipeline(wds.SimpleShardList(parts), wds.split_by_worker,
                                wds.filters.detshuffle(len(parts), seed=seed), self._blocks,
                                _Unblock(self.cache, self.targets, self.columns, seed=self.seed, epoch=epoch),
                                *shuffle, self._render)

    def _blocks(self, parts: Iterator[dict[str, str]]) -> Iterator[dict[str, Any]]:
        """Each block of this rank's part of a shard: its raw inputs with its slice of the shard's zarr rows."""
        for part in parts:
            index, first, stop = map(int, part["url"].split(":"))
            sizes = self.blocks[index]
            rows, offset, seen = self.cache.shard_rows(index, self.row_names), sum(sizes[:first]), 0
            for j, (name, data) in enumerate(self.cache.shard_blocks(index, self.paths[index])):
                if j >= stop:
                    break
                if j < first:
                    continue
                raw = decode_block(data, f"{self.paths[index]}: block {name}", self.cache.root, keys=RAW_KEYS)
                count = raw_count(raw)
                if count != sizes[j]:
                    raise CacheError(f"{self.paths[index]}: block {name} holds {count} samples, its record "
                                     f"{sizes[j]}; {repair_hint(self.cache.root)}")
                yield {"raw": raw, "rows": {block_key(n): v[offset:offset + count] for n, v in rows.items()}}
                offset, seen = offset + count, seen + 1
            if seen != stop - first:
                raise CacheError(f"{self.paths[index]} holds {first + seen} blocks, its record at least {stop}; "
                                 f"{repair_hint(self.cache.root)}")

    def loader(self, epoch: int, batch_size: int, workers: int, pin_memory: bool = False) -> torch.utils.data.DataLoader:
        workers = 0 if workers == 0 else len(self.streams(workers))
        return torch.utils.data.DataLoader(self.dataset(epoch), batch_size=batch_size, num_workers=workers,
                                           pin_memory=pin_memory, multiprocessing_context=worker_context(workers))

    def _render(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        # A compose stage rather than `.map`: webdataset's map adds a `__key__` the collate cannot batch.
        for sample in samples:
            params = self.plan.params(sample["id"], sample["view"])
            out = {"input": render_view(sample["raw"], params, self.size, self.mean, self.std),
                   "label": sample["label"], "id": sample["id"], "view": sample["view"],
                   "targets": sample["targets"]}
            if self.teacher_size is not None:
                out["teacher_input"] = render_view(sample["raw"], params, self.teacher_size, self.mean, self.std)
            yield out


def _row(target: Served, i: int) -> Served:
    # A copy, so a sample waiting in the shuffle buffer does not keep its whole block alive.
    return tuple(a[i].clone() for a in target) if isinstance(target, tuple) else target[i].clone()


class _Unblock:
    """Pipeline stage: decoded blocks -> one sample per row, with the chosen view's targets only."""

    def __init__(self, cache: TeacherCache, targets: frozenset[str], columns: _RamColumns, seed: int,
                 epoch: int) -> None:
        self.cache, self.targets, self.columns, self.seed, self.epoch = cache, targets, columns, seed, epoch

    def __call__(self, blocks: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for block in blocks:
            rows = dict(block["rows"])
            ids = rows[block_key("samples/ids")]
            rows.update(self.columns.block(ids))
            views = epoch_views(self.seed, self.epoch, ids, self.cache.num_views)
            targets = {name: self._target(name, rows, views) for name in self.targets}
            labels = rows[block_key("samples/labels")]
            for i in range(len(ids)):
                yield {"id": int(ids[i]), "view": int(views[i]), "label": int(labels[i]),
                       "raw": unpack_raw(block["raw"], i).copy(),
                       "targets": {name: _row(t, i) for name, t in targets.items()}}

    def _target(self, name: str, rows: dict[str, np.ndarray], views: np.ndarray) -> Served:
        """The chosen view of each row, served as `pipeline.cache.targets` says (top-k logits decoded, ...)."""
        chosen = {n: torch.from_numpy(_view_rows(rows[block_key(n)], views)) for n in self.cache.target_arrays(name)}
        return TARGETS[name].serve(chosen, self.cache.num_classes)
