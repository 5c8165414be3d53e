"""The two resize arithmetics of a view plan (`ViewPlan.resize`, docs/ARCHITECTURE.md#views) side by side in one
process, in CPU-seconds (`time.process_time`: other jobs' load does not lower it): rendering 224 px views alone,
and one epoch of the student stream (one thread, no workers) over two `encoded` caches of the same synthetic
folder that differ only in `views.resize`. Rounds alternate the two, so a drift in load hits both alike.

    python -m pipeline.lab.resize_bench [--images 256] [--rounds 4]

Figures: docs/results.md#input-pipeline.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data.views import RESIZES, ViewPlan, render_views
from pipeline.lab.image_folder import FolderSpec, write_image_folder
from pipeline.lab.input_bench import CLASSES, SIZE, cache_fields
from pipeline.lab.storage_bench import cache_once, stream_samples_per_s


def render_per_cpu_second(raws: list[np.ndarray], resize: str) -> float:
    """Views 1 (random-resized crops) of `raws` rendered at `SIZE` px in batches of 64: views per CPU-second."""
    plan = ViewPlan(num_augmented=1, resize=resize)
    views = [plan.params(i, 1) for i in range(len(raws))]
    start = time.process_time()
    for i in range(0, len(raws), 64):
        render_views(raws[i:i + 64], views[i:i + 64], SIZE, (0.5,) * 3, (0.25,) * 3)
    return len(raws) / (time.process_time() - start)


def stream_per_cpu_second(cache: str, samples: int) -> float:
    start = time.process_time()
    stream_samples_per_s(cache, SIZE, 64, 0, "cpu")
    return samples / (time.process_time() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="training images of the synthetic folder")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds of each measurement")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_image_folder(Path(tmp) / "jpegs", FolderSpec(args.images, 20, classes=CLASSES))
        caches = {resize: str(Path(tmp) / f"cache-{resize}") for resize in RESIZES}
        for resize, cache in caches.items():
            cache_once(cache_fields(folder, cache, 32, "cpu", {"inputs": "encoded", "resize": resize}))
        raws = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((folder / "train").glob("*/*.jpg"))]
        torch.set_num_threads(1)
        rates: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for resize in RESIZES:
                rates.setdefault(("render", resize), []).append(render_per_cpu_second(raws, resize))
                rates.setdefault(("stream", resize), []).append(stream_per_cpu_second(caches[resize], len(raws)))
    for what in ("render", "stream"):
        old, new = rates[what, "float32"], rates[what, "uint8"]
        print(f"{what} per CPU-second, float32 resize: {', '.join(f'{r:.0f}' for r in old)}; uint8 resize: "
              f"{', '.join(f'{r:.0f}' for r in new)}; ratios per round: "
              f"{', '.join(f'{b / a:.2f}' for a, b in zip(old, new))} (median "
              f"{statistics.median(b / a for a, b in zip(old, new)):.2f})")


if __name__ == "__main__":
    main()
