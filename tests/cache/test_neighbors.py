"""`lsh_neighbors`: a sample's nearest stored samples by Hamming distance of the cached LSH codes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.manifest import CacheError
from pipeline.cache.neighbors import lsh_neighbors
from pipeline.cache.reader import TeacherCache


def test_neighbors_are_the_nearest_codes_by_brute_force(digits_lsh_cache: Path) -> None:
    cache = TeacherCache(digits_lsh_cache)
    ids, labels, codes = cache.read("samples/ids"), cache.read("samples/labels"), cache.read("lsh/codes")[:, 0]
    row = 123
    found = lsh_neighbors(cache, int(ids[row]), k=8)
    hamming = np.unpackbits(codes[row] ^ codes, axis=1).sum(1)
    hamming[row] = 10**6  # the sample itself is not its own neighbour
    assert found.query.id == ids[row] and found.query.hamming == 0 and found.bits == 64
    assert found.query.class_name == cache.class_names[labels[row]]
    assert [n.hamming for n in found.neighbors] == sorted(hamming)[:8]
    for n in found.neighbors:
        r = int(np.flatnonzero(ids == n.id)[0])
        assert n.hamming == hamming[r] and n.label == labels[r] and n.class_name == cache.class_names[labels[r]]
    assert len({n.id for n in found.neighbors}) == 8


def test_unknown_id_bad_k_and_a_cache_without_lsh_are_refused(digits_lsh_cache: Path, digits_cache: Path) -> None:
    cache = TeacherCache(digits_lsh_cache)
    with pytest.raises(CacheError, match="sample id -5 is not in"):
        lsh_neighbors(cache, -5)
    with pytest.raises(CacheError, match="--k must be >= 1"):
        lsh_neighbors(cache, int(cache.read("samples/ids")[0]), k=0)
    with pytest.raises(CacheError, match="distillery stats .* --lsh-bits"):
        lsh_neighbors(TeacherCache(digits_cache), 0)
