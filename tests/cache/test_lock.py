"""The cache writer lock (pipeline.cache.lock): an flock locally, a lock object at a URL (memory:// here;
on S3 in tests/cache/test_object_storage.py)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cache.lock import cache_lock
from pipeline.cache.manifest import CacheError
from pipeline.cache.statistics import recompute_statistics
from pipeline.object_store import holder_note, location

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


@pytest.fixture
def memory_cache(memory_url: str) -> str:
    return f"{memory_url}/cache"


def test_a_cache_at_a_url_is_locked_by_an_object_naming_its_holder(memory_cache: str) -> None:
    lock = location(memory_cache) / ".writer.lock"
    with cache_lock(memory_cache):
        note = json.loads(lock.read_bytes())
        assert note["pid"] == os.getpid() and note["host"] == socket.gethostname()
        line = (rf"^another distillery process is writing {location(memory_cache)} \(pid {os.getpid()} on "
                rf"{re.escape(socket.gethostname())} since .+\); wait for it to finish, then run this again$")
        with pytest.raises(CacheError, match=line), cache_lock(memory_cache):
            pass
        with pytest.raises(CacheError, match=line):  # `distillery stats` takes it too, before reading anything
            recompute_statistics(memory_cache)
        assert json.loads(lock.read_bytes()) == note  # the refused writers left the holder's lock alone
    assert not lock.exists()


def test_a_dead_holders_lock_is_taken_over_and_another_hosts_is_refused_naming_the_lock(memory_cache: str) -> None:
    lock = location(memory_cache) / ".writer.lock"
    elsewhere = {**holder_note(), "host": "elsewhere"}  # no one here can tell whether it still runs
    lock.write_bytes(json.dumps(elsewhere).encode())
    with pytest.raises(CacheError, match=rf"\(pid {elsewhere['pid']} on elsewhere since .+; if it no longer runs, "
                                         rf"delete {lock}$"), cache_lock(memory_cache):
        pass
    assert json.loads(lock.read_bytes()) == elsewhere

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = {**holder_note(), "pid": int(gone.stdout), "started": "1"}  # this host and boot, no longer running
    lock.write_bytes(json.dumps(dead).encode())
    with cache_lock(memory_cache):
        assert json.loads(lock.read_bytes())["pid"] == os.getpid()
    assert not lock.exists()
