"""Synthetic teacher caches for the student-stage tests (`pipeline.lab.synthetic`): written with the real
`CacheWriter` but with random targets instead of a teacher pass, so every layout (top-k, view-0 pooled, no
logits, an older format) is cheap."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from pipeline.lab.synthetic import random_images, write_synthetic_cache
from pipeline.train.rundir import RunDir


@pytest.fixture
def make_cache(tmp_path: Path):
    """Factory: `make_cache(name="c", n=200, seed=0, **write_synthetic_cache options)` -> the root, under tmp_path,
    of a complete cache of `n` random 8x8 digits (`random_images`: ids 3*i + 7) whose teacher has learnt
    nothing (random logits), with 3 views, 8-d pooled features, 4 Gaussian channels, no statistics and
    16 px inputs unless the options say otherwise."""
    def make(name: str = "cache", n: int = 200, seed: int = 0, **options) -> Path:
        options = {"views": 3, "dim": 8, "channels": 4, "lsh_bits": 0, "separation": 0.0, "statistics": False,
                   "input_size": 16, "shard_size": 80, "block_size": 32, **options}
        write_synthetic_cache(tmp_path / name, random_images(n, seed=seed), seed=seed, **options)
        return tmp_path / name

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
