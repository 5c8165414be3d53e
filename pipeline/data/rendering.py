"""Rendered (sample, view) pairs: as a batch, as a torch Dataset, and the DataLoader worker start method (docs/ARCHITECTURE.md#views)."""

from __future__ import annotations

import inspect
import multiprocessing
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from pipeline.data.datasets import ImageDataset
from pipeline.data.views import ViewPlan, crop_tensor, normalise_resized, render_crops, render_views, resize_uint8


class RenderedViews(torch.utils.data.Dataset):
    """Item i renders view `view_ids[i]` of the sample at `positions[i]`; returns (input, label)."""

    def __init__(self, dataset: ImageDataset, plan: ViewPlan, positions: np.ndarray, view_ids: np.ndarray,
                 size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(positions) != len(view_ids):
            raise ValueError("positions and view_ids must have the same length")
        self.dataset, self.plan, self.size = dataset, plan, size
        self.positions, self.view_ids = np.asarray(positions), np.asarray(view_ids)
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        """Items `indices` rendered as one batch (`render_views`, the same bits as one by one); a DataLoader
        with a batch size calls this instead of `__getitem__` per item."""
        positions = self.positions[list(indices)]
        images = render_samples(self.dataset, self.plan, positions, self.view_ids[list(indices)], self.size,
                                self.mean, self.std)
        return list(zip(images, (int(self.dataset.labels[p]) for p in positions)))


def render_samples(dataset: ImageDataset, plan: ViewPlan, positions: np.ndarray, view_ids: np.ndarray, size: int,
                   mean: Sequence[float], std: Sequence[float],
                   device: torch.device | str | None = None) -> torch.Tensor:
    """View `view_ids[i]` of the sample at `positions[i]`, for every i, as one (N, C, size, size) batch on
    `device` (default CPU)."""
    return render_views([dataset.raw(int(p)) for p in positions],
                        [plan.params(int(dataset.ids[p]), int(v)) for p, v in zip(positions, view_ids)],
                        size, mean, std, device)


class ViewBatches:
    """A DataLoader's collate_fn for samples that carry their view as pixels: "crop" (a uint8 (h, w, C) array,
    `crop_view`) and "flip". The other fields are collated as usual; the crops become one rendered input per
    entry of `sizes` (field name -> render size; "input" for the student, "teacher_input" for an online
    teacher at its own size).

    `render_here`: render in the collate, i.e. in the DataLoader worker (CPU training: the workers' cores
    render, each worker one batch at a time, single-threaded). Otherwise the crops travel packed into one
    uint8 tensor (`pixels`, with their `shapes`; one shared-memory buffer per batch, pinned by a CUDA loader)
    and `render_on` renders them where the student trains. Either way `render_crops` does the arithmetic.
    A "uint8" `resize` runs on the CPU in any case (`resize_uint8`), so the worker resizes and ships each
    size's uint8 batch (`resized/NAME`, smaller than the crops); `render_on` normalises it on the device.
    """

    def __init__(self, sizes: Mapping[str, int], mean: Sequence[float], std: Sequence[float],
                 render_here: bool, interpolation: str = "bilinear", resize: str = "float32") -> None:
        self.sizes, self.mean, self.std, self.render_here = dict(sizes), tuple(mean), tuple(std), render_here
        self.interpolation, self.resize = interpolation, resize  # the cache's view plan's resize filter and arithmetic

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        crops = [crop_tensor(sample.pop("crop")) for sample in samples]
        flips = torch.tensor([bool(sample.pop("flip")) for sample in samples])
        batch = default_collate(samples)
        if self.render_here:
            batch.update(self._render(crops, flips, None))
        elif self.resize == "uint8":
            batch.update({f"resized/{name}": resize_uint8(crops, size, self.interpolation)
                          for name, size in self.sizes.items()})
            batch["flips"] = flips
        else:
            batch["pixels"] = torch.cat([crop.reshape(-1) for crop in crops])
            batch["shapes"] = torch.tensor([tuple(crop.shape) for crop in crops], dtype=torch.int64)
            batch["flips"] = flips
        return batch

    def render_on(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """A packed batch (`render_here` False) with its crops rendered on `device`: one host-to-device copy
        of the batch's pixels, then the arithmetic on the device."""
        if self.resize == "uint8":
            flips = batch.pop("flips").tolist()
            rendered = {name: normalise_resized(batch.pop(f"resized/{name}"), flips, self.mean, self.std, device)
                        for name in self.sizes}
            return {**batch, **rendered}
        pixels = batch.pop("pixels").to(device, non_blocking=True)
        shapes, flips = batch.pop("shapes").tolist(), batch.pop("flips")
        ends = np.cumsum([h * w * c for h, w, c in shapes]).tolist()
        crops = [pixels[end - h * w * c:end].view(h, w, c) for end, (h, w, c) in zip(ends, shapes)]
        return {**batch, **self._render(crops, flips, device)}

    def _render(self, crops: list[torch.Tensor], flips: torch.Tensor,
                device: torch.device | None) -> dict[str, torch.Tensor]:
        return {name: render_crops(crops, flips.tolist(), size, self.mean, self.std, device,
                                   interpolation=self.interpolation, resize=self.resize)
                for name, size in self.sizes.items()}


class DeviceRendered:
    """Iterates `loader` (collating with `batches`, `render_here` False), each batch rendered on `device`."""

    def __init__(self, loader: torch.utils.data.DataLoader, batches: ViewBatches, device: torch.device) -> None:
        self.loader, self.batches, self.device = loader, batches, device

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            yield self.batches.render_on(batch, self.device)


def clean_views(dataset: ImageDataset, size: int, mean: Sequence[float], std: Sequence[float]) -> RenderedViews:
    """View 0 of every sample: the evaluation input."""
    n = len(dataset)
    return RenderedViews(dataset, ViewPlan(num_augmented=0), np.arange(n), np.zeros(n, dtype=np.int64), size, mean, std)


# Imported once by the fork server: its workers then start without importing torch and the stream again.
WORKER_PRELOAD = ["pipeline.train.stream"]


def worker_preload() -> list[str]:
    """`WORKER_PRELOAD` plus what the parent's main module imports.

    Each worker runs the parent's main module again (multiprocessing's main-module fixup; Python 3.11's
    fork server drops the main path its "__main__" preload needs, so it cannot do it once): for the
    `distillery` script that is `from flows.cli import main`, the whole CLI's imports, per worker, and the
    training loops start a worker per epoch. Preloaded in the server, those imports are done already: a
    ``python -m NAME`` parent's NAME, or the modules a main script's globals come from.
    """
    main = sys.modules["__main__"]
    name = getattr(main.__spec__, "name", None)
    if name is not None:
        imported = set() if name.endswith("__main__") else {name}  # `-m pkg` runs pkg.__main__: not re-run
    else:
        imported = {value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
                    for value in vars(main).values() if inspect.ismodule(value) or callable(value)}
    return WORKER_PRELOAD + sorted(m for m in imported if m in sys.modules and m not in ("__main__", "__mp_main__"))


def worker_context(workers: int) -> multiprocessing.context.BaseContext | None:
    """The `multiprocessing_context` of every DataLoader: `forkserver`, or None without workers.

    Workers forked from this process would inherit the exit hooks of its threads (Prefect's log and
    event services), which fail in the child at exit; workers forked from a fork server (a clean,
    single-threaded process started once) have none. The server preloads `worker_preload()`, so after its
    start (once per process) a worker starts as fast as a forked one (`python -m pipeline.lab.loader_bench`).
    """
    if workers == 0:
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(worker_preload())
    return context


def default_input_size(dataset: ImageDataset) -> int:
    """Small in-memory datasets (digits, Fashion-MNIST) render at 32 px; image folders at 224 px."""
    raw = dataset.raw(0)
    return 32 if max(raw.shape[:2]) <= 32 else 224
