"""Write a dataset directory (Fashion-MNIST's IDX layout) whose val split is a held-out part of a TRAIN split.

Choices (TCS defaults, README "What we tried for TCS") are made on it, never on the test split. Any
single-channel dataset works (digits' 8x8 images too; the class names read as Fashion-MNIST's):

    python scripts/holdout_split.py OUT --dataset digits --holdout 287
    distillery fit-teacher --dataset fashion-mnist:OUT ...   # train = the first N - holdout, val = the rest
"""
from __future__ import annotations

import argparse
import gzip
import struct
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_write_bytes
from pipeline.data.datasets import load_dataset


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = struct.pack(f">i{array.ndim}I", magic, *array.shape)
    return gzip.compress(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes(), compresslevel=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--holdout", type=int, default=10_000, help="last N train images become the val split")
    parser.add_argument("--dataset", default="fashion-mnist", help="a single-channel dataset spec")
    args = parser.parse_args()
    train = load_dataset(args.dataset, "train")
    images, labels = train.images[..., 0], train.labels
    cut = len(labels) - args.holdout
    args.out.mkdir(parents=True, exist_ok=True)
    for stem, rows in (("train", slice(0, cut)), ("t10k", slice(cut, None))):
        atomic_write_bytes(args.out / f"{stem}-images-idx3-ubyte.gz", idx_bytes(images[rows], 2051))
        atomic_write_bytes(args.out / f"{stem}-labels-idx1-ubyte.gz", idx_bytes(labels[rows], 2049))
    print(f"{args.out}: train {cut}, val (held out from train) {args.holdout}")


if __name__ == "__main__":
    main()
