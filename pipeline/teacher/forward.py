"""The teacher pass's per-shard forward (docs/ARCHITECTURE.md#data-flow): render every (sample, view) of a shard,
run the teacher, turn its outputs into the targets' rows (`pipeline.cache.targets`) and write the shard.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.cache.inputs import InputCodec, StoredImages
from pipeline.cache.manifest import Manifest, ShardRecord, StorageSpec
from pipeline.cache.writer import CacheWriter
from pipeline.cache.targets import TARGETS, produce_rows
from pipeline.data.datasets import ImageDataset
from pipeline.data.rendering import render_samples
from pipeline.data.views import ViewPlan
from pipeline.nets.tapped import TappedOutputs
from pipeline.options import resolve_device
from pipeline.progress import progress_task
from pipeline.stop import raise_if_stopped
from pipeline.teacher.model import Teacher, TeacherError, TeacherSpec, manifest_teacher_spec
from pipeline.teacher.plan import CacheRequest, request_dataset, shared_teacher


def render_pairs(dataset: ImageDataset, plan: ViewPlan, pairs: np.ndarray, spec: TeacherSpec,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Render (position, view id) pairs at the teacher's input size and normalisation: a batch on `device`, the
    teacher's, as a student on that device type renders them (bit-identical, docs/ARCHITECTURE.md#views)."""
    return render_samples(dataset, plan, pairs[:, 0], pairs[:, 1], spec.input_size, spec.mean, spec.std, device)


def teacher_forward(teacher: Teacher, x: torch.Tensor, device: torch.device) -> TappedOutputs:
    """Inference-mode forward; bf16 autocast on CUDA (docs/operations.md#prefect-in-production), fp32 on CPU."""
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return teacher(x.to(device, non_blocking=True))


def cache_shard(request: CacheRequest, index: int) -> ShardRecord:
    """Teacher forward over every (sample, view) of shard `index`; writes its rows, tar and record."""
    writer = CacheWriter(request.out, Manifest.load(request.out))
    record = writer.finished_record(index)
    if record is not None:
        return record
    m = writer.manifest
    spec = manifest_teacher_spec(m.teacher)
    storage = m.storage
    plan = ViewPlan(**m.views.plan_fields())
    # Rendered from the stored inputs read back, as a student reads them: bit-identical views.
    dataset = StoredImages.of(request_dataset(request), InputCodec.of(m))
    device = resolve_device(request.device)
    teacher = shared_teacher(spec, str(device))
    s = m.shards[index]
    start, stop, v = s.start, s.stop, plan.num_views
    pairs = np.array([(p, view) for p in range(start, stop) for view in range(v)], dtype=np.int64)
    batches = [pairs[i:i + request.batch_size] for i in range(0, len(pairs), request.batch_size)]
    parts: dict[str, list[np.ndarray]] = {}
    with progress_task(f"shard {index}", len(pairs), "views") as bar:
        x = render_pairs(dataset, plan, batches[0], spec, device)
        for i, batch in enumerate(batches):
            raise_if_stopped()  # a stop asked for (`pipeline.stop.polled`) ends the shard here: nothing written
            out = teacher_forward(teacher, x, device)
            # Rendering the next batch before reading this one's outputs overlaps it with a GPU's forward
            # (CUDA kernels run asynchronously) without a thread: on CPU a render thread beside the forward
            # took cores from its OpenMP team and cost more than it hid (`distillery bench`).
            if i + 1 < len(batches):
                x = render_pairs(dataset, plan, batches[i + 1], spec, device)
            for name, value in batch_rows(out, storage, dataset, batch).items():
                parts.setdefault(name, []).append(value)
            bar.advance(len(batch))
    n = stop - start
    rows = {name: np.concatenate(vals).reshape(n, v, *vals[0].shape[1:]) for name, vals in parts.items()}
    for target in TARGETS.values():
        if target.first_view_only(storage):
            for name in target.dtypes(storage.tap, spec.num_classes).keys() & rows.keys():
                rows[name] = rows[name][:, :1]
    rows["samples/ids"] = dataset.ids[start:stop].astype(np.int64)
    rows["samples/labels"] = dataset.labels[start:stop].astype(np.int32)
    return writer.write_shard(index, start, stop, rows, [dataset.payload(p) for p in range(start, stop)])


def batch_rows(out: TappedOutputs, storage: StorageSpec, dataset: ImageDataset,
               pairs: np.ndarray) -> dict[str, np.ndarray]:
    """One batch of teacher outputs -> per-(sample, view) rows of every target; refuses non-finite outputs."""
    rows = produce_rows(out, storage)
    # One reduction per array: a sum is non-finite iff some element is (inf - inf is nan, too).
    checked = [n for t in TARGETS.values() for n in t.checked_arrays(storage.tap) if n in rows]
    if not torch.isfinite(torch.stack([rows[n].sum() for n in checked])).all():
        name = next(n for n in checked if not torch.isfinite(rows[n]).all())
        bad = (~torch.isfinite(rows[name])).flatten(1).any(1).nonzero()[0, 0].item()
        sid, view = int(dataset.ids[pairs[bad, 0]]), int(pairs[bad, 1])
        raise TeacherError(f"teacher produced non-finite {name} for sample id {sid}, view {view}; "
                           f"check the checkpoint (the cache stays partial)")
    return {name: value.cpu().numpy() for name, value in rows.items()}
