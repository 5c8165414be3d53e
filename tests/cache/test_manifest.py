"""The manifest (`pipeline.cache.manifest`): identity comparison, a missing or foreign manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cache.manifest import CacheError, Manifest, identity_mismatch


def test_identity_mismatch_names_the_nested_field() -> None:
    a = {"teacher": {"model": "r18", "taps": ["layer4"]}, "views": {"seed": 0}}
    assert identity_mismatch(a, json.loads(json.dumps(a))) is None
    b = {"teacher": {"model": "r18", "taps": ["layer3"]}, "views": {"seed": 0}}
    assert identity_mismatch(a, b).startswith("teacher.taps")


def test_missing_or_foreign_manifest_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="not a teacher cache"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(CacheError, match="format 99"):
        Manifest.load(tmp_path)
