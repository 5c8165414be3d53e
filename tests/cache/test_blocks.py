"""The block codec and the tar shards (`pipeline.cache.blocks`): byte-stable blocks, raw images packed without
padding (and the padded encoding before it still read), tars written whole with mtime 0."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.blocks import decode_block, encode_block, iter_tar_members, write_tar_whole
from pipeline.cache.inputs import pack_raw, unpack_raw


def test_block_codec_roundtrips_and_is_byte_stable() -> None:
    arrays = {"logits.dense": np.random.default_rng(0).normal(size=(4, 3, 10)).astype(np.float16),
              "ids": np.arange(4, dtype=np.int64)}
    data = encode_block(arrays)
    assert data == encode_block(dict(reversed(arrays.items())))
    out = decode_block(data)
    assert out.keys() == arrays.keys()
    for k in arrays:
        assert out[k].dtype == arrays[k].dtype and np.array_equal(out[k], arrays[k])


def test_block_codec_refuses_object_arrays() -> None:
    with pytest.raises(TypeError, match="object"):
        encode_block({"x": np.array([{"a": 1}], dtype=object)})


def test_raw_images_of_different_sizes_pack_and_unpack() -> None:
    raws = [np.full((5, 7, 3), 1, np.uint8), np.full((9, 4, 3), 2, np.uint8)]
    block = pack_raw(raws)
    assert block["raw"].shape == (5 * 7 * 3 + 9 * 4 * 3,)  # no padding to the largest image
    for i, r in enumerate(raws):
        assert np.array_equal(unpack_raw(block, i), r)


def test_blocks_written_before_unpadded_raw_images_are_still_read() -> None:
    raws = [np.full((5, 7, 1), 1, np.uint8), np.full((9, 4, 1), 2, np.uint8)]
    padded = np.zeros((2, 9, 7, 1), np.uint8)
    for i, r in enumerate(raws):
        padded[i, : r.shape[0], : r.shape[1]] = r
    legacy = decode_block(encode_block({"raw": padded, "raw_hw": np.array([[5, 7], [9, 4]], np.int32)}))
    for i, r in enumerate(raws):
        assert np.array_equal(unpack_raw(legacy, i), r)


def test_tar_shard_is_written_atomically_with_zero_mtime(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    write_tar_whole(path, [("a.npz", b"123"), ("b.npz", b"45")])
    assert not (tmp_path / "s.tar.tmp").exists()
    assert list(iter_tar_members(path)) == [("a.npz", b"123"), ("b.npz", b"45")]
    with tarfile.open(path) as tar:
        assert {m.mtime for m in tar.getmembers()} == {0}
