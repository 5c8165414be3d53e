"""The store's own formats: block codec, atomic tar shards, checksums, identity comparison."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.manifest import CacheError, Manifest, identity_mismatch
from pipeline.cache.store import (CacheWriter, TeacherCache, as_stored_dtype, decode_block, encode_block,
                                  iter_tar_members, pack_raw, unpack_raw, write_tar_whole)


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
    import tarfile

    with tarfile.open(path) as tar:
        assert {m.mtime for m in tar.getmembers()} == {0}


def test_verify_detects_a_flipped_byte_in_a_shard(digits_cache: Path, tmp_path: Path) -> None:
    import shutil

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


def test_rewriting_a_shard_records_the_digest_of_what_zarr_holds(digits_cache: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "c"
    shutil.copytree(digits_cache, copy)
    cache = TeacherCache(copy)
    record = cache.manifest.shards[1]
    start, stop = record.start, record.stop
    rows = {name: cache.read(name)[start:stop] for name in cache.manifest.arrays}
    # float32 rows for float16 arrays: stored (and digested) as the manifest's dtype.
    rows = {name: value.astype(np.float32) if value.dtype == np.float16 else value for name, value in rows.items()}
    raws = [np.zeros((8, 8, 1), np.uint8)] * (stop - start)
    writer = CacheWriter(copy, Manifest.load(copy))
    written = writer.write_shard(1, start, stop, rows, raws)
    assert written.rows_sha256 == record.rows_sha256 == writer.stored_rows_digest(start, stop)
    assert writer.finished_record(1) == written

    rows["logits/dense"] = rows["logits/dense"][:, :1]
    with pytest.raises(CacheError, match=r"shard 1: logits/dense has shape .* expected"):
        writer.write_shard(1, start, stop, rows, raws)


def test_float16_storage_rounds_exactly_as_numpy() -> None:
    bits = np.random.default_rng(0).integers(0, 2**32, 2_000_000, dtype=np.uint64).astype(np.uint32)
    values = bits.view(np.float32)
    values = np.concatenate([values[np.isfinite(values)], np.float32([65504, 65519.99, 65520, 2**-25, -0.0])])
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16)
    stored = as_stored_dtype(values, "float16")
    assert stored.dtype == np.float16 and np.array_equal(stored.view(np.uint16), expected.view(np.uint16))
    assert as_stored_dtype(values[::2], "float16").flags.c_contiguous


def test_identity_mismatch_names_the_nested_field() -> None:
    a = {"teacher": {"model": "r18", "taps": ["layer4"]}, "views": {"seed": 0}}
    assert identity_mismatch(a, json.loads(json.dumps(a))) is None
    b = {"teacher": {"model": "r18", "taps": ["layer3"]}, "views": {"seed": 0}}
    assert identity_mismatch(a, b).startswith("teacher.taps")


def test_missing_or_foreign_manifest_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="not a teacher cache"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(CacheError, match="format 99"):
        Manifest.load(tmp_path)


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


def test_teacher_tail_roundtrips_and_a_changed_file_is_refused(digits_cache: Path, tmp_path: Path) -> None:
    import shutil

    import torch

    from pipeline.cache.store import CacheWriter

    copy = tmp_path / "copy"
    shutil.copytree(digits_cache, copy)
    with pytest.raises(CacheError, match="stores no teacher tail.*--teacher-tail N"):
        TeacherCache(copy).teacher_tail()
    spec = {"format": "f", "family": "resnet", "stages": ["layer4"], "input_shape": [3, 2, 2]}
    state = {"0.weight": torch.arange(6.0).reshape(2, 3)}
    writer = CacheWriter(copy, Manifest.load(copy))
    writer.write_teacher_tail(spec, state)
    got_spec, got_state = TeacherCache(copy).teacher_tail()
    assert got_spec == spec and torch.equal(got_state["0.weight"], state["0.weight"])
    assert Manifest.load(copy).files["teacher_tail"].bytes == (copy / "teacher_tail.pt").stat().st_size
    with open(copy / "teacher_tail.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(CacheError, match="fails its sha256"):
        TeacherCache(copy).teacher_tail()
    with pytest.raises(TypeError):  # a spec that is not plain JSON-able values is refused before writing
        writer.write_teacher_tail({**spec, "dtype": torch.float32}, state)
