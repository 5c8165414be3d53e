"""One writer at a time per cache: an exclusive `fcntl.flock` on `<cache>/.writer.lock`.

Held by `distillery cache`, `distillery stats` and `distillery verify --repair` for their whole run; the
kernel drops it when the process ends (a killed writer leaves nothing to clean up). Readers (training,
`inspect`) take no lock: a writer commits with renames and a manifest written last.

A cache at a URL (README "Caches on object storage") takes no lock: object stores have no flock, and a
lock file on one host does not stop a writer on another. One writer per cache there is the user's to keep
(each object is still written whole and the manifest last, so readers never see a half-written cache).
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.cache.manifest import CacheError
from pipeline.cache.store import LOCK_NAME
from pipeline.object_store import is_url


@contextmanager
def cache_lock(root: str | Path) -> Iterator[None]:
    """Hold the writer lock of the cache at `root` (created if missing); a second writer gets one line."""
    if is_url(root):
        yield  # no lock on object storage (module docstring)
        return
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    try:
        # O_NOFOLLOW: a symlink planted as the lock file is refused, never created or opened through.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise CacheError(f"cannot open the writer lock {path} ({e.strerror}); it must be a plain file in the "
                         f"cache directory") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise CacheError(f"another distillery process is writing {root} (`distillery cache`, `stats` or "
                             f"`verify --repair`); wait for it to finish, then run this again") from None
        yield
    finally:
        os.close(fd)
