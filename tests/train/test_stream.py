"""The training stream: the right view's targets with the exactly re-rendered input, reproducibly, in
bounded memory (docs/ARCHITECTURE.md#data-flow, docs/cache-format.md#contract)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from pipeline.cache.layout import block_sizes
from pipeline.cache.manifest import ShardRange
from pipeline.cache.reader import TeacherCache
from pipeline.data.views import ViewPlan, epoch_views, render_view
from pipeline.cache.targets import GAUSSIAN, LOGITS, POOLED
from pipeline.train.stream import CacheStream, ShardPart, rank_parts, split_parts

ALL = frozenset({LOGITS, POOLED, GAUSSIAN})


def _epoch(stream: CacheStream, epoch: int = 0, batch_size: int = 16, workers: int = 0) -> list[dict]:
    return list(stream.loader(epoch, batch_size, workers))


def _cat(batches: list[dict], key: str) -> torch.Tensor:
    return torch.cat([b[key] for b in batches])


@pytest.mark.parametrize("logits, layout", [("dense", {}), ("topk:3", {}),
                                            ("topk:3", {"format_version": 1, "index_dtype": "int64"})],
                         ids=["dense", "topk", "format-1-int64-topk"])
def test_each_sample_once_with_its_epoch_view_rendered_and_that_views_targets(make_cache, logits, layout) -> None:
    cache = TeacherCache(make_cache(logits=logits, **layout))
    stream = CacheStream(cache, size=12, targets=ALL, seed=5)
    batches = _epoch(stream, epoch=2)
    ids, views = _cat(batches, "id").numpy(), _cat(batches, "view").numpy()
    stored_ids = cache.read("samples/ids")
    assert sorted(ids) == sorted(stored_ids)
    np.testing.assert_array_equal(views, epoch_views(5, 2, ids, cache.num_views))
    assert len(set(views)) == cache.num_views  # the stream really uses the augmented views

    rows = np.searchsorted(stored_ids, ids)
    dense = cache.dense_logits()
    np.testing.assert_array_equal(_cat(batches, "label").numpy(), cache.read("samples/labels")[rows])
    np.testing.assert_array_equal(torch.cat([b["targets"][LOGITS] for b in batches]).numpy(), dense[rows, views])
    np.testing.assert_array_equal(torch.cat([b["targets"][POOLED] for b in batches]).numpy(),
                                  cache.read("features/pooled")[rows, views].astype(np.float32))
    for k, name in enumerate(("gaussian/mean", "gaussian/std")):
        got = torch.cat([b["targets"][GAUSSIAN][k] for b in batches]).numpy()
        np.testing.assert_array_equal(got, cache.read(name)[rows, views].astype(np.float32))
    assert all(b["targets"][LOGITS].dtype == torch.float32 for b in batches)

    # The input is the cached view re-rendered by the teacher's own function, at the student's size.
    plan = ViewPlan(**cache.manifest.views.plan_fields())
    b, i = batches[1], 3
    raw = _raw(cache, int(b["id"][i]))
    teacher = cache.manifest.teacher
    expected = render_view(raw, plan.params(int(b["id"][i]), int(b["view"][i])), 12, teacher.mean, teacher.std)
    torch.testing.assert_close(b["input"][i], expected, rtol=0, atol=0)


def _raw(cache: TeacherCache, sample_id: int) -> np.ndarray:
    """The raw image of one sample, read back through a separate pass over the shards (blocks follow the
    zarr rows' order)."""
    from pipeline.cache.blocks import decode_block, iter_tar_members
    from pipeline.cache.inputs import raw_count, unpack_raw

    row = int(np.flatnonzero(cache.read("samples/ids") == sample_id)[0])
    for path in cache.shard_paths():
        for _, data in iter_tar_members(path):
            block = decode_block(data)
            if row < raw_count(block):
                return unpack_raw(block, row)
            row -= raw_count(block)
    raise KeyError(sample_id)


def test_view_zero_only_pooled_features_serve_view_zero(make_cache) -> None:
    cache = TeacherCache(make_cache(pooled_views="first"))
    batches = _epoch(CacheStream(cache, size=8, targets=frozenset({POOLED}), seed=0))
    rows = np.searchsorted(cache.read("samples/ids"), _cat(batches, "id").numpy())
    np.testing.assert_array_equal(torch.cat([b["targets"][POOLED] for b in batches]).numpy(),
                                  cache.read("features/pooled")[rows, 0].astype(np.float32))
    assert set(batches[0]["targets"]) == {POOLED}


def test_order_is_reproducible_per_seed_and_epoch_and_independent_of_targets(make_cache) -> None:
    cache = TeacherCache(make_cache())
    order = lambda stream, epoch: _cat(_epoch(stream, epoch), "id").tolist()  # noqa: E731
    a = CacheStream(cache, size=8, targets=ALL, seed=1, shuffle_buffer=64)
    bare = CacheStream(cache, size=8, targets=frozenset(), seed=1, shuffle_buffer=64, teacher_size=16)
    assert order(a, 0) == order(a, 0) == order(bare, 0)
    assert order(a, 0) != order(a, 1)
    assert order(a, 0) != order(CacheStream(cache, size=8, targets=ALL, seed=2, shuffle_buffer=64), 0)
    batch = _epoch(bare)[0]
    assert batch["targets"] == {} and batch["teacher_input"].shape[-1] == 16 and batch["input"].shape[-1] == 8


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_per_epoch_is_exact(make_cache, workers) -> None:
    cache = TeacherCache(make_cache(n=230, shard_size=60))
    stream = CacheStream(cache, size=8, targets=frozenset({LOGITS}), seed=0)
    batches = _epoch(stream, batch_size=16, workers=workers)
    assert len(batches) == stream.batches_per_epoch(16, workers)
    assert sorted(_cat(batches, "id").tolist()) == sorted(cache.read("samples/ids").tolist())


def test_split_parts_follows_webdataset_worker_order() -> None:
    parts = [ShardPart(i, 0, 1, i + 1) for i in range(5)]
    assert split_parts(parts, workers=2) == [parts[0::2], parts[1::2]]
    assert split_parts(parts[:2], workers=8) == [[parts[0]], [parts[1]]]  # no idle workers


@pytest.mark.parametrize("num_shards", [1, 3, 4, 7])
@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_rank_parts_give_each_block_to_one_rank_and_each_rank_its_share_within_a_block(num_shards, world_size) -> None:
    shards, start = [], 0
    for i in range(num_shards):  # uneven shards, the last one short
        stop = start + 100 + 37 * (i % 3) - (23 if i == num_shards - 1 else 0)
        shards.append(ShardRange(index=i, start=start, stop=stop))
        start = stop
    blocks = block_sizes(shards, block_size=32)
    assert [sum(b) for b in blocks] == [s.count for s in shards]
    owners: dict[tuple[int, int], list[int]] = {}
    totals = []
    for rank in range(world_size):
        parts = rank_parts(blocks, rank, world_size)
        for p in parts:
            assert p.samples == sum(blocks[p.shard][p.first:p.stop])
            for j in range(p.first, p.stop):
                owners.setdefault((p.shard, j), []).append(rank)
        totals.append(sum(p.samples for p in parts))
    assert owners == {(i, j): owners[(i, j)] for i, b in enumerate(blocks) for j in range(len(b))}
    assert all(len(r) == 1 for r in owners.values())
    assert sum(totals) == start and all(abs(t - start / world_size) <= 32 for t in totals)
    assert rank_parts(blocks, 0, 1) == [ShardPart(i, 0, len(b), sum(b)) for i, b in enumerate(blocks)]


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_streams_see_every_id_once_with_its_epoch_view(make_cache, workers) -> None:
    # 230 samples in 4 shards of 60 (the last 50), blocks of 32: 3 ranks cut shards in the middle.
    cache = TeacherCache(make_cache(n=230, shard_size=60))
    ranks = [CacheStream(cache, size=8, targets=frozenset({LOGITS}), seed=3, rank=r, world_size=3) for r in range(3)]
    seen, batches = [], []
    for stream in ranks:
        epoch = _epoch(stream, epoch=1, batch_size=16, workers=workers)
        assert len(epoch) == stream.batches_per_epoch(16, workers)
        batches.append(len(epoch))
        seen.append(_cat(epoch, "id").numpy())
        np.testing.assert_array_equal(_cat(epoch, "view").numpy(), epoch_views(3, 1, seen[-1], cache.num_views))
    ids = np.concatenate(seen)
    assert sorted(ids.tolist()) == sorted(cache.read("samples/ids").tolist())
    assert ranks[0].steps_per_epoch(16, workers) == max(batches)


def _peak_traced_bytes(stream: CacheStream, repeats: int = 3) -> int:
    """The least, over `repeats` epochs, of an epoch's peak traced allocation above what was live at its start.

    The least, because a one-off spike from elsewhere in the process (zarr's event-loop thread, a dict
    resize) can land in any one epoch; memory the stream holds for the epoch is in every one of them.
    """
    for _ in stream.loader(0, 32, 0):  # warm-up: first-use allocations of torch, numpy and webdataset
        pass
    peaks = []
    tracemalloc.start()
    for _ in range(repeats):
        tracemalloc.reset_peak()
        live = tracemalloc.get_traced_memory()[0]
        for _ in stream.loader(0, 32, 0):
            pass
        peaks.append(tracemalloc.get_traced_memory()[1] - live)
    tracemalloc.stop()
    return min(peaks)


def test_memory_does_not_grow_with_the_number_of_samples(make_cache) -> None:
    # 10x the samples; anything holding the epoch (or the cache) in memory would grow ~10x.
    small = CacheStream(TeacherCache(make_cache("small", n=300)), size=8, targets=ALL, seed=0, shuffle_buffer=64)
    large = CacheStream(TeacherCache(make_cache("large", n=3000)), size=8, targets=ALL, seed=0, shuffle_buffer=64)
    assert _peak_traced_bytes(large) < 2 * _peak_traced_bytes(small)


@pytest.mark.parametrize("workers", [0, 2])
def test_lsh_codes_written_after_the_shards_are_served_from_zarr_by_sample_id(make_cache, workers) -> None:
    from pipeline.cache.targets import LSH_CODES
    from pipeline.cache.statistics import recompute_statistics

    root = make_cache(n=150, shard_size=60)
    recompute_statistics(str(root), lsh_bits=16)
    cache = TeacherCache(root)
    assert not cache.digested_per_shard(LSH_CODES)
    batches = _epoch(CacheStream(cache, size=8, targets=frozenset({LSH_CODES, POOLED}), seed=3), workers=workers)
    ids = _cat(batches, "id").numpy()
    rows = np.searchsorted(cache.read("samples/ids"), ids)
    codes = torch.cat([b["targets"][LSH_CODES] for b in batches])
    assert codes.dtype == torch.uint8 and sorted(ids) == sorted(cache.read("samples/ids"))
    np.testing.assert_array_equal(codes.numpy(), cache.read("lsh/codes")[rows, 0])
