"""Destructive repairs (issue 29, class 1): a repair deletes or rewrites only what it owns. `distillery stats`
deletes the arrays the old statistics listed, so a manifest listing anything but statistics arrays (crafted,
digests recomputed) is refused before anything is touched."""

from __future__ import annotations

from pathlib import Path

import pytest

from forgery import forge_manifest, tree_bytes
from pipeline.cache.manifest import CacheError
from pipeline.cache.statistics import recompute_statistics
from test_cache_faults import cli_error, run_cli

NOT_STATISTICS = ["", "samples", "samples/ids", "samples/labels", "logits/dense", "../outside", "arrays.zarr",
                  "stats"]


@pytest.mark.parametrize("name", NOT_STATISTICS)
def test_stats_deletes_nothing_the_old_statistics_do_not_own(forged: Path, name: str) -> None:
    forge_manifest(forged, lambda m: m["stats"]["arrays"].append(name))
    (forged.parent / "outside").mkdir()
    before, beside = tree_bytes(forged), tree_bytes(forged.parent)
    with pytest.raises(CacheError) as refused:
        recompute_statistics(str(forged))
    message = str(refused.value)
    assert "\n" not in message and "stats.arrays" in message and "not a statistics array" in message, message
    assert tree_bytes(forged) == before and tree_bytes(forged.parent) == beside


def test_a_digest_for_a_per_sample_array_is_refused(forged: Path) -> None:
    forge_manifest(forged, lambda m: m["digests"].update({"samples/ids": "0" * 64}))
    before = tree_bytes(forged)
    with pytest.raises(CacheError, match=r"digests lists 'samples/ids', not a statistics array"):
        recompute_statistics(str(forged))
    assert tree_bytes(forged) == before


def test_stats_cli_refuses_an_empty_name_in_one_line_and_keeps_the_arrays(forged: Path) -> None:
    """The issue's example: an entry "" wiped all of `arrays.zarr` and exited 0."""
    forge_manifest(forged, lambda m: m["stats"]["arrays"].insert(0, ""))
    before = tree_bytes(forged)
    line = cli_error(run_cli("stats", str(forged)))
    assert "stats.arrays lists ''" in line and "re-run `distillery cache`" in line, line
    assert tree_bytes(forged) == before
