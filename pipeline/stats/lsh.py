"""LSH planes, median thresholds, packed codes and the Hamming neighbour index (docs/cache-format.md#statistics, docs/methods.md#elsh).

Planes and thresholds come from `faiss.IndexLSH(D, bits, rotate_data=True, train_thresholds=True)`
trained on view-0 pooled teacher features: faiss applies its random rotation `A` (bits x D, no bias) and
subtracts per-bit medians `b`, so the exported planes are `A` itself and bit j of feature f is
`(A f - b)_j > 0` (faiss writes `>= 0`: the two differ only for a projection exactly on its threshold).
Codes are packed LSB-first (bit j is bit j % 8 of byte j // 8), faiss's order. faiss has no GPU
IndexLSH, so codes are computed here in torch (on CUDA when available); the neighbour index is a
`faiss.IndexBinaryFlat`, searched through `GpuIndexBinaryFlat` when a faiss-gpu build and a GPU exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import torch

# Rows the planes are trained on at most: faiss holds a float32 copy of them (bits x rows) to take the
# medians, so a huge cache trains on a seeded subset. Up to this many rows every feature is used.
MAX_TRAIN_ROWS = 1 << 18


@dataclass(frozen=True)
class LSHProjection:
    """`planes` (bits, D) and `thresholds` (bits,), float32: bit j of f is `planes[j] @ f - thresholds[j] > 0`."""

    planes: np.ndarray
    thresholds: np.ndarray

    @property
    def bits(self) -> int:
        return int(self.planes.shape[0])


def check_bits(bits: int) -> None:
    if bits < 8 or bits % 8:
        raise ValueError(f"LSH needs a positive multiple of 8 bits, not {bits}")


def training_rows(n: int, seed: int = 0, max_rows: int = MAX_TRAIN_ROWS) -> np.ndarray:
    """Stored rows the planes are trained on: all of them, or a seeded sorted subset of `max_rows`."""
    if n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False))


def train_lsh(features: np.ndarray, bits: int) -> LSHProjection:
    """Train faiss's IndexLSH (random rotation, median thresholds) on `features` (rows, D); export it."""
    check_bits(bits)
    x = np.ascontiguousarray(features, dtype=np.float32)
    index = faiss.IndexLSH(x.shape[1], bits, True, True)
    index.train(x)
    # vector_to_array copies out of vectors the index owns: `index` stays referenced until both are copied.
    planes = faiss.vector_to_array(index.rrot.A).reshape(bits, x.shape[1]).copy()
    thresholds = faiss.vector_to_array(index.thresholds).copy()
    return LSHProjection(planes=planes.astype(np.float32), thresholds=thresholds.astype(np.float32))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Boolean (..., B) -> uint8 (..., B/8), LSB-first."""
    weights = 1 << torch.arange(8, device=bits.device, dtype=torch.int32)
    grouped = bits.reshape(*bits.shape[:-1], -1, 8).to(torch.int32)
    return (grouped * weights).sum(-1).to(torch.uint8)


def unpack_bits(codes: torch.Tensor) -> torch.Tensor:
    """uint8 (..., B/8) -> 0/1 uint8 (..., B), LSB-first (the inverse of `pack_bits`)."""
    shifts = torch.arange(8, device=codes.device, dtype=torch.uint8)
    return ((codes.unsqueeze(-1) >> shifts) & 1).flatten(-2)


def encode(features: np.ndarray, projection: LSHProjection, device: torch.device | None = None) -> np.ndarray:
    """Packed codes (rows, bits/8) uint8 of `features` (rows, D), computed in float32 torch."""
    device = device or default_device()
    f = torch.as_tensor(np.asarray(features, dtype=np.float32), device=device)
    planes = torch.as_tensor(projection.planes, device=device)
    thresholds = torch.as_tensor(projection.thresholds, device=device)
    return pack_bits(f @ planes.T - thresholds > 0).cpu().numpy()


def build_index(codes: np.ndarray) -> faiss.IndexBinaryFlat:
    """Exhaustive Hamming index over packed codes (rows, bits/8); faiss label i = row i."""
    index = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    index.add(np.ascontiguousarray(codes, dtype=np.uint8))
    return index


def _searcher(index: faiss.IndexBinaryFlat) -> faiss.IndexBinary:
    # faiss-gpu builds expose GpuIndexBinaryFlat; faiss-cpu (this project's default) does not.
    if hasattr(faiss, "GpuIndexBinaryFlat") and faiss.get_num_gpus() > 0:
        return faiss.GpuIndexBinaryFlat(faiss.StandardGpuResources(), index)
    return index


def search(index: faiss.IndexBinaryFlat, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` nearest rows of each query code by Hamming distance: (distances int32, rows int64)."""
    k = min(k, index.ntotal)
    distances, rows = _searcher(index).search(np.ascontiguousarray(queries, dtype=np.uint8), k)
    return distances.astype(np.int32), rows.astype(np.int64)
