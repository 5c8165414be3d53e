import numpy as np
import pytest

from pipeline.stats.cka import (SAMPLE_BUDGET, SAMPLE_LEVELS, category_interrelations, cka_sample_rows, linear_cka,
                                pair_sample_counts)


def _hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Independent reference: CKA as normalised HSIC with the centring matrix H (Kornblith et al.)."""
    m = x.shape[0]
    h = np.eye(m) - np.ones((m, m)) / m
    k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float(np.sum(k * l) / np.sqrt(np.sum(k * k) * np.sum(l * l)))


def test_linear_cka_matches_hsic_form():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 8)) + 5.0
    y = x[:, :5] @ rng.normal(size=(5, 6)) + rng.normal(size=(30, 6))
    assert linear_cka(x, y) == pytest.approx(_hsic_cka(x, y), rel=1e-10)
    assert 0.0 < linear_cka(x, y) < 1.0


def test_linear_cka_of_itself_is_one():
    x = np.random.default_rng(1).normal(size=(20, 7))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_linear_cka_invariances():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(25, 6)), rng.normal(size=(25, 4))
    rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    base = linear_cka(x, y)
    assert linear_cka(x @ rotation, y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(3.5 * x, y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(x + 1e3, y) == pytest.approx(base, rel=1e-8)  # column centring


def _double_loop(values, labels, num_classes, budget=SAMPLE_BUDGET):
    """Reference: each pair's CKA from the first m rows of both classes, m from `pair_sample_counts`."""
    counts = np.bincount(labels, minlength=num_classes)
    m = pair_sample_counts(counts, budget)
    rows = [np.flatnonzero(labels == c) for c in range(num_classes)]
    return np.array([[linear_cka(values[rows[i][:m[i, j]]], values[rows[j][:m[i, j]]]) for j in range(num_classes)]
                     for i in range(num_classes)])


def _clustered(rng, counts, dim):
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    rng.shuffle(labels)
    prototypes = rng.normal(size=(len(counts), dim)) * 2
    return (prototypes[labels] + rng.normal(size=(len(labels), dim)) + 10.0).astype(np.float32), labels


@pytest.mark.parametrize(("rows_per_class", "dim"), [(6, 20), (12, 12), (40, 5)])
@pytest.mark.parametrize("block", [1, 3, 64])
def test_category_interrelations_match_double_loop(rows_per_class, dim, block):
    rng = np.random.default_rng(rows_per_class * dim)
    num_classes = 5
    # Unequal class sizes, interleaved: only the first m_ij rows of each class in stored order count.
    values, labels = _clustered(rng, [rows_per_class + 3 * c for c in range(num_classes)], dim)

    result = category_interrelations(values, labels, num_classes, block=block)

    expected = _double_loop(values, labels, num_classes)
    assert result.ir.shape == (num_classes, num_classes) and result.ir.dtype == np.float32
    np.testing.assert_allclose(result.ir, expected, atol=1e-5)
    np.testing.assert_array_equal(np.diag(result.ir), 1.0)
    np.testing.assert_array_equal(result.ir, result.ir.T)
    assert result.undefined == {} and result.warning() is None


def test_pairs_use_min_of_their_two_classes_up_to_the_budget_on_a_9_percent_grid():
    m = pair_sample_counts(np.array([0, 1, 2, 143, 150, 300, 1000]), budget=256)
    assert m[0].tolist() == [0] * 7 and m[1, 1:].tolist() == [1] * 6 and m[2, 2:].tolist() == [2] * 5
    assert m[3, 4] == m[4, 4] == 140  # balanced classes within the grid step share one count
    assert m[5, 6] == 256 and m[3, 6] == 140
    large = SAMPLE_LEVELS[SAMPLE_LEVELS >= 64]
    assert np.all(np.diff(SAMPLE_LEVELS) >= 1) and np.all(large[1:] / large[:-1] < 1.1)
    assert np.sum(SAMPLE_LEVELS <= SAMPLE_BUDGET) <= 50  # Gram passes, whatever the class sizes


def test_a_budget_caps_the_rows_of_large_classes():
    rng = np.random.default_rng(3)
    values, labels = _clustered(rng, [40, 50, 60], 6)
    result = category_interrelations(values, labels, 3, budget=16)
    assert result.samples[0, 1] == 16
    np.testing.assert_allclose(result.ir, _double_loop(values, labels, 3, budget=16), atol=1e-5)


def test_a_long_tail_degrades_only_its_own_rows():
    """A 1-sample class, a class of identical samples and a 2-sample class beside three large classes: the
    large classes' interrelations are those of the same data without the rare classes, and nothing raises."""
    rng = np.random.default_rng(11)
    values, labels = _clustered(rng, [30, 35, 40], 8)
    alone = category_interrelations(values, labels, 3).ir
    rare_values = np.concatenate([values, rng.normal(size=(1, 8)), np.tile(rng.normal(size=(1, 8)), (15, 1)),
                                  rng.normal(size=(2, 8))]).astype(np.float32)
    rare_labels = np.concatenate([labels, [3], np.full(15, 4), [5, 5]])

    result = category_interrelations(rare_values, rare_labels, 6)

    np.testing.assert_array_equal(result.ir[:3, :3], alone)
    assert result.undefined == {3: "1 sample", 4: "its first 2 samples are identical"}
    assert np.all(result.ir[[3, 4]][:, [0, 1, 2, 5]] == 0) and np.all(result.ir[:, [3, 4]][[0, 1, 2, 5]] == 0)
    assert np.all(result.ir[5, :3] > 0) and result.samples[5, 0] == 2  # a 2-sample class: its own 2-row estimate
    np.testing.assert_array_equal(np.diag(result.ir), 1.0)
    line = result.warning(["a", "b", "c", "one", "same", "two"])
    assert "\n" not in line and "3 ('one'): 1 sample" in line and "4 ('same')" in line


def test_category_interrelations_use_stored_order():
    rng = np.random.default_rng(7)
    labels = np.array([0, 1, 0, 1, 0, 1, 1])  # class 0 has 3 rows, so class 1 uses its first 3
    values = rng.normal(size=(7, 4))
    reordered = values.copy()
    reordered[[3, 6]] = values[[6, 3]]  # swap a used row of class 1 with its unused last row
    assert not np.allclose(
        category_interrelations(values, labels, 2).ir, category_interrelations(reordered, labels, 2).ir
    )


def test_cka_sample_rows_are_the_first_rows_of_each_class_up_to_the_budget():
    labels = np.array([1, 0, 1, 1, 0, 2, 1])
    assert cka_sample_rows(labels, 3, budget=2).tolist() == [0, 1, 2, 4, 5]


def test_category_interrelations_reject_labels_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        category_interrelations(np.zeros((4, 2)), np.array([0, 0, 1, 2]), 2)
