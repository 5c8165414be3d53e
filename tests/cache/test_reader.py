"""The read side (`pipeline.cache.reader`): shard checks, the raw inputs in zarr row order, target shapes and
statistics, and `BlockReader`'s blocks with their rows and served targets."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.blocks import decode_block, iter_tar_members
from pipeline.cache.inputs import raw_count, unpack_raw
from pipeline.cache.layout import block_sizes
from pipeline.cache.reader import BlockReader, TeacherCache
from pipeline.cache.targets import FEATMAPS, LOGITS, POOLED


def test_verify_detects_a_flipped_byte_in_a_shard(digits_cache: Path, tmp_path: Path) -> None:
    copy = tmp_path / "c"
    shutil.copytree(digits_cache, copy)
    assert TeacherCache(copy).verify_shards() == []
    shard = copy / "shards" / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = TeacherCache(copy).verify_shards()
    assert len(problems) == 1 and "shard 1" in problems[0] and "sha256" in problems[0]


def test_shard_blocks_hold_the_raw_inputs_in_zarr_row_order(digits_cache: Path) -> None:
    from pipeline.data.datasets import load_dataset

    cache = TeacherCache(digits_cache)
    blocks = [decode_block(data) for path in cache.shard_paths() for _, data in iter_tar_members(path)]
    assert all(set(b) == {"raw", "raw_shape", "raw_offsets"} for b in blocks)  # the targets live in zarr only
    raws = [unpack_raw(b, i) for b in blocks for i in range(len(b["raw_shape"]))]
    dataset = load_dataset("digits", "train")
    position = {int(sid): p for p, sid in enumerate(dataset.ids)}
    ids = cache.read("samples/ids")
    assert len(raws) == len(ids) and raws[0].dtype == np.uint8 and raws[0].shape == (8, 8, 1)
    for row in (0, 500, len(ids) - 1):
        assert np.array_equal(raws[row], dataset.raw(position[int(ids[row])]))


def test_reader_serves_target_shapes_and_statistics(digits_cache: Path) -> None:
    cache = TeacherCache(digits_cache)
    shapes = cache.target_shapes(cache.available_targets())
    assert shapes["logits"] == (cache.num_classes,)
    assert shapes["pooled"] == (cache.manifest.teacher.pooled_dim,)
    stats = cache.statistics()
    d = cache.manifest.teacher.pooled_dim
    assert stats["pca/components"].shape == (d, d)
    assert stats["cka/ir"].shape == (cache.num_classes, cache.num_classes)
    np.testing.assert_array_equal(stats["classes/count"].numpy(), cache.read("stats/classes/count"))


def test_block_sizes_are_the_blocks_the_writer_cut(digits_cache: Path) -> None:
    cache = TeacherCache(digits_cache)
    written = [[raw_count(decode_block(data)) for _, data in iter_tar_members(path)] for path in cache.shard_paths()]
    assert block_sizes(cache.manifest.shards, cache.manifest.storage.block_size) == written
    assert any(len(sizes) > 1 for sizes in written)  # shards of several blocks, the last one short


def test_block_reader_gives_each_block_its_rows_and_raw_inputs(digits_cache: Path) -> None:
    cache = TeacherCache(digits_cache)
    reader = BlockReader(cache, frozenset({LOGITS, POOLED}))
    blocks = [block for shard in range(len(cache.manifest.shards)) for block in reader.blocks(shard)]
    assert [len(b) for b in blocks] == [n for sizes in reader.sizes for n in sizes]
    np.testing.assert_array_equal(np.concatenate([b.ids for b in blocks]), cache.read("samples/ids"))
    np.testing.assert_array_equal(np.concatenate([b.labels for b in blocks]), cache.read("samples/labels"))
    np.testing.assert_array_equal(np.concatenate([b.rows["features.pooled"] for b in blocks]),
                                  cache.read("features/pooled"))
    written = [decode_block(data) for path in cache.shard_paths() for _, data in iter_tar_members(path)]
    assert all(np.array_equal(b.image(i), unpack_raw(w, i)) for b, w in zip(blocks, written) for i in (0, len(b) - 1))

    # A part of a shard: its blocks only, with the rows that follow the blocks before them.
    [second] = reader.blocks(0, 1, 2)
    np.testing.assert_array_equal(second.ids, blocks[1].ids)
    np.testing.assert_array_equal(second.rows["logits.dense"], blocks[1].rows["logits.dense"])


def test_block_reader_serves_each_row_at_its_view(digits_cache: Path) -> None:
    cache = TeacherCache(digits_cache)
    reader = BlockReader(cache, frozenset({LOGITS, POOLED}))
    block = next(reader.blocks(2))
    views = np.arange(len(block)) % cache.num_views
    served = reader.served(block, views)
    rows = np.searchsorted(cache.read("samples/ids"), block.ids)
    assert set(served) == {LOGITS, POOLED}
    np.testing.assert_array_equal(served[LOGITS].numpy(), cache.dense_logits()[rows, views])
    np.testing.assert_array_equal(served[POOLED].numpy(), cache.read("features/pooled")[rows, views].astype(np.float32))


def test_block_reader_refuses_a_target_the_cache_does_not_store(digits_cache: Path) -> None:
    with pytest.raises(ValueError, match=f"cannot serve targets \\['{FEATMAPS}'\\]"):
        BlockReader(TeacherCache(digits_cache), frozenset({LOGITS, FEATMAPS}))
