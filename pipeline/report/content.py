"""What the cache report shows, gathered once from a cache: numbers and arrays, no pictures.

The HTML page (`pipeline.report.html`) and the Prefect markdown artifact (`pipeline.report.markdown`)
both render a `CacheReport`; sections a cache cannot fill (no logits, no tap, no LSH, dataset not
found here) are left as None with a note saying why.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from pipeline.cache.manifest import CacheError
from pipeline.checksums import sha256_file
from pipeline.cache.source import source_dataset
from pipeline.cache.blocks import block_key
from pipeline.cache.reader import TeacherCache
from pipeline.cache.summary import (PCA_FRACTIONS, ArrayRow, array_rows, components_reaching, human_bytes,
                                    pca_cumulative_ratio, teacher_accuracy_per_view)
from pipeline.data.datasets import DatasetError
from pipeline.data.views import ViewPlan, render_view
from pipeline.teacher.checkpoint import CheckpointError, TeacherCheckpoint

TOP_PAIRS = 10
KNN_K = 10
KNN_QUERIES = 1000
KNN_SEARCHED = 10_000
DISTANCE_PAIRS = 20000


@dataclass(frozen=True)
class Storage:
    """Bytes on disk: the zarr per-sample arrays, the zarr statistics, and the webdataset shards."""

    per_sample_arrays: int
    statistics: int
    shards: int
    num_samples: int

    @property
    def per_sample(self) -> float:
        """Bytes one sample costs (its zarr rows and its share of the shards)."""
        return (self.per_sample_arrays + self.shards) / max(1, self.num_samples)

    @property
    def total(self) -> int:
        return self.per_sample_arrays + self.statistics + self.shards


def storage_totals(cache: TeacherCache, rows: list[ArrayRow]) -> Storage:
    per_sample = sum(r.stored_bytes for r in rows if r.name in cache.manifest.arrays)
    statistics = sum(r.stored_bytes for r in rows if r.name not in cache.manifest.arrays)
    shards = sum(r.bytes for r in cache.manifest.records())
    return Storage(per_sample, statistics, shards, cache.num_samples)


@dataclass(frozen=True)
class CkaSummary:
    """The CKA category interrelations (docs/cache-format.md#statistics) and the most related distinct class pairs."""

    ir: np.ndarray  # (C, C)
    class_names: list[str]
    source: str  # logits | features
    top_pairs: list[tuple[str, str, float]]


def top_related_pairs(ir: np.ndarray, names: list[str], top: int = TOP_PAIRS) -> list[tuple[str, str, float]]:
    """The `top` pairs i < j with the largest interrelation, largest first (ties: lower i, then j)."""
    i, j = np.triu_indices(len(names), k=1)
    values = ir[i, j]
    order = np.lexsort((j, i, -values))[:top]
    return [(names[i[o]], names[j[o]], float(values[o])) for o in order]


def cka_summary(cache: TeacherCache, top: int = TOP_PAIRS) -> CkaSummary | None:
    if not cache.has("stats/cka/ir"):
        return None
    ir = cache.read("stats/cka/ir").astype(np.float64)
    return CkaSummary(ir, cache.class_names, cache.manifest.stats.cka_source or "logits",
                      top_related_pairs(ir, cache.class_names, top))


@dataclass(frozen=True)
class GaussianStats:
    """Per-channel averages over view-0 sample-cells of the cached Gaussians (docs/cache-format.md#statistics, WKD-F)."""

    tap: str
    grid: int
    channel_mean: np.ndarray  # (Cf,) mean of the per-cell channel means
    channel_std: np.ndarray  # (Cf,) mean of the per-cell channel stds


def gaussian_stats(cache: TeacherCache) -> GaussianStats | None:
    if not cache.has("stats/gaussian/channel_mean"):
        return None
    return GaussianStats(str(cache.manifest.storage.tap), cache.manifest.storage.grid,
                         cache.read("stats/gaussian/channel_mean"), cache.read("stats/gaussian/channel_std"))


@dataclass(frozen=True)
class KnnScore:
    """Leave-one-out k-NN under Hamming distance: how often the neighbours' majority label is the query's
    (`accuracy`), and the share of all k neighbours that share the query's label (`agreement`)."""

    accuracy: float
    agreement: float
    k: int
    queries: int


@dataclass(frozen=True)
class LshSummary:
    """What the cached LSH codes (docs/cache-format.md#statistics, docs/methods.md#elsh) carry about the classes, on view 0."""

    bits: int
    dim: int
    ones_fraction: np.ndarray  # (bits,) share of view-0 codes with each bit set; median thresholds give 0.5
    knn: KnnScore  # with every bit
    by_bits: dict[int, KnnScore]  # the same with only the first b bits, b = 1, 2, 4, ..., bits
    searched: int  # codes the k-NN searches among (a seeded subset of a large cache)
    same_class: np.ndarray  # Hamming distances of seeded same-class pairs
    other_class: np.ndarray  # and of as many different-class pairs
    chance: float  # share of the most frequent class: what always guessing it scores

    @property
    def separation(self) -> float:
        """P(a same-class pair is closer than a different-class pair), ties counted half: the ROC AUC of
        "same class" scored by minus the distance (Mann-Whitney U / (n1 n2)); 0.5 says nothing."""
        return closer_probability(self.same_class, self.other_class, self.bits)


def closer_probability(near: np.ndarray, far: np.ndarray, bits: int) -> float:
    """P(d_near < d_far) + P(d_near = d_far) / 2 for independent draws of integer distances in [0, bits]."""
    p = np.bincount(near, minlength=bits + 1) / len(near)
    q = np.bincount(far, minlength=bits + 1) / len(far)
    farther = 1 - np.cumsum(q)  # P(d_far > d)
    return float((p * (farther + q / 2)).sum())


def unpack_codes(codes: np.ndarray) -> np.ndarray:
    """Packed (..., bits/8) uint8 codes -> (..., bits) 0/1 uint8; bit b is bit b % 8 of byte b // 8 (LSB first,
    faiss's order, docs/cache-format.md#contract)."""
    return np.unpackbits(codes, axis=-1, bitorder="little")


def leading_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Packed codes of their first `bits` bits only (ceil(bits / 8) bytes; the last byte's spare bits zero, so
    they add no distance). The bits of random-hyperplane LSH are exchangeable: the first b are as good as any b."""
    return np.packbits(unpack_codes(codes)[..., :bits], axis=-1, bitorder="little")


def hamming_knn(codes: np.ndarray, labels: np.ndarray, k: int = KNN_K, queries: int = KNN_QUERIES,
                seed: int = 0) -> KnnScore:
    """Leave-one-out k-NN of packed binary codes (N, bits/8) under Hamming distance.

    `queries` seeded rows are each classified by the majority label of their k nearest other rows
    (faiss exact binary search; a tie between labels goes to the lowest class).
    """
    n = len(codes)
    k = min(k, n - 1)
    if k < 1:
        raise CacheError("k-NN accuracy needs at least 2 coded samples")
    # faiss has fast Hamming kernels for 4-byte codes and multiples of 8 bytes (a generic, several times slower
    # one otherwise); zero bytes add no distance.
    width = codes.shape[1]
    codes = np.pad(codes, ((0, 0), (0, (4 if width <= 4 else -(-width // 8) * 8) - width)))
    index = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    index.add(np.ascontiguousarray(codes))
    q = np.random.default_rng(seed).choice(n, size=min(queries, n), replace=False)
    _, found = index.search(np.ascontiguousarray(codes[q]), k + 1)
    # Drop the query itself; where ties pushed it out of the k + 1, drop the farthest instead.
    not_self = found != q[:, None]
    order = np.argsort(~not_self, axis=1, kind="stable")
    neighbour_labels = labels[np.take_along_axis(found, order, axis=1)[:, :k]]
    votes = np.zeros((len(q), int(labels.max()) + 1), dtype=np.int64)
    np.add.at(votes, (np.repeat(np.arange(len(q)), k), neighbour_labels.ravel()), 1)
    return KnnScore(accuracy=float((votes.argmax(1) == labels[q]).mean()),
                    agreement=float((neighbour_labels == labels[q, None]).mean()), k=k, queries=len(q))


def class_pairs(labels: np.ndarray, pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`pairs` seeded anchors i, each with a uniformly drawn other member of its class and a uniformly drawn
    member of another class: (i, same, other). Anchors of single-member classes are dropped from all three,
    and with a single class no pairs exist."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    counts = np.bincount(labels)
    starts = np.cumsum(counts) - counts
    order = np.argsort(labels, kind="stable")  # members of class c: order[starts[c]:starts[c] + counts[c]]
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - starts[labels[order]]
    anchors = rng.integers(len(labels), size=pairs)
    c = labels[anchors]
    keep = (counts[c] > 1) & (counts[c] < len(labels))
    anchors, c = anchors[keep], c[keep]
    pick = rng.integers(counts[c] - 1)  # another member: skip the anchor's own rank
    same = order[starts[c] + pick + (pick >= rank[anchors])]
    pick = rng.integers(len(labels) - counts[c])  # a member of the other classes: skip class c's block
    other = order[pick + np.where(pick >= starts[c], counts[c], 0)]
    return anchors, same, other


def hamming_distances(codes: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distance between packed codes a[i] and b[i]."""
    return np.bitwise_count(codes[a] ^ codes[b]).sum(-1).astype(np.int64)


def bit_counts(bits: int) -> list[int]:
    """1, 2, 4, ... below `bits`, then `bits`."""
    return [1 << e for e in range(bits.bit_length()) if 1 << e < bits] + [bits]


@contextmanager
def one_faiss_thread() -> Iterator[None]:
    """faiss searches on one OpenMP thread inside the block. Its threads spin while waiting for each other: on
    a busy 2-core machine the report's nine small searches (1,000 queries among 10,000 codes) took 14 s on
    two threads and under 1 s on one (2026-12-02, load 10)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def lsh_summary(cache: TeacherCache, k: int = KNN_K, queries: int = KNN_QUERIES, searched: int = KNN_SEARCHED,
                pairs: int = DISTANCE_PAIRS) -> LshSummary | None:
    """The codes' class information on view 0: k-NN with the first b bits (b = 1, 2, 4, ..., all) among at most
    `searched` seeded codes (a search per b: a subset keeps a 60,000-sample cache's report in seconds), and
    the distances of `pairs` same-class and different-class pairs of the whole cache."""
    if not (cache.has("lsh/codes") and cache.has("stats/lsh/planes")):
        return None
    codes = cache.read("lsh/codes")[:, 0]
    labels = cache.read("samples/labels").astype(np.int64)
    bits = int(codes.shape[1] * 8)
    rows = np.sort(np.random.default_rng(0).choice(len(codes), size=min(searched, len(codes)), replace=False))
    with one_faiss_thread():
        by_bits = {b: hamming_knn(leading_bits(codes[rows], b), labels[rows], k, queries) for b in bit_counts(bits)}
    anchors, same, other = class_pairs(labels, pairs)
    counts = np.bincount(labels)
    return LshSummary(bits=bits, dim=int(cache.array("stats/lsh/planes").shape[1]),
                      ones_fraction=unpack_codes(codes).mean(0), knn=by_bits[bits], by_bits=by_bits, searched=len(rows),
                      same_class=hamming_distances(codes, anchors, same),
                      other_class=hamming_distances(codes, anchors, other),
                      chance=float(counts.max() / counts.sum()))


@dataclass(frozen=True)
class SampleViews:
    """A few samples rendered in every stored view, as the teacher saw them (before normalisation)."""

    images: np.ndarray  # (S, V, H, W, channels) float32 in [0, 1]
    ids: list[int]
    labels: list[str]
    predictions: list[list[tuple[str, float]]] | None  # per sample, per view: teacher's top class, probability


def sample_views(cache: TeacherCache, count: int = 6) -> SampleViews:
    """The first sample of each of the first `count` classes, every view re-rendered with `render_view`
    from the manifest's dataset (docs/ARCHITECTURE.md#views); raises CacheError or DatasetError when it is not here."""
    dataset = source_dataset(cache)
    labels = cache.read("samples/labels")
    classes, first = np.unique(labels, return_index=True)
    positions = first[np.argsort(classes)][:count]
    plan = ViewPlan(**cache.manifest.views.plan_fields())
    size, channels = cache.manifest.teacher.input_size, dataset.channels
    images = np.stack([np.stack([
        render_view(dataset.raw(int(p)), plan.params(int(dataset.ids[p]), v), size, (0.0,) * channels,
                    (1.0,) * channels).permute(1, 2, 0).clamp(0, 1).numpy()
        for v in range(cache.num_views)]) for p in positions])
    predictions = None
    if "logits" in cache.available_targets():
        rows = {block_key(name): cache.array(name).oindex[positions]
                for name in cache.manifest.arrays if name.startswith("logits/")}
        logits = cache.dense_logits(rows)
        z = np.exp(logits - logits.max(-1, keepdims=True))
        prob = z / z.sum(-1, keepdims=True)
        top = prob.argmax(-1)
        predictions = [[(cache.class_names[top[s, v]], float(prob[s, v, top[s, v]])) for v in range(top.shape[1])]
                       for s in range(len(positions))]
    return SampleViews(images=images, ids=[int(dataset.ids[p]) for p in positions],
                       labels=[cache.class_names[labels[p]] for p in positions], predictions=predictions)


@dataclass(frozen=True)
class TeacherProvenance:
    """On which split the per-view accuracy is measured, and whether the teacher learnt from it."""

    measured_on: str
    trained_on: str
    held_out: bool | None  # None: not recorded anywhere this machine can read


def teacher_provenance(cache: TeacherCache) -> TeacherProvenance:
    """The manifest names the cached split and the checkpoint (path, sha256); what the teacher was trained on
    is recorded only in a `distillery fit-teacher` checkpoint (dataset, config; it trains on the train split
    and reports the val accuracy), read here when the file is present and its sha256 is the manifest's."""
    d, t = cache.manifest.dataset, cache.manifest.teacher
    subset = f", a seeded subset of {d.subset}" if d.subset else ""
    measured_on = f"{d.name} {d.split} split ({cache.num_samples} samples{subset}), every stored view"
    path = t.checkpoint
    if not path:
        return TeacherProvenance(measured_on, "nothing: random weights (no checkpoint)", True)
    unknown = "the manifest records the checkpoint's path and sha256 only, not its training data"
    if not Path(path).is_file():
        return TeacherProvenance(measured_on, f"not recorded: checkpoint {path} is not on this machine ({unknown})",
                                 None)
    if sha256_file(path) != t.checkpoint_sha256:
        return TeacherProvenance(measured_on, f"not recorded: checkpoint {path} changed since the cache was made "
                                              f"({unknown})", None)
    try:
        ckpt = TeacherCheckpoint.load(path)
    except CheckpointError as e:
        return TeacherProvenance(measured_on, f"not recorded: {e}", None)
    config, val = ckpt.config, ckpt.val_accuracy
    trained = (f"{ckpt.dataset} train split" + (f" (a seeded subset of {config['subset']})"
                                                if config.get("subset") else "")
               + f", {config.get('epochs')} epochs, {config.get('objective', 'supervised')}"
               + (f"; its val-split accuracy {val:.2%}" if val is not None else ""))
    held_out = ckpt.dataset != d.name or d.split != "train"
    if not held_out:
        trained += (". This split (or part of it) is the teacher's training data: this is training accuracy, "
                    "not held-out accuracy")
    return TeacherProvenance(measured_on, trained, held_out)


def overview(cache: TeacherCache) -> list[tuple[str, str]]:
    """The manifest summary as (field, value) lines."""
    m = cache.manifest
    t, d, s = m.teacher, m.dataset, m.storage
    sha = t.checkpoint_sha256
    return [
        ("cache", str(cache.root)), ("status", f"{m.status} (format {m.format_version})"),
        ("created", f"{m.created}, completed {m.completed or '-'}"),
        ("teacher", f"{t.model}, input {t.input_size} px, head {'kept' if t.head else 'none'}, "
                    f"taps {', '.join(t.taps) or '-'}"),
        ("checkpoint", f"{t.checkpoint or '- (random weights)'}" + (f", sha256 {sha[:16]}" if sha else "")),
        ("dataset", f"{d.name} ({d.split}), {cache.num_samples} samples, {cache.num_classes} classes, "
                    f"fingerprint {d.fingerprint[:16]}"),
        ("views", f"{cache.num_views} stored: view 0 clean + {cache.num_views - 1} x {m.views.recipe}, "
                  f"seed {m.views.seed}"),
        ("storage", f"logits {s.logits}, pooled views {s.pooled_views}, tap {s.tap or '-'}, "
                    f"grid {s.grid}, feature maps {'yes' if s.featmaps else 'no'}, LSH bits {s.lsh_bits}"),
        ("shards", f"{len(m.shards)} x {s.shard_size} samples (blocks of {s.block_size})"),
        ("versions", ", ".join(f"{k} {v}" for k, v in m.versions.items())),
    ]


# Why a section is empty, by section.
ABSENT = {"teacher": "the cache stores no logits (head-less teacher)",
          "pca": "no PCA statistics (run `distillery stats`)",
          "cka": "no CKA interrelations (run `distillery stats`)",
          "gaussian": "no Gaussian statistics (the cache was made with --tap none)",
          "lsh": "no LSH codes (the cache was made without --lsh-bits)"}


@dataclass
class CacheReport:
    """Everything the report shows about one cache; None sections are explained in `notes`."""

    overview: list[tuple[str, str]]
    split: str  # what every figure is measured on, e.g. "digits train split"
    provenance: TeacherProvenance
    arrays: list[ArrayRow]
    storage: Storage
    teacher: list[dict[str, float]]
    pca_ratio: np.ndarray | None  # cumulative explained variance of 1..D components
    pca_reach: dict[float, int]  # fraction of variance -> components needed
    cka: CkaSummary | None
    gaussian: GaussianStats | None
    lsh: LshSummary | None
    samples: SampleViews | None
    notes: dict[str, str] = field(default_factory=dict)


def gather_report(cache: TeacherCache, samples: int = 6) -> CacheReport:
    """Read everything the report shows, with `samples` samples re-rendered in every view (0: none).

    Whole columns are read only where they are small (logits, LSH codes)."""
    rows = array_rows(cache)
    found = {"teacher": teacher_accuracy_per_view(cache) or None, "pca": pca_cumulative_ratio(cache),
             "cka": cka_summary(cache), "gaussian": gaussian_stats(cache), "lsh": lsh_summary(cache)}
    notes = {key: ABSENT[key] for key, value in found.items() if value is None}
    views = None
    if samples < 1:
        notes["samples"] = "views not rendered (see the HTML report: `distillery inspect CACHE --report FILE`)"
    else:
        try:
            views = sample_views(cache, samples)
        except (CacheError, DatasetError) as e:
            notes["samples"] = f"views not rendered: {e}"
    ratio = found["pca"]
    split = f"{cache.manifest.dataset.name} {cache.manifest.dataset.split} split"
    reach = {} if ratio is None else {f: components_reaching(ratio, f) for f in PCA_FRACTIONS}
    return CacheReport(overview=overview(cache), split=split, provenance=teacher_provenance(cache), arrays=rows,
                       storage=storage_totals(cache, rows), teacher=found["teacher"] or [], pca_ratio=ratio,
                       pca_reach=reach, cka=found["cka"], gaussian=found["gaussian"], lsh=found["lsh"], samples=views,
                       notes=notes)


def storage_lines(storage: Storage) -> list[tuple[str, str]]:
    """The storage totals as (what, how much) lines, for both renderings."""
    return [("per-sample arrays (zarr)", human_bytes(storage.per_sample_arrays)),
            ("statistics (zarr)", human_bytes(storage.statistics)),
            ("shards (webdataset)", human_bytes(storage.shards)),
            ("total", human_bytes(storage.total)),
            ("per sample (zarr rows + shards)", human_bytes(storage.per_sample))]
