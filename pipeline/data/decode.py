"""Encoded images <-> the uint8 (H, W, C) arrays every render starts from (docs/cache-format.md#inputs).

One decoder serves the teacher pass, the student stream and `verify`, so the pixels a view is rendered from
are the same bytes in the same library everywhere; which library that is (`decoder_identity`: Pillow and the
libjpeg, zlib and libwebp it was built with) is part of a cache's identity, because another build may
decode the same JPEG to other pixels.

A decode is memory-bounded by its output, not the camera. `max_side` caps the longer side; `min_side` (a
cache's `decode_min_side`: the pixels its smallest view crop needs, `ViewPlan.source_side`) then divides
both sides by the largest of 8, 4, 2 that leaves each at least `min_side` (`decoded_size`). A JPEG is
decoded at that reduced DCT scale (Pillow's `draft`: 1/2, 1/4 or 1/8, never below the target), anything
else is resized in uint8 to the exact size; a 12 MP photo never exists at full resolution, nor anything
as float (docs/cache-format.md#inputs).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, features

__all__ = ["DECODE_ERRORS", "decode_error", "decode_image", "decoded_size", "decoder_identity", "encode_image",
           "scaled_size", "shrink"]

DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
"""What Pillow raises on bytes that are not a decodable image."""


def decoder_identity() -> str:
    """The decoder that turns stored bytes into pixels, as one string: equal strings decode equal pixels."""
    turbo = "-turbo" if features.check_feature("libjpeg_turbo") else ""
    return (f"pillow {Image.__version__}; libjpeg{turbo} {features.version('jpg')}; "
            f"zlib {features.version('zlib')}; webp {features.version('webp')}")


def scaled_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) scaled so the longer side is `max_side` (unchanged when it already fits), each >= 1."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


REDUCTIONS = (8, 4, 2)
"""The factors a `min_side` decode divides by: JPEG's DCT scales, so a JPEG decodes straight to its size."""


def _factor(width: int, height: int, min_side: int | None) -> int:
    for factor in REDUCTIONS if min_side is not None else ():
        if min(-(-width // factor), -(-height // factor)) >= min_side:
            return factor
    return 1


def decoded_size(width: int, height: int, max_side: int | None, min_side: int | None) -> tuple[int, int]:
    """The (width, height) an image of that size decodes to: `scaled_size` for `max_side`, then both sides
    divided (rounding up, as the DCT scaling does) by the largest of `REDUCTIONS` that leaves each
    >= `min_side` (None: by none)."""
    width, height = scaled_size(width, height, max_side)
    factor = _factor(width, height, min_side)
    return -(-width // factor), -(-height // factor)


def _mode(channels: int) -> str:
    if channels not in (1, 3):
        raise ValueError(f"images decode to 1 or 3 channels, not {channels}")
    return "L" if channels == 1 else "RGB"


def _decoded(image: Image.Image, channels: int, max_side: int | None, min_side: int | None) -> np.ndarray:
    size = decoded_size(*image.size, max_side, min_side)
    if size != image.size:
        capped = scaled_size(*image.size, max_side)
        factor = _factor(*capped, min_side)
        # The DCT scaling rounds up (a side s at 1/f is ceil(s / f)): asking for s // f picks exactly 1/f and
        # lands on `size`. After a `max_side` cap, asking for `size` picks the coarsest scale at least that
        # large, so the resize below only ever shrinks.
        request = size if capped != image.size else (max(1, capped[0] // factor), max(1, capped[1] // factor))
        image.draft(_mode(channels), request)
    converted = image.convert(_mode(channels))
    if converted.size != size:
        converted = converted.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)
    pixels = np.asarray(converted, dtype=np.uint8)
    return pixels[..., None] if channels == 1 else pixels


def decode_image(source: bytes | str | Path, channels: int = 3, max_side: int | None = None,
                 min_side: int | None = None) -> np.ndarray:
    """The image in `source` (encoded bytes or a file) as uint8 (H, W, channels): RGB or grey, at
    `decoded_size` (longer side at most `max_side`, then reduced while both sides stay >= `min_side`).
    Raises one of `DECODE_ERRORS` when it is not a decodable image."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        return _decoded(image, channels, max_side, min_side)


def encode_image(pixels: np.ndarray, quality: int) -> bytes:
    """uint8 (H, W, C) pixels as image bytes: JPEG at `quality` for RGB, PNG (lossless) for grey."""
    grey = pixels.shape[2] == 1
    image = Image.fromarray(pixels[..., 0] if grey else pixels, "L" if grey else "RGB")
    out = io.BytesIO()
    if grey:
        image.save(out, format="PNG", optimize=False)
    else:
        image.save(out, format="JPEG", quality=quality, optimize=False, progressive=False)
    return out.getvalue()


def shrink(pixels: np.ndarray, max_side: int | None, min_side: int | None = None) -> np.ndarray:
    """uint8 (H, W, C) `pixels` at `decoded_size`, resized as `decode_image` resizes what it cannot draft."""
    size = decoded_size(pixels.shape[1], pixels.shape[0], max_side, min_side)
    if size == (pixels.shape[1], pixels.shape[0]):
        return pixels
    grey = pixels.shape[2] == 1
    image = Image.fromarray(pixels[..., 0] if grey else pixels, "L" if grey else "RGB")
    out = np.asarray(image.resize(size, Image.Resampling.BILINEAR, reducing_gap=None), dtype=np.uint8)
    return out[..., None] if grey else out


CHECK_SIDE = 256
"""`decode_error` decodes to this longer side: a JPEG at a reduced DCT scale still reads every byte of its
entropy-coded data (where truncation and corruption show), in a fraction of the memory and time."""


def decode_error(path: str | Path) -> str | None:
    """Why the image file at `path` cannot be decoded to RGB, or None if it can.

    Decodes all of it (`CHECK_SIDE`): a truncated or corrupt file often opens (only its header is read) and
    fails later.
    """
    try:
        decode_image(Path(path), 3, CHECK_SIDE)
    except DECODE_ERRORS as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None
