"""`distillery neighbors` on a GPU: with the `gpu` extra's faiss build and a GPU, the cache's binary index is
searched as a `GpuIndexBinaryFlat`, with the CPU index's results. Skipped, saying why, elsewhere."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from pipeline.cache.neighbors import lsh_neighbors
from pipeline.cache.reader import TeacherCache
from pipeline.stats.lsh import _searcher, build_index, search

pytestmark = [
    pytest.mark.skipif(not hasattr(faiss, "GpuIndexBinaryFlat"),
                       reason="this faiss is a CPU build; the GPU index needs the gpu extra (make venv FAISS=gpu)"),
    pytest.mark.skipif(hasattr(faiss, "GpuIndexBinaryFlat") and faiss.get_num_gpus() == 0,
                       reason="faiss sees no GPU on this machine"),
]


def test_codes_are_searched_on_the_gpu_as_on_the_cpu() -> None:
    codes = np.random.default_rng(4).integers(0, 256, size=(5000, 8), dtype=np.uint8)
    index = build_index(codes)
    assert isinstance(_searcher(index), faiss.GpuIndexBinaryFlat)
    distances, rows = search(index, codes[:64], 16)
    cpu_distances, _ = index.search(codes[:64], 16)  # the CPU index itself
    np.testing.assert_array_equal(distances, cpu_distances)
    brute = np.unpackbits(codes[:64, None] ^ codes[None], axis=-1).sum(-1)
    np.testing.assert_array_equal(np.take_along_axis(brute, rows, 1), distances)  # ties may order rows apart


def test_neighbors_of_a_cached_sample_on_the_gpu(digits_lsh_cache: Path) -> None:
    cache = TeacherCache(digits_lsh_cache)
    assert isinstance(_searcher(cache.lsh_index()), faiss.GpuIndexBinaryFlat)
    ids, codes = cache.read("samples/ids"), cache.read("lsh/codes")[:, 0]
    row = 77
    found = lsh_neighbors(cache, int(ids[row]), k=8)
    hamming = np.unpackbits(codes[row] ^ codes, axis=1).sum(1)
    hamming[row] = 10**6
    assert [n.hamming for n in found.neighbors] == sorted(hamming)[:8]
