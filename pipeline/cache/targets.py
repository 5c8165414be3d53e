"""Teacher targets: one record per kind of per-sample target a cache stores and a method needs (docs/cache-format.md#contract, docs/methods.md#compose).

A :class:`Target` says everything the rest of the library needs to know about one kind:

- ``name``: the logical name a method lists in ``needs`` and reads from its batch's ``targets``;
- ``description`` and ``cache_option``: how an error names it and the `distillery cache` option producing it;
- ``layouts``: the zarr arrays (name, stored dtype) that hold it; a target with several encodings (dense or
  top-k logits) has one layout per encoding and a cache holds at most one of them;
- ``produce``: the per-(sample, view) rows of those arrays, from one batch of teacher outputs and the
  cache's :class:`StorageSpec` (empty when the storage does not ask for the target). The teacher pass
  stores them; ``--online-teacher`` computes them live. ``None``: written later with the statistics, from
  the stored rows (the LSH codes), so neither the shards nor a live teacher carry it;
- ``serve``: the stored arrays of a batch (one view per sample) -> what a method receives (``decode``,
  ``as_tuple``, ``keep_stored_dtype``), used alike by the cache stream and the online teacher.

Adding a target is one record registered here (:func:`register_target`), its producer, and the method
that needs it (docs/ARCHITECTURE.md "Where new things go").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeAlias

from pipeline.cache.manifest import StorageSpec

if TYPE_CHECKING:  # the records and their names are read without torch (the command line's help lists them)
    from torch import Tensor

__all__ = ["CLASS_INDEX", "class_index_dtype", "LOGITS", "POOLED", "GAUSSIAN", "LSH_CODES", "FEATMAPS", "TARGETS", "SAMPLE_ARRAYS", "STORABLE", "Target",
           "TargetArray", "TeacherOutputs", "Served", "register_target", "produce_rows"]

Served: TypeAlias = "Tensor | tuple[Tensor, ...]"
"""What a method receives for one target: a batch tensor, or a tuple of them (``as_tuple`` targets)."""


class TeacherOutputs(Protocol):
    """The teacher's outputs for one batch of views (``pipeline.nets.tapped.TappedOutputs``)."""

    logits: Tensor | None  # (B, C); None for a head-less teacher
    pooled: Tensor  # (B, D) pre-logits after global pooling
    maps: Mapping[str, Tensor]  # tapped stage name -> (B, Cf, H, W)


CLASS_INDEX = "class-index"
"""A `TargetArray` dtype resolved per cache: the smallest integer type holding a class index
(:func:`class_index_dtype`)."""


def class_index_dtype(num_classes: int) -> str:
    """The smallest unsigned integer type holding indices 0..C-1: uint8 up to 256 classes, uint16 up to
    65,536 (TinyViT's logit cache stores its top-k indices in 2 bytes), else int32. Served as int64."""
    if num_classes <= 2**8:
        return "uint8"
    return "uint16" if num_classes <= 2**16 else "int32"


@dataclass(frozen=True)
class TargetArray:
    """One stored per-sample array: its path (``{tap}`` = the storage's tapped stage) and stored dtype
    (:data:`CLASS_INDEX`: sized to the class count). ``checked``: the pass refuses a non-finite value in it
    (one sum per batch; the others follow from these)."""

    name: str
    dtype: str
    checked: bool = False

    def path(self, tap: str | None) -> str:
        return self.name.format(tap=tap)

    def stored_dtype(self, num_classes: int) -> str:
        return class_index_dtype(num_classes) if self.dtype == CLASS_INDEX else self.dtype


def _as_float32(arrays: Mapping[str, Tensor]) -> list[Tensor]:
    return [a.float() if a.is_floating_point() else a for a in arrays.values()]


def _never(storage: StorageSpec) -> bool:
    return False


@dataclass(frozen=True)
class Target:
    """One kind of cached teacher target (module docstring)."""

    name: str
    description: str
    cache_option: str
    layouts: tuple[tuple[TargetArray, ...], ...]
    produce: Callable[[TeacherOutputs, StorageSpec], dict[str, Tensor]] | None
    decode: Callable[[Mapping[str, Tensor], int], Tensor] | None = None
    as_tuple: bool = False
    keep_stored_dtype: bool = False
    first_view_only: Callable[[StorageSpec], bool] = _never
    classes_wide: bool = False  # served (C,) per sample whatever its layout (top-k logits decode to C)

    def kept(self, storage: StorageSpec) -> bool:
        """Whether the cache's `--store` keeps this target (None keeps every target the options produce)."""
        return storage.store is None or self.name in storage.store.split(",")

    def stored_layout(self, has: Callable[[str], bool], tap: str | None) -> tuple[str, ...] | None:
        """The array paths of the layout a cache holds (`has(path)`), or None when it holds none."""
        for layout in self.layouts:
            paths = tuple(a.path(tap) for a in layout)
            if all(has(p) for p in paths):
                return paths
        return None

    def dtypes(self, tap: str | None, num_classes: int) -> dict[str, str]:
        """Stored dtype of every array of every layout, for a teacher of `num_classes` classes."""
        return {a.path(tap): a.stored_dtype(num_classes) for layout in self.layouts for a in layout}

    def checked_arrays(self, tap: str | None) -> list[str]:
        return [a.path(tap) for layout in self.layouts for a in layout if a.checked]

    def serve(self, arrays: Mapping[str, Tensor], num_classes: int) -> Served:
        """A batch's stored arrays of this target (one view per sample, keyed by path) -> what methods get:
        floats as float32 unless ``keep_stored_dtype``, a tuple for ``as_tuple`` targets."""
        if self.decode is not None:
            return self.decode(arrays, num_classes)
        served = list(arrays.values()) if self.keep_stored_dtype else _as_float32(arrays)
        return tuple(served) if self.as_tuple else served[0]


SAMPLE_ARRAYS = {"samples/ids": "int64", "samples/labels": "int32"}
"""The per-sample arrays every cache stores beside the targets."""

TARGETS: dict[str, Target] = {}
"""Registered targets by name, in the order the teacher pass lays out their arrays."""


def register_target(target: Target) -> Target:
    """Add ``target`` to :data:`TARGETS` (its name must be new)."""
    if target.name in TARGETS:
        raise TypeError(f"target {target.name!r} is already registered")
    TARGETS[target.name] = target
    return target


def produce_rows(outputs: TeacherOutputs, storage: StorageSpec) -> dict[str, Tensor]:
    """Every target's rows for one batch of teacher outputs, keyed by array path, in registry order."""
    rows: dict[str, Tensor] = {}
    for target in TARGETS.values():
        if target.produce is not None and target.kept(storage):
            rows.update(target.produce(outputs, storage))
    return rows


# --- the targets ---------------------------------------------------------------------------------


def _produce_logits(out: TeacherOutputs, storage: StorageSpec) -> dict[str, Tensor]:
    if out.logits is None or storage.logits == "none":
        return {}
    logits = out.logits.float()
    if storage.topk is None:
        return {"logits/dense": logits}
    from pipeline.cache.codecs import topk_encode

    values, indices, tail = topk_encode(logits, storage.topk)
    return {"logits/topk_values": values, "logits/topk_indices": indices, "logits/tail_logsumexp": tail}


def _decode_logits(arrays: Mapping[str, Tensor], num_classes: int) -> Tensor:
    """Dense float32 logits; top-k codes reconstructed (docs/cache-format.md#contract)."""
    from pipeline.cache.codecs import topk_decode

    if "logits/dense" in arrays:
        return arrays["logits/dense"].float()
    return topk_decode(arrays["logits/topk_values"].float(), arrays["logits/topk_indices"].long(),
                       arrays["logits/tail_logsumexp"].float(), num_classes)


LOGITS = register_target(Target(
    name="logits", description="teacher logits", cache_option="--logits dense|topk:K (teacher with a head; with --store, list logits)",
    layouts=((TargetArray("logits/dense", "float16", checked=True),),
             (TargetArray("logits/topk_values", "float16", checked=True), TargetArray("logits/topk_indices", CLASS_INDEX),
              TargetArray("logits/tail_logsumexp", "float32"))),
    produce=_produce_logits, decode=_decode_logits, classes_wide=True)).name
"""Dense float32 teacher logits (B, C) of the view the student sees; top-k caches are reconstructed."""


def _produce_pooled(out: TeacherOutputs, storage: StorageSpec) -> dict[str, Tensor]:
    return {"features/pooled": out.pooled.float()}


POOLED = register_target(Target(
    name="pooled", description="teacher pooled features",
    cache_option="--store with pooled listed (its default keeps them)",
    layouts=((TargetArray("features/pooled", "float16", checked=True),),), produce=_produce_pooled,
    first_view_only=lambda storage: storage.pooled_views == "first")).name
"""Teacher pooled pre-logit features (B, D_t), float32."""


def _produce_gaussian(out: TeacherOutputs, storage: StorageSpec) -> dict[str, Tensor]:
    if storage.tap is None:
        return {}
    from pipeline.stats.gaussian import grid_gaussian

    mean, std = grid_gaussian(out.maps[storage.tap].float(), storage.grid)
    return {"gaussian/mean": mean, "gaussian/std": std}


GAUSSIAN = register_target(Target(
    name="gaussian", description="teacher feature-map Gaussian statistics", cache_option="--tap STAGE --grid G (with --store, list gaussian)",
    layouts=((TargetArray("gaussian/mean", "float16"), TargetArray("gaussian/std", "float16", checked=True)),),
    produce=_produce_gaussian, as_tuple=True)).name
"""Tuple (mean, std) of the tapped teacher map per grid cell and channel, each (B, G*G, Cf) (docs/methods.md#wkd-f)."""


def _produce_featmaps(out: TeacherOutputs, storage: StorageSpec) -> dict[str, Tensor]:
    if storage.tap is None or not storage.featmaps:
        return {}
    return {f"featmaps/{storage.tap}": out.maps[storage.tap].float()}


FEATMAPS = register_target(Target(
    name="featmaps", description="teacher feature maps",
    cache_option="--featmaps (and --tap STAGE, the stage to mimic; with --store, list featmaps)",
    layouts=((TargetArray("featmaps/{tap}", "float16"),),), produce=_produce_featmaps, keep_stored_dtype=True)).name
"""The tapped teacher stage's feature map (B, Cf, H, W) of the view the student sees (docs/methods.md#scalekd). Served as
stored, float16 (maps are large: float32 would double the shuffle buffer); losses promote them."""

LSH_CODES = register_target(Target(
    name="lsh_codes", description="teacher LSH codes", cache_option="--lsh-bits B",
    layouts=((TargetArray("lsh/codes", "uint8"),),), produce=None)).name
"""Packed LSH codes of the teacher's view-0 pooled features, (B, bits/8) uint8 (docs/methods.md#elsh); written with the
statistics (`pipeline.stats.lsh`), after the shards."""

STORABLE = tuple(name for name, target in TARGETS.items() if target.produce is not None)
"""The targets the teacher pass stores per sample, the choices of `distillery cache --store`."""
