"""Prior kernels against brute-force loops in numpy float64."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from monai_du.kernels import (
    CategoricalKernel,
    CosineKernel,
    RBFKernel,
    kernel_from_dict,
    kernel_summary,
)


def _prior(n=40, seed=0, missing=False):
    rng = np.random.default_rng(seed)
    age = rng.uniform(20, 90, n)
    sex = rng.integers(0, 2, n).astype(float)
    site = rng.integers(0, 4, n).astype(float)
    prior = np.stack([age, sex, site], 1)
    if missing:
        prior[::5, 0] = np.nan
        prior[1::7, 1] = np.nan
        prior[2::6, 2] = np.nan
    return prior


def _loop(fn, x):
    n = len(x)
    return np.array([[fn(x[i], x[j]) for j in range(n)] for i in range(n)])


def test_rbf_matches_loop_one_and_many_columns():
    x = _prior()
    got = RBFKernel(bandwidth=7.5, columns=[0])(torch.tensor(x)).numpy()
    want = _loop(lambda a, b: math.exp(-((a[0] - b[0]) ** 2) / (2 * 7.5**2)), x)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)

    got = RBFKernel(bandwidth=[7.5, 0.5], columns=[0, 2])(torch.tensor(x)).numpy()
    want = _loop(lambda a, b: math.exp(-((a[0] - b[0]) ** 2) / (2 * 7.5**2) - (a[2] - b[2]) ** 2 / (2 * 0.25)), x)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_rbf_wide_embedding_path_matches_loop():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 16))
    got = RBFKernel(bandwidth=3.0)(torch.tensor(x)).numpy()
    want = _loop(lambda a, b: math.exp(-((a - b) ** 2).sum() / 18.0), x)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_categorical_and_product_match_loop():
    x = _prior()
    k = RBFKernel(bandwidth=10.0, columns=[0]) * CategoricalKernel(columns=[1]) * CategoricalKernel(columns=[2])
    want = _loop(lambda a, b: math.exp(-((a[0] - b[0]) ** 2) / 200.0) * (a[1] == b[1]) * (a[2] == b[2]), x)
    np.testing.assert_allclose(k(torch.tensor(x)).numpy(), want, rtol=1e-12, atol=1e-14)
    both = CategoricalKernel(columns=[1, 2])(torch.tensor(x)).numpy()
    np.testing.assert_array_equal(both, _loop(lambda a, b: float(a[1] == b[1] and a[2] == b[2]), x))


def test_sum_and_scaled_match_loop():
    x = _prior()
    k = 0.5 * RBFKernel(bandwidth=10.0, columns=[0]) + CategoricalKernel(columns=[2])
    want = _loop(lambda a, b: 0.5 * math.exp(-((a[0] - b[0]) ** 2) / 200.0) + (a[2] == b[2]), x)
    np.testing.assert_allclose(k(torch.tensor(x)).numpy(), want, rtol=1e-12)


def test_cosine_matches_loop_and_zero_vector_is_finite():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20, 8))
    x[3] = 0.0
    got = CosineKernel()(torch.tensor(x)).numpy()

    def cos(a, b):
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))

    np.testing.assert_allclose(got, _loop(cos, x), rtol=1e-12, atol=1e-14)
    assert np.isfinite(got).all()


def test_bandwidth_rules_match_numpy():
    rng = np.random.default_rng(3)
    age = rng.uniform(20, 90, (300, 1))
    n = len(age)
    std = age.std(ddof=1)
    assert RBFKernel("scott").fit(age).bandwidth[0] == pytest.approx(std * n ** (-1 / 5), rel=1e-10)
    assert RBFKernel("silverman").fit(age).bandwidth[0] == pytest.approx(
        (4 / 3) ** (1 / 5) * std * n ** (-1 / 5), rel=1e-10
    )
    dist = np.abs(age - age.T)
    iu = np.triu_indices(n, 1)
    assert RBFKernel("median").fit(age).bandwidth[0] == pytest.approx(np.median(dist[iu]), rel=1e-10)
    # knn with the batch = the whole training set: median distance to the 5th neighbour (index 0 is the sample)
    kth = np.sort(dist, 1)[:, 5]
    got = RBFKernel("knn", knn_k=5, knn_batch_size=n).fit(age).bandwidth[0]
    assert got == pytest.approx(np.median(kth), rel=1e-10)
    # neighbourhood scale is much narrower than the density rules for a batch of this size
    assert got < RBFKernel("median").fit(age).bandwidth[0] / 5


def test_knn_rule_within_groups_measures_batches_like_the_sampler():
    # two interleaved groups on a line: spacing 1 inside a group, 0.5 once they are mixed
    x = np.concatenate([np.arange(10.0), np.arange(10.0) + 0.5])[:, None]
    groups = ["a"] * 10 + ["b"] * 10
    # batches of all 20 rows: the 2nd neighbour is 0.5 away (1.0 at the two ends) -> median 0.5
    assert RBFKernel("knn", knn_k=2, knn_batch_size=20).fit(x).bandwidth[0] == pytest.approx(0.5)
    # batches inside one group: 1.0 away (2.0 at the ends) -> median 1.0, whatever the draws
    within = RBFKernel("knn", knn_k=2, knn_batch_size=20, seed=3).fit(x, groups=groups)
    assert within.bandwidth[0] == pytest.approx(1.0)
    # against a brute-force loop on random data with one batch holding every row
    y = np.random.default_rng(4).normal(size=(25, 3))
    brute = [sorted(np.linalg.norm(y - y[i], axis=1))[4] for i in range(25)]
    assert RBFKernel("knn", knn_k=4, knn_batch_size=25).fit(y).bandwidth[0] == pytest.approx(np.median(brute))
    with pytest.raises(ValueError, match="needs a group with at least 13"):
        RBFKernel("knn", knn_k=12, knn_batch_size=20).fit(x, groups=groups)
    with pytest.raises(ValueError, match="groups has 3 entries"):
        RBFKernel("knn", knn_k=2, knn_batch_size=20).fit(x, groups=["a", "b", "c"])
    # composites pass the groups to their factors
    product = RBFKernel("knn", columns=[0], knn_k=2, knn_batch_size=20) * CategoricalKernel(columns=[0])
    assert product.fit(x, groups=groups).k1.bandwidth[0] == pytest.approx(1.0)


def test_rules_need_fit_and_reject_bad_values():
    with pytest.raises(RuntimeError, match="not fitted"):
        RBFKernel("median")(torch.zeros(3, 1))
    for bad in (0.0, -1.0, float("nan"), [1.0, 0.0]):
        with pytest.raises(ValueError, match="bandwidth"):
            RBFKernel(bad)
    with pytest.raises(ValueError, match="rule"):
        RBFKernel("widest")
    with pytest.raises(ValueError, match="non-positive bandwidth"):
        RBFKernel("median", columns=[0]).fit(np.ones((10, 1)))
    with pytest.raises(ValueError, match="columns"):
        RBFKernel(1.0, columns=[5])(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"\(B, P\)"):
        RBFKernel(1.0)(torch.zeros(3))


def test_fitted_kernel_round_trips_through_json():
    x = _prior(missing=True)
    k = RBFKernel("knn", columns=[0], knn_batch_size=16) * CategoricalKernel(columns=[1]) + 0.3 * CosineKernel([0, 2])
    k.fit(x)
    restored = kernel_from_dict(json.loads(json.dumps(k.to_dict())))
    np.testing.assert_array_equal(k(torch.tensor(x)).numpy(), restored(torch.tensor(x)).numpy())
    assert "knn" in repr(k) and "CategoricalKernel" in repr(k)


def test_missing_categorical_uses_training_frequencies():
    train = np.array([[0.0], [0.0], [0.0], [1.0]])
    k = CategoricalKernel(columns=[0]).fit(train)
    x = torch.tensor([[0.0], [1.0], [np.nan], [np.nan]], dtype=torch.float64)
    got = k(x).numpy()
    p0, p1 = 0.75, 0.25
    want = np.array(
        [
            [1, 0, p0, p0],
            [0, 1, p1, p1],
            [p0, p1, p0**2 + p1**2, p0**2 + p1**2],
            [p0, p1, p0**2 + p1**2, p0**2 + p1**2],
        ]
    )
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_missing_rbf_is_expectation_under_gaussian_marginal():
    rng = np.random.default_rng(4)
    train = rng.normal(50.0, 12.0, (5000, 1))
    k = RBFKernel(bandwidth=6.0, columns=[0]).fit(train)
    m, v = train.mean(), train.var()
    y = 61.0
    x = torch.tensor([[np.nan], [y]], dtype=torch.float64)
    got = k(x).numpy()
    # Gauss-Hermite quadrature of E_{a ~ N(m, v)} exp(-(a - y)^2 / (2 s^2)), and of the double expectation
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    weights = weights / weights.sum()
    a = m + math.sqrt(v) * nodes
    one = (weights * np.exp(-((a - y) ** 2) / 72.0)).sum()
    two = (weights[:, None] * weights[None, :] * np.exp(-((a[:, None] - a[None, :]) ** 2) / 72.0)).sum()
    assert got[0, 1] == pytest.approx(one, rel=1e-9)
    assert got[0, 0] == pytest.approx(two, rel=1e-9)
    assert got[1, 1] == 1.0


def test_kernels_with_missing_values_are_psd_and_finite():
    x = _prior(n=60, missing=True)
    k = RBFKernel(bandwidth=8.0, columns=[0]) * CategoricalKernel(columns=[1]) * CategoricalKernel(columns=[2])
    for kern in (k, k.fit(_prior(n=200, seed=9))):
        gram = kern(torch.tensor(x))
        assert torch.isfinite(gram).all()
        assert torch.linalg.eigvalsh(gram).min() > -1e-10


def test_exact_feature_maps_reproduce_the_gram():
    x = torch.tensor(_prior(missing=True))
    for kern in (
        CategoricalKernel(columns=[1]),
        CategoricalKernel(columns=[1, 2]),
        CategoricalKernel(columns=[1]) * CategoricalKernel(columns=[2]),
        CategoricalKernel(columns=[2]).fit(_prior(seed=5)[:10]),
        CosineKernel(columns=[0, 2]),
        CategoricalKernel(columns=[1]) + 2.0 * CosineKernel(columns=[0, 2]),
    ):
        f = kern.feature_map(x)
        assert f is not None and f.shape[0] == len(x)
        np.testing.assert_allclose((f @ f.T).numpy(), kern(x).numpy(), atol=1e-12)


def test_unseen_category_matches_only_itself():
    k = CategoricalKernel(columns=[0]).fit(np.array([[0.0], [1.0]]))
    x = torch.tensor([[0.0], [7.0], [7.0], [1.0]], dtype=torch.float64)
    want = np.array([[1, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]], dtype=float)
    np.testing.assert_array_equal(k(x).numpy(), want)
    f = k.feature_map(x)
    np.testing.assert_array_equal((f @ f.T).numpy(), want)


def test_random_fourier_features_approximate_rbf():
    x = torch.tensor(_prior(n=50, missing=True))
    errors = []
    for rank in (64, 4096):
        k = RBFKernel(bandwidth=10.0, columns=[0], n_features=rank, fourier="rff").fit(_prior(n=500, seed=7))
        assert k.feature_map(x) is None  # approximate maps only on request
        f = k.feature_map(x, approximate=True)
        errors.append(np.abs((f @ f.T).numpy() - k(x).numpy()).max())
    assert errors[1] < 0.08
    assert errors[1] < errors[0]


@pytest.mark.parametrize("bandwidth", [0.5, 3.0, 40.0])
def test_quadrature_features_reproduce_one_column_rbf(bandwidth):
    x = torch.tensor(_prior(n=80, missing=True))
    k = RBFKernel(bandwidth=bandwidth, columns=[0]).fit(_prior(n=300, seed=8))
    f = k.feature_map(x, approximate=True)
    assert f.shape[1] < 80 * 40 / bandwidth + 60  # rank grows with range / bandwidth, not with B
    np.testing.assert_allclose((f @ f.T).numpy(), k(x).numpy(), atol=1e-10)
    with pytest.raises(ValueError, match="single prior column"):
        RBFKernel(1.0, columns=[0, 2], fourier="quadrature").feature_map(x, approximate=True)


def test_block_ids_separate_zero_blocks():
    x = torch.tensor(_prior())
    k = RBFKernel(bandwidth=10.0, columns=[0]) * CategoricalKernel(columns=[1]) * CategoricalKernel(columns=[2])
    ids = k.block_ids(x)
    gram = k(x)
    differ = ids[:, None] != ids[None, :]
    assert (gram[differ] == 0).all()
    assert (gram[~differ] > 0).all()
    assert CategoricalKernel(columns=[2]).block_ids(torch.tensor(_prior(missing=True))) is None


def test_kernel_summary_closed_forms():
    eye = torch.eye(12)
    s = kernel_summary(eye)
    assert s["kernel_effective_rank"] == pytest.approx(12.0) and s["kernel_mean_offdiag"] == 0.0
    groups = torch.arange(12) % 3
    s = kernel_summary((groups[:, None] == groups[None, :]).float())
    assert s["kernel_effective_rank"] == pytest.approx(3.0)
    assert s["kernel_mean_offdiag"] == pytest.approx((3 * 4 * 3) / (12 * 11))
    assert kernel_summary(torch.ones(5, 5))["kernel_effective_rank"] == pytest.approx(1.0)
