"""`distillery verify`: re-run the live teacher on random (id, view) pairs and compare with the cache.

docs/ARCHITECTURE.md#views: a cached target is valid only for the exact input the teacher saw, so a cache is checked
by re-rendering stored views with `render_view` from the manifest's dataset, running the teacher rebuilt
from the manifest (the checkpoint must be the file that made the cache), producing the rows the teacher
pass would store (`batch_rows`, the pass's own function) and taking the largest absolute difference per
stored array. Before that, everything that can be checked without the teacher is
(`TeacherCache.verify_integrity`): shard files, blocks, zarr rows, statistics, LSH index, teacher tail.
`repair_cache` (`distillery verify --repair`) rewrites what fails, with the teacher that made the cache.

Tolerance. Stored arrays are float16: rounding moves a value by at most half a unit in the last place,
2^-11 relative, and a live value a hair from a rounding boundary may land one unit (2^-10) away. Floating
point noise is relative to the array's scale rather than to each value (a near-zero logit carries the
absolute error of the large ones it was summed from), so an array passes when

    max |live - stored| <= rtol * max |stored|,   rtol = 2^-8 by default

(the maximum over finite stored values: a non-finite stored value fails its array, never widens the
tolerance to inf)

(four float16 units of its largest value). A cache made on a GPU under bf16 autocast (docs/operations.md#prefect-in-production) and
verified on CPU differs by bf16 rounding, 2^-8 relative per operation: verify it on the same kind of
device, or pass a larger rtol (e.g. 0.03).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.cache.inputs import MAX_SHARD_BYTES, InputCodec, StoredImages
from pipeline.cache.manifest import Manifest
from pipeline.cache.source import source_dataset
from pipeline.cache.blocks import block_key
from pipeline.cache.reader import TeacherCache
from pipeline.data.views import ViewPlan
from pipeline.options import resolve_device
from pipeline.teacher.cache_pass import run_cache_pass
from pipeline.teacher.forward import batch_rows, render_pairs, teacher_forward
from pipeline.teacher.plan import CacheRequest
from pipeline.teacher.model import (CheckpointChanged, TeacherError, build_teacher, check_cache_checkpoint,
                                    manifest_teacher_spec)

RTOL = 2.0 ** -8


@dataclass(frozen=True)
class ArrayCheck:
    """One stored array against the live teacher over the verified pairs."""

    name: str
    values: int  # how many stored values were compared
    max_abs_diff: float
    tolerance: float
    worst: tuple[int, int]  # (sample id, view) holding the largest difference

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


@dataclass
class VerifyResult:
    pairs: int
    shards: int  # shard files re-hashed
    checks: list[ArrayCheck]
    problems: list[str] = field(default_factory=list)  # integrity (files, arrays), a changed checkpoint
    notes: list[str] = field(default_factory=list)  # not failures: what could not be checked, and why

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.checks)


def sample_pairs(num_samples: int, num_views: int, count: int, seed: int) -> np.ndarray:
    """`count` distinct samples (seeded), views spread evenly over them: (n, 2) (position, view), by position.

    Every view gets its share, so arrays that store view 0 only are compared too.
    """
    n = min(count, num_samples)
    rng = np.random.default_rng(seed)
    positions = np.sort(rng.choice(num_samples, size=n, replace=False))
    views = rng.permutation(np.arange(n) % num_views)
    return np.stack([positions, views], axis=1).astype(np.int64)


def _live_rows(cache: TeacherCache, pairs: np.ndarray, device: str, batch_size: int) -> dict[str, np.ndarray]:
    """The rows the teacher pass would store for `pairs` (float32, before the storage dtype)."""
    m = cache.manifest
    spec = manifest_teacher_spec(m.teacher)
    dataset = StoredImages.of(source_dataset(cache), InputCodec.of(m))  # what the teacher pass rendered
    plan = ViewPlan(**m.views.plan_fields())
    dev = resolve_device(device)
    teacher = build_teacher(spec, dev)
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(pairs), batch_size):
        batch = pairs[i:i + batch_size]
        out = teacher_forward(teacher, render_pairs(dataset, plan, batch, spec, dev), dev)
        for name, value in batch_rows(out, m.storage, dataset, batch).items():
            parts.setdefault(name, []).append(value)
    return {name: np.concatenate(values) for name, values in parts.items()}


def _stored_rows(cache: TeacherCache, names: list[str], pairs: np.ndarray) -> tuple[dict[str, np.ndarray],
                                                                                   dict[str, np.ndarray]]:
    """Stored rows of `names` at `pairs`, and per array which pairs it holds (view 0 only for
    view-0-only arrays)."""
    rows, held = {}, {}
    index = np.arange(len(pairs))
    for name in names:
        arr = np.asarray(cache.array(name).oindex[pairs[:, 0]])
        if arr.shape[1] == cache.num_views:
            rows[name], held[name] = arr[index, pairs[:, 1]], np.ones(len(pairs), bool)
        else:
            rows[name], held[name] = arr[:, 0], pairs[:, 1] == 0
    return rows, held


def _check(name: str, live: np.ndarray, stored: np.ndarray, ids: np.ndarray, views: np.ndarray,
           rtol: float) -> ArrayCheck:
    live, stored = live.astype(np.float64), stored.astype(np.float64)
    if stored.size == 0:
        return ArrayCheck(name, 0, 0.0, 0.0, (-1, -1))
    finite = np.isfinite(stored)
    diff = np.where(finite & np.isfinite(live), np.abs(live - stored), np.inf).reshape(len(stored), -1)
    worst = int(np.unravel_index(np.argmax(diff), diff.shape)[0])
    scale = float(np.abs(stored[finite]).max()) if finite.any() else 0.0
    return ArrayCheck(name, int(stored.size), float(diff.max()), rtol * scale, (int(ids[worst]), int(views[worst])))


def verify_cache(root: str | Path, samples: int = 64, seed: int = 0, rtol: float = RTOL, device: str = "cpu",
                 batch_size: int = 256) -> VerifyResult:
    """Compare `samples` random (id, view) pairs of the cache with the live teacher; re-hash every shard.

    A checkpoint that changed since the cache was made is a problem (the result is not ok) but is still
    run, so the report shows how far apart the two teachers are. A cache whose teacher cannot be rebuilt
    at all (no checkpoint, file missing) or whose dataset is not here raises TeacherError / CacheError.
    """
    if samples < 1 or not 0 <= rtol < float("inf"):
        raise TeacherError(f"verify needs --samples >= 1 and a finite --rtol >= 0, not {samples} and {rtol}")
    cache = TeacherCache(root)
    problems = cache.verify_integrity()
    undigested = cache.undigested_statistics()
    notes = [f"statistics not digested ({len(undigested)} arrays): written by an older version; "
             f"`distillery stats {root}` adds them"] if undigested else []
    try:
        check_cache_checkpoint(manifest_teacher_spec(cache.manifest.teacher))
    except CheckpointChanged as e:
        problems.append(str(e))
    pairs = sample_pairs(cache.num_samples, cache.num_views, samples, seed)
    live = _live_rows(cache, pairs, device, batch_size)
    names = [n for n in live if n in cache.manifest.arrays]
    stored, held = _stored_rows(cache, names, pairs)
    ids = cache.read("samples/ids")[pairs[:, 0]]
    checks = []
    logit_names = [n for n in names if n.startswith("logits/")]
    if logit_names:
        # Top-k codes are compared as the dense logits they reconstruct: near-tied classes may swap places
        # in the code without changing what a student is taught.
        title = "logits/dense" if "logits/dense" in logit_names else "logits (top-k reconstructed)"
        checks.append(_check(title, cache.dense_logits({block_key(n): live[n] for n in logit_names}),
                             cache.dense_logits({block_key(n): stored[n] for n in logit_names}), ids, pairs[:, 1],
                             rtol))
    for name in names:
        if name not in logit_names:
            keep = held[name]
            checks.append(_check(name, live[name][keep], stored[name][keep], ids[keep], pairs[keep, 1], rtol))
    return VerifyResult(pairs=len(pairs), shards=len(cache.manifest.shards), checks=checks, problems=problems,
                        notes=notes)


def manifest_request(root: str | Path, device: str = "cpu", batch_size: int = 256) -> CacheRequest:
    """The `distillery cache` request that made the cache at `root`, read back from its manifest (a repair
    re-runs it; `plan_cache` refuses it, naming the field, if it does not give the cache's identity)."""
    m = Manifest.load(root)
    d, v, st, t = m.dataset, m.views, m.storage, m.teacher
    return CacheRequest(dataset=d.name, split=d.split, subset=d.subset, subset_seed=d.subset_seed,
                        teacher=t.model, checkpoint=t.checkpoint, weights=t.weights, class_map=t.class_map,
                        teacher_head=t.head, views=v.num_augmented,
                        view_seed=v.seed, logits=st.logits, tap=st.tap or "none", grid=st.grid, featmaps=st.featmaps,
                        teacher_tail=st.teacher_tail, store=st.store, lsh_bits=st.lsh_bits, input_size=t.input_size,
                        shard_size=st.shard_size, block_size=st.block_size,
                        cka_source=m.stats.cka_source or "auto", out=str(root), batch_size=batch_size,
                        device=device, on_bad_image=d.on_bad_image or "fail", inputs=st.inputs or "raw",
                        max_side=st.max_side, reduced_decode=st.decode_min_side is not None, resize=v.resize,
                        shard_bytes=MAX_SHARD_BYTES)  # the stored shard size already fits the budget it had


def repair_cache(root: str | Path, device: str = "cpu", batch_size: int = 256) -> list[str]:
    """`distillery verify --repair`: rewrite every shard, statistic and side file of the cache at `root` that
    fails its checks, with the teacher that made it; returns the problems found before.

    Refused (TeacherError, one line) unless the checkpoint recorded in the manifest is at hand and
    unchanged: a repair must reproduce the cache's own targets, not another teacher's.
    """
    cache = TeacherCache(root, require_complete=False)
    check_cache_checkpoint(manifest_teacher_spec(cache.manifest.teacher))
    found = cache.verify_integrity() if cache.manifest.status == "complete" else ["the cache is partial"]
    run_cache_pass(manifest_request(root, device, batch_size))
    return found
