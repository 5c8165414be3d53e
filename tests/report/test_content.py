"""The report's numbers: CKA pairs, LSH codes (bit order, balance, k-NN), sample views, absent sections."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.reader import TeacherCache
from pipeline.cache.summary import teacher_accuracy_per_view
from pipeline.data.datasets import load_dataset
from pipeline.lab.synthetic import write_synthetic_cache
from pipeline.report.content import (KNN_QUERIES, KnnScore, bit_counts, class_pairs, closer_probability, gather_report,
                                     hamming_knn, leading_bits, lsh_summary, one_faiss_thread, teacher_provenance,
                                     top_related_pairs, unpack_codes)


@pytest.fixture(scope="module")
def lsh_cache(tmp_path_factory: pytest.TempPathFactory) -> TeacherCache:
    """Digits with synthetic class-structured teacher outputs and 32-bit LSH codes (the LSH contract)."""
    root = tmp_path_factory.mktemp("report") / "lsh"
    return write_synthetic_cache(root, load_dataset("digits"), views=2, dim=16, channels=4, lsh_bits=32,
                                 shard_size=500, block_size=100)


def test_top_related_pairs_are_the_largest_off_diagonal_entries() -> None:
    rng = np.random.default_rng(0)
    a = rng.uniform(size=(7, 7))
    ir = (a + a.T) / 2
    np.fill_diagonal(ir, 1.0)
    names = [f"c{i}" for i in range(7)]
    brute = sorted(((ir[i, j], names[i], names[j]) for i in range(7) for j in range(i + 1, 7)), reverse=True)[:4]
    assert top_related_pairs(ir, names, 4) == [(x, y, v) for v, x, y in brute]


def test_codes_unpack_least_significant_bit_first() -> None:
    codes = np.random.default_rng(1).integers(0, 256, size=(5, 4), dtype=np.uint8)
    reference = np.array([[(row[b // 8] >> (b % 8)) & 1 for b in range(32)] for row in codes], dtype=np.uint8)
    assert np.array_equal(unpack_codes(codes), reference)


def test_knn_on_codes_excludes_the_query_itself() -> None:
    # Twins share a code but not a class: with k=1 each query's only neighbour is its twin, never itself.
    rng = np.random.default_rng(2)
    codes = np.repeat(rng.integers(0, 256, size=(50, 8), dtype=np.uint8), 2, axis=0)
    labels = np.tile([0, 1], 50)
    assert hamming_knn(codes, labels, k=1, queries=100) == KnnScore(accuracy=0.0, agreement=0.0, k=1, queries=100)


def test_knn_on_codes_is_perfect_for_well_separated_classes() -> None:
    rng = np.random.default_rng(3)
    prototypes = rng.integers(0, 2, size=(4, 128), dtype=np.uint8)
    labels = np.repeat(np.arange(4), 30)
    bits = prototypes[labels]
    flips = rng.integers(0, 128, size=(len(labels), 2))
    for row, (i, j) in enumerate(flips):
        bits[row, [i, j]] ^= 1
    codes = np.packbits(bits, axis=1, bitorder="little")
    assert hamming_knn(codes, labels, k=10, queries=500) == KnnScore(accuracy=1.0, agreement=1.0, k=10, queries=120)


def test_leading_bits_keep_the_distance_of_the_first_bits() -> None:
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 256, size=(2, 8), dtype=np.uint8)
    bits = unpack_codes(codes)
    for b in (1, 3, 8, 13, 64):
        kept = leading_bits(codes, b)
        assert kept.shape == (2, -(-b // 8))
        assert np.bitwise_count(kept[0] ^ kept[1]).sum() == (bits[0, :b] != bits[1, :b]).sum()
    assert bit_counts(32) == [1, 2, 4, 8, 16, 32] and bit_counts(48) == [1, 2, 4, 8, 16, 32, 48]


def test_class_pairs_pair_each_anchor_with_its_class_and_another() -> None:
    labels = np.array([2, 0, 1, 2, 0, 2, 3, 0, 2])  # class 1 and class 3 have a single member
    anchors, same, other = class_pairs(labels, 4000, seed=5)
    assert np.all(labels[anchors] != 1) and np.all(labels[anchors] != 3) and len(anchors) > 3000
    assert np.all(labels[same] == labels[anchors]) and np.all(same != anchors)
    assert np.all(labels[other] != labels[anchors])
    # Every eligible partner is drawn: for an anchor of class 0, both other 0s and all 6 others.
    zero = labels[anchors] == 0
    for i in np.flatnonzero(labels == 0):
        mine = anchors[zero] == i
        assert set(same[zero][mine]) == set(np.flatnonzero(labels == 0)) - {i}
        assert set(other[zero][mine]) == set(np.flatnonzero(labels != 0))
    assert [len(x) for x in class_pairs(np.zeros(5, dtype=np.int64), 10)] == [0, 0, 0]


def test_closer_probability_counts_pairs_and_half_the_ties() -> None:
    rng = np.random.default_rng(6)
    near, far = rng.integers(0, 9, size=40), rng.integers(3, 12, size=50)
    brute = np.mean([(a < b) + 0.5 * (a == b) for a in near for b in far])
    assert closer_probability(near, far, 12) == pytest.approx(brute)
    assert closer_probability(near, near, 12) == pytest.approx(0.5)


def test_lsh_section_on_a_cache_with_codes(lsh_cache: TeacherCache) -> None:
    report = gather_report(lsh_cache, samples=2)
    lsh = report.lsh
    codes = lsh_cache.read("lsh/codes")[:, 0]
    set_bits = np.array([[(row[b // 8] >> (b % 8)) & 1 for b in range(32)] for row in codes]).mean(0)
    assert lsh.bits == 32 and lsh.dim == 16 and np.allclose(lsh.ones_fraction, set_bits)
    # Median thresholds split every bit in half (the median sample itself falls on the zero side).
    assert np.all(np.abs(lsh.ones_fraction - 0.5) <= 1 / len(codes))
    labels = lsh_cache.read("samples/labels")
    counts = np.bincount(labels)
    assert lsh.chance == counts.max() / counts.sum()
    # Codes of class centres plus noise keep the classes apart far better than guessing, and more bits
    # keep them apart better than one.
    assert list(lsh.by_bits) == [1, 2, 4, 8, 16, 32] and lsh.knn == lsh.by_bits[32]
    assert lsh.knn.accuracy > 3 * lsh.chance and lsh.knn.queries == min(KNN_QUERIES, len(codes)) and lsh.knn.k == 10
    assert lsh.by_bits[32].accuracy > lsh.by_bits[1].accuracy and lsh.by_bits[32].agreement > lsh.by_bits[1].agreement
    anchors, same, other = class_pairs(labels, len(lsh.same_class))
    bits = unpack_codes(codes)
    assert np.array_equal(lsh.same_class, (bits[anchors] != bits[same]).sum(1))
    assert np.array_equal(lsh.other_class, (bits[anchors] != bits[other]).sum(1))
    assert lsh.same_class.mean() < lsh.other_class.mean() and lsh.separation > 0.6
    assert "lsh" not in report.notes and lsh.searched == len(codes)
    # A large cache is searched through a seeded subset (the pairs still span the whole cache).
    subset = lsh_summary(lsh_cache, searched=500)
    assert subset.searched == subset.knn.queries == 500 and np.array_equal(subset.same_class, lsh.same_class)


def test_teacher_provenance_says_what_the_teacher_was_trained_on(digits_cache: Path, tmp_path: Path) -> None:
    cache = TeacherCache(digits_cache)
    p = teacher_provenance(cache)
    assert p.held_out is False and "digits train split" in p.measured_on and "1437 samples" in p.measured_on
    assert p.trained_on.startswith("digits train split, 2 epochs, supervised; its val-split accuracy ")
    assert "training accuracy, not held-out accuracy" in p.trained_on
    cache.manifest.dataset.split = "val"
    assert teacher_provenance(cache).held_out is True
    cache.manifest.teacher.checkpoint_sha256 = "0" * 64
    changed = teacher_provenance(cache)
    assert changed.held_out is None and "changed since the cache was made" in changed.trained_on
    cache.manifest.teacher.checkpoint = str(tmp_path / "gone.pt")
    assert "is not on this machine" in teacher_provenance(cache).trained_on
    cache.manifest.teacher.checkpoint = None
    assert teacher_provenance(cache).held_out is True


def test_report_of_the_digits_cache_without_lsh(digits_cache: Path) -> None:
    cache = TeacherCache(digits_cache)
    report = gather_report(cache, samples=4)
    assert report.lsh is None and "--lsh-bits" in report.notes["lsh"]
    assert report.teacher == teacher_accuracy_per_view(cache)
    assert report.cka.ir.shape == (10, 10) and len(report.cka.top_pairs) == 10
    assert report.pca_reach[0.5] <= report.pca_reach[0.9] <= report.pca_reach[0.99] <= len(report.pca_ratio)
    assert report.storage.shards == sum(s.bytes for s in cache.manifest.records())

    views = report.samples
    assert views.images.shape == (4, 3, 32, 32, 1) and 0 <= views.images.min() and views.images.max() <= 1
    labels, ids = cache.read("samples/labels"), cache.read("samples/ids")
    positions = [int(np.flatnonzero(labels == c)[0]) for c in range(4)]
    assert views.ids == ids[positions].tolist() and views.labels == ["0", "1", "2", "3"]
    logits = cache.read("logits/dense")[positions].astype(np.float32)
    assert [[name for name, _ in row] for row in views.predictions] == \
        [[cache.class_names[c] for c in row] for row in logits.argmax(-1)]
    # View 0 is the whole image: its mean brightness is the raw image's (resizing keeps the mean).
    raw = load_dataset("digits").raw(positions[0]).astype(np.float64) / 255
    assert views.images[0, 0].mean() == pytest.approx(raw.mean(), abs=0.01)
    assert not np.allclose(views.images[:, 0], views.images[:, 1])  # augmented views are other crops


def test_views_are_skipped_with_a_reason_when_the_dataset_is_not_the_cached_one(tmp_path: Path) -> None:
    # A subset of digits recorded as if it were the full split: the dataset found here has other ids.
    subset = load_dataset("digits").subset(np.arange(300))
    cache = write_synthetic_cache(tmp_path / "c", subset, views=2, dim=8, channels=2, lsh_bits=8, shard_size=300)
    report = gather_report(cache, samples=3)
    assert report.samples is None and "not the one" in report.notes["samples"]
    assert report.lsh is not None


def test_one_faiss_thread_restores_the_thread_count() -> None:
    import faiss

    before = faiss.omp_get_max_threads()
    with one_faiss_thread():
        assert faiss.omp_get_max_threads() == 1
    assert faiss.omp_get_max_threads() == before
