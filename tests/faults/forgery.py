"""The forger of issue 29: tamper with a cache, then recompute every digest it records, so every byte-level
check (shard sha256, per-block sha256, per-array row digests, statistics digests, the LSH index's and the
teacher tail's sha256) passes again. What is left to catch the tampering is what the cache *means*
(docs/cache-format.md#security).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import zarr

from pipeline.cache.blocks import iter_tar_members, write_tar_whole
from pipeline.cache.manifest import CacheError
from pipeline.cache.integrity import array_digest, rows_digest
from pipeline.checksums import sha256_bytes, sha256_file

REPO = Path(__file__).resolve().parents[2]

# block_size: the CLI's (it has no option for it), so `distillery cache` can rerun the same request.
SMALL_CACHE = {"subset": 120, "views": 1, "shard_size": 40, "block_size": 256, "featmaps": True, "teacher_tail": 1,
               "lsh_bits": 16}
"""The fault suite's cache (tests/faults/conftest.py `small_cache`): 120 samples, 2 views, 3 shards, feature
maps, teacher tail, 16 LSH bits."""


def manifest_of(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def save_manifest(root: Path, manifest: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(manifest))


def recompute_digests(root: Path) -> None:
    """Every digest the manifest and the shard records hold, recomputed from the files as they are now."""
    m = manifest_of(root)
    group = zarr.open_group(str(root / "arrays.zarr"), mode="r")
    per_sample = sorted(m["arrays"])
    for record in m["shards"]:
        rows = {name: np.asarray(group[name][record["start"]:record["stop"]]) for name in per_sample}
        record["rows_sha256"] = rows_digest(rows)
        record["arrays_sha256"] = {name: rows_digest({name: rows[name]}) for name in per_sample}
        shard = root / record["file"]
        try:
            record["blocks_sha256"] = [sha256_bytes(data) for _, data in iter_tar_members(shard)]
        except CacheError:  # a bomb the reader refuses to unpack: its per-block digests stay as they were
            pass
        record["sha256"], record["bytes"] = sha256_file(shard), shard.stat().st_size
        shard.with_suffix(".json").write_text(json.dumps(record))
    m["digests"] = {name: array_digest(name, np.asarray(group[name][...])) for name in m["digests"]}
    if m["stats"].get("lsh") and (root / "lsh.faiss").is_file():
        m["stats"]["lsh"]["index_sha256"] = sha256_file(root / "lsh.faiss")
    for record in m["files"].values():
        path = root / record["file"]
        record["sha256"], record["bytes"] = sha256_file(path), path.stat().st_size
    save_manifest(root, m)


def forge_array(root: Path, name: str, change: Callable[[np.ndarray], np.ndarray]) -> None:
    """Array `name` of the cache replaced by `change(old)` (same shape and dtype), digests recomputed."""
    arr = zarr.open_array(str(root / "arrays.zarr" / name), mode="r+")
    arr[...] = change(np.asarray(arr[...]))
    recompute_digests(root)


def forge_manifest(root: Path, edit: Callable[[dict], None]) -> None:
    """The manifest edited by `edit`, digests recomputed."""
    m = manifest_of(root)
    edit(m)
    save_manifest(root, m)
    recompute_digests(root)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every regular file under `root` and its bytes: what "nothing lost, nothing rewritten" compares."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def replace_block(root: Path, shard: int, block: bytes) -> None:
    """Shard `shard`'s first block replaced by `block` (a crafted zip), digests recomputed."""
    path = root / "shards" / f"train-{shard:06d}.tar"
    members = [(name, data) for name, data in iter_tar_members(path)]
    write_tar_whole(path, [(members[0][0], block), *members[1:]])
    recompute_digests(root)


def memory_bounded(code: str, limit: int = 5 << 30, seconds: int = 120) -> subprocess.CompletedProcess:
    """`code` run by Python under `prlimit --as=limit` bytes (torch maps about 3.6 GB at import, so 5 GiB
    leaves 1.4 GB: any bomb the code lets through ends in a MemoryError traceback, not a refusal). A
    DistilleryError is printed as one `error:` line with exit 2, as the CLI does."""
    program = ("import sys\nfrom pipeline.errors import DistilleryError, one_line\ntry:\n"
               + "".join(f"    {line}\n" for line in code.strip().splitlines())
               + "except DistilleryError as e:\n    print('error:', one_line(e), file=sys.stderr)\n    sys.exit(2)\n")
    return subprocess.run(["prlimit", f"--as={limit}", sys.executable, "-c", program], capture_output=True,
                          text=True, timeout=seconds, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
