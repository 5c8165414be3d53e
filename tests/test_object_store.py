"""A cache at an fsspec URL reads like the same cache on disk, and its paths stay confined by key prefix
(README "Caches on object storage"); fsspec's in-memory filesystem, no server needed."""

from __future__ import annotations

from pathlib import Path

import fsspec
import numpy as np
import pytest

from pipeline.cache.integrity import confined_path
from pipeline.cache.manifest import CacheError
from pipeline.cache.layout import SHARDS_DIR
from pipeline.cache.reader import TeacherCache
from pipeline.object_store import ObjectPath, check_output_location, location
from pipeline.options import OptionError


@pytest.fixture
def memory_copy(digits_cache: Path):
    """`digits_cache` uploaded to memory://, object by object; removed afterwards."""
    fs = fsspec.filesystem("memory")
    fs.put(str(digits_cache), "/digits-copy", recursive=True)
    yield "memory://digits-copy"
    fs.rm("/digits-copy", recursive=True)


def test_a_cache_at_a_url_reads_verifies_and_streams_the_same_bytes(digits_cache: Path, memory_copy: str) -> None:
    local, remote = TeacherCache(digits_cache), TeacherCache(memory_copy)
    assert isinstance(remote.root, ObjectPath) and str(remote.root).startswith("memory://")
    assert remote.verify_integrity() == []
    for name in local.manifest.arrays:
        np.testing.assert_array_equal(remote.read(name), local.read(name))
    assert list(remote.shard_blocks(1)) == list(local.shard_blocks(1))
    np.testing.assert_array_equal(remote.statistics()["pca/components"], local.statistics()["pca/components"])


def test_a_damaged_object_is_named(memory_copy: str) -> None:
    cache = TeacherCache(memory_copy)
    shard = cache.shard_paths()[2]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a block (a tar ends in zero padding no check reads)
    shard.write_bytes(bytes(data))
    assert cache.verify_integrity()[0].startswith(f"shard 2: {shard} fails its sha256")


@pytest.mark.parametrize("crafted", ["../other/shards/x.tar", "/bucket/shards/x.tar", "shards/../manifest.json",
                                     "shards/../../digits-copy/shards/x.tar", "s3://elsewhere/x.tar"])
def test_manifest_keys_outside_the_shards_prefix_are_refused(crafted: str) -> None:
    root = location("memory://bucket/cache")
    with pytest.raises(CacheError, match="the cache is refused"):
        confined_path(root, crafted, "manifest shards[0].file", under=SHARDS_DIR)
    assert str(confined_path(root, "shards/train-000000.tar", "f", under=SHARDS_DIR)) == \
        "memory:///bucket/cache/shards/train-000000.tar"


def test_a_local_path_stays_a_path(tmp_path: Path) -> None:
    assert location(str(tmp_path)) == tmp_path and isinstance(location(str(tmp_path)), Path)
    joined = location("memory://bucket/cache") / "shards/../../evil"
    assert not joined.is_relative_to(location("memory://bucket/cache"))


@pytest.mark.parametrize("url", ["memory://exclusive/run.lock", "file://{tmp}/new/run.lock"])  # a new directory
def test_create_is_exclusive(url: str, tmp_path: Path) -> None:
    path = location(url.format(tmp=tmp_path))
    path.create(b"first")
    with pytest.raises(FileExistsError):
        path.create(b"second")
    assert path.read_bytes() == b"first"
    path.unlink()


def test_an_output_url_is_probed_and_left_as_it_was() -> None:
    check_output_location("memory://probed/run")
    assert fsspec.filesystem("memory").find("/probed") == []  # the probe object is gone
    location("memory://probed/file").write_bytes(b"x")
    with pytest.raises(OptionError, match=r"^--out memory://probed/file is an object, not a prefix"):
        check_output_location("memory://probed/file")
    with pytest.raises(OptionError, match=r"^--out nosuch://a/b: Protocol not known: nosuch$"):
        check_output_location("nosuch://a/b")
    fsspec.filesystem("memory").rm("/probed", recursive=True)
