"""Tests of monai_du.evaluation.regression_probe against brute-force and by-hand references."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import Ridge
from sklearn.model_selection import GroupKFold
from sklearn.preprocessing import StandardScaler

from monai_du.evaluation import DEFAULT_ALPHAS, RegressionScores, age_regression, regression_probe


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """Hundreds of small ridge fits; BLAS threads only add contention on a shared CPU."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


def _cohort(n_patients=30, rows=2, n_features=8, noise=2.0, seed=0):
    """Features, age tied to two features, patient ids (``rows`` rows each), a fold per patient (4 folds)."""
    rng = np.random.default_rng(seed)
    n = n_patients * rows
    x = rng.normal(size=(n, n_features))
    age = 60 + 6 * x[:, 0] - 4 * x[:, 1] + noise * rng.normal(size=n)
    patients = np.repeat([f"p{i:03d}" for i in range(n_patients)], rows)
    folds = np.repeat(rng.permutation(np.arange(n_patients) % 4), rows)
    return x, age, patients, folds


def _brute_alpha(x, y, g, grid, inner_splits):
    """The alpha a plain loop picks: GroupKFold by patient, scaler per inner fold, mean validation MAE, ties larger."""
    k = min(inner_splits, len(np.unique(g)))
    mean = np.zeros(len(grid))
    splits = list(GroupKFold(n_splits=k).split(x, y, groups=g))
    for tr, va in splits:
        scaler = StandardScaler().fit(x[tr])
        for j, a in enumerate(grid):
            pred = Ridge(alpha=a).fit(scaler.transform(x[tr]), y[tr]).predict(scaler.transform(x[va]))
            mean[j] += np.mean(np.abs(pred - y[va])) / len(splits)
    best = max(j for j in range(len(grid)) if mean[j] <= mean.min() * (1 + 1e-12))
    return grid[best]


def test_inner_alpha_matches_brute_force_grid_search():
    x, age, patients, folds = _cohort()
    grid = np.logspace(-2, 4, 9)
    res = regression_probe(x, age, patients, folds=folds, alphas=grid, inner_splits=4)
    for k in range(4):
        tr, te = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        alpha = _brute_alpha(x[tr], age[tr], patients[tr], grid, 4)
        assert res.alphas_chosen[k] == alpha
        scaler = StandardScaler().fit(x[tr])
        pred = Ridge(alpha=alpha).fit(scaler.transform(x[tr]), age[tr]).predict(scaler.transform(x[te]))
        np.testing.assert_allclose(res.y_pred[te], pred, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(res.folds, folds)
    # 3 training patients and inner_splits=5: the inner CV drops to 3 folds
    train = np.isin(patients, ["p000", "p001", "p002"])
    small = regression_probe(x, age, patients, train_mask=train, alphas=grid, inner_splits=5)
    assert small.alphas_chosen[0] == _brute_alpha(x[train], age[train], patients[train], grid, 5)
    # a constant target: every alpha predicts it exactly (inner MAE 0 for all), and the tie goes to the largest alpha
    tied = regression_probe(x, np.full(len(age), 70.0), patients, folds=folds, alphas=grid, inner_splits=4)
    assert (tied.alphas_chosen == grid.max()).all() and tied.mae == 0.0
    with pytest.raises(ValueError, match="single patient"):
        regression_probe(x, age, patients, train_mask=patients == "p000", alphas=grid)


def _ridge_by_hand(xtr, ytr, xte, alpha):
    """Standardise with training statistics (population std), centre, solve (X'X + alpha I) b = X'y in float64."""
    mu, sd = xtr.mean(axis=0), xtr.std(axis=0)
    ztr, zte = (xtr - mu) / sd, (xte - mu) / sd
    ybar = ytr.mean()
    b = np.linalg.solve(ztr.T @ ztr + alpha * np.eye(ztr.shape[1]), ztr.T @ (ytr - ybar))
    return zte @ b + ybar


def test_mae_and_floor_equal_a_computation_by_hand():
    x, age, patients, _ = _cohort()
    train = np.isin(patients, [f"p{i:03d}" for i in range(20)])
    res = regression_probe(x, age, patients, train_mask=train, alphas=[5.0])
    pred = _ridge_by_hand(x[train], age[train], x[~train], 5.0)
    mae = sum(abs(p - t) for p, t in zip(pred.tolist(), age[~train].tolist())) / (~train).sum()
    floor = sum(abs(age[train].mean() - t) for t in age[~train].tolist()) / (~train).sum()
    assert res.mae == pytest.approx(mae, abs=1e-9)
    assert res.floor_mae == pytest.approx(floor, abs=1e-12)
    assert res.alphas_chosen.tolist() == [5.0]
    assert np.isnan(res.inner_mae).all()  # one alpha: no inner search
    assert (res.folds == np.where(train, -1, 0)).all() and np.isnan(res.y_pred[train]).all()
    assert np.allclose(res.floor_pred[~train], age[train].mean()) and np.isnan(res.floor_pred[train]).all()
    # age_regression is regression_probe(...).mae: fixed alpha and alpha=None (inner CV)
    assert age_regression(x, age, patients, train_mask=train, alpha=5.0) == res.mae
    cv = regression_probe(x, age, patients, n_splits=4, seed=3)
    assert age_regression(x, age, patients, n_splits=4, seed=3, alpha=None) == cv.mae
    np.testing.assert_array_equal(cv.alpha_grid, DEFAULT_ALPHAS)


def _sparse_signal(seed=0, n=60, n_features=200):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, n_features))
    y = 50 + 8 * x[:, 0] - 6 * x[:, 1] + 5 * x[:, 2] + 3 * rng.normal(size=n)
    return x, y, rng.normal(size=(n, n_features))


def test_signal_beats_floor_and_noise_does_not():
    # 3 informative features of 200, 60 rows (48 per training part): ridge recovers only part of a sparse signal
    # (about 0.83-0.89 of the floor's MAE for data seeds 0-4), and its inner curve is flat below alpha ~ 50 (the
    # scale of the eigenvalues of X'X), so the chosen alphas scatter from 0.01 to ~300 there. Pure noise features
    # push the choice to strong regularisation (median >= 100 for seeds 0-5) and the MAE to the floor's.
    x, y, noise = _sparse_signal()
    res = regression_probe(x, y, seed=0)
    assert res.mae < 0.93 * res.floor_mae
    assert res.alphas_chosen.max() < 1e4  # not the floor-like end of the grid
    flat = regression_probe(noise, y, seed=0)
    assert flat.mae > 0.95 * flat.floor_mae
    assert np.median(flat.alphas_chosen) >= 100
    assert flat.floor_mae == res.floor_mae  # same outer splits, same floor


def test_no_patient_on_both_sides_of_a_split():
    x, age, patients, _ = _cohort(n_patients=24, rows=3)
    res = regression_probe(x, age, patients, n_splits=4, alphas=[1.0, 100.0], seed=1)
    assert res.scored.all() and sorted(np.unique(res.folds)) == [0, 1, 2, 3]
    for k in range(4):
        assert not set(patients[res.folds == k]) & set(patients[res.folds != k])
    split_patient = np.zeros(len(age), bool)
    split_patient[0] = True  # p000's first row trains, its other rows are tested
    with pytest.raises(ValueError, match="patient 'p000'"):
        regression_probe(x, age, patients, train_mask=split_patient | (patients > "p011"))


def _brute_cluster_mae(err, groups, n_bootstrap, seed, level=0.95):
    rng = np.random.default_rng(seed)
    uniq = np.unique(groups)
    maes = []
    for _ in range(n_bootstrap):
        picked = uniq[rng.integers(0, len(uniq), size=len(uniq))]
        maes.append(np.concatenate([err[groups == p] for p in picked]).mean())
    return tuple(np.quantile(maes, [(1 - level) / 2, (1 + level) / 2]))


def test_mae_ci_is_a_patient_bootstrap_and_widens_with_fewer_patients():
    x, age, patients, _ = _cohort(n_patients=60, rows=2)
    train = np.isin(patients, [f"p{i:03d}" for i in range(20)])
    wide_test = ~train  # 40 patients scored
    narrow_test = np.isin(patients, [f"p{i:03d}" for i in range(20, 30)])  # 10 of them
    many = regression_probe(x, age, patients, train_mask=train, test_mask=wide_test, alphas=[1.0])
    few = regression_probe(x, age, patients, train_mask=train, test_mask=narrow_test, alphas=[1.0])
    for res in (many, few):
        for floor in (False, True):
            point, low, high = res.mae_ci(n_bootstrap=500, seed=2, floor=floor)
            assert point == (res.floor_mae if floor else res.mae)
            assert low < point < high
    m = many.scored
    err = np.abs(many.y_pred[m] - many.y_true[m])
    assert many.mae_ci(300, seed=5)[1:] == pytest.approx(_brute_cluster_mae(err, patients[m], 300, 5), abs=1e-12)
    width = lambda r: r.mae_ci(1000, seed=0)[2] - r.mae_ci(1000, seed=0)[1]  # noqa: E731
    assert width(few) > width(many)  # 0.76 vs 0.58 here (10 vs 40 patients; sqrt(40/10) = 2 only on average)
    point, low, high = many.mae_ci(n_bootstrap=0)
    assert point == many.mae and math.isnan(low) and math.isnan(high)


def test_nan_targets_are_dropped_and_bad_input_raises():
    x, age, patients, folds = _cohort()
    age_nan = age.copy()
    age_nan[[3, 17, 40]] = np.nan
    res = regression_probe(x, pd.Series(age_nan, name="age"), patients, folds=folds, alphas=[1.0, 10.0])
    assert isinstance(res, RegressionScores) and res.name == "age"
    assert (res.folds[[3, 17, 40]] == -1).all() and np.isnan(res.y_pred[[3, 17, 40]]).all()
    keep = ~np.isnan(age_nan)
    sub = regression_probe(x[keep], age[keep], patients[keep], folds=folds[keep], alphas=[1.0, 10.0])
    np.testing.assert_allclose(res.y_pred[keep], sub.y_pred, rtol=0, atol=1e-12)
    assert res.mae == pytest.approx(sub.mae, abs=1e-12) and res.floor_mae == pytest.approx(sub.floor_mae, abs=1e-12)
    with pytest.raises(ValueError, match="target must have shape"):
        regression_probe(x, age[:-1], patients)
    with pytest.raises(ValueError, match="groups must have shape"):
        regression_probe(x, age, patients[:-1])
    with pytest.raises(ValueError, match="target must be numeric"):
        regression_probe(x, np.array(["old"] * len(age), dtype=object), patients)
    with pytest.raises(ValueError, match="target is missing"):
        regression_probe(x, np.full(len(age), np.nan), patients)
    with pytest.raises(ValueError, match="target holds inf"):
        regression_probe(x, np.where(np.arange(len(age)) == 5, np.inf, age), patients)
    with pytest.raises(ValueError, match="alphas"):
        regression_probe(x, age, patients, alphas=[1.0, -1.0])
    with pytest.raises(ValueError, match="inner_splits"):
        regression_probe(x, age, patients, inner_splits=1)
    with pytest.raises(ValueError, match="age must be numeric"):
        age_regression(x, ["x"] * len(age), patients)
    with pytest.raises(ValueError, match="alpha must be"):
        age_regression(x, age, patients, alpha=0.0)
