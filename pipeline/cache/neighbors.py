"""Nearest neighbours of a cached sample in the teacher's LSH space (`distillery neighbors`, docs/cache-format.md#contract, docs/cache-format.md#statistics).

Queries the cache's `lsh.faiss` index with the sample's own view-0 code: Hamming distance between the
teacher's binary codes, i.e. how many of the LSH half-spaces separate two samples' teacher features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.cache.manifest import CacheError
from pipeline.cache.reader import TeacherCache
from pipeline.stats.lsh import search


@dataclass(frozen=True)
class Neighbor:
    id: int
    label: int
    class_name: str
    hamming: int


@dataclass(frozen=True)
class Neighborhood:
    """A sample (`query`, Hamming 0 to itself) and its nearest other samples, closest first."""

    query: Neighbor
    neighbors: list[Neighbor]
    bits: int


def lsh_neighbors(cache: TeacherCache, sample_id: int, k: int = 8) -> Neighborhood:
    """The `k` stored samples nearest to `sample_id` by Hamming distance of their LSH codes.

    Raises CacheError for a cache without LSH, an unknown id or k < 1.
    """
    if k < 1:
        raise CacheError(f"--k must be >= 1, not {k}")
    index = cache.lsh_index()
    ids, labels = cache.read("samples/ids"), cache.read("samples/labels")
    found = np.flatnonzero(ids == sample_id)
    if len(found) == 0:
        raise CacheError(f"sample id {sample_id} is not in {cache.root} (ids {ids.min()}..{ids.max()}, "
                         f"{len(ids)} samples)")
    row = int(found[0])
    # One extra result: the sample itself, wherever it falls among other samples with the same code.
    distances, rows = search(index, cache.read("lsh/codes")[row:row + 1, 0], k + 1)
    names = cache.class_names

    def at(r: int, d: int) -> Neighbor:
        return Neighbor(id=int(ids[r]), label=int(labels[r]), class_name=names[labels[r]], hamming=int(d))

    others = [at(r, d) for r, d in zip(rows[0], distances[0]) if r != row and r >= 0][:k]
    return Neighborhood(query=at(row, 0), neighbors=others, bits=index.code_size * 8)
