"""Bytes and read-back time of a cache's inputs per `--inputs` mode (docs/results.md#inputs).

    python scripts/inputs_storage.py [--images 200] [--seed 0]

For a folder of JPEGs around 400x350 px (smooth noise, so they compress as photos do) and for digits: the
bytes each mode stores over the bytes of the source, and the seconds per sample to get the pixels back
(what the student stream pays per sample before rendering), measured side by side in one process.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.cache.inputs import InputCodec, parse_inputs
from pipeline.data.datasets import load_dataset

MODES = (("raw", None), ("encoded", None), ("encoded", 256), ("source", None))


def write_folder(root: Path, images: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for i in range(images):
        height, width = int(rng.integers(300, 400)), int(rng.integers(350, 450))
        coarse = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
        folder = root / ("train" if i % 5 else "val") / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC).save(folder / f"{i}.jpg", quality=85)


def measure(spec: str, source_bytes: int) -> None:
    dataset = load_dataset(spec, "train")
    for mode, max_side in MODES:
        if mode == "source" and dataset.relative(0) is None:
            continue
        codec = InputCodec(parse_inputs(mode)[0], max_side=max_side, channels=dataset.channels)
        payloads = [codec.store(dataset, p)[0] for p in range(len(dataset))]
        block = codec.pack(payloads)
        if mode == "source":
            codec = InputCodec("source", max_side=max_side, channels=dataset.channels, root=Path(dataset.root))
        start = time.perf_counter()
        for i in range(len(dataset)):
            codec.image(block, i)
        per_sample = (time.perf_counter() - start) / len(dataset)
        stored = sum(a.nbytes for a in block.values())
        print(f"{spec.split(':')[0]:12s} {mode:8s} max-side {str(max_side):5s} stored/source "
              f"{stored / source_bytes:6.3f}  read back {per_sample * 1e3:7.3f} ms/sample")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_folder(root, args.images, args.seed)
        measure(f"imagefolder:{root}", sum(p.stat().st_size for p in (root / "train").rglob("*.jpg")))
    digits = load_dataset("digits", "train")
    # digits' source is an 8x8 4-bit array per image (sklearn's bundled CSV); its decoded bytes stand for it
    measure("digits", sum(digits.raw(p).nbytes for p in range(len(digits))))


if __name__ == "__main__":
    main()
