"""Bounded reads of files that come from someone else: a cache, a run directory, a spec or sweep file.

Every read is capped before it starts (a 100 GB sparse `manifest.json` is refused from its size, not read
whole), only regular files are read (a FIFO named `summary.json` would block forever, a device never ends),
and every way the bytes can be wrong (not UTF-8, not JSON/TOML, nested deeper than any file the project
writes) is the one line of the caller's :class:`DistilleryError` naming the file and what to do
(docs/cache-format.md, security model).
"""

from __future__ import annotations

import json
import os
import stat
import tomllib
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from pipeline.errors import DistilleryError


class ObjectPath(Protocol):
    """What is read of `pipeline.object_store.ObjectPath` (a layer above this module): its size and bytes."""

    def stat(self) -> Any: ...

    def open(self, mode: str = "rb") -> BinaryIO: ...

MAX_DEPTH = 32
"""Deepest nesting of lists and tables accepted: the project's own files nest at most 5 deep."""

KIB, MIB = 1 << 10, 1 << 20


def _size(limit: int) -> str:
    return f"{limit / MIB:g} MiB" if limit >= MIB else f"{limit / KIB:g} KiB"


def read_bytes(path: Path | ObjectPath, limit: int, error: type[DistilleryError], hint: str) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them; otherwise ``error`` (one line that
    names ``path`` and ends with ``hint``, what the user can do)."""
    if not isinstance(path, Path):  # an object store: sizes are what the store says, reads stop at the cap
        try:
            size = path.stat().st_size
            data = b"" if size > limit else path.open("rb").read(limit + 1)
        except (OSError, ValueError) as e:
            raise error(f"cannot read {path} ({type(e).__name__}: {e}); {hint}") from None
    else:
        with open_regular(path, limit, error, hint) as f:
            # read(n) allocates n bytes first: ask for the file's size (a 2 GiB cap is not a 2 GiB buffer), and
            # for the rest of the cap only if the file grew since.
            size = os.fstat(f.fileno()).st_size
            data = f.read(size + 1)
            if len(data) > size:
                data += f.read(limit - len(data) + 1)
        size = len(data)
    if size > limit or len(data) > limit:
        raise error(_too_big(path, max(size, len(data)), limit, hint))
    return data


def open_regular(path: Path, limit: int, error: type[DistilleryError], hint: str) -> BinaryIO:
    """``path`` open for reading when it is a regular file of at most ``limit`` bytes; otherwise ``error``.
    For readers that take a file rather than bytes (``torch.load``): the checks hold for the file they read,
    which a check of the path before opening it would not promise."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise error(f"cannot read {path} ({e.strerror}); {hint}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # checked before fdopen, which refuses a directory itself
            raise error(f"{path} is not a regular file; {hint}")
        if info.st_size > limit:
            raise error(_too_big(path, info.st_size, limit, hint))
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _too_big(path: Path | ObjectPath, size: int, limit: int, hint: str) -> str:
    return f"{path} is {size:,} bytes, more than the {_size(limit)} such a file can be; {hint}"


def read_text(path: Path | ObjectPath, limit: int, error: type[DistilleryError], hint: str) -> str:
    """``read_bytes`` decoded as UTF-8 (the only encoding the project writes)."""
    data = read_bytes(path, limit, error, hint)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text (byte {e.start}); {hint}") from None


def check_depth(value: Any, where: str, error: type[DistilleryError], hint: str, limit: int = MAX_DEPTH) -> Any:
    """``value`` unchanged when its lists and dicts nest at most ``limit`` deep (checked without recursion,
    so no RecursionError can come from a hostile file); otherwise ``error``."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                raise error(f"{where} nests deeper than {limit} levels; {hint}")
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return value


class _KeyTwice(Exception):
    """A key given twice in one JSON object (raised while parsing, caught by `parse_json`)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for key, item in pairs:
        if key in value:
            raise _KeyTwice(key)
        value[key] = item
    return value


def parse_json(text: str | bytes, where: str, error: type[DistilleryError], hint: str,
               unique_keys: bool = False) -> Any:
    """JSON ``text`` (read from ``where``) as Python values; NaN and infinities are refused (the project never
    writes them and they defeat every range check). With ``unique_keys``, so is a key given twice in one object
    (a dict would silently keep the last: where keys are names a user writes, the first would be lost)."""
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not a number JSON allows")

    try:
        value = json.loads(text, parse_constant=no_constants, object_pairs_hook=_unique_keys if unique_keys else None)
    except _KeyTwice as e:
        raise error(f"{where} names {json.dumps(e.args[0], ensure_ascii=False)} twice in one object; {hint}") from None
    except RecursionError:
        raise error(f"{where} nests deeper than {MAX_DEPTH} levels; {hint}") from None
    except UnicodeDecodeError as e:
        raise error(f"{where} is not UTF-8 text (byte {e.start}); {hint}") from None
    except ValueError as e:
        raise error(f"{where} is not valid JSON ({e}); {hint}") from None
    return check_depth(value, where, error, hint)


def read_json(path: Path | ObjectPath, limit: int, error: type[DistilleryError], hint: str,
              unique_keys: bool = False) -> Any:
    """The JSON document in ``path``: bounded, UTF-8, depth-checked; every problem one line."""
    return parse_json(read_text(path, limit, error, hint), str(path), error, hint, unique_keys)


def read_toml(path: Path, limit: int, error: type[DistilleryError], hint: str) -> dict[str, Any]:
    """The TOML document in ``path``: bounded, UTF-8, depth-checked; every problem one line."""
    text = read_text(path, limit, error, hint)
    try:
        value = tomllib.loads(text)
    except RecursionError:
        raise error(f"{path} nests deeper than {MAX_DEPTH} levels; {hint}") from None
    except tomllib.TOMLDecodeError as e:
        raise error(f"{path} is not valid TOML ({e}); {hint}") from None
    return check_depth(value, str(path), error, hint)
