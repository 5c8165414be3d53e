"""sha256 helpers for files (checkpoints, shards) and bytes."""

from __future__ import annotations

import hashlib
import os
from typing import Any


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike | Any, chunk: int = 1 << 20) -> str:
    """sha256 of a local file, or of anything with `open("rb")` (an `ObjectPath` at a URL)."""
    h = hashlib.sha256()
    with open(path, "rb") if isinstance(path, (str, os.PathLike)) else path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
