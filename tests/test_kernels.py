"""Prior kernels against brute-force loops in numpy float64."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from monai_du.kernels import (
    CategoricalKernel,
    CosineKernel,
    PriorKernel,
    ProductKernel,
    RBFKernel,
    ScaledKernel,
    SumKernel,
    _kernel_classes,
    kernel_from_dict,
    kernel_summary,
    nystrom_features,
    patient_time_kernel,
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


# -- serialisation of every kernel ------------------------------------------------------------------------------------


def _clinical(n, seed, patients, nan=True):
    """Columns: age, sex, site, patient code, days since the patient's first study; NaNs in every column."""
    rng = np.random.default_rng(seed)
    prior = np.stack(
        [
            rng.uniform(20, 90, n),
            rng.integers(0, 2, n).astype(float),
            rng.integers(0, 4, n).astype(float),
            rng.integers(0, patients, n).astype(float),
            rng.integers(0, 900, n).astype(float),
        ],
        1,
    )
    if nan:
        for col, step in zip(range(5), (5, 7, 6, 8, 9)):
            prior[col % 3 :: step, col] = np.nan
    return prior


def _every_kernel():
    """Every kernel class and composition, fitted on training priors."""
    kernels = [
        RBFKernel(7.0, columns=[0]),
        RBFKernel([7.0, 100.0], columns=[0, 4]),
        RBFKernel("knn", columns=[0, 4], knn_k=3, knn_batch_size=32),
        RBFKernel("scott", columns=[0]),
        RBFKernel("silverman", columns=[4]),
        RBFKernel("median", columns=[0, 4]),
        RBFKernel("gap", columns=[4], group_column=3),
        RBFKernel(5.0, columns=[0], fourier="rff", n_features=64, seed=3),
        CategoricalKernel(columns=[1]),
        CategoricalKernel(columns=[1, 2]),
        CategoricalKernel(columns=[3], missing="singleton"),
        CosineKernel(columns=[0, 4]),
        RBFKernel("knn", columns=[0], knn_batch_size=16) * CategoricalKernel(columns=[1]),
        CategoricalKernel(columns=[2]) + 0.3 * CosineKernel([0, 2]),
        ScaledKernel(RBFKernel(9.0, columns=[0]), 2.5),
        SumKernel(ProductKernel(CategoricalKernel([1]), CategoricalKernel([2])), RBFKernel("scott", columns=[4])),
        patient_time_kernel(patient_column=3, time_column=4),
        patient_time_kernel(patient_column=3, time_column=4, bandwidth=30.0, missing_patient="expected"),
    ]
    train = _clinical(300, seed=20, patients=60)
    return [k.fit(train) for k in kernels]


def _classes_in(kernel):
    out = {type(kernel)}
    for value in vars(kernel).values():
        if isinstance(value, PriorKernel):
            out |= _classes_in(value)
    return out


def test_every_kernel_round_trips_through_json_on_new_priors():
    new = torch.tensor(_clinical(40, seed=21, patients=80))  # new rows: other ages, unseen patients, NaNs
    kernels = _every_kernel()
    covered = set().union(*(_classes_in(k) for k in kernels))
    ours = {name for name, cls in _kernel_classes().items() if cls.__module__ == "monai_du.kernels"}
    assert {c.__name__ for c in covered} >= ours - {"PriorKernel"}
    for k in kernels:
        spec = k.to_dict()
        restored = kernel_from_dict(json.loads(json.dumps(spec)))
        assert type(restored) is type(k) and restored.to_dict() == spec
        np.testing.assert_array_equal(restored(new).numpy(), k(new).numpy(), err_msg=repr(k))
        f, g = k.feature_map(new, approximate=True), restored.feature_map(new, approximate=True)
        assert (f is None) == (g is None)
        if f is not None:
            np.testing.assert_array_equal(f.numpy(), g.numpy(), err_msg=repr(k))


def test_cosine_round_trip_keeps_the_training_mean():
    # a missing coordinate takes the training mean, not the batch mean, also after a round trip
    train = np.array([[1.0, 0.0], [3.0, 0.2], [2.0, -0.2]])
    batch = np.array([[np.nan, 1.0], [-2.0, 1.0], [-1.0, 1.0]])
    k = CosineKernel().fit(train)
    restored = kernel_from_dict(json.loads(json.dumps(k.to_dict())))
    filled = np.where(np.isnan(batch), train.mean(0), batch)
    unit = filled / np.linalg.norm(filled, axis=1, keepdims=True)
    np.testing.assert_allclose(restored(torch.tensor(batch)).numpy(), unit @ unit.T, rtol=1e-12)
    batch_fill = np.where(np.isnan(batch), np.nanmean(batch, 0), batch)  # what an unfitted kernel does
    batch_unit = batch_fill / np.linalg.norm(batch_fill, axis=1, keepdims=True)
    assert abs((unit @ unit.T)[0, 1] - (batch_unit @ batch_unit.T)[0, 1]) > 1.0


def test_dicts_written_by_earlier_versions_still_load():
    old = {
        "type": "ProductKernel",
        "k1": {"type": "RBFKernel", "bandwidth": "knn", "columns": [0], "knn_k": 5, "knn_batch_size": 16,
               "bandwidth_": [6.0], "mean_": [50.0], "var_": [100.0]},
        "k2": {"type": "CategoricalKernel", "columns": [1], "categories_": [[0.0, 1.0]],
               "frequencies_": [[0.75, 0.25]]},
    }
    k = kernel_from_dict(old)
    x = torch.tensor([[np.nan, 0.0], [61.0, 0.0], [40.0, 1.0]], dtype=torch.float64)
    s2, m, v = 36.0, 50.0, 100.0
    want01 = math.sqrt(s2 / (s2 + v)) * math.exp(-((61.0 - m) ** 2) / (2 * (s2 + v)))
    got = k(x).numpy()
    assert got[0, 1] == pytest.approx(want01, rel=1e-12) and got[0, 2] == 0.0
    assert got[0, 0] == pytest.approx(math.sqrt(s2 / (s2 + 2 * v)), rel=1e-12)
    cosine = {"type": "CosineKernel", "columns": [0, 2]}
    scaled = kernel_from_dict({"type": "ScaledKernel", "base": cosine, "weight": 0.3})
    assert scaled.weight == 0.3 and scaled.base.columns == [0, 2]
    with pytest.raises(ValueError, match="'widht'"):
        kernel_from_dict({"type": "RBFKernel", "widht": 3.0})
    with pytest.raises(ValueError, match="unknown kernel type"):
        kernel_from_dict({"type": "LaplaceKernel"})


# -- bandwidth outliers -----------------------------------------------------------------------------------------------


def test_density_rules_warn_when_outliers_set_the_bandwidth():
    ages = np.array([34.0, 51, 62, 45, 70, 28, 55, 1e6])[:, None]
    n = len(ages)
    q1, q3 = np.percentile(ages[:, 0], [25, 75])
    for rule, factor in (("scott", n ** (-1 / 5)), ("silverman", (4 / 3) ** (1 / 5) * n ** (-1 / 5))):
        with pytest.warns(UserWarning, match="prior column 0") as record:
            k = RBFKernel(rule, columns=[0]).fit(ages)
        message = str(record[0].message)
        assert f"{k.bandwidth[0]:.6g}" in message
        assert f"{factor * (q3 - q1) / 1.349:.6g}" in message and "IQR" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for rule in ("median", "knn"):  # a median and a neighbourhood scale are not moved by one far value
            RBFKernel(rule, columns=[0], knn_k=2, knn_batch_size=8).fit(ages)
        clean = np.random.default_rng(0).normal(50, 12, (400, 2))
        for rule in ("scott", "silverman", "median", "knn"):
            RBFKernel(rule).fit(clean)
    two = np.concatenate([np.random.default_rng(1).normal(50, 12, (50, 1)), np.arange(50.0)[:, None]], 1)
    two[3, 1] = 1e7
    with pytest.warns(UserWarning) as record:
        RBFKernel("scott", columns=[0, 1]).fit(two)
    assert len(record) == 1 and "prior column 1" in str(record[0].message)


# -- precision ---------------------------------------------------------------------------------------------------------


def test_half_precision_priors_and_autocast_leave_kernels_in_float32():
    x = torch.tensor(_prior(n=30), dtype=torch.float64)
    half = x.to(torch.bfloat16)
    rounded = half.double().numpy()
    got = RBFKernel(7.5, columns=[0])(half)
    assert got.dtype == torch.float32
    want = _loop(lambda a, b: math.exp(-((a[0] - b[0]) ** 2) / (2 * 7.5**2)), rounded)
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-6, atol=1e-7)
    emb = torch.randn(30, 16, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (emb @ emb.T).dtype == torch.bfloat16  # the premise: autocast would run these products in bf16
        wide = RBFKernel(4.0)(emb)  # more than 8 columns: the matrix-product route
        cosine = CosineKernel()(emb)
        features = CosineKernel().feature_map(emb)
    e = emb.double().numpy()
    assert wide.dtype == cosine.dtype == features.dtype == torch.float32
    np.testing.assert_allclose(wide.numpy(), _loop(lambda a, b: math.exp(-((a - b) ** 2).sum() / 32.0), e), atol=2e-6)
    unit = e / np.linalg.norm(e, axis=1, keepdims=True)
    np.testing.assert_allclose(cosine.numpy(), unit @ unit.T, atol=2e-6)


# -- columns, diagonal and Nystrom features ---------------------------------------------------------------------------


def test_gram_columns_and_diagonal_equal_the_batch_kernel():
    new = torch.tensor(_clinical(40, seed=22, patients=80))
    unfitted = [RBFKernel(7.0, columns=[0]), CategoricalKernel(columns=[1]), CosineKernel(columns=[0, 4]),
                patient_time_kernel(3, 4, bandwidth=50.0)]
    index = torch.tensor([0, 3, 3, 17, 39, 5])
    for k in _every_kernel() + unfitted:
        gram = k(new)
        np.testing.assert_allclose(k.gram_columns(new, index).numpy(), gram[:, index].numpy(), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(k.diagonal(new).numpy(), torch.diagonal(gram).numpy(), rtol=1e-12, atol=1e-15)


def test_nystrom_features_are_exact_at_full_rank_and_psd_below():
    new = torch.tensor(_clinical(60, seed=23, patients=30))
    for k in (_every_kernel()[2], CosineKernel(columns=[0, 4]).fit(_clinical(100, 1, 10)), _every_kernel()[-1],
              RBFKernel(20.0, columns=[0]) + CategoricalKernel(columns=[3], missing="singleton")):
        gram = k(new).numpy()
        full = nystrom_features(k, new, rank=60)
        assert full.shape[0] == 60 and full.shape[1] <= 60
        np.testing.assert_allclose((full @ full.T).numpy(), gram, atol=1e-8)
        errors = []
        for rank in (4, 16):
            f = nystrom_features(k, new, rank=rank).numpy()
            assert f.shape[1] <= rank
            residual = gram - f @ f.T
            assert np.linalg.eigvalsh(residual).min() > -1e-9  # K - F F^T stays positive semi-definite
            errors.append(np.trace(residual))
        assert errors[1] <= errors[0] + 1e-12
    with pytest.raises(ValueError, match="rank"):
        nystrom_features(RBFKernel(1.0), new, rank=0)


# -- patient x time ----------------------------------------------------------------------------------------------------


def test_patient_time_kernel_matches_loop_with_missing_patients_and_offsets():
    train = _clinical(400, seed=30, patients=100, nan=False)
    k = patient_time_kernel(patient_column=3, time_column=4, bandwidth=40.0).fit(train)
    x = _clinical(50, seed=31, patients=30)  # NaN patients: unknown ones (the prior encoder's code for unseen ones)
    x[[4, 9], 3] = 5000.0  # a code unseen at fit time matches only itself
    m, v, s2 = train[:, 4].mean(), train[:, 4].var(), 40.0**2

    def rbf(a, b):
        if np.isnan(a) and np.isnan(b):
            return math.sqrt(s2 / (s2 + 2 * v))
        if np.isnan(a) or np.isnan(b):
            y = b if np.isnan(a) else a
            return math.sqrt(s2 / (s2 + v)) * math.exp(-((y - m) ** 2) / (2 * (s2 + v)))
        return math.exp(-((a - b) ** 2) / (2 * s2))

    want = np.zeros((50, 50))
    for i in range(50):
        for j in range(50):
            same = i == j if np.isnan(x[i, 3]) or np.isnan(x[j, 3]) else x[i, 3] == x[j, 3]
            want[i, j] = rbf(x[i, 4], x[j, 4]) if same else 0.0
    got = k(torch.tensor(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    ids = k.block_ids(torch.tensor(x))
    differ = (ids[:, None] != ids[None, :]).numpy()
    singletons = int(np.isnan(x[:, 3]).sum())
    assert (got[differ] == 0).all() and len(torch.unique(ids)) == len(set(x[~np.isnan(x[:, 3]), 3])) + singletons
    f = k.k1.feature_map(torch.tensor(x))  # singleton codes keep the exact one-hot map
    np.testing.assert_array_equal((f @ f.T).numpy(), k.k1(torch.tensor(x)).numpy())


def test_gap_rule_is_the_median_within_patient_gap():
    rng = np.random.default_rng(5)
    patients = np.repeat(np.arange(300), rng.integers(1, 6, 300)).astype(float)  # thousands of studies
    days = rng.integers(0, 2000, len(patients)).astype(float)
    days[::11] = np.nan
    prior = np.stack([patients, days], 1)
    gaps = []
    for p in np.unique(patients):
        t = sorted(d for d, q in zip(days, patients) if q == p and not np.isnan(d))
        gaps += [b - a for a, b in zip(t, t[1:]) if b > a]
    k = patient_time_kernel(0, 1).fit(prior)
    assert k.k2.bandwidth[0] == pytest.approx(float(np.median(gaps)), rel=1e-12)
    assert len(k.k1.categories_[0]) == 300
    with pytest.raises(ValueError, match="no group"):
        patient_time_kernel(0, 1).fit(np.array([[0.0, 1.0], [1.0, 5.0]]))
    with pytest.raises(ValueError, match="group_column"):
        RBFKernel("gap", columns=[1])
    with pytest.raises(ValueError, match="must differ"):
        patient_time_kernel(1, 1)
