"""Integrity of a teacher cache read from anywhere (README "Security model and integrity").

A cache is untrusted input: every path read from its manifest or a shard record must resolve inside the
cache (shard files inside `<cache>/shards/`, compared after resolving symlinks), and every array a student
reads is checked against a sha256 recorded when it was written: per shard and per array for the per-sample
rows (`ShardRecord.arrays_sha256`), per tar member for the blocks a student streams
(`ShardRecord.blocks_sha256`), per array for the dataset-level statistics and the LSH column
(`Manifest.digests`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import numpy as np

from pipeline.cache.manifest import CacheError


REFUSED = "the cache is refused (damaged or crafted): re-create it with `distillery cache`"
"""How a refusal of a cache whose content contradicts itself ends (there is nothing to repair from)."""


def inside(path: Path, base: Path) -> bool:
    """Whether `path`, symlinks resolved, lies inside `base` (also resolved)."""
    return path.resolve().is_relative_to(base.resolve())


def confined_path(root: Path, relative: object, field: str, under: str = "") -> Path:
    """`root / relative`, refused unless it is a plain relative path that resolves inside `root / under`.

    `field` names where the path was read (e.g. `manifest shards[3].file`) so the refusal says which.
    """
    base = root / under
    if not isinstance(relative, str) or not relative:
        raise CacheError(f"{root}: {field} is not a file name ({relative!r}); the cache is refused "
                         f"(damaged or crafted): re-create it with `distillery cache`")
    parts = PurePosixPath(relative).parts
    if relative.startswith(("/", "\\")) or ".." in parts or ":" in relative or "\\" in relative:
        raise CacheError(f"{root}: {field} ({relative!r}) is not a plain path inside {base}; the cache is "
                         f"refused (damaged or crafted): re-create it with `distillery cache`")
    path = root / relative
    if not inside(path, base):
        raise CacheError(f"{root}: {field} ({relative!r}) resolves outside {base} (a symlink?); the cache is "
                         f"refused (damaged or crafted): re-create it with `distillery cache`")
    return path


def repair_hint(root: str | Path) -> str:
    """What to run when a shard or its rows are damaged (README "Security model and integrity")."""
    return (f"repair with `distillery verify {root} --repair` (needs the teacher checkpoint) or re-run the "
            f"`distillery cache` command that made it")


def rows_digest(rows: Mapping[str, np.ndarray]) -> str:
    """sha256 over the arrays' names and bytes, in name order: a shard's rows as a record keeps them."""
    h = hashlib.sha256()
    for name in sorted(rows):
        h.update(name.encode())
        h.update(np.ascontiguousarray(rows[name]).data)
    return h.hexdigest()


def array_digest(name: str, value: np.ndarray) -> str:
    """sha256 of one array: its name, dtype, shape and bytes (a deleted zarr chunk reads back as zeros and
    changes it)."""
    value = np.ascontiguousarray(value)
    h = hashlib.sha256(f"{name}|{value.dtype.str}|{value.shape}".encode())
    h.update(value.data)
    return h.hexdigest()


def non_finite_rows(value: np.ndarray) -> np.ndarray:
    """Positions (along axis 0) of rows holding a NaN or an infinity; empty for non-float arrays."""
    if value.dtype.kind != "f" or value.size == 0:
        return np.zeros(0, np.int64)
    return np.flatnonzero(~np.isfinite(value.reshape(len(value), -1)).all(axis=1))
