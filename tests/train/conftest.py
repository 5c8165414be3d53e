"""Synthetic teacher caches for the student-stage tests: written with the real `CacheWriter` but with
random targets instead of a teacher pass, so every layout (top-k, view-0 pooled, no logits) is cheap."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache.codecs import topk_encode
from pipeline.cache.manifest import FORMAT_VERSION, Manifest, StorageSpec
from pipeline.cache.writer import CacheWriter
from pipeline.cache.targets import class_index_dtype
from pipeline.data.views import ViewPlan
from pipeline.train.rundir import RunDir

CLASSES = 10  # named "0".."9" and called digits, so the digits val split evaluates the students
DIM, CHANNELS = 8, 4


def write_cache(root: Path, n: int = 200, views: int = 3, logits: str = "dense", pooled_views: str = "all",
                shard_size: int = 80, block_size: int = 32, seed: int = 0, index_dtype: str = class_index_dtype(CLASSES),
                format_version: int = FORMAT_VERSION) -> Path:
    """A complete cache of `n` random 8x8 images with random per-view targets; ids are 3*i + 7. An older
    format (`format_version`, `index_dtype`) writes the layout that format had."""
    rng = np.random.default_rng(seed)
    ids = np.arange(n, dtype=np.int64) * 3 + 7
    dense = (rng.normal(size=(n, views, CLASSES)) * 3).astype(np.float32)
    rows: dict[str, np.ndarray] = {
        "samples/ids": ids, "samples/labels": (np.arange(n) % CLASSES).astype(np.int32),
        "features/pooled": rng.normal(size=(n, views if pooled_views == "all" else 1, DIM)).astype(np.float16),
        "gaussian/mean": rng.normal(size=(n, views, 1, CHANNELS)).astype(np.float16),
        "gaussian/std": rng.uniform(0.1, 2, size=(n, views, 1, CHANNELS)).astype(np.float16),
    }
    storage = StorageSpec(logits=logits, pooled_views=pooled_views, tap="layer1", shard_size=shard_size,
                          block_size=block_size)
    if storage.topk is not None:
        values, indices, tail = topk_encode(torch.from_numpy(dense), storage.topk)
        rows.update({"logits/topk_values": values.numpy().astype(np.float16),
                     "logits/topk_indices": indices.numpy().astype(index_dtype),
                     "logits/tail_logsumexp": tail.numpy()})
    elif logits == "dense":
        rows["logits/dense"] = dense.astype(np.float16)
    plan = ViewPlan(num_augmented=views - 1, seed=seed)
    ranges = [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]
    manifest = Manifest(
        teacher={"model": "test_resnet", "num_classes": CLASSES, "in_chans": 1, "input_size": 16, "mean": [0.3],
                 "std": [0.4], "checkpoint": None, "checkpoint_sha256": None, "taps": ["layer1"], "head": True,
                 "model_kwargs": {}, "stages": ["act1", "layer1"], "pooled_dim": DIM},
        dataset={"name": "digits", "split": "train", "num_samples": n, "num_classes": CLASSES,
                 "class_names": [str(c) for c in range(CLASSES)], "channels": 1, "fingerprint": f"synthetic-{seed}"},
        views=plan.to_dict(), storage=storage,
        arrays={name: {"shape": list(a.shape), "dtype": str(a.dtype)} for name, a in rows.items()},
        shards=[{"index": i, "start": a, "stop": b} for i, (a, b) in enumerate(ranges)], format_version=format_version)
    writer = CacheWriter.create_or_resume(root, manifest)
    raws = list(rng.integers(0, 256, size=(n, 8, 8, 1), dtype=np.uint8))
    records = [writer.write_shard(i, a, b, {k: v[a:b] for k, v in rows.items()}, raws[a:b])
               for i, (a, b) in enumerate(ranges)]
    writer.finalize(records)
    return root


@pytest.fixture
def make_cache(tmp_path: Path):
    """Factory: `make_cache(name="c", **write_cache options)` -> the cache's root under tmp_path."""
    def make(name: str = "cache", **options) -> Path:
        return write_cache(tmp_path / name, **options)

    return make


@pytest.fixture
def interrupted(monkeypatch) -> Callable[[], AbstractContextManager[None]]:
    """`with interrupted(): train_student(...)`: the run stops (KeyboardInterrupt) right after writing its
    first epoch's checkpoint, as a kill between epochs leaves it."""
    @contextmanager
    def stop() -> Iterator[None]:
        save = RunDir.save_checkpoint

        def killed_after_first_epoch(self: RunDir, state: dict) -> None:
            save(self, state)
            if state["state"]["epoch"] == 1:
                raise KeyboardInterrupt

        with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
            patch.setattr(RunDir, "save_checkpoint", killed_after_first_epoch)
            yield

    return stop
