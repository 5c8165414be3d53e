"""Path confinement, array digests and the non-finite row finder of pipeline.cache.integrity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.integrity import array_digest, confined_path, non_finite_rows, rows_digest
from pipeline.cache.manifest import CacheError


@pytest.mark.parametrize("relative", ["shards/a.tar", "shards/sub/b.tar"])
def test_plain_paths_inside_the_base_are_kept(tmp_path: Path, relative: str) -> None:
    assert confined_path(tmp_path, relative, "f", under="shards") == tmp_path / relative


@pytest.mark.parametrize("relative", ["/etc/passwd", "../x.tar", "shards/../../x.tar", "shards/../manifest.json",
                                      "pipe:touch X", "shards/c:\\x.tar", "", None, 3, "manifest.json"])
def test_other_paths_are_refused_naming_the_field(tmp_path: Path, relative: object) -> None:
    with pytest.raises(CacheError, match=r"manifest shards\[0\]\.file"):
        confined_path(tmp_path, relative, "manifest shards[0].file", under="shards")


def test_a_symlink_leading_out_of_the_base_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cache" / "shards").mkdir(parents=True)
    (tmp_path / "outside.tar").write_bytes(b"x")
    (tmp_path / "cache" / "shards" / "a.tar").symlink_to(tmp_path / "outside.tar")
    with pytest.raises(CacheError, match="resolves outside"):
        confined_path(tmp_path / "cache", "shards/a.tar", "f", under="shards")


def test_array_digest_sees_zeros_dtype_and_shape() -> None:
    a = np.arange(6, dtype=np.float32)
    digest = array_digest("x", a)
    assert digest == array_digest("x", a.copy())
    assert len({digest, array_digest("x", np.zeros_like(a)), array_digest("x", a.reshape(2, 3)),
                array_digest("x", a.view(np.int32)), array_digest("y", a)}) == 5


def test_rows_digest_is_per_name_and_order_free() -> None:
    a, b = np.arange(3), np.ones(2)
    assert rows_digest({"a": a, "b": b}) == rows_digest({"b": b, "a": a}) != rows_digest({"a": a})


def test_non_finite_rows_after_a_float16_cast() -> None:
    values = np.array([[1.0, 2.0], [70000.0, 0.0], [np.nan, 1.0]], dtype=np.float32)
    assert non_finite_rows(values).tolist() == [2]  # finite in float32 but for the NaN
    with np.errstate(over="ignore"):  # the overflow is the point
        assert non_finite_rows(values.astype(np.float16)).tolist() == [1, 2]
    assert non_finite_rows(np.array([1, 2], dtype=np.int64)).tolist() == []
