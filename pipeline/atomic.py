"""Atomic file writes: a reader sees the old file or the new one, never half of either.

The temporary file gets a unique, unpredictable name created with ``O_EXCL`` (``tempfile.mkstemp``), so a
symlink planted under a predictable temp name in a cache or run directory is never followed; the final
``os.replace`` swaps the directory entry (a symlink at the target is replaced, not written through).
``mkstemp`` creates the file 0600 whatever the umask; the file is given the mode any Unix tool would create
(``0666 & ~umask``: 0644 under umask 022) before it is renamed into place, so a cache or run directory on a
team disk is readable by the team (docs/operations.md#sharing).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def current_umask() -> int:
    """This process's umask, read without changing it (``os.umask`` can only be read by setting it, which
    races with other threads creating files); Linux reports it in /proc/self/status since 4.7."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on a fresh temp file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
