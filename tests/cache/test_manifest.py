"""The manifest (`pipeline.cache.manifest`): identity comparison and fingerprint, a missing or foreign manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cache.manifest import CacheError, Manifest, identity_mismatch

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "cache-v1-before-targets"


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


def test_fingerprint_is_the_identitys_and_never_changes_formula() -> None:
    """Student run directories record it (a resume must find it again), so the fixture's stays this value."""
    manifest = Manifest.load(FIXTURE)
    assert manifest.fingerprint() == "45f23dfc722c31f2c0023286369de18605c5e06c4f736912225ff6bb0ec6679b"
    moved = manifest.model_copy(deep=True)
    moved.teacher.checkpoint = "/elsewhere/teacher.pt"  # where the checkpoint lies is provenance
    moved.status = "partial"
    assert moved.fingerprint() == manifest.fingerprint()
    other = manifest.model_copy(deep=True)
    other.views.seed += 1
    assert other.fingerprint() != manifest.fingerprint()
