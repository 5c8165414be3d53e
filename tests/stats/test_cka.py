import numpy as np
import pytest

from pipeline.stats.cka import category_interrelations, linear_cka


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


def _double_loop(values, labels, num_classes):
    counts = [int(np.sum(labels == c)) for c in range(num_classes)]
    m = min(counts)
    blocks = [values[np.flatnonzero(labels == c)[:m]] for c in range(num_classes)]
    return np.array([[linear_cka(a, b) for b in blocks] for a in blocks])


@pytest.mark.parametrize(("rows_per_class", "dim"), [(6, 20), (12, 12), (40, 5)])
@pytest.mark.parametrize("block", [1, 3, 64])
def test_category_interrelations_match_double_loop(rows_per_class, dim, block):
    rng = np.random.default_rng(rows_per_class * dim)
    num_classes = 5
    # Unequal class sizes, interleaved: only the first m rows of each class in stored order count.
    labels = np.concatenate([np.full(rows_per_class + 3 * c, c) for c in range(num_classes)])
    rng.shuffle(labels)
    prototypes = rng.normal(size=(num_classes, dim)) * 2
    values = (prototypes[labels] + rng.normal(size=(len(labels), dim)) + 10.0).astype(np.float32)

    ir = category_interrelations(values, labels, num_classes, block=block)

    expected = _double_loop(values, labels, num_classes)
    assert ir.shape == (num_classes, num_classes) and ir.dtype == np.float32
    np.testing.assert_allclose(ir, expected, atol=1e-5)
    np.testing.assert_array_equal(np.diag(ir), 1.0)
    np.testing.assert_array_equal(ir, ir.T)


def test_category_interrelations_use_stored_order():
    rng = np.random.default_rng(7)
    labels = np.array([0, 1, 0, 1, 0, 1, 1])  # class 0 has 3 rows, so class 1 uses its first 3
    values = rng.normal(size=(7, 4))
    reordered = values.copy()
    reordered[[3, 6]] = values[[6, 3]]  # swap a used row of class 1 with its unused last row
    assert not np.allclose(
        category_interrelations(values, labels, 2), category_interrelations(reordered, labels, 2)
    )


@pytest.mark.parametrize(("labels", "message"), [([0, 0, 1, 2, 2], "class 1 has 1"), ([0, 0, 2, 2], "class 1 has 0")])
def test_category_interrelations_need_two_samples_per_class(labels, message):
    labels = np.array(labels)
    values = np.random.default_rng(0).normal(size=(len(labels), 3))
    with pytest.raises(ValueError, match=message):
        category_interrelations(values, labels, 3)


def test_category_interrelations_reject_labels_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        category_interrelations(np.zeros((4, 2)), np.array([0, 0, 1, 2]), 2)
