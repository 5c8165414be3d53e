"""The cache writer lock (pipeline.cache.lock)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cache.lock import cache_lock
from pipeline.cache.manifest import CacheError

REPO = Path(__file__).resolve().parents[2]


def test_a_second_process_gets_one_line_until_the_first_ends(tmp_path: Path) -> None:
    probe = ("import sys; from pipeline.cache.lock import cache_lock\n"
             "try:\n    cache_lock(sys.argv[1]).__enter__()\nexcept Exception as e:\n    print(e); sys.exit(2)")

    def second_writer() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True,
                              cwd=REPO, check=False)

    with cache_lock(tmp_path):
        held = second_writer()
        assert held.returncode == 2 and "another distillery process is writing" in held.stdout
    assert second_writer().returncode == 0


def test_a_symlinked_lock_file_is_refused_and_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / ".writer.lock").symlink_to(victim)
    with pytest.raises(CacheError, match="writer lock"), cache_lock(tmp_path / "cache"):
        pass
    assert victim.read_text() == "keep"
