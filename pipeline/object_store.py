"""Caches and run directories at fsspec URLs (`s3://bucket/prefix`, `gs://`, `memory://`, `file://`): README
"Caches on object storage".

`location(root)` is a `pathlib.Path` for a local directory (unchanged behaviour) and an `ObjectPath` for a URL.
`ObjectPath` offers the subset of `Path` the cache and run-directory code uses (`/`, `name`, `parent`,
`is_file`, `open`, `read_bytes`, `stat().st_size`, ...) over an fsspec filesystem, so one code path serves
both.

Object stores have no rename and no symlinks: an object is written whole by one PUT (`write_whole`), which
the store makes visible all at once, and a key is confined by its normalised prefix (`resolve` is the
identity, `is_relative_to` compares key prefixes; a `..` in a joined name is collapsed before the check).
Nor have they flock: one writer per cache or run directory at a URL is an `ObjectLock`, an object created
exclusively that names its holder.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import posixpath
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, BinaryIO

from pipeline.atomic import atomic_write
from pipeline.errors import DistilleryError
from pipeline.options import OptionError, check_output_dir

if TYPE_CHECKING:  # fsspec (with asyncio) is imported when a URL is opened: local work never pays for it
    import fsspec


def is_url(root: object) -> bool:
    """Whether `root` names a location through an fsspec protocol (`s3://...`) rather than a local path."""
    return isinstance(root, (str, ObjectPath)) and "://" in str(root)


class ObjectPath:
    """A key under an fsspec filesystem with the `pathlib.Path` methods the cache code calls."""

    def __init__(self, fs: fsspec.AbstractFileSystem, key: str) -> None:
        self.fs = fs
        self.key = posixpath.normpath(key).rstrip("/") if key not in ("", "/") else key

    @classmethod
    def from_url(cls, url: str) -> ObjectPath:
        import fsspec

        # No listings cache: another process (or the store's owner) may add or delete objects at any time.
        fs, key = fsspec.core.url_to_fs(url, use_listings_cache=False)
        return cls(fs, key)

    def __truediv__(self, name: str | PurePosixPath) -> ObjectPath:
        return ObjectPath(self.fs, posixpath.join(self.key, str(name)))

    def __str__(self) -> str:
        return self.fs.unstrip_protocol(self.key)

    def as_uri(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: ObjectPath) -> bool:
        return str(self) < str(other)

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.fs, posixpath.dirname(self.key))

    def with_suffix(self, suffix: str) -> ObjectPath:
        return ObjectPath(self.fs, str(PurePosixPath(self.key).with_suffix(suffix)))

    def resolve(self) -> ObjectPath:
        return self  # keys have no symlinks; `..` is collapsed when a path is built

    def is_relative_to(self, other: ObjectPath) -> bool:
        return isinstance(other, ObjectPath) and (self.key == other.key or self.key.startswith(other.key + "/"))

    def relative_to(self, other: ObjectPath) -> PurePosixPath:
        if not self.is_relative_to(other):
            raise ValueError(f"{self} is not under {other}")
        return PurePosixPath(self.key).relative_to(other.key)

    def exists(self) -> bool:
        return self.fs.exists(self.key)

    def is_file(self) -> bool:
        return self.fs.isfile(self.key)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.key)

    def is_symlink(self) -> bool:
        return False

    def iterdir(self) -> Iterator[ObjectPath]:
        for key in self.fs.ls(self.key, detail=False) if self.fs.isdir(self.key) else []:
            yield ObjectPath(self.fs, key)

    def glob(self, pattern: str) -> Iterator[ObjectPath]:
        for key in self.fs.glob(posixpath.join(self.key, pattern)):
            yield ObjectPath(self.fs, key)

    def rglob(self, pattern: str) -> Iterator[ObjectPath]:
        """`pattern` at any depth below this key, this level included (as `Path.rglob`)."""
        return self.glob(f"**/{pattern}")

    def stat(self) -> SimpleNamespace:
        return SimpleNamespace(st_size=int(self.fs.size(self.key)))

    def open(self, mode: str = "rb") -> Any:
        return self.fs.open(self.key, mode)

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.key)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        self.fs.pipe_file(self.key, data)

    def create(self, data: bytes) -> None:
        """Write `data` only if nothing is at this key: FileExistsError otherwise. One exclusive write
        (`If-None-Match: *` on S3, `O_EXCL` for file://), so of two writers racing for a key one gets it."""
        from fsspec.implementations.local import LocalFileSystem

        if isinstance(self.fs, LocalFileSystem):
            self.parent.mkdir()  # a file needs its directory; a key does not (and s3fs's would create a bucket)
        with self.fs.open(self.key, "xb") as f:
            f.write(data)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        self.fs.makedirs(self.key, exist_ok=True)  # prefixes need no creating on object stores; local file:// does

    def unlink(self, missing_ok: bool = False) -> None:
        if self.fs.exists(self.key) or not missing_ok:
            self.fs.rm_file(self.key)


def location(root: str | Path | ObjectPath) -> Path | ObjectPath:
    """`root` as the cache code addresses it: an `ObjectPath` for a URL, else a local `Path` (as before)."""
    if isinstance(root, (Path, ObjectPath)):
        return root
    return ObjectPath.from_url(root) if is_url(root) else Path(root)


def open_binary(path: str | os.PathLike | ObjectPath) -> BinaryIO:
    """`path` opened for reading bytes, local or at a URL."""
    return open(path, "rb") if isinstance(path, (str, os.PathLike)) else path.open("rb")


def write_whole(path: Path | ObjectPath, write: Callable[[BinaryIO], None]) -> None:
    """Write a file whole: `pipeline.atomic.atomic_write` locally; on an object store one PUT of the bytes
    `write` produced (an object is replaced all at once: readers see the old one or the new one)."""
    if isinstance(path, ObjectPath):
        buf = io.BytesIO()
        write(buf)
        path.write_bytes(buf.getvalue())
    else:
        atomic_write(path, write)


def write_whole_bytes(path: Path | ObjectPath, data: bytes) -> None:
    write_whole(path, lambda f: f.write(data))


def check_output_location(root: str | Path, option: str = "--out") -> None:
    """`root` is a directory this process can write in (`pipeline.options.check_output_dir`), or a URL whose
    store takes a write there (a probe object, put and removed: tried, not guessed). Nothing stays behind."""
    if not is_url(root):
        check_output_dir(root, option)
        return
    try:
        path = ObjectPath.from_url(str(root))
    except (ImportError, ValueError) as e:  # an unknown protocol, or its fsspec package is not installed
        raise OptionError(f"{option} {root}: {e}") from None
    try:
        if path.is_file():
            raise OptionError(f"{option} {root} is an object, not a prefix; choose another {option}")
        probe = path / f".distillery-probe.{os.urandom(8).hex()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OptionError(f"{option} {root}: cannot write there ({type(e).__name__}: {e}); choose a writable "
                          f"{option}") from None


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22), None if it is not running:
    with the boot id, what tells a live holder from a dead one whose pid was reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def holder_note() -> dict[str, Any]:
    """This process, as a lock names its holder."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "boot": boot_id(), "started": _process_start(os.getpid())}


def describe_holder(holder: Any) -> str:
    try:
        return f"pid {holder['pid']} on {holder['host']} since {holder['since']}: {holder['command']}"
    except (KeyError, TypeError):
        return "another process"


def dead_here(holder: Any) -> bool:
    """Whether `holder` is a process of this host, this boot, that no longer runs: its lock is stale."""
    try:
        return (holder["host"] == socket.gethostname() and bool(holder["boot"]) and holder["boot"] == boot_id()
                and holder["started"] is not None and _process_start(int(holder["pid"])) != holder["started"])
    except (KeyError, TypeError, ValueError):
        return False


class ObjectLock:
    """One writer at a time for a cache or run directory at a URL: the `lock` object, created exclusively
    (`ObjectPath.create`: of two writers racing, the store lets one create it), naming its holder
    (`holder_note`), removed when the holder is done.

    An object store drops no lock when its holder dies. A lock left by a dead process of this host and boot
    (`dead_here`: its pid gone or started at another time) is taken over; any other is refused with
    `error(in_use(description of the holder))`, and one from another host adds "if it no longer runs, delete
    <lock>", for a person to judge. Takers on one host are serialised by an flock on a file in the temp
    directory, so two never both delete a stale lock and create their own; other hosts never take over.
    """

    def __init__(self, lock: ObjectPath, error: type[DistilleryError], in_use: Callable[[str], str],
                 unwritable: str) -> None:
        self.lock, self.error, self.in_use, self.unwritable = lock, error, in_use, unwritable

    def _note(self) -> tuple[bool, Any]:
        """Whether the lock object exists, and the holder it names (None if unreadable)."""
        try:
            data = self.lock.read_bytes()
        except FileNotFoundError:
            return False, None
        try:
            return True, json.loads(data)
        except ValueError:
            return True, None

    def _refusal(self, holder: Any) -> DistilleryError:
        here = isinstance(holder, dict) and holder.get("host") == socket.gethostname()
        remedy = "" if here else f"; if it no longer runs, delete {self.lock}"
        return self.error(self.in_use(describe_holder(holder)) + remedy)

    def check_free(self) -> None:
        """Refuse if a live process may hold the lock now; takes and writes nothing."""
        held, holder = self._note()
        if held and not dead_here(holder):
            raise self._refusal(holder)

    @contextmanager
    def held(self) -> Iterator[None]:
        note = json.dumps(holder_note()).encode()
        try:
            try:
                self.lock.create(note)
            except FileExistsError:
                self._take_over(note)
        except OSError as e:
            raise self.error(f"cannot create the lock {self.lock} ({type(e).__name__}: {e}); "
                             f"{self.unwritable}") from None
        try:
            yield
        finally:
            self.lock.unlink(missing_ok=True)

    def _take_over(self, note: bytes) -> None:
        key = hashlib.sha256(str(self.lock).encode()).hexdigest()[:24]
        local = Path(tempfile.gettempdir()) / f"distillery-lock-{key}"
        fd = os.open(local, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held, holder = self._note()
            if held:
                if not dead_here(holder):
                    raise self._refusal(holder)
                self.lock.unlink(missing_ok=True)
            try:
                self.lock.create(note)
            except FileExistsError:  # another host created it after the stale one went: it is live
                raise self._refusal(self._note()[1]) from None
        finally:
            os.close(fd)
