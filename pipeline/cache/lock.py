"""One writer at a time per cache, held for their whole run by the teacher pass (`teacher_pass` in
`pipeline.teacher.cache_pass`: `distillery cache`, the `cache-teacher` flow however it is started,
`distillery verify --repair`) and by `distillery stats`. Readers (training, `inspect`) take no lock: a
writer commits with renames (or whole PUTs) and a manifest written last.

Locally an exclusive `fcntl.flock` on `<cache>/.writer.lock`: the kernel drops it when the process ends (a
killed writer leaves nothing to clean up). At a URL (README "Caches on object storage") the `.writer.lock`
object, created exclusively and naming its holder (`pipeline.object_store.ObjectLock`, the run directory's
lock too): it stops writers on every host, and a killed writer's lock is taken over by the next writer on
its host.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.cache.layout import LOCK_NAME
from pipeline.cache.manifest import CacheError
from pipeline.object_store import ObjectLock, ObjectPath, location


def _in_use(root: Path | ObjectPath, holder: str = "`distillery cache`, `stats` or `verify --repair`") -> str:
    return f"another distillery process is writing {root} ({holder}); wait for it to finish, then run this again"


@contextmanager
def cache_lock(root: str | Path) -> Iterator[None]:
    """Hold the writer lock of the cache at `root` (created if missing); a second writer gets one line."""
    root = location(root)
    if isinstance(root, ObjectPath):
        lock = ObjectLock(root / LOCK_NAME, CacheError, lambda holder: _in_use(root, holder),
                          "the cache must be writable")
        with lock.held():
            yield
        return
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
            raise CacheError(_in_use(root)) from None
        yield
    finally:
        os.close(fd)
