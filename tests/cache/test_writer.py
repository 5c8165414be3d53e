"""The cache writer (`pipeline.cache.writer`): shard records digest what zarr holds, float16 rounding as
numpy's, the teacher tail written whole and recorded."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache.manifest import CacheError, Manifest
from pipeline.cache.reader import TeacherCache
from pipeline.cache.writer import CacheWriter, as_stored_dtype


def test_rewriting_a_shard_records_the_digest_of_what_zarr_holds(digits_cache: Path, tmp_path: Path) -> None:
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


def test_teacher_tail_roundtrips_and_a_changed_file_is_refused(digits_cache: Path, featmaps_cache: Path,
                                                               tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="stores no teacher tail.*--teacher-tail N"):
        TeacherCache(digits_cache).teacher_tail()
    copy = tmp_path / "copy"
    shutil.copytree(featmaps_cache, copy)
    spec, state = TeacherCache(copy).teacher_tail()
    (copy / "teacher_tail.pt").unlink()
    writer = CacheWriter(copy, Manifest.load(copy))
    writer.write_teacher_tail(spec, state)
    got_spec, got_state = TeacherCache(copy).teacher_tail()
    assert got_spec == spec and got_state.keys() == state.keys()
    assert all(torch.equal(got_state[k], state[k]) for k in state)
    assert Manifest.load(copy).files["teacher_tail"].bytes == (copy / "teacher_tail.pt").stat().st_size
    with open(copy / "teacher_tail.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(CacheError, match="fails its sha256"):
        TeacherCache(copy).teacher_tail()
    with pytest.raises(TypeError):  # a spec that is not plain JSON-able values is refused before writing
        writer.write_teacher_tail({**spec, "dtype": torch.float32}, state)
