"""Bounded reads of untrusted files: size caps before reading, regular files only, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.bounded import MAX_DEPTH, check_depth, read_bytes, read_json, read_toml
from pipeline.errors import DistilleryError


class Refused(DistilleryError):
    pass


def refuse(call, *args, **kwargs) -> str:
    with pytest.raises(Refused) as e:
        call(*args, Refused, "do this", **kwargs)
    line = str(e.value)
    assert "\n" not in line and line.endswith("; do this")
    return line


def test_a_file_within_its_cap_is_read_whole(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"a": [1, 2, {"b": null}]}')
    assert read_json(tmp_path / "a.json", 100, Refused, "x") == {"a": [1, 2, {"b": None}]}
    assert read_bytes(tmp_path / "a.json", 26, Refused, "x") == (tmp_path / "a.json").read_bytes()


def test_a_file_over_its_cap_is_refused_from_its_size_without_reading_it(tmp_path: Path) -> None:
    sparse = tmp_path / "manifest.json"
    with open(sparse, "wb") as f:
        f.truncate(100 * 2 ** 30)  # 100 GiB of holes: reading it would take minutes and all the memory
    assert "107,374,182,400 bytes, more than the 4 KiB" in refuse(read_bytes, sparse, 4096)


def test_a_fifo_is_refused_at_once_instead_of_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "summary.json"
    os.mkfifo(fifo)
    code = (f"from pipeline.bounded import read_json; from pipeline.errors import DistilleryError as E\n"
            f"try: read_json(__import__('pathlib').Path({str(fifo)!r}), 100, E, 'x')\n"
            f"except E as e: print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == f"{fifo} is not a regular file; x"


@pytest.mark.parametrize("content, message", [
    (b"\xc3\x28", "is not UTF-8 text (byte 0)"),
    (b'{"a": ', "is not valid JSON"),
    (b'{"a": NaN}', "NaN is not a number JSON allows"),
    (b"[" * 100_000 + b"]" * 100_000, f"nests deeper than {MAX_DEPTH} levels"),
    (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), f"nests deeper than {MAX_DEPTH} levels"),
])
def test_bad_json_is_one_line(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "f.json").write_bytes(content)
    assert message in refuse(read_json, tmp_path / "f.json", 1 << 20)


def test_a_key_given_twice_is_refused_only_where_keys_must_be_unique(tmp_path: Path) -> None:
    (tmp_path / "f.json").write_text('{"a": {"Trouser": [1], "Trouser": [2]}}')
    assert read_json(tmp_path / "f.json", 1 << 20, Refused, "x") == {"a": {"Trouser": [2]}}
    assert 'names "Trouser" twice in one object' in refuse(read_json, tmp_path / "f.json", 1 << 20, unique_keys=True)


def test_the_deepest_accepted_nesting_is_max_depth(tmp_path: Path) -> None:
    (tmp_path / "f.json").write_text("[" * MAX_DEPTH + "]" * MAX_DEPTH)
    assert read_json(tmp_path / "f.json", 1 << 20, Refused, "x") is not None
    assert check_depth({"a": [{"b": 1}]}, "w", Refused, "x", limit=3) == {"a": [{"b": 1}]}


@pytest.mark.parametrize("content, message", [
    ("a = " + "[" * 5000 + "]" * 5000, "nests deeper than"),
    ("a = " + "[" * 40 + "]" * 40, "nests deeper than"),
    ("a = ", "is not valid TOML"),
    ("[a]\n" + "b = {c = {d = {e = 1}}}\n" * 1, None),
])
def test_toml_is_bounded_the_same_way(tmp_path: Path, content: str, message: str | None) -> None:
    (tmp_path / "spec.toml").write_text(content)
    if message is None:
        assert read_toml(tmp_path / "spec.toml", 1 << 20, Refused, "x") == {"a": {"b": {"c": {"d": {"e": 1}}}}}
    else:
        assert message in refuse(read_toml, tmp_path / "spec.toml", 1 << 20)
