"""Each byte once (docs/cache-format.md#contract): a cache's bytes summed per array from its files, and the top-k
logits against TinyViT's 4k+4 bytes per sample-view."""

from __future__ import annotations

import io
import json
import zipfile
from collections import Counter
from pathlib import Path

import numcodecs
import numpy as np
import pytest

from pipeline.cache.blocks import iter_tar_members
from pipeline.cache.reader import TeacherCache
from pipeline.cache.writer import ROW_COMPRESSOR
from pipeline.teacher.cache_pass import run_cache_pass

K = 3


@pytest.fixture(scope="module")
def topk_cache(cache_request, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every kind of per-sample array: top-k logits, pooled features, Gaussians and feature maps."""
    out = tmp_path_factory.mktemp("cache") / "topk"
    run_cache_pass(cache_request(out, subset=200, views=1, logits=f"topk:{K}", featmaps=True, shard_size=100,
                                 block_size=50))
    return out


def zarr_bytes(root: Path, name: str) -> int:
    """Bytes of every file under one zarr array's directory (metadata and chunks)."""
    return sum(p.stat().st_size for p in (root / "arrays.zarr" / name).rglob("*") if p.is_file())


def shard_bytes_per_key(root: Path) -> Counter:
    """Bytes each block key (`logits.dense`, `raw`, ...) takes in the shards, summed over every block."""
    found: Counter = Counter()
    for tar in sorted((root / "shards").glob("*.tar")):
        for _, data in iter_tar_members(tar):
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                for info in zf.infolist():
                    found[info.filename.removesuffix(".npy")] += info.file_size
    return found


def test_no_per_sample_array_is_stored_twice(topk_cache: Path) -> None:
    manifest = json.loads((topk_cache / "manifest.json").read_text())
    in_shards = shard_bytes_per_key(topk_cache)
    per_array = {name: (zarr_bytes(topk_cache, name), in_shards[name.replace("/", ".")]) for name in manifest["arrays"]}
    assert {"logits/topk_indices", "features/pooled", "gaussian/std", "featmaps/layer3"} <= per_array.keys()
    twice = [name for name, (zarr, shards) in per_array.items() if zarr and shards]
    assert not twice, f"stored in zarr and in the shards: {twice} {per_array}"
    assert all(zarr for zarr, _ in per_array.values())  # each has its home
    assert set(in_shards) == {"raw", "raw_shape", "raw_offsets"}  # the shards carry the inputs only


def test_topk_bytes_per_sample_view_are_within_tinyvit_4k_plus_4(topk_cache: Path) -> None:
    cache = TeacherCache(topk_cache)
    names = cache.target_arrays("logits")
    sample_views = cache.num_samples * cache.num_views
    # As stored, before compression: k float16 values, k indices sized to C, one float32 tail log-mass.
    raw = sum(np.dtype(cache.manifest.arrays[n].dtype).itemsize * int(np.prod(cache.manifest.arrays[n].shape[2:]))
              for n in names)
    assert raw <= 4 * K + 4
    # On disk: the compressed chunks, plus the container's overhead computed from the codec itself (what zstd
    # adds to an incompressible chunk of the same length) and each array's zarr.json, amortised over the rows.
    chunk_rows = [r.count for r in cache.manifest.records()]
    overhead = 0
    for n in names:
        row_bytes = cache.array(n).nbytes // cache.num_samples
        overhead += (topk_cache / "arrays.zarr" / n / "zarr.json").stat().st_size
        overhead += sum(framing(rows * row_bytes) for rows in chunk_rows)
    stored = sum(zarr_bytes(topk_cache, n) for n in names)
    assert stored <= (4 * K + 4) * sample_views + overhead, (stored / sample_views, overhead / sample_views)


def framing(length: int) -> int:
    """Bytes the cache's row codec (zstd, `ROW_COMPRESSOR`'s level) adds to `length` incompressible bytes."""
    data = np.random.default_rng(0).integers(0, 256, length, dtype=np.uint8).tobytes()
    return len(numcodecs.Zstd(level=ROW_COMPRESSOR.level).encode(data)) - length


def test_the_bench_counts_every_stored_byte_once_per_sample_view(topk_cache: Path) -> None:
    from pipeline.lab.storage_bench import cache_bytes, tinyvit_bytes

    result = cache_bytes(str(topk_cache))
    cache = TeacherCache(topk_cache)
    sample_views = cache.num_samples * cache.num_views
    on_disk = sum(zarr_bytes(topk_cache, n) for n in cache.manifest.arrays) + sum(
        p.stat().st_size for p in (topk_cache / "shards").glob("*.tar"))
    per_sample = [r for r in result.rows if not r.array.startswith("statistics")]
    assert sum(r.bytes for r in per_sample) * sample_views == pytest.approx(on_disk)
    assert result.total == pytest.approx(sum(r.bytes for r in result.rows))
    assert result.k == K and result.tinyvit == tinyvit_bytes(K) == 4 * K + 4
    assert result.logits_over_tinyvit == pytest.approx(result.logits / (4 * K + 4))


def test_a_format_1_twin_streams_the_same_samples_and_targets(topk_cache: Path, tmp_path: Path) -> None:
    from pipeline.lab.storage_bench import format_1_twin, stream_samples_per_s
    from pipeline.train.stream import CacheStream

    twin = TeacherCache(format_1_twin(str(topk_cache), str(tmp_path / "twin")))
    assert twin.manifest.format_version == 1 and "logits.topk_indices" in shard_bytes_per_key(tmp_path / "twin")
    served = []
    for cache in (TeacherCache(topk_cache), twin):
        batches = list(CacheStream(cache, size=16, targets=frozenset({"logits", "pooled"}), seed=1).loader(0, 64, 0))
        served.append([(b["id"], b["input"], b["targets"]["logits"], b["targets"]["pooled"]) for b in batches])
    for new, old in zip(*served, strict=True):
        for a, b in zip(new, old, strict=True):
            assert a.equal(b)
    assert stream_samples_per_s(str(tmp_path / "twin"), size=16) > 0
