import numpy as np
import pytest

from pipeline.stats.classes import ClassMoments


def _data(rng, n=300, dim=5, num_classes=7):
    labels = rng.integers(0, num_classes - 1, size=n)  # the last class never occurs
    x = rng.normal(size=(n, dim)).astype(np.float32) + 100.0
    return x, labels


def test_means_and_counts_match_numpy():
    rng = np.random.default_rng(0)
    x, labels = _data(rng)
    stats = ClassMoments.empty(7, 5)
    stats.update(x, labels)

    for c in range(6):
        rows = x[labels == c].astype(np.float64)
        assert stats.counts[c] == len(rows)
        np.testing.assert_allclose(stats.means()[c], rows.mean(axis=0), rtol=1e-6)
    assert stats.counts[6] == 0
    np.testing.assert_array_equal(stats.means()[6], np.zeros(5))
    assert stats.means().dtype == np.float32 and stats.counts.dtype == np.int64


def test_merge_of_partials_equals_one_shot():
    rng = np.random.default_rng(1)
    x, labels = _data(rng)
    one_shot = ClassMoments.empty(7, 5)
    one_shot.update(x, labels)

    merged = ClassMoments.empty(7, 5)
    for lo, hi in [(0, 3), (3, 150), (150, 151), (151, 300)]:
        part = ClassMoments.empty(7, 5)
        part.update(x[lo:hi], labels[lo:hi])
        merged = merged.merge(part)

    np.testing.assert_array_equal(merged.counts, one_shot.counts)
    np.testing.assert_allclose(merged.sums, one_shot.sums, rtol=1e-12)


def test_repeated_labels_in_one_batch_all_count():
    stats = ClassMoments.empty(2, 1)
    stats.update(np.array([[1.0], [2.0], [6.0]]), np.array([1, 1, 1]))
    np.testing.assert_array_equal(stats.counts, [0, 3])
    np.testing.assert_allclose(stats.means(), [[0.0], [3.0]])


@pytest.mark.parametrize("bad", [-1, 3])
def test_labels_out_of_range(bad):
    stats = ClassMoments.empty(3, 2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        stats.update(np.zeros((2, 2)), np.array([0, bad]))
    np.testing.assert_array_equal(stats.counts, 0)  # nothing half-applied


def test_shape_mismatches():
    stats = ClassMoments.empty(3, 2)
    with pytest.raises(ValueError, match="shape"):
        stats.update(np.zeros((2, 3)), np.array([0, 1]))
    with pytest.raises(ValueError, match="labels of shape"):
        stats.update(np.zeros((2, 2)), np.array([0]))
    with pytest.raises(ValueError, match="cannot merge"):
        stats.merge(ClassMoments.empty(4, 2))
