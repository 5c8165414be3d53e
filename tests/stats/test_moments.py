import numpy as np
import pytest
from sklearn.decomposition import PCA

from pipeline.stats.moments import FeatureMoments, PCABasis, pca_from_moments


def _merged_moments(x: np.ndarray, sizes: list[int]) -> FeatureMoments:
    """Moments of x accumulated over uneven parts, mixing update and merge as the reduce step does."""
    assert sum(sizes) == x.shape[0]
    bounds = np.cumsum([0] + sizes)
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        part = FeatureMoments.empty(x.shape[1])
        part.update(x[lo:hi])
        parts.append(part)
    total = FeatureMoments.empty(x.shape[1])
    for part in reversed(parts):
        total = part.merge(total)
    return total


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_merged_partials_match_numpy(offset):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6)) * np.array([1, 2, 3, 0.5, 5, 1]) + offset
    m = _merged_moments(x, [1, 2, 37, 300, 60])

    ref_cov = np.cov(x, rowvar=False)
    assert m.count == 400
    np.testing.assert_allclose(m.mean, x.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(m.covariance, ref_cov, rtol=1e-10, atol=1e-10 * np.abs(ref_cov).max())


def test_large_offset_defeats_naive_sums_but_not_the_parallel_update():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 4)) + 1e4
    ref_cov = np.cov(x, rowvar=False)
    tolerance = 1e-10 * np.abs(ref_cov).max()

    naive = (x.T @ x - len(x) * np.outer(x.mean(0), x.mean(0))) / (len(x) - 1)
    assert np.abs(naive - ref_cov).max() > tolerance  # the test data does exercise cancellation

    m = _merged_moments(x, [700, 13, 1287])
    assert np.abs(m.covariance - ref_cov).max() <= tolerance


def test_update_accepts_low_precision_and_accumulates_in_float64():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 3)).astype(np.float16)
    m = FeatureMoments.empty(3)
    m.update(x[:20])
    m.update(x[20:])
    assert m.mean.dtype == np.float64
    np.testing.assert_allclose(m.covariance, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10)


def test_merge_with_empty_is_identity_and_returns_new_object():
    m = FeatureMoments.empty(2)
    m.update(np.array([[1.0, 2.0], [3.0, 5.0], [4.0, 0.0]]))
    for merged in (m.merge(FeatureMoments.empty(2)), FeatureMoments.empty(2).merge(m)):
        assert merged is not m
        assert merged.count == 3
        np.testing.assert_array_equal(merged.mean, m.mean)
        np.testing.assert_array_equal(merged.covariance, m.covariance)


def test_covariance_needs_two_rows_and_shapes_are_checked():
    m = FeatureMoments.empty(3)
    m.update(np.ones((1, 3)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        m.covariance
    with pytest.raises(ValueError, match="shape"):
        m.update(np.ones((2, 4)))
    with pytest.raises(ValueError, match="dim"):
        m.merge(FeatureMoments.empty(4))


def _correlated_features(rng, n=3000, dim=16):
    scales = np.geomspace(10.0, 0.1, dim)
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    return (rng.normal(size=(n, dim)) * scales) @ rotation + 50.0


def test_pca_matches_sklearn_up_to_sign():
    rng = np.random.default_rng(3)
    x = _correlated_features(rng)
    basis = pca_from_moments(_merged_moments(x, [1000, 999, 1001]))
    ref = PCA(n_components=10, svd_solver="full").fit(x)

    cosines = np.abs(np.sum(basis.components[:10] * ref.components_, axis=1))
    assert np.all(cosines > 0.999)
    np.testing.assert_allclose(basis.explained_variance[:10], ref.explained_variance_, rtol=1e-5)
    np.testing.assert_allclose(basis.mean, ref.mean_, rtol=1e-6)
    assert basis.components.dtype == basis.mean.dtype == basis.explained_variance.dtype == np.float32


def test_pca_sign_convention_and_ordering():
    rng = np.random.default_rng(4)
    basis = pca_from_moments(_merged_moments(_correlated_features(rng, n=500, dim=8), [500]))
    rows = np.arange(8)
    pivots = np.argmax(np.abs(basis.components), axis=1)
    assert np.all(basis.components[rows, pivots] > 0)
    assert np.all(np.diff(basis.explained_variance) <= 0)
    np.testing.assert_allclose(basis.components @ basis.components.T, np.eye(8), atol=1e-5)


def test_pca_clamps_negative_eigenvalues_of_rank_deficient_data():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(100, 2)) @ rng.normal(size=(2, 6))  # rank 2 in 6 dimensions
    basis = pca_from_moments(_merged_moments(x, [40, 60]))
    assert np.all(basis.explained_variance >= 0)
    assert np.all(basis.explained_variance[2:] < 1e-10 * basis.explained_variance[0])


def test_num_components_for():
    basis = PCABasis(
        mean=np.zeros(4, np.float32),
        components=np.eye(4, dtype=np.float32),
        explained_variance=np.array([5.0, 3.0, 1.0, 1.0], np.float32),
    )
    np.testing.assert_allclose(basis.explained_variance_ratio(), [0.5, 0.3, 0.1, 0.1])
    assert basis.num_components_for(0.5) == 1
    assert basis.num_components_for(0.51) == 2
    assert basis.num_components_for(0.8) == 2
    assert basis.num_components_for(0.81) == 3
    assert basis.num_components_for(1.0) == 4
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            basis.num_components_for(bad)
