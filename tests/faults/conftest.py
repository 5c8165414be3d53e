"""Fault injection (issue 13): every test here tries one fault or bad input against a real cache, run
directory or command, and asserts that it is refused or detected with one line naming the culprit, or
recovered to the same bytes as an uninterrupted run. The tally printed at the end (tests/conftest.py) counts the
faults tried and how many the product handled.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from forgery import SMALL_CACHE


@pytest.fixture(scope="session")
def small_cache(cache_request, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One complete digits cache for the forger's cases (issue 29): 120 samples, 2 views, 3 shards, feature
    maps, teacher tail, 16 LSH bits. Tests tamper with a copy (`forged`), never with this one."""
    from pipeline.teacher.cache_pass import run_cache_pass

    out = tmp_path_factory.mktemp("forger") / "cache"
    run_cache_pass(cache_request(out, **SMALL_CACHE))
    return out


@pytest.fixture
def forged(small_cache: Path, tmp_path: Path) -> Path:
    """A fresh copy of `small_cache` to tamper with."""
    copy = tmp_path / "cache"
    shutil.copytree(small_cache, copy, symlinks=True)
    return copy

