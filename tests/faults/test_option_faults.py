"""Options without upper bounds (issue 29, class 8): every option is bounded by what is meaningful (and the
memory it would need) and refused in one line before any work. The upper bounds of the train settings and the
method options are rows of test_input_faults.py's range tables, beside their lower bounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from forgery import tree_bytes
from pipeline.errors import DistilleryError
from test_cache_faults import cli_error, run_cli


def refused(call) -> str:
    with pytest.raises(DistilleryError) as caught:
        call()
    assert "\n" not in str(caught.value)
    return str(caught.value)


@pytest.mark.parametrize("fields, message", [
    ({"views": 100000}, "--views must be >= 0 and <= 64, not 100000"),
    ({"input_size": 100000}, "--input-size must be >= 8 and <= 1024, not 100000"),
    ({"lsh_bits": 8000000}, "--lsh-bits must be >= 0 and <= 4096, not 8000000"),
    ({"view_seed": 10 ** 20}, "--view-seed must be >= 0 and <= 4294967295, not 100000000000000000000"),
    ({"shard_size": 10 ** 9}, "--shard-size must be >= 1 and <= 65536, not 1000000000"),
    ({"shard_bytes": 0}, "--shard-bytes must be >= 1 and <= 1099511627776, not 0"),
    ({"shard_bytes": 1 << 41}, "--shard-bytes must be >= 1 and <= 1099511627776, not 2199023255552"),
    ({"grid": 10 ** 6}, "--grid must be >= 1 and <= 64, not 1000000"),
])
def test_cache_options_have_upper_bounds(tmp_path: Path, fields, message) -> None:
    from pipeline.teacher.plan import CacheRequest

    assert refused(lambda: CacheRequest(dataset="digits", teacher="test_resnet", out=str(tmp_path / "c"),
                                        **fields)) == message
    assert not (tmp_path / "c").exists()


def test_stats_refuses_lsh_bits_beyond_the_bound_before_any_work(forged: Path) -> None:
    """The issue's `--lsh-bits 8000000`, refused only after the whole pass: now before anything is read."""
    before = tree_bytes(forged)
    line = cli_error(run_cli("stats", str(forged), "--lsh-bits", "8000000"))
    assert "--lsh-bits must be a multiple of 8 in [0, 4096], not 8000000" in line
    assert tree_bytes(forged) == before
