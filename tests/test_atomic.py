"""Atomic writes honour the umask, so a cache on a team disk can be read by the team (issue 30)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from pipeline.atomic import atomic_write_text, current_umask


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_an_atomically_written_file_gets_the_mode_the_umask_allows(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        atomic_write_text(tmp_path / "manifest.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "manifest.json").stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp file left behind


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None,
                    reason="reading a cache as another account needs root (to switch to `nobody`) and runuser")
def test_another_account_reads_every_file_of_a_cache(digits_cache: Path) -> None:
    # pytest's own temp root is 0700; the copy (modes preserved by copy2) lies in a directory anyone may enter.
    shared = Path(tempfile.mkdtemp(prefix="distillery-shared-"))
    try:
        os.chmod(shared, 0o755)
        shutil.copytree(digits_cache, shared / "cache", copy_function=shutil.copy2)
        files = [p for p in (shared / "cache").rglob("*") if p.is_file()]
        assert any(p.name == "manifest.json" for p in files) and any(p.suffix == ".tar" for p in files)
        read = subprocess.run(["runuser", "-u", "nobody", "--", "cat", *map(str, files)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert read.returncode == 0, read.stderr
    finally:
        shutil.rmtree(shared)
