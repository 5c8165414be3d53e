"""The student's training stream over a teacher cache's webdataset shards (docs/ARCHITECTURE.md#data-flow, docs/cache-format.md#contract).

    shards (blocks split by rank, then shards by DataLoader worker, then a seeded shard shuffle)
      -> the cache's `BlockReader`: blocks of raw inputs with their per-sample rows (ids, labels, targets),
         every byte checked against its record's digests before it is decoded
      -> samples, each keeping only the targets of this epoch's view and only that view's crop of the input
      -> seeded shuffle buffer
      -> batches, each rendered at once from its crops (`render_crops`, the teacher's own arithmetic): in the
         DataLoader worker for a CPU student, on the GPU for a CUDA one (`ViewBatches`)
      -> {"input", "label", "id", "view", "targets"[, "teacher_input"]}

The view of a sample in an epoch is `epoch_views(seed, epoch, id)`, so every run with the same seed
sees the same (sample, view) pairs in the same order, whatever else it does (cached or online targets,
an interrupted and resumed run). Memory is bounded by the shuffle buffer, one block of inputs and one
shard of target rows per worker (zarr chunks a shard at a time and digests it whole; lower `--shard-size`
for large per-sample targets): no step reads the whole cache, so it does not grow with the number of
samples. The one exception is a target written after the shards (the view-0 LSH codes), which
`BlockReader` holds in RAM (N * bits / 8 bytes).

Shard files are opened by the cache's reader (a local file, or an object under the cache's own URL through
fsspec: README "Caches on object storage"), never handed to webdataset as URLs: a cache is untrusted, and
webdataset's URL openers interpret schemes (`pipe:` runs a shell). Webdataset's stages still split and
shuffle the shard *indices*.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import webdataset as wds

from pipeline.cache.reader import Block, BlockReader, TeacherCache
from pipeline.cache.targets import Served
from pipeline.data.rendering import DeviceRendered, ViewBatches, worker_context
from pipeline.data.views import ViewPlan, crop_view, epoch_views


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


class CacheStream:
    """Builds each epoch's loader over `cache` for a student rendering at `size`.

    `targets` are the logical target names to serve (`pipeline.cache.targets`); an online run passes
    none and, if the teacher renders at another size than the student, `teacher_size`.
    """

    def __init__(self, cache: TeacherCache, size: int, targets: frozenset[str], seed: int,
                 shuffle_buffer: int = 1024, teacher_size: int | None = None, rank: int = 0,
                 world_size: int = 1) -> None:
        self.reader = BlockReader(cache, frozenset(targets))  # refuses a target or shard path before any epoch
        self.cache, self.size, self.seed = cache, size, seed
        self.shuffle_buffer, self.teacher_size = shuffle_buffer, teacher_size
        teacher = cache.manifest.teacher
        self.mean, self.std = tuple(teacher.mean), tuple(teacher.std)
        self.plan = ViewPlan(**cache.manifest.views.plan_fields())
        self.blocks = self.reader.sizes
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
                                _Unblock(self.reader, self.plan, seed=self.seed, epoch=epoch), *shuffle)

    def _blocks(self, parts: Iterator[dict[str, str]]) -> Iterator[Block]:
        """Each block of this rank's part of a shard, as the cache's reader decodes it."""
        for part in parts:
            index, first, stop = map(int, part["url"].split(":"))
            yield from self.reader.blocks(index, first, stop)

    def loader(self, epoch: int, batch_size: int, workers: int, pin_memory: bool = False,
               device: torch.device | str = "cpu") -> torch.utils.data.DataLoader | DeviceRendered:
        """The epoch's batches with their inputs rendered on `device`, the student's (docs/ARCHITECTURE.md#views):
        on CPU by the DataLoader's workers (or this process without workers), on CUDA here, from crops the
        workers cut."""
        device = torch.device(device)
        workers = 0 if workers == 0 else len(self.streams(workers))
        sizes = {"input": self.size, **({"teacher_input": self.teacher_size} if self.teacher_size is not None else {})}
        batches = ViewBatches(sizes, self.mean, self.std, render_here=device.type == "cpu",
                              interpolation=self.plan.interpolation, resize=self.plan.resize)
        loader = torch.utils.data.DataLoader(self.dataset(epoch), batch_size=batch_size, num_workers=workers,
                                             pin_memory=pin_memory, collate_fn=batches,
                                             multiprocessing_context=worker_context(workers))
        return loader if batches.render_here else DeviceRendered(loader, batches, device)


def _row(target: Served, i: int) -> Served:
    # A copy, so a sample waiting in the shuffle buffer does not keep its whole block alive.
    return tuple(a[i].clone() for a in target) if isinstance(target, tuple) else target[i].clone()


class _Unblock:
    """Pipeline stage: decoded blocks -> one sample per row, with the chosen view's targets and crop only."""

    def __init__(self, reader: BlockReader, plan: ViewPlan, seed: int, epoch: int) -> None:
        self.reader, self.plan, self.seed, self.epoch = reader, plan, seed, epoch

    def __call__(self, blocks: Iterator[Block]) -> Iterator[dict[str, Any]]:
        for block in blocks:
            ids = block.ids
            views = epoch_views(self.seed, self.epoch, ids, self.reader.cache.num_views)
            targets = self.reader.served(block, views)
            labels = block.labels
            for i in range(len(ids)):
                params = self.plan.params(int(ids[i]), int(views[i]))
                # A copy of the crop alone: the shuffle buffer then holds crops, not whole images or blocks.
                yield {"id": int(ids[i]), "view": int(views[i]), "label": int(labels[i]),
                       "crop": crop_view(block.image(i), params).copy(), "flip": params.flip,
                       "targets": {name: _row(t, i) for name, t in targets.items()}}
