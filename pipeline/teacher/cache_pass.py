"""The teacher pass: run a teacher once over a dataset and shard its outputs into a cache (docs/ARCHITECTURE.md §2).

Plain functions, one per step, so a Prefect flow (`flows.cache_teacher`) can wrap each as a task and
anything else (tests, notebooks, a GPU box without Prefect) can call `run_cache_pass`:

    plan_cache(request)            -> CachePlan       create or resume the store, list pending shards
    cache_shard(request, index)    -> ShardRecord     teacher forward over one shard's (sample, view)s
    shard_statistics(root, index)  -> ShardStats      mergeable partial sums from the stored rows
    reduce_statistics(root, parts) -> dict            PCA, class stats, CKA, Gaussian summaries, LSH
    complete_cache(root, records)  -> Manifest        status 'complete' only when every shard verifies
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar

import faiss
import numpy as np
import torch
from pydantic import BaseModel, Field, ValidationError, model_validator

from pipeline.cache.codecs import topk_encode
from pipeline.cache.lock import cache_lock
from pipeline.cache.manifest import CacheError, Manifest, ShardRecord, StorageSpec
from pipeline.cache.store import LSH_ARRAYS, LSH_INDEX_NAME, CacheWriter, TeacherCache, repair_hint
from pipeline.checksums import sha256_bytes, sha256_file
from pipeline.data.datasets import ImageDataset, check_bad_image_policy, load_dataset
from pipeline.data.rendering import render_samples
from pipeline.data.views import ViewPlan
from pipeline.options import Range, check_device, check_output_dir, check_ranges, one_line_error
from pipeline.progress import progress_task
from pipeline.stats.classes import ClassMoments
from pipeline.stats.cka import category_interrelations
from pipeline.stats.gaussian import GaussianSummary, grid_gaussian
from pipeline.stats.lsh import build_index, encode, train_lsh, training_rows
from pipeline.stats.moments import FeatureMoments, pca_from_moments
from pipeline.teacher.model import (Teacher, TeacherError, TeacherSpec, build_teacher, load_checkpoint,
                                    manifest_teacher_spec, resolve_tap, stage_names)
from pipeline.teacher.tail import extract_teacher_tail


class CacheRequest(BaseModel):
    """What `distillery cache` asks for (JSON-able: it is a Prefect flow parameter)."""

    dataset: str
    teacher: str
    out: str
    split: str = "train"
    subset: int | None = None
    subset_seed: int = 0
    checkpoint: str | None = None
    teacher_head: bool = True
    views: int = Field(2, description="augmented views per sample (view 0, the clean one, is extra)")
    view_seed: int = 0
    logits: str = "dense"
    tap: str = "auto"
    grid: int = 1
    featmaps: bool = False
    teacher_tail: int = Field(0, description="teacher stages ending at the tap saved for ScaleKD's TPP")
    lsh_bits: int = 0
    input_size: int | None = None
    shard_size: int = 1024
    batch_size: int = 256
    block_size: int = 256
    cka_source: str = "auto"  # "logits" | "features" | "auto" (logits when the teacher has a head)
    device: str = "auto"
    on_bad_image: str = "fail"  # an undecodable image in an image folder: "fail" (name it) or "skip"

    RANGES: ClassVar[dict[str, Range]] = {
        "subset": Range(ge=1), "subset_seed": Range(ge=0), "views": Range(ge=0), "view_seed": Range(ge=0),
        "grid": Range(ge=1), "teacher_tail": Range(ge=0), "lsh_bits": Range(ge=0), "input_size": Range(ge=8),
        "shard_size": Range(ge=1), "batch_size": Range(ge=1), "block_size": Range(ge=1)}

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:  # one line, as from every other config
            raise one_line_error(e) from None

    @model_validator(mode="after")
    def _check_ranges(self) -> CacheRequest:
        check_ranges(self.__dict__, self.RANGES)
        check_bad_image_policy(self.on_bad_image)
        return self


def check_request(request: CacheRequest) -> Manifest:
    """Everything `plan_cache` would refuse about the request, found without writing anything: the device,
    the output directory, the dataset (every split's images, decoded), the teacher and its tap.

    Run before the flow starts (the CLI does), so a bad option is one line rather than a failed task.
    """
    check_device(request.device)
    check_output_dir(request.out)
    return build_manifest(request)


def resolve_device(device: str) -> torch.device:
    """`auto` (CUDA when torch sees a GPU, else CPU) or a device this machine has (`check_device`: one line
    otherwise, not a CUDA traceback from deep inside a run)."""
    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@functools.lru_cache(maxsize=4)
def _dataset(name: str, split: str, subset: int | None, seed: int, on_bad_image: str = "fail") -> ImageDataset:
    return load_dataset(name, split=split, subset=subset, seed=seed, on_bad_image=on_bad_image)


def request_dataset(request: CacheRequest) -> ImageDataset:
    return _dataset(request.dataset, request.split, request.subset, request.subset_seed, request.on_bad_image)


@functools.lru_cache(maxsize=2)
def shared_teacher(spec: TeacherSpec, device: str) -> Teacher:
    """One teacher per (spec, device) per process: shard tasks reuse it instead of rebuilding it."""
    return build_teacher(spec, device)


def default_input_size(dataset: ImageDataset) -> int:
    """Small in-memory datasets (digits, Fashion-MNIST) render at 32 px; image folders at 224 px."""
    raw = dataset.raw(0)
    return 32 if max(raw.shape[:2]) <= 32 else 224


def teacher_spec(request: CacheRequest, dataset: ImageDataset) -> TeacherSpec:
    """Resolve the request's teacher (checkpoint metadata, input size, normalisation, tap)."""
    ckpt: dict[str, Any] = {}
    if request.checkpoint is not None:
        ckpt = load_checkpoint(request.checkpoint)
        if ckpt.get("num_classes", dataset.num_classes) != dataset.num_classes and request.teacher_head:
            raise TeacherError(f"checkpoint {request.checkpoint} has {ckpt['num_classes']} classes, dataset "
                               f"{dataset.name} has {dataset.num_classes}; use --teacher-head none to cache "
                               f"features only")
    if "mean" in ckpt:
        mean, std = tuple(ckpt["mean"]), tuple(ckpt["std"])
    else:
        mean, std = _dataset(request.dataset, "train", None, 0, request.on_bad_image).pixel_stats()
    base = TeacherSpec(
        model=request.teacher, num_classes=int(ckpt.get("num_classes", dataset.num_classes)),
        in_chans=dataset.channels, input_size=request.input_size or int(ckpt.get("input_size", 0))
        or default_input_size(dataset), mean=mean, std=std, checkpoint=request.checkpoint,
        checkpoint_sha256=sha256_file(request.checkpoint) if request.checkpoint else None,
        head=request.teacher_head)
    if request.tap == "none":
        return base
    return TeacherSpec(**{**base.__dict__, "taps": (_resolve_tap(base, request.tap, request.grid),)})


def _resolve_tap(spec: TeacherSpec, tap: str, grid: int) -> str:
    """`auto` = the deepest stage whose map still gives every grid cell >= 2 positions (a std needs 2)."""
    probe = build_teacher(spec)
    names = stage_names(probe.model)
    if tap != "auto":
        return resolve_tap(probe.model, tap)
    x = torch.zeros(1, spec.in_chans, spec.input_size, spec.input_size)
    with torch.inference_mode():
        _, maps = probe.model.forward_intermediates(x, indices=list(range(len(names))))
    for name, fmap in reversed(list(zip(names, maps))):
        h, w = fmap.shape[-2:]
        if (h // grid) * (w // grid) >= 2:
            return name
    raise TeacherError(f"no stage of {spec.model} at input {spec.input_size} has >= 2 positions per cell of a "
                       f"{grid}x{grid} grid; use a smaller --grid, a larger --input-size or --tap none")


def _describe_outputs(teacher: Teacher, spec: TeacherSpec, storage: StorageSpec, n: int, v: int,
                      device: torch.device) -> dict[str, dict[str, Any]]:
    """The per-sample arrays (name -> shape, dtype) this teacher and storage spec produce."""
    x = torch.zeros(2, spec.in_chans, spec.input_size, spec.input_size, device=device)
    with torch.inference_mode():
        out = teacher(x)
    arrays: dict[str, dict[str, Any]] = {"samples/ids": {"shape": [n], "dtype": "int64"},
                                         "samples/labels": {"shape": [n], "dtype": "int32"}}
    if storage.logits != "none":
        c = out.logits.shape[1]
        if storage.topk is not None:
            k = storage.topk
            if k >= c:
                raise TeacherError(f"--logits topk:{k} needs k < {c} classes; use --logits dense")
            arrays["logits/topk_values"] = {"shape": [n, v, k], "dtype": "float16"}
            arrays["logits/topk_indices"] = {"shape": [n, v, k], "dtype": "int32"}
            arrays["logits/tail_logsumexp"] = {"shape": [n, v], "dtype": "float32"}
        else:
            arrays["logits/dense"] = {"shape": [n, v, c], "dtype": "float16"}
    vp = v if storage.pooled_views == "all" else 1
    arrays["features/pooled"] = {"shape": [n, vp, out.pooled.shape[1]], "dtype": "float16"}
    if storage.tap is not None:
        fmap = out.maps[storage.tap]
        cells = storage.grid * storage.grid
        grid_gaussian(fmap.float(), storage.grid)  # validates the grid against the map size
        for stat in ("mean", "std"):
            arrays[f"gaussian/{stat}"] = {"shape": [n, v, cells, fmap.shape[1]], "dtype": "float16"}
        if storage.featmaps:
            arrays[f"featmaps/{storage.tap}"] = {"shape": [n, v, *fmap.shape[1:]], "dtype": "float16"}
    return arrays


@dataclass
class CachePlan:
    root: str
    num_shards: int
    pending: list[int]
    done: list[ShardRecord] = field(default_factory=list)
    complete: bool = False  # the cache already exists, complete, with the requested identity


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


def build_manifest(request: CacheRequest) -> Manifest:
    """The manifest the request would produce (identity + layout), without running the teacher pass."""
    check_cka_source(request.cka_source, request.teacher_head)
    dataset = request_dataset(request)
    if len(dataset) == 0:
        raise TeacherError(f"dataset {request.dataset} ({request.split}) is empty; nothing to cache")
    spec = teacher_spec(request, dataset)
    plan = ViewPlan(num_augmented=request.views, seed=request.view_seed)
    storage = StorageSpec(logits="none" if not request.teacher_head else request.logits,
                          tap=spec.taps[0] if spec.taps else None, grid=request.grid, featmaps=request.featmaps,
                          lsh_bits=request.lsh_bits, shard_size=request.shard_size, block_size=request.block_size,
                          teacher_tail=request.teacher_tail)
    device = resolve_device(request.device)
    teacher = shared_teacher(spec, str(device))
    arrays = _describe_outputs(teacher, spec, storage, len(dataset), plan.num_views, device)
    ranges = shard_ranges(len(dataset), request.shard_size)
    return Manifest(
        teacher={**spec.to_dict(), "stages": stage_names(teacher.model),
                 "pooled_dim": arrays["features/pooled"]["shape"][-1]},
        dataset={"name": dataset.name, "split": dataset.split, "num_samples": len(dataset),
                 "num_classes": dataset.num_classes, "class_names": list(dataset.class_names),
                 "channels": dataset.channels, "fingerprint": dataset.fingerprint(),
                 "subset": request.subset, "subset_seed": request.subset_seed,
                 # Only when it changes what is cached: caches made without skipping keep their identity.
                 **({"on_bad_image": "skip", "skipped": list(dataset.skipped)}
                    if request.on_bad_image == "skip" else {})},
        views={**plan.to_dict(), "recipe": plan.recipe},
        storage=storage.__dict__.copy(),
        arrays=arrays,
        shards=[{"index": i, "start": a, "stop": b} for i, (a, b) in enumerate(ranges)],
    )


def plan_cache(request: CacheRequest) -> CachePlan:
    """Create the store (or resume one with the same identity) and list the shards to (re)write.

    Nothing is reused unchecked, a complete cache included: a shard is kept only when its tar, its blocks
    and its zarr rows match its record (and a complete cache's manifest), and a complete cache stays
    complete only when its statistics, LSH index and teacher tail match their digests too. A damaged shard
    is rewritten (the cache is partial meanwhile); damaged statistics are recomputed after the shards.
    """
    manifest = build_manifest(request)
    tail = teacher_tail(manifest, resolve_device(request.device))  # refuses an unsupported tail before writing
    writer = CacheWriter.create_or_resume(request.out, manifest)
    writer.remove_staging()
    if tail is not None and not writer.tail_verifies():  # a rerun restores a lost or changed file
        writer.write_teacher_tail(*tail)
    was_complete = writer.manifest.status == "complete"
    listed = {r.index: r for r in writer.manifest.records()} if was_complete else {}
    done, pending = [], []
    for s in writer.manifest.shards:
        record = writer.finished_record(s["index"])
        reusable = record is not None and (not was_complete or listed.get(s["index"]) == record)
        (done.append(record) if reusable else pending.append(s["index"]))
    complete = was_complete and not pending and not TeacherCache(request.out).statistics_problems()
    if pending and was_complete:
        writer.mark_partial()
    return CachePlan(root=request.out, num_shards=len(writer.manifest.shards), pending=pending, done=done,
                     complete=complete)


def teacher_tail(manifest: Manifest, device: torch.device) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """The teacher's last `--teacher-tail` stages ending at the tap, for ScaleKD's TPP (docs/ARCHITECTURE.md §6.7):
    (spec, state dict), or None when the cache asks for no tail."""
    storage = manifest.storage_spec()
    if not storage.teacher_tail:
        return None
    spec = TeacherSpec.from_dict({k: v for k, v in manifest.teacher.items() if k not in ("stages", "pooled_dim")})
    teacher = shared_teacher(spec, str(device))
    probe = torch.randn(2, spec.in_chans, spec.input_size, spec.input_size, generator=torch.Generator().manual_seed(0))
    return extract_teacher_tail(teacher.model, storage.tap, storage.teacher_tail, probe.to(device))


def render_pairs(dataset: ImageDataset, plan: ViewPlan, pairs: np.ndarray, spec: TeacherSpec) -> torch.Tensor:
    """Render (position, view id) pairs at the teacher's input size and normalisation: a batch."""
    return render_samples(dataset, plan, pairs[:, 0], pairs[:, 1], spec.input_size, spec.mean, spec.std)


def teacher_forward(teacher: Teacher, x: torch.Tensor, device: torch.device) -> Any:
    """Inference-mode forward; bf16 autocast on CUDA (docs/ARCHITECTURE.md §7), fp32 on CPU."""
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
    storage = m.storage_spec()
    plan = ViewPlan.from_dict({k: v for k, v in m.views.items() if k != "recipe"})
    dataset = request_dataset(request)
    device = resolve_device(request.device)
    teacher = shared_teacher(spec, str(device))
    s = m.shards[index]
    start, stop, v = s["start"], s["stop"], plan.num_views
    pairs = np.array([(p, view) for p in range(start, stop) for view in range(v)], dtype=np.int64)
    batches = [pairs[i:i + request.batch_size] for i in range(0, len(pairs), request.batch_size)]
    parts: dict[str, list[np.ndarray]] = {}
    with progress_task(f"shard {index}", len(pairs), "views") as bar:
        x = render_pairs(dataset, plan, batches[0], spec)
        for i, batch in enumerate(batches):
            out = teacher_forward(teacher, x, device)
            # Rendering the next batch before reading this one's outputs overlaps it with a GPU's forward
            # (CUDA kernels run asynchronously) without a thread: on CPU a render thread beside the forward
            # took cores from its OpenMP team and cost more than it hid (`distillery bench`).
            if i + 1 < len(batches):
                x = render_pairs(dataset, plan, batches[i + 1], spec)
            for name, value in _batch_rows(out, storage, dataset, batch).items():
                parts.setdefault(name, []).append(value)
            bar.advance(len(batch))
    n = stop - start
    rows = {name: np.concatenate(vals).reshape(n, v, *vals[0].shape[1:]) for name, vals in parts.items()}
    if storage.pooled_views == "first":
        rows["features/pooled"] = rows["features/pooled"][:, :1]
    rows["samples/ids"] = dataset.ids[start:stop].astype(np.int64)
    rows["samples/labels"] = dataset.labels[start:stop].astype(np.int32)
    return writer.write_shard(index, start, stop, rows, [dataset.raw(p) for p in range(start, stop)])


def _batch_rows(out: Any, storage: StorageSpec, dataset: ImageDataset, pairs: np.ndarray) -> dict[str, np.ndarray]:
    """One batch of teacher outputs -> per-(sample, view) rows; refuses non-finite outputs."""
    rows: dict[str, torch.Tensor] = {"features/pooled": out.pooled.float()}
    if out.logits is not None:
        logits = out.logits.float()
        if storage.topk is not None:
            values, indices, tail = topk_encode(logits, storage.topk)
            rows.update({"logits/topk_values": values, "logits/topk_indices": indices,
                         "logits/tail_logsumexp": tail})
        else:
            rows["logits/dense"] = logits
    if storage.tap is not None:
        fmap = out.maps[storage.tap].float()
        rows["gaussian/mean"], rows["gaussian/std"] = grid_gaussian(fmap, storage.grid)
        if storage.featmaps:
            rows[f"featmaps/{storage.tap}"] = fmap
    # One reduction per array: a sum is non-finite iff some element is (inf - inf is nan, too).
    checked = [n for n in ("logits/dense", "logits/topk_values", "features/pooled", "gaussian/std") if n in rows]
    if not torch.isfinite(torch.stack([rows[n].sum() for n in checked])).all():
        name = next(n for n in checked if not torch.isfinite(rows[n]).all())
        bad = (~torch.isfinite(rows[name])).flatten(1).any(1).nonzero()[0, 0].item()
        sid, view = int(dataset.ids[pairs[bad, 0]]), int(pairs[bad, 1])
        raise TeacherError(f"teacher produced non-finite {name} for sample id {sid}, view {view}; "
                           f"check the checkpoint (the cache stays partial)")
    return {name: value.cpu().numpy() for name, value in rows.items()}


# ------------------------------------------------------------------------------------------------
# Dataset-level statistics (docs/ARCHITECTURE.md §5): mergeable partials per shard, computed from the stored
# rows (so recomputation never needs the teacher), merged by `reduce_statistics`.
# ------------------------------------------------------------------------------------------------


@dataclass
class ShardStats:
    features: FeatureMoments
    classes: ClassMoments
    gaussian: GaussianSummary | None

    def merge(self, other: ShardStats) -> ShardStats:
        return ShardStats(self.features.merge(other.features), self.classes.merge(other.classes),
                          self.gaussian.merge(other.gaussian) if self.gaussian is not None else None)


def shard_statistics(root: str, index: int) -> ShardStats:
    """Partial sums of shard `index`, from its zarr rows once they match their record (named otherwise)."""
    cache = TeacherCache(root, require_complete=False)
    record = cache.shard_record(index)
    if record is None:
        raise CacheError(f"{cache.root}: shard {index} has no record; re-run the `distillery cache` command that "
                         f"made it")
    start, stop = record.start, record.stop
    read = [n for n in cache.manifest.arrays if n.startswith(("features/", "samples/", "gaussian/", "logits/"))]
    problem = cache.rows_problem(record, read)
    if problem:
        raise CacheError(f"{cache.root}: {problem}; {repair_hint(cache.root)}")
    pooled = cache.array("features/pooled")[start:stop, 0].astype(np.float64)
    labels = cache.array("samples/labels")[start:stop]
    features = FeatureMoments.empty(pooled.shape[1])
    features.update(pooled)
    classes = ClassMoments.empty(cache.num_classes, pooled.shape[1])
    classes.update(pooled, labels)
    gaussian = None
    if cache.has("gaussian/mean"):
        gaussian = GaussianSummary.empty(cache.array("gaussian/mean").shape[-1])
        gaussian.update(cache.array("gaussian/mean")[start:stop, 0].astype(np.float32),
                        cache.array("gaussian/std")[start:stop, 0].astype(np.float32))
    return ShardStats(features, classes, gaussian)


def check_cka_source(source: str, has_logits: bool) -> None:
    """Refuse a CKA source the cache cannot serve, before any teacher pass or statistics rewrite starts."""
    if source not in ("logits", "features", "auto"):
        raise TeacherError(f"--cka-source must be logits, features or auto, not '{source}'")
    if source == "logits" and not has_logits:
        raise TeacherError("--cka-source logits needs stored logits; this cache has none, use "
                           "--cka-source features")


def cka_rows(cache: TeacherCache, source: str) -> tuple[np.ndarray, np.ndarray]:
    """View-0 rows used for CKA: the first m samples of every class (m = smallest class count)."""
    check_cka_source(source, "logits" in cache.available_targets())
    labels = cache.read("samples/labels")
    counts = np.bincount(labels, minlength=cache.num_classes)
    m = int(counts.min())
    take = np.sort(np.concatenate([np.flatnonzero(labels == c)[:m] for c in range(cache.num_classes)]))
    if source == "logits":
        rows = {name.replace("/", "."): cache.array(name).oindex[take, 0:1]
                for name in cache.manifest.arrays if name.startswith("logits/")}
        values = cache.dense_logits(rows)[:, 0]
    else:
        values = cache.array("features/pooled").oindex[take, 0].astype(np.float32)
    return values, labels[take]


def lsh_statistics(cache: TeacherCache, bits: int) -> tuple[dict[str, np.ndarray], bytes, dict[str, Any]]:
    """Train LSH planes on the view-0 pooled features and encode every stored sample (README "The teacher
    cache", Statistics): the arrays (planes, thresholds, view-0 codes `lsh/codes` (N, 1, bits/8) uint8), the serialized faiss
    neighbour index and its manifest record. Reads the stored features only (no teacher); memory is one
    shard of features plus the training rows and the codes (N * bits / 8 bytes)."""
    pooled = cache.array("features/pooled")
    rows = training_rows(cache.num_samples)
    projection = train_lsh(pooled.oindex[rows, 0].astype(np.float32), bits)
    codes = np.concatenate([encode(pooled[s["start"]:s["stop"], 0].astype(np.float32), projection)
                            for s in cache.manifest.shards])
    index = faiss.serialize_index_binary(build_index(codes)).tobytes()
    arrays = {"stats/lsh/planes": projection.planes, "stats/lsh/thresholds": projection.thresholds,
              "lsh/codes": codes[:, None]}
    return arrays, index, {"bits": bits, "train_rows": len(rows), "index": LSH_INDEX_NAME,
                           "index_sha256": sha256_bytes(index)}


def reduce_statistics(root: str, parts: list[ShardStats], cka_source: str = "auto",
                      lsh_bits: int | None = None) -> dict[str, Any]:
    """Merge the shards' partials; write PCA, class stats, CKA interrelations, Gaussian summaries and, with
    LSH bits (`lsh_bits`, default the storage's), the LSH planes, codes and index: all committed at once
    (`CacheWriter.write_stats`), with the storage's `lsh_bits` updated to match."""
    total = functools.reduce(ShardStats.merge, parts)
    pca = pca_from_moments(total.features)
    cache = TeacherCache(root, require_complete=False)
    if cka_source == "auto":  # a head-less teacher stores no logits
        cka_source = "logits" if "logits" in cache.available_targets() else "features"
    values, labels = cka_rows(cache, cka_source)
    arrays: dict[str, np.ndarray] = {
        "stats/pca/mean": pca.mean, "stats/pca/components": pca.components,
        "stats/pca/explained_variance": pca.explained_variance,
        "stats/classes/mean": total.classes.means(), "stats/classes/count": total.classes.counts,
        "stats/cka/ir": category_interrelations(values, labels, cache.num_classes),
    }
    if total.gaussian is not None:
        arrays["stats/gaussian/channel_mean"] = total.gaussian.channel_mean_of_means()
        arrays["stats/gaussian/channel_std"] = total.gaussian.channel_mean_of_stds()
    info = {"arrays": sorted(arrays), "cka_source": cka_source, "cka_samples_per_class": int(len(labels) //
            cache.num_classes), "pca_components_90": pca.num_components_for(0.9),
            "features_count": int(total.features.count)}
    bits = cache.manifest.storage["lsh_bits"] if lsh_bits is None else lsh_bits
    index = None
    if bits:
        lsh_arrays, index, info["lsh"] = lsh_statistics(cache, bits)
        arrays.update(lsh_arrays)
        info["arrays"] = sorted([*info["arrays"], *LSH_ARRAYS])
    CacheWriter(root, cache.manifest).write_stats(arrays, info, lsh_index=index, storage={"lsh_bits": bits})
    return info


def complete_cache(root: str, records: list[ShardRecord]) -> Manifest:
    return CacheWriter(root, Manifest.load(root)).finalize(records)


def recompute_statistics(root: str, cka_source: str = "auto", lsh_bits: int | None = None) -> dict[str, Any]:
    """`distillery stats`: rebuild the dataset-level statistics of a complete cache, without the teacher.

    `lsh_bits` replaces the cache's LSH bits (its `storage.lsh_bits`, so the manifest stays truthful;
    0 removes LSH); None rebuilds with the bits it has. The new statistics are committed only once all of
    them are written (`CacheWriter.write_stats`): an interrupted run leaves the previous complete cache as
    it was, and running either command again works.
    """
    with cache_lock(root):
        cache = TeacherCache(root)
        check_cka_source(cka_source, "logits" in cache.available_targets())
        if lsh_bits is not None:
            StorageSpec(**{**cache.manifest.storage, "lsh_bits": lsh_bits})  # validates the bits (CacheError)
        parts = [shard_statistics(root, r.index) for r in cache.manifest.records()]
        return reduce_statistics(root, parts, cka_source, lsh_bits=lsh_bits)


def run_cache_pass(request: CacheRequest) -> Manifest:
    """The whole teacher pass in this process, without Prefect (same steps as `flows.cache_teacher`), holding
    the cache's writer lock."""
    with cache_lock(request.out):
        plan = plan_cache(request)
        if plan.complete:
            return Manifest.load(plan.root)
        records = plan.done + [cache_shard(request, i) for i in plan.pending]
        parts = [shard_statistics(plan.root, i) for i in range(plan.num_shards)]
        reduce_statistics(plan.root, parts, request.cka_source)
        return complete_cache(plan.root, records)

