"""Parse-time tracebacks (issue 29, class 4) and an unreachable object store (class 6): every file a command
opens of a cache is read with a size cap, as UTF-8, nested no deeper than the project writes, and every
problem is one line naming the file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from forgery import manifest_of
from pipeline.cache.manifest import CacheError, Manifest
from pipeline.cache.reader import TeacherCache
from test_cache_faults import cli_error, one_line, run_cli

DEEP = "[" * 100_000 + "]" * 100_000


def refused(call) -> str:
    with pytest.raises(CacheError) as caught:
        call()
    return one_line(caught.value)


@pytest.mark.parametrize("content, expected", [
    (DEEP.encode(), "nests deeper than 32 levels"),
    (json.dumps({"a": 1}).encode()[:-1] + b"\xff\xfe}", "is not UTF-8 text (byte"),
    (b'{"format_version": 2, "format_version": 2}', "is not a cache manifest"),
], ids=["nested", "not-utf8", "not-a-manifest"])
def test_a_manifest_that_does_not_parse_is_one_line(forged: Path, content: bytes, expected: str) -> None:
    (forged / "manifest.json").write_bytes(content)
    message = refused(lambda: Manifest.load(forged))
    assert expected in message or "does not have the fields" in message, message


def test_a_sparse_100_gb_manifest_is_refused_from_its_size(forged: Path) -> None:
    with open(forged / "manifest.json", "r+b") as f:
        f.truncate(100 << 30)  # sparse: no disk used, and never read
    message = refused(lambda: Manifest.load(forged))
    assert "is 107,374,182,400 bytes, more than the 64 MiB such a file can be" in message


def test_deep_zarr_attributes_are_one_line_not_a_recursion_error(forged: Path) -> None:
    path = forged / "arrays.zarr" / "samples" / "labels" / "zarr.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps(meta)[:-1] + ', "attributes": ' + DEEP + "}")
    assert "nests deeper than 32 levels" in refused(lambda: TeacherCache(str(forged)))


def test_a_manifest_fifo_never_blocks(forged: Path) -> None:
    (forged / "manifest.json").unlink()
    os.mkfifo(forged / "manifest.json")
    assert "is not a regular file" in refused(lambda: Manifest.load(forged))


def test_inspect_cli_names_a_nested_manifest_in_one_line(forged: Path) -> None:
    (forged / "manifest.json").write_text(json.dumps({**manifest_of(forged), "teacher": "X"}).replace('"X"', DEEP))
    assert "nests deeper than 32 levels" in cli_error(run_cli("inspect", str(forged)))


def test_an_unreachable_object_store_is_not_called_not_a_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x",
                       "AWS_SECRET_ACCESS_KEY": "y"}.items():
        monkeypatch.setenv(key, value)
    message = refused(lambda: Manifest.load("s3://distillery-nowhere/cache"))
    assert message.startswith("cannot reach s3://distillery-nowhere/cache/manifest.json (EndpointConnectionError")
    assert "not a teacher cache" not in message
