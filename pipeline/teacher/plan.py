"""Planning the teacher pass (docs/ARCHITECTURE.md#data-flow, docs/cache-format.md#contract): the request, the manifest it would produce, and
which shards are still to write.

    check_request(request)        -> Manifest        every refusal, found before anything is written
    plan_cache(request)           -> CachePlan       create or resume the store, list pending shards
    complete_cache(root, records) -> Manifest        status 'complete' only when every shard verifies

The per-shard forward is `pipeline.teacher.forward`, the statistics `pipeline.cache.statistics`, and the
whole pass in one process `pipeline.teacher.cache_pass.run_cache_pass`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.cache.inputs import input_storage, shard_size_within
from pipeline.cache.manifest import ArraySpec, CacheError, Manifest, ShardRange, ShardRecord, StorageSpec, shard_ranges
from pipeline.cache.statistics import check_cka_source
from pipeline.cache.reader import TeacherCache
from pipeline.cache.writer import CacheWriter, stored_with_identity
from pipeline.cache.targets import LOGITS, POOLED, SAMPLE_ARRAYS, STORABLE, TARGETS
from pipeline.checksums import sha256_file
from pipeline.data.datasets import ImageDataset, load_dataset
from pipeline.data.rendering import default_input_size
from pipeline.data.views import ViewPlan
from pipeline.nets.tail import extract_teacher_tail
from pipeline.nets.tapped import TappedOutputs, resolve_tap, stage_names
from pipeline.object_store import check_output_location, location
from pipeline.options import check_device, resolve_device
from pipeline.teacher.checkpoint import TeacherCheckpoint
from pipeline.teacher.class_map import ClassMap
from pipeline.teacher.weights import resolve_sized
from pipeline.teacher.model import Teacher, TeacherError, TeacherSpec, build_teacher, manifest_teacher_spec
from pipeline.teacher.request import CacheRequest


def check_request(request: CacheRequest) -> Manifest:
    """Everything `plan_cache` would refuse about the request, found without writing anything: the device,
    the output directory or URL, the dataset (every split's images, decoded), the teacher and its tap, and the
    identity of a cache already at the output (another teacher's cache is refused before any pass).

    Run before the flow starts (the CLI does), so a bad option is one line rather than a failed task.
    Both splits' files are checked here; the pass itself loads only the split it caches.
    """
    check_device(request.device)
    check_output_location(request.out)
    # The other split's files too: a bad val image stops the pass before it starts, not a student after it
    # (checked once: an image folder remembers its checks).
    _dataset(request.dataset, "val" if request.split == "train" else "train", None, 0, request.on_bad_image)
    manifest = build_manifest(request)
    stored_with_identity(location(request.out), manifest)  # a cache of another teacher: refused now, not in the pass
    return manifest


@functools.lru_cache(maxsize=4)
def _dataset(name: str, split: str, subset: int | None, seed: int, on_bad_image: str = "fail") -> ImageDataset:
    return load_dataset(name, split=split, subset=subset, seed=seed, on_bad_image=on_bad_image)


def request_dataset(request: CacheRequest) -> ImageDataset:
    return _dataset(request.dataset, request.split, request.subset, request.subset_seed, request.on_bad_image)


@functools.lru_cache(maxsize=2)
def shared_teacher(spec: TeacherSpec, device: str) -> Teacher:
    """One teacher per (spec, device) per process: shard tasks reuse it instead of rebuilding it."""
    return build_teacher(spec, device)


def teacher_spec(request: CacheRequest, dataset: ImageDataset) -> TeacherSpec:
    """Resolve the request's teacher (checkpoint metadata or weights, input size, normalisation, class map,
    tap)."""
    if request.checkpoint is not None and request.weights is not None:
        raise TeacherError("--checkpoint and --weights both give the teacher's weights; give one")
    if request.weights is not None:
        base = _weights_spec(request, dataset)
    else:
        base = _checkpoint_spec(request, dataset)
    if request.class_map is not None:
        if not request.teacher_head:
            raise TeacherError("--class-map maps the teacher's logits, which --teacher-head none drops; give one")
        mapped = (ClassMap.parse(request.class_map, "the cache's class map", dataset.class_names, base.num_classes)
                  if isinstance(request.class_map, dict)
                  else ClassMap.load(request.class_map, dataset.class_names, base.num_classes))
        base = base.model_copy(update={"class_map": mapped.to_dict(), "class_map_sha256": mapped.sha256})
    elif request.teacher_head and base.num_classes != dataset.num_classes:
        raise TeacherError(f"the teacher {base.model} has {base.num_classes} classes, dataset {dataset.name} has "
                           f"{dataset.num_classes}; use --teacher-head none to cache features only, or --class-map "
                           f"FILE to map its classes to the dataset's")
    if request.tap == "none":
        return base
    return base.model_copy(update={"taps": (_resolve_tap(base, request.tap, request.grid),)})


def _weights_spec(request: CacheRequest, dataset: ImageDataset) -> TeacherSpec:
    """The teacher of `--weights`: its input size, mean and std from the weights' pretrained config (the
    renders follow them), the stem adapted by timm to the dataset's channels (a grey image is rendered as
    one channel, which a teacher's RGB stem summed to one channel sees as the grey image replicated to
    three), the head kept at the dataset's size when the weights have it, else at the weights' own."""
    if not request.teacher_head:
        head: int | None = 0
    else:  # a class map says which of the weights' own classes count; else a head of the dataset's size, and
        # a head of another size is kept only to be refused below, naming the ways out
        head = None if request.class_map is not None else dataset.num_classes
    got = resolve_sized(request.weights, request.teacher, num_classes=head,
                        fallback_classes=0 if head == 0 else None, in_chans=dataset.channels,
                        input_size=request.input_size)
    pre = got.preprocessing
    return TeacherSpec(
        model=got.architecture, num_classes=got.num_classes, in_chans=dataset.channels,
        input_size=request.input_size or pre.input_size[-1], mean=pre.mean, std=pre.std, head=request.teacher_head,
        model_kwargs=got.model_kwargs, weights=request.weights, weights_sha256=got.sha256,
        weights_revision=got.revision, preprocessing=pre.to_dict())


def _checkpoint_spec(request: CacheRequest, dataset: ImageDataset) -> TeacherSpec:
    """The teacher of a `fit-teacher` checkpoint, or random weights shaped by the dataset."""
    if request.teacher is None:
        raise TeacherError("name the teacher: --teacher NAME (a timm model), --checkpoint FILE or --weights SOURCE")
    if request.checkpoint is not None:
        ckpt = TeacherCheckpoint.load(request.checkpoint)
        num_classes, input_size, mean, std = ckpt.num_classes, ckpt.input_size, ckpt.mean, ckpt.std
        model_kwargs = ckpt.model_kwargs
    else:  # random weights: the dataset decides
        num_classes, input_size, model_kwargs = dataset.num_classes, default_input_size(dataset), {}
        mean, std = _dataset(request.dataset, "train", None, 0, request.on_bad_image).pixel_stats()
    return TeacherSpec(
        model=request.teacher, num_classes=num_classes, in_chans=dataset.channels,
        input_size=request.input_size or input_size, mean=mean, std=std, checkpoint=request.checkpoint,
        checkpoint_sha256=sha256_file(request.checkpoint) if request.checkpoint else None,
        head=request.teacher_head, model_kwargs=model_kwargs)


def teacher_view_fields(spec: TeacherSpec) -> dict[str, Any]:
    """The `ViewPlan` fields of the teacher's own evaluation transform (docs/guide.md#your-own-teacher): its
    interpolation, and view 0 as the central box timm's eval transform keeps at the teacher's input size
    (resize to floor(size / crop_pct), then centre-crop size). Nothing for a teacher without a pretrained config."""
    pre = spec.preprocessing
    if pre is None:
        return {}
    return {"clean_crop": spec.input_size / math.floor(spec.input_size / pre["crop_pct"]),
            "interpolation": pre["interpolation"]}


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
                      device: torch.device) -> tuple[dict[str, ArraySpec], int]:
    """The per-sample arrays (name -> shape, dtype) this teacher and storage spec produce: the sample arrays,
    then each target's, as its producer lays them out on a probe batch (`pipeline.cache.targets`); and the
    teacher's pooled width (stored or not)."""
    x = torch.zeros(2, spec.in_chans, spec.input_size, spec.input_size, device=device)
    with torch.inference_mode():
        out: TappedOutputs = teacher(x)
    if storage.topk is not None and out.logits is not None and storage.topk >= out.logits.shape[1]:
        raise TeacherError(f"--logits topk:{storage.topk} needs k < {out.logits.shape[1]} classes; use --logits dense")
    arrays = {name: ArraySpec(shape=[n], dtype=dtype) for name, dtype in SAMPLE_ARRAYS.items()}
    for target in TARGETS.values():
        if target.produce is None or not target.kept(storage):  # written with the statistics, or left out
            continue
        views = 1 if target.first_view_only(storage) else v
        dtypes = target.dtypes(storage.tap, spec.num_classes)
        for name, row in target.produce(out, storage).items():
            arrays[name] = ArraySpec(shape=[n, views, *row.shape[1:]], dtype=dtypes[name])
    return arrays, int(out.pooled.shape[-1])


@dataclass
class CachePlan:
    root: str
    num_shards: int
    pending: list[int]
    done: list[ShardRecord] = field(default_factory=list)
    complete: bool = False  # the cache already exists, complete, with the requested identity


def build_manifest(request: CacheRequest) -> Manifest:
    """The manifest the request would produce (identity + layout), without running the teacher pass."""
    kept = set(STORABLE if request.store is None else request.store.split(","))
    check_cka_source(request.cka_source, request.teacher_head and LOGITS in kept, POOLED in kept)
    if request.lsh_bits and POOLED not in kept:
        raise TeacherError(f"--lsh-bits {request.lsh_bits} trains LSH planes on the pooled features: add pooled "
                           f"to --store, or leave out --lsh-bits")
    dataset = request_dataset(request)
    if len(dataset) == 0:
        raise TeacherError(f"dataset {request.dataset} ({request.split}) is empty; nothing to cache")
    spec = teacher_spec(request, dataset)
    existing = manifest_at(request.out)
    plan = ViewPlan(num_augmented=request.views, seed=request.view_seed, resize=view_resize(request, existing, dataset),
                    **teacher_view_fields(spec))
    storage = StorageSpec(logits="none" if not request.teacher_head else request.logits,
                          tap=spec.taps[0] if spec.taps else None, grid=request.grid, featmaps=request.featmaps,
                          lsh_bits=request.lsh_bits, shard_size=request.shard_size, block_size=request.block_size,
                          teacher_tail=request.teacher_tail, store=request.store,
                          **input_storage(request.inputs, request.max_side, dataset,
                                          plan.source_side(spec.input_size)
                                          if reduced_decode(request, existing) else None))
    storage = storage.replace(shard_size=shard_size_within(storage, dataset, request.shard_bytes))
    device = resolve_device(request.device)
    teacher = shared_teacher(spec, str(device))
    arrays, pooled_dim = _describe_outputs(teacher, spec, storage, len(dataset), plan.num_views, device)
    produced = {name for name, target in TARGETS.items() if target.stored_layout(arrays.__contains__, storage.tap)}
    for name in sorted(kept - produced) if request.store is not None else ():
        raise TeacherError(f"--store lists {name}, but these options produce no {TARGETS[name].description}: add "
                           f"{TARGETS[name].cache_option}, or leave {name} out of --store")
    ranges = shard_ranges(len(dataset), storage.shard_size)
    return Manifest(
        teacher={**spec.to_dict(), "stages": stage_names(teacher.model), "pooled_dim": pooled_dim},
        dataset={"name": dataset.name, "split": dataset.split, "num_samples": len(dataset),
                 "num_classes": dataset.num_classes, "class_names": list(dataset.class_names),
                 "channels": dataset.channels, "fingerprint": dataset.fingerprint(),
                 "subset": request.subset, "subset_seed": request.subset_seed,
                 # Only when it changes what is cached: caches made without skipping keep their identity.
                 **({"on_bad_image": "skip", "skipped": list(dataset.skipped)}
                    if request.on_bad_image == "skip" else {})},
        views={**plan.to_dict(), "recipe": plan.recipe},
        storage=storage,
        arrays=arrays,
        shards=[ShardRange(index=i, start=a, stop=b) for i, (a, b) in enumerate(ranges)],
    )


def manifest_at(out: str) -> Manifest | None:
    """The manifest of the cache already at `out`, None where there is none (a damaged one is named when the
    writer opens it)."""
    try:
        return Manifest.load(out)
    except CacheError:
        return None


def view_resize(request: CacheRequest, existing: Manifest | None, dataset: ImageDataset) -> str:
    """The request's resize arithmetic (`ViewPlan.resize`); "auto": that of the `existing` cache at `out` (made
    before the field: float32), so rerunning its command resumes or reuses it; for a new cache uint8 where the
    images are files (large images: the resize is most of a render) and float32 for in-memory datasets (tiny
    images, whose resize costs little: their caches and results stay as they were)."""
    if request.resize != "auto":
        return request.resize
    if existing is not None:
        return existing.views.resize
    return "uint8" if dataset.ENCODED else "float32"


def reduced_decode(request: CacheRequest, existing: Manifest | None) -> bool:
    """Whether image files decode only as large as the views need (`storage.decode_min_side`); None (auto): as
    the `existing` cache at `out` does (one made before the rule decodes at full size), else yes."""
    if request.reduced_decode is not None:
        return request.reduced_decode
    return existing is None or existing.storage.decode_min_side is not None


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
        record = writer.finished_record(s.index)
        reusable = record is not None and (not was_complete or listed.get(s.index) == record)
        (done.append(record) if reusable else pending.append(s.index))
    complete = was_complete and not pending and not TeacherCache(request.out).statistics_problems()
    if pending and was_complete:
        writer.mark_partial()
    return CachePlan(root=request.out, num_shards=len(writer.manifest.shards), pending=pending, done=done,
                     complete=complete)


def teacher_tail(manifest: Manifest, device: torch.device) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """The teacher's last `--teacher-tail` stages ending at the tap, for ScaleKD's TPP (docs/methods.md#scalekd):
    (spec, state dict), or None when the cache asks for no tail."""
    storage = manifest.storage
    if not storage.teacher_tail:
        return None
    spec = manifest_teacher_spec(manifest.teacher)
    teacher = shared_teacher(spec, str(device))
    probe = torch.randn(2, spec.in_chans, spec.input_size, spec.input_size, generator=torch.Generator().manual_seed(0))
    return extract_teacher_tail(teacher.model, storage.tap, storage.teacher_tail, probe.to(device))


def complete_cache(root: str, records: list[ShardRecord]) -> Manifest:
    return CacheWriter(root, Manifest.load(root)).finalize(records)
