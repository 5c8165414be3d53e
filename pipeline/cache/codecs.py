"""The teacher cache's codecs: top-k logits (docs/cache-format.md#top-k), and the zstd codec zarr decodes the
arrays' chunks with, bounded by the chunk's size (docs/cache-format.md#forger)."""

from __future__ import annotations

import math

import numpy as np
import torch
import zarr
from numcodecs.zstd import decompress
from zarr.codecs import ZstdCodec
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import Buffer
from zarr.registry import fully_qualified_name, register_codec

from pipeline.cache.manifest import CacheError


def topk_encode(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the k largest raw logits and the log-mass of the rest.

    Returns ``(values, indices, tail_logsumexp)``: ``values`` (..., k) in the input dtype, sorted
    descending; ``indices`` (..., k) int64; ``tail_logsumexp`` (...) float32, the logsumexp of the
    C - k logits not kept, computed in float32 (-inf when k == C).
    """
    num_classes = logits.shape[-1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"top-k needs 1 <= k <= number of classes ({num_classes}), got k={k}")
    values, indices = torch.topk(logits, k, dim=-1, largest=True, sorted=True)
    rest = logits.float().scatter(-1, indices, float("-inf"))
    return values, indices, torch.logsumexp(rest, dim=-1)


def topk_decode(
    values: torch.Tensor, indices: torch.Tensor, tail_logsumexp: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Dense (..., C) float32 logits from the top-k code; missing classes share the tail mass.

    Every class not kept gets ``tail_logsumexp - log(C - k)``, so the tail mass is spread
    uniformly. At temperature 1 this is exact for the kept probabilities and the total tail
    mass: ``softmax`` sees the same normaliser ``sum_kept exp(z) + exp(tail_logsumexp)``.
    At T != 1 it is an approximation: ``sum exp(z / T)`` over the tail depends on how the tail
    mass is distributed, which the code does not store, so the tempered kept probabilities and
    tail mass differ from those of the original logits.
    """
    k = values.shape[-1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"top-k code with k={k} does not fit {num_classes} classes")
    if k == num_classes:
        # Every class is kept; log(C - k) would be log(0).
        fill = torch.full_like(tail_logsumexp, float("-inf"), dtype=torch.float32)
    else:
        fill = tail_logsumexp.float() - math.log(num_classes - k)
    dense = fill.unsqueeze(-1).expand(*fill.shape, num_classes).clone()
    return dense.scatter(-1, indices.long(), values.float())


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
"""The first four bytes of a zstd frame (RFC 8878, section 3.1.1)."""


def zstd_content_size(frame: bytes) -> int | None:
    """The decompressed size the header of the zstd frame starting ``frame`` declares (RFC 8878, section
    3.1.1.1: Frame_Content_Size after the descriptor, window and dictionary id); None when it declares none or
    ``frame`` does not start with a zstd frame."""
    if len(frame) < 5 or frame[:4] != ZSTD_MAGIC:
        return None
    descriptor = frame[4]
    single_segment = descriptor >> 5 & 1
    width = (single_segment, 2, 4, 8)[descriptor >> 6]
    start = 5 + (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3]
    if width == 0 or len(frame) < start + width:
        return None
    value = int.from_bytes(frame[start:start + width], "little")
    return value + 256 if width == 2 else value  # the 2-byte field stores the size minus 256


class BoundedZstdCodec(ZstdCodec):
    """zarr's zstd codec, decoding a chunk into a buffer of exactly the chunk's bytes (its shape times its
    itemsize, from the already bounded `zarr.json`): numcodecs would otherwise allocate whatever the frame
    declares (a 65 KB chunk declaring 2 GiB) or stream a frame declaring nothing without end. A chunk whose
    first frame declares another size, or whose frames decompress to more, is refused in one line. Every zstd
    array zarr opens decodes with it once `read_zstd_bounded` has run (on importing `pipeline.cache.reader`, and in `open_arrays`)."""

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> Buffer:
        data = chunk_bytes.as_numpy_array().view(np.uint8)
        itemsize = np.dtype(chunk_spec.dtype.to_native_dtype()).itemsize
        expected = math.prod(chunk_spec.shape) * itemsize
        declared = zstd_content_size(data[:32].tobytes())
        where = f"a zstd chunk of {list(chunk_spec.shape)} {chunk_spec.dtype.to_native_dtype()} in arrays.zarr"
        hint = "the cache is damaged or crafted: delete it and re-run `distillery cache`"
        if declared != expected:
            said = "declares no decompressed size" if declared is None else f"declares {declared:,} bytes"
            raise CacheError(f"{where} {said}, not the {expected:,} the chunk holds; {hint}")
        out = np.empty(expected, np.uint8)
        try:
            decompress(data, out)  # numcodecs refuses frames that together exceed `out`, before or while decoding
        except (RuntimeError, ValueError) as e:
            raise CacheError(f"{where} does not decompress to its {expected:,} bytes ({e}); {hint}") from None
        return chunk_spec.prototype.buffer.from_array_like(out)


def read_zstd_bounded() -> None:
    """Make `BoundedZstdCodec` the codec zarr gives every "zstd" array it opens from now on, in this process
    (zarr resolves the codec when it parses an array's metadata; writing is unchanged)."""
    register_codec("zstd", BoundedZstdCodec)
    zarr.config.set({"codecs.zstd": fully_qualified_name(BoundedZstdCodec)})
