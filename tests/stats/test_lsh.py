"""LSH planes, codes and index (docs/cache-format.md#statistics): the stored codes are faiss's IndexLSH codes of the stored
features, every bit splits the training set in half, and `distillery stats --lsh-bits` rebuilds them
from a complete cache without the teacher."""

from __future__ import annotations

import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from pipeline.cache.manifest import CacheError
from pipeline.cache.reader import TeacherCache
from pipeline.cache.targets import LSH_CODES
from pipeline.stats.lsh import build_index, encode, pack_bits, search, train_lsh, training_rows, unpack_bits
from pipeline.cache.statistics import recompute_statistics

BITS = 64  # as `digits_lsh_cache` (tests/conftest.py) is built


def faiss_reference(features: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """An independently trained faiss.IndexLSH: its codes of `features` and its projection minus thresholds."""
    index = faiss.IndexLSH(features.shape[1], bits, True, True)
    index.train(features)
    margin = index.rrot.apply(features) - faiss.vector_to_array(index.thresholds)
    return index.sa_encode(features), margin


def assert_codes_match(codes: np.ndarray, reference: np.ndarray, margin: np.ndarray) -> None:
    """Equal bits, except where the projection lies within 1e-5 of its threshold (float rounding)."""
    ours = np.unpackbits(codes, axis=1, bitorder="little").astype(bool)
    theirs = np.unpackbits(reference, axis=1, bitorder="little").astype(bool)
    differ = ours != theirs
    assert np.all(np.abs(margin[differ]) < 1e-5), margin[differ]


def test_pack_bits_is_lsb_first_like_numpy_and_unpack_inverts_it() -> None:
    bits = torch.from_numpy(np.random.default_rng(0).random((5, 3, 32)) > 0.5)
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 3, 4)
    np.testing.assert_array_equal(packed.numpy(), np.packbits(bits.numpy(), axis=-1, bitorder="little"))
    np.testing.assert_array_equal(unpack_bits(packed).numpy(), bits.numpy().astype(np.uint8))


def test_encoded_codes_equal_faiss_codes_on_random_features() -> None:
    x = np.random.default_rng(1).normal(size=(501, 24)).astype(np.float32)
    projection = train_lsh(x, 40)
    assert projection.planes.shape == (40, 24) and projection.thresholds.shape == (40,) and projection.bits == 40
    reference, margin = faiss_reference(x, 40)
    assert_codes_match(encode(x, projection, torch.device("cpu")), reference, margin)


def test_training_rows_are_all_rows_or_a_seeded_sorted_subset() -> None:
    np.testing.assert_array_equal(training_rows(10, max_rows=10), np.arange(10))
    rows = training_rows(100, seed=3, max_rows=20)
    assert len(np.unique(rows)) == 20 and np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(rows, training_rows(100, seed=3, max_rows=20))


def test_search_ranks_by_hamming_distance() -> None:
    codes = np.random.default_rng(2).integers(0, 256, size=(300, 8), dtype=np.uint8)
    distances, rows = search(build_index(codes), codes[:4], 6)
    brute = np.unpackbits(codes[:4, None] ^ codes[None], axis=-1).sum(-1)
    for q in range(4):
        np.testing.assert_array_equal(distances[q], np.sort(brute[q])[:6])
        np.testing.assert_array_equal(brute[q, rows[q]], distances[q])
    assert rows[0, 0] == 0 and distances[0, 0] == 0


def test_stored_codes_are_faiss_codes_of_the_stored_features(digits_lsh_cache: Path) -> None:
    cache = TeacherCache(digits_lsh_cache)
    features = cache.read("features/pooled")[:, 0].astype(np.float32)
    codes = cache.read("lsh/codes")
    assert codes.shape == (cache.num_samples, 1, BITS // 8) and codes.dtype == np.uint8
    reference, margin = faiss_reference(features, BITS)
    assert_codes_match(codes[:, 0], reference, margin)
    np.testing.assert_array_equal(cache.read("stats/lsh/planes").shape, (BITS, features.shape[1]))


def test_every_bit_splits_the_training_set_in_half(digits_lsh_cache: Path) -> None:
    # The thresholds are per-bit medians over all 1437 rows (odd N: the median row itself is 0), so each
    # bit is 1 on 718/1437 = 49.97 % of them, up to ties at the median; 1 % allows 14 such rows per bit.
    bits = np.unpackbits(TeacherCache(digits_lsh_cache).read("lsh/codes")[:, 0], axis=1, bitorder="little")
    balance = bits.mean(0)
    assert balance.shape == (BITS,) and np.all(np.abs(balance - 0.5) <= 0.01), balance


def test_manifest_lists_lsh_arrays_and_the_cache_serves_codes(digits_lsh_cache: Path) -> None:
    cache = TeacherCache(digits_lsh_cache)
    m = cache.manifest
    assert m.status == "complete" and m.storage.lsh_bits == BITS
    assert {"lsh/codes", "stats/lsh/planes", "stats/lsh/thresholds"} <= set(m.stats.arrays)
    assert m.stats.lsh.bits == BITS and m.stats.lsh.train_rows == cache.num_samples
    assert LSH_CODES in cache.available_targets() and not cache.digested_per_shard(LSH_CODES)
    assert cache.target_shapes(frozenset({LSH_CODES})) == {LSH_CODES: (BITS // 8,)}
    assert {"lsh/planes", "lsh/thresholds"} <= set(cache.statistics())
    # The index holds row i = stored sample i.
    index = cache.lsh_index()
    assert index.ntotal == cache.num_samples
    np.testing.assert_array_equal(np.stack([index.reconstruct(i) for i in range(0, index.ntotal, 97)]),
                                  cache.read("lsh/codes")[::97, 0])


def test_changed_index_file_is_refused(digits_lsh_cache: Path, tmp_path: Path) -> None:
    copy = tmp_path / "c"
    shutil.copytree(digits_lsh_cache, copy)
    faiss.write_index_binary(build_index(np.zeros((3, BITS // 8), np.uint8)), str(copy / "lsh.faiss"))
    with pytest.raises(CacheError, match="sha256"):
        TeacherCache(copy).lsh_index()


def test_stats_without_lsh_bits_keeps_them_and_zero_removes_them(digits_lsh_cache: Path, tmp_path: Path) -> None:
    copy = tmp_path / "c"
    shutil.copytree(digits_lsh_cache, copy)
    before = TeacherCache(copy).read("lsh/codes")
    recompute_statistics(str(copy))
    np.testing.assert_array_equal(TeacherCache(copy).read("lsh/codes"), before)  # faiss's rotation is seeded
    recompute_statistics(str(copy), lsh_bits=0)
    cache = TeacherCache(copy)
    assert LSH_CODES not in cache.available_targets() and not (copy / "lsh.faiss").exists()
    assert "lsh/codes" not in cache.group and cache.manifest.stats.lsh is None
    assert "lsh" not in cache.manifest.stats.to_dict()
    with pytest.raises(CacheError, match="--lsh-bits"):
        cache.lsh_index()
    with pytest.raises(CacheError, match="multiple of 8"):
        recompute_statistics(str(copy), lsh_bits=12)
