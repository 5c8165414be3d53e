"""A shard's bytes (docs/cache-format.md#contract): the block codec and the tar files that hold the blocks.

A block is a dict of plain numpy arrays <-> bytes: a zip of .npy members (like np.savez) but with fixed
timestamps, so the same rows always give the same bytes (stable shard checksums), and read back with
allow_pickle=False (no pickle on any read path). A shard is a tar of blocks with mtime 0, written whole.
"""

from __future__ import annotations

import io
import math
import tarfile
import zipfile
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.cache.integrity import repair_hint
from pipeline.cache.manifest import CacheError
from pipeline.checksums import sha256_bytes
from pipeline.object_store import ObjectPath, location, open_binary, write_whole

def encode_block(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The block's bytes: the same arrays (in any order) always give the same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            arr = np.ascontiguousarray(arrays[name])
            if arr.dtype == object:
                raise TypeError(f"block array {name} has dtype object; only plain numeric arrays are stored")
            member = io.BytesIO()
            np.lib.format.write_array(member, arr, allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
    return buf.getvalue()


def decode_block(data: bytes, where: str = "block", root: str | Path | None = None,
                 keys: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of a block (of the cache at `root`), only `keys` when given; one that does not decode is one
    CacheError naming `where`."""
    out = {}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info in zf.infolist():
                if keys is not None and info.filename.removesuffix(".npy") not in keys:
                    continue
                # Sizes are the block's own bytes, never what a header declares: members are stored, not
                # deflated (a 1 MB member inflating to 1 GiB is refused unread), and an array's declared
                # shape must fit the member's bytes before it is allocated.
                if info.compress_type != zipfile.ZIP_STORED or info.file_size > len(data):
                    raise ValueError(f"member {info.filename} is compressed or larger than its block")
                with zf.open(info) as f:
                    member = f.read(len(data) + 1)
                out[info.filename.removesuffix(".npy")] = read_npy(member)
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
        fix = repair_hint(root) if root is not None else "the cache holding it is damaged"
        raise CacheError(f"{where} does not decode ({e}); {fix}") from None
    return out


def read_npy(member: bytes) -> np.ndarray:
    """The array in `.npy` bytes, its header's shape checked against the bytes that follow it first
    (`read_array` allocates the declared shape before reading); no pickles."""
    f = io.BytesIO(member)
    version = np.lib.format.read_magic(f)
    header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if header is None:
        raise ValueError(f"an array has .npy version {version}, not one the writer writes")
    shape, _, dtype = header(f)
    if dtype.hasobject or math.prod(shape) * dtype.itemsize != len(member) - f.tell():
        raise ValueError(f"an array header declares {shape} {dtype}, not the {len(member) - f.tell()} bytes it holds")
    f.seek(0)
    return np.lib.format.read_array(f, allow_pickle=False)


def block_key(name: str) -> str:
    """zarr array path -> key inside a block (`logits/dense` -> `logits.dense`)."""
    return name.replace("/", ".")


def write_tar_whole(path: Path | ObjectPath, members: list[tuple[str, bytes]]) -> None:
    """Write a tar with mtime 0 whole (`write_whole`): a shard file is whole or absent."""
    def write(f: BinaryIO) -> None:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))

    write_whole(path, write)


def iter_tar_members(path: str | Path | ObjectPath) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular member of the shard tar at `path` (`<cache>/shards/...`), a local file
    or an object (read as one stream)."""
    try:
        with open_binary(path) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            size = location(path).stat().st_size
            for info in tar:
                # What a header declares is bounded by the file before anything is read: a 1.5 KB shard
                # declaring 10^12 bytes, or a sparse member expanding to GiBs (the writer writes neither).
                if info.issparse() or info.offset_data + info.size > size:
                    raise tarfile.TarError(f"member {info.name} declares {info.size:,} bytes"
                                           f"{' (sparse)' if info.issparse() else ''}, more than the file holds")
                f = tar.extractfile(info) if info.isfile() else None
                if f is not None:
                    yield info.name, f.read(info.size)
    except FileNotFoundError:
        raise CacheError(f"{path} is missing; {repair_hint(location(path).parent.parent)}") from None
    except (tarfile.TarError, EOFError) as e:
        raise CacheError(f"{path} is not a readable tar ({e}); {repair_hint(location(path).parent.parent)}") from None


def block_digests(path: Path | ObjectPath) -> list[str] | None:
    """sha256 of each member of the shard tar at `path`, in order; None if it is not a readable tar."""
    try:
        return [sha256_bytes(data) for _, data in iter_tar_members(path)]
    except CacheError:
        return None
