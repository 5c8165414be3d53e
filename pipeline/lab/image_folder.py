"""A synthetic ImageNet-like image folder, seeded, no downloads: `python -m pipeline.lab.image_folder OUT`.

Each image is 1/f ("pink") noise, whose amplitude spectrum falls as 1/f like natural images' (van der
Schaaf & van Hateren 1996), tinted by its class's colour, with a few filled shapes of the class's kind
(ellipses, boxes or polygons) on top, written as a JPEG of a size drawn around 400x350 px (ImageNet's
typical train image is about 400x350 after its 500 px longest-side resize). `--photos` makes 12 MP
(4000x3000) phone-camera-like images instead: drawn at a quarter of the size and upscaled, with per-pixel
sensor noise on top, so a photo costs about a second, not a 12 MP FFT per channel.

The layout is what `imagefolder:DIR` reads: OUT/train/<class>/*.jpg and OUT/val/<class>/*.jpg. Every image
is a pure function of (seed, split, index): the same arguments write the same bytes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Around ImageNet's typical train image: sizes drawn uniformly in these ranges (width, height), px.
WIDTHS, HEIGHTS = (300, 500), (260, 440)
PHOTO_SIZE = (4000, 3000)  # a 12 MP phone camera, landscape
PHOTO_UPSCALE = 4  # a photo is drawn at a quarter of its size, then upscaled, with sensor noise on top
SHAPES = ("ellipse", "rectangle", "polygon")


@dataclass(frozen=True)
class FolderSpec:
    """What `write_image_folder` writes: images per split, classes, seed, photo size or not, JPEG quality."""

    train: int
    val: int
    classes: int = 10
    seed: int = 0
    photos: bool = False
    quality: int = 90

    def __post_init__(self) -> None:
        if self.classes < 1 or self.train < self.classes or self.val < self.classes:
            raise ValueError(f"need classes >= 1 and at least one train and one val image per class, got "
                             f"train={self.train}, val={self.val}, classes={self.classes}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {self.quality}")


def pink_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(height, width) noise with an amplitude spectrum of 1/f, scaled to zero mean and unit std."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    f = np.sqrt(fy * fy + fx * fx)
    f[0, 0] = 1.0  # the mean: removed below
    spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f
    spectrum[0, 0] = 0.0
    noise = np.fft.irfft2(spectrum, s=(height, width))
    return (noise / noise.std()).astype(np.float32)


def class_colour(seed: int, label: int) -> np.ndarray:
    """The class's tint, an RGB triple in [40, 215]: one draw per (seed, class)."""
    return np.random.default_rng([seed, 1_000_003, label]).uniform(40, 215, size=3).astype(np.float32)


def render_image(spec: FolderSpec, label: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of class `label`: tinted pink noise with 2-5 shapes of the class's kind."""
    if spec.photos:
        width, height = PHOTO_SIZE[0] // PHOTO_UPSCALE, PHOTO_SIZE[1] // PHOTO_UPSCALE
    else:
        width, height = int(rng.integers(*WIDTHS, endpoint=True)), int(rng.integers(*HEIGHTS, endpoint=True))
    colour = class_colour(spec.seed, label)
    # A shared luminance field and a weaker one per channel: colour varies with, and apart from, brightness.
    luminance = pink_noise(rng, height, width)
    planes = [colour[c] + 45.0 * luminance + 15.0 * pink_noise(rng, height, width) for c in range(3)]
    image = Image.fromarray(np.clip(np.stack(planes, axis=-1), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    kind = SHAPES[label % len(SHAPES)]
    for _ in range(int(rng.integers(2, 6))):
        w, h = rng.uniform(0.1, 0.45) * width, rng.uniform(0.1, 0.45) * height
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        fill = tuple(int(v) for v in np.clip(255 - colour + rng.normal(0, 25, size=3), 0, 255))
        if kind == "polygon":
            angles = np.sort(rng.uniform(0, 2 * np.pi, size=int(rng.integers(3, 7))))
            draw.polygon([(x + w / 2 * (1 + np.cos(a)), y + h / 2 * (1 + np.sin(a))) for a in angles], fill=fill)
        else:
            getattr(draw, kind)((x, y, x + w, y + h), fill=fill)
    # Shapes' edges as a lens draws them: slightly soft.
    image = image.filter(ImageFilter.GaussianBlur(radius=0.8))
    if not spec.photos:
        return image
    image = image.resize(PHOTO_SIZE, Image.Resampling.BICUBIC)
    # Uniform in [-5, 5] (std 3.2 levels), in int16: a float32 Gaussian at 12 MP costs seconds per photo.
    grain = rng.integers(-5, 6, size=(PHOTO_SIZE[1], PHOTO_SIZE[0], 3), dtype=np.int16)
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + grain, 0, 255).astype(np.uint8))


def write_image_folder(out: str | Path, spec: FolderSpec) -> Path:
    """Write OUT/{train,val}/<class>/<split>-<index>.jpg (classes balanced, labels cycling); returns OUT."""
    root = Path(out)
    width = len(str(spec.classes - 1))
    for split, count in (("train", spec.train), ("val", spec.val)):
        for index in range(count):
            label = index % spec.classes
            directory = root / split / f"class{label:0{width}d}"
            directory.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([spec.seed, 0 if split == "train" else 1, index])
            render_image(spec, label, rng).save(directory / f"{split}-{index:06d}.jpg", quality=spec.quality)
    return root


def folder_bytes(root: str | Path, split: str = "train") -> int:
    """Bytes of the JPEG files under ROOT/split."""
    return sum(p.stat().st_size for p in Path(root, split).rglob("*.jpg"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the folder to write (created)")
    parser.add_argument("--train", type=int, default=5000, help="train images (default 5000)")
    parser.add_argument("--val", type=int, default=1000, help="val images (default 1000)")
    parser.add_argument("--classes", type=int, default=20, help="class subfolders (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--photos", action="store_true", help="12 MP (4000x3000) photos instead of ~400x350")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    args = parser.parse_args(argv)
    try:
        spec = FolderSpec(args.train, args.val, args.classes, args.seed, args.photos, args.quality)
    except ValueError as exc:
        parser.error(str(exc))
    root = write_image_folder(args.out, spec)
    print(f"{root}: {spec.train} train + {spec.val} val images, {spec.classes} classes, "
          f"{folder_bytes(root) / 2**20:.1f} MiB of train JPEGs")


if __name__ == "__main__":
    main()
