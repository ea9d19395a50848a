"""Tests of monai_du.evaluation against direct scikit-learn computations and brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from monai_du.evaluation import (
    ProbeReport,
    age_regression,
    extract_features,
    format_table,
    knn_probe,
    linear_probe,
    patient_grouped_splits,
    probe_report,
    roc_auc_with_ci,
    site_leakage,
)

N_PATIENTS, ROWS_PER_PATIENT, N_FEATURES = 40, 3, 6


@pytest.fixture()
def cohort():
    """Features (N, F), binary label tied to the first feature, patient ids (3 rows each), and a fold per patient."""
    rng = np.random.default_rng(123)
    n = N_PATIENTS * ROWS_PER_PATIENT
    x = rng.normal(size=(n, N_FEATURES))
    y = (x[:, 0] + 0.8 * rng.normal(size=n) > 0).astype(float)
    patients = np.repeat([f"p{i:03d}" for i in range(N_PATIENTS)], ROWS_PER_PATIENT)
    patient_fold = rng.permutation(np.arange(N_PATIENTS) % 4)  # 4 folds of 10 patients, chosen in the test
    folds = np.repeat(patient_fold, ROWS_PER_PATIENT)
    return x, y, patients, folds


def _reference_logreg(x, y, pairs, C=1.0, standardize=True):
    """Out-of-fold P(y=1) from a plain scikit-learn loop."""
    out = np.full(len(y), np.nan)
    for tr, te in pairs:
        xtr, xte = x[tr], x[te]
        if standardize:
            scaler = StandardScaler().fit(xtr)
            xtr, xte = scaler.transform(xtr), scaler.transform(xte)
        clf = LogisticRegression(C=C, max_iter=5000).fit(xtr, y[tr].astype(int))
        out[te] = clf.predict_proba(xte)[:, 1]
    return out


def _pairs_from_folds(folds, keep=None):
    keep = np.ones(len(folds), bool) if keep is None else keep
    return [
        (np.flatnonzero(keep & (folds != k) & (folds >= 0)), np.flatnonzero(keep & (folds == k)))
        for k in np.unique(folds[keep & (folds >= 0)])
    ]


# ----------------------------------------------------------------------------------------------------------- splits
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_patient_grouped_splits_never_share_a_patient(cohort, seed):
    x, y, patients, _ = cohort
    splits = patient_grouped_splits(y, patients, n_splits=5, seed=seed)
    assert len(splits) == 5
    tested = np.concatenate([te for _, te in splits])
    assert np.array_equal(np.sort(tested), np.arange(len(y)))  # every row tested exactly once
    for tr, te in splits:
        assert set(patients[tr]).isdisjoint(patients[te])
        assert len(tr) + len(te) == len(y)
        assert set(np.unique(y[te])) == {0.0, 1.0}  # stratified: both classes in every fold


def test_patient_grouped_splits_depend_on_seed(cohort):
    _, y, patients, _ = cohort
    a = [te.tolist() for _, te in patient_grouped_splits(y, patients, 5, seed=0)]
    b = [te.tolist() for _, te in patient_grouped_splits(y, patients, 5, seed=0)]
    c = [te.tolist() for _, te in patient_grouped_splits(y, patients, 5, seed=3)]
    assert a == b and a != c


def test_split_that_shares_a_patient_is_rejected(cohort):
    x, y, patients, folds = cohort
    bad_mask = np.zeros(len(y), bool)
    bad_mask[: len(y) // 2 + 1] = True  # cuts patient p020 in half (rows 60, 61 | 62)
    with pytest.raises(ValueError, match="patient"):
        linear_probe(x, y, groups=patients, train_mask=bad_mask)
    bad_folds = folds.copy()
    bad_folds[0] = (folds[0] + 1) % 4
    with pytest.raises(ValueError, match="patient 'p000'"):
        linear_probe(x, y, groups=patients, folds=bad_folds)
    with pytest.raises(ValueError, match="only 2 patients"):
        patient_grouped_splits(np.array([0, 1, 0, 1]), ["a", "a", "b", "b"], n_splits=3)


# ------------------------------------------------------------------------------------------------------ linear probe
def test_linear_probe_default_cv_matches_sklearn(cohort):
    x, y, patients, _ = cohort
    result = linear_probe(x, y, groups=patients, n_splits=5, seed=2)
    splits = patient_grouped_splits(y, patients, n_splits=5, seed=2)
    np.testing.assert_allclose(result.scores, _reference_logreg(x, y, splits), rtol=0, atol=1e-10)
    assert result.evaluated.all()
    for k, (_, te) in enumerate(splits):
        assert (result.folds[te] == k).all()


def test_linear_probe_explicit_folds_and_C_match_sklearn(cohort):
    x, y, patients, folds = cohort
    pairs = _pairs_from_folds(folds)
    for C, standardize in [(1.0, True), (0.05, False)]:
        result = linear_probe(x, y, groups=patients, folds=folds, C=C, standardize=standardize)
        ref = _reference_logreg(x, y, pairs, C=C, standardize=standardize)
        np.testing.assert_allclose(result.scores, ref, rtol=0, atol=1e-10)
    auc, low, high = result.roc_auc(n_bootstrap=200)
    assert auc == pytest.approx(roc_auc_score(y, ref), abs=1e-12)
    assert low <= auc <= high


def test_linear_probe_train_mask_matches_sklearn(cohort):
    x, y, patients, folds = cohort
    train = folds != 0
    result = linear_probe(x, y, groups=patients, train_mask=train)
    ref = _reference_logreg(x, y, [(np.flatnonzero(train), np.flatnonzero(~train))])
    np.testing.assert_allclose(result.scores[~train], ref[~train], rtol=0, atol=1e-10)
    assert np.isnan(result.scores[train]).all() and (result.folds[train] == -1).all()
    # an explicit test mask leaves the remaining rows unscored
    test = folds == 1
    result = linear_probe(x, y, groups=patients, train_mask=folds >= 2, test_mask=test)
    assert np.array_equal(~np.isnan(result.scores), test)


def test_label_policy_nan_and_uncertain(cohort):
    x, y, patients, folds = cohort
    rng = np.random.default_rng(5)
    raw = y.copy()
    raw[rng.choice(len(y), 15, replace=False)] = np.nan
    uncertain_rows = rng.choice(np.flatnonzero(~np.isnan(raw)), 12, replace=False)
    raw[uncertain_rows] = -1
    labels = pd.DataFrame({"label_a": raw, "label_b": y})

    result = linear_probe(x, labels, groups=patients, folds=folds)
    assert set(result) == {"label_a", "label_b"}
    a = result["label_a"]
    keep = ~np.isnan(raw) & (raw != -1)
    assert np.array_equal(a.evaluated, keep)
    assert np.isnan(a.y_true[~keep]).all() and np.isnan(a.scores[~keep]).all()
    ref = _reference_logreg(x, raw, _pairs_from_folds(folds, keep))
    np.testing.assert_allclose(a.scores[keep], ref[keep], rtol=0, atol=1e-10)
    # label_b is unaffected by label_a's missing rows
    np.testing.assert_allclose(result["label_b"].scores, _reference_logreg(x, y, _pairs_from_folds(folds)), atol=1e-10)

    for policy, value in [("zero", 0.0), ("one", 1.0)]:
        mapped = raw.copy()
        mapped[uncertain_rows] = value
        keep = ~np.isnan(mapped)
        res = linear_probe(x, labels["label_a"], groups=patients, folds=folds, uncertain=policy)
        assert np.array_equal(res.y_true[uncertain_rows], np.full(len(uncertain_rows), value))
        assert np.array_equal(res.evaluated, keep)
        ref = _reference_logreg(x, mapped, _pairs_from_folds(folds, keep))
        np.testing.assert_allclose(res.scores[keep], ref[keep], rtol=0, atol=1e-10)

    bad = y.copy()
    bad[3] = 2
    with pytest.raises(ValueError, match="'label'.*2.0"):
        linear_probe(x, bad, groups=patients, folds=folds)
    with pytest.raises(ValueError, match="uncertain"):
        linear_probe(x, y, folds=folds, uncertain="ignore")


# --------------------------------------------------------------------------------------------------------- kNN probe
def test_knn_probe_matches_sklearn_and_brute_force(cohort):
    x, y, patients, folds = cohort
    k = 7
    result = knn_probe(x, y, groups=patients, folds=folds, k=k)
    ref_sklearn = np.full(len(y), np.nan)
    ref_brute = np.full(len(y), np.nan)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    for tr, te in _pairs_from_folds(folds):
        knn = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(x[tr], y[tr].astype(int))
        ref_sklearn[te] = knn.predict_proba(x[te])[:, 1]
        dist = 1.0 - unit[te] @ unit[tr].T  # cosine distance, float64
        nearest = np.argsort(dist, axis=1)[:, :k]
        ref_brute[te] = y[tr][nearest].mean(axis=1)
    np.testing.assert_allclose(result.scores, ref_sklearn, rtol=0, atol=1e-10)
    np.testing.assert_allclose(result.scores, ref_brute, rtol=0, atol=1e-10)
    # default CV path agrees with the inspected splitter
    result = knn_probe(x, y, groups=patients, n_splits=4, k=k, seed=1, metric="euclidean")
    ref = np.full(len(y), np.nan)
    for tr, te in patient_grouped_splits(y, patients, 4, seed=1):
        knn = KNeighborsClassifier(n_neighbors=k, metric="euclidean", algorithm="brute").fit(x[tr], y[tr].astype(int))
        ref[te] = knn.predict_proba(x[te])[:, 1]
    np.testing.assert_allclose(result.scores, ref, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------- ROC AUC
def _mann_whitney_auc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def _brute_bootstrap(y, s, n_bootstrap, alpha, seed, groups=None):
    rng = np.random.default_rng(seed)
    patients = sorted(set(groups)) if groups is not None else None
    aucs = []
    for _ in range(n_bootstrap):
        if patients is None:
            idx = list(rng.integers(0, len(y), size=len(y)))
        else:
            drawn = rng.integers(0, len(patients), size=len(patients))
            idx = []
            for p in drawn:
                idx += [i for i in range(len(y)) if groups[i] == patients[p]]
        yb, sb = y[idx], s[idx]
        if len(set(yb.tolist())) < 2:
            continue
        aucs.append(_mann_whitney_auc(yb, sb))
    return np.quantile(aucs, [alpha / 2, 1 - alpha / 2])


@pytest.fixture()
def scored():
    rng = np.random.default_rng(11)
    n = 60
    y = (rng.random(n) < 0.4).astype(float)
    s = y * 0.8 + rng.normal(size=n)
    s[::7] = np.round(s[::7], 1)  # a few ties
    groups = np.repeat(np.arange(20), 3)[rng.permutation(n)]
    return y, s, groups


def test_roc_auc_point_estimate_matches_references(scored):
    from monai.metrics import compute_roc_auc

    y, s, _ = scored
    auc, _, _ = roc_auc_with_ci(y, s, n_bootstrap=10)
    assert auc == pytest.approx(_mann_whitney_auc(y, s), abs=1e-12)
    monai_auc = compute_roc_auc(torch.as_tensor(s, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64))
    assert auc == pytest.approx(float(monai_auc), abs=1e-10)


def test_roc_auc_bootstrap_matches_brute_force(scored):
    y, s, _ = scored
    auc, low, high = roc_auc_with_ci(y, s, n_bootstrap=300, alpha=0.1, seed=4)
    ref_low, ref_high = _brute_bootstrap(y, s, 300, 0.1, 4)
    assert low == pytest.approx(ref_low, abs=1e-12) and high == pytest.approx(ref_high, abs=1e-12)
    assert low <= auc <= high
    assert roc_auc_with_ci(y, s, n_bootstrap=300, alpha=0.1, seed=4) == (auc, low, high)
    assert roc_auc_with_ci(y, s, n_bootstrap=300, alpha=0.1, seed=5) != (auc, low, high)


def test_cluster_bootstrap_resamples_patients(scored):
    y, s, groups = scored
    auc, low, high = roc_auc_with_ci(y, s, n_bootstrap=200, seed=9, groups=groups)
    ref_low, ref_high = _brute_bootstrap(y, s, 200, 0.05, 9, groups=list(groups))
    assert low == pytest.approx(ref_low, abs=1e-12) and high == pytest.approx(ref_high, abs=1e-12)
    assert low <= auc <= high
    assert (low, high) != roc_auc_with_ci(y, s, n_bootstrap=200, seed=9)[1:]  # differs from the row bootstrap
    # each patient holding 3 identical copies of one row: resampling patients == resampling the distinct rows
    y1, s1 = y[:20], s[:20]
    rows = roc_auc_with_ci(y1, s1, n_bootstrap=200, seed=3)
    groups3 = np.repeat(np.arange(20), 3)
    clusters = roc_auc_with_ci(np.repeat(y1, 3), np.repeat(s1, 3), n_bootstrap=200, seed=3, groups=groups3)
    np.testing.assert_allclose(clusters, rows, rtol=0, atol=1e-12)


def test_bootstrap_skips_single_class_resamples():
    y = np.array([0, 0, 0, 0, 0, 1, 0, 0.0])  # one positive: about 1 resample in 3 holds a single class
    s = np.array([0.1, 0.4, 0.2, 0.3, 0.5, 0.9, 0.6, 0.35])
    with pytest.warns(UserWarning, match="single class"):
        auc, low, high = roc_auc_with_ci(y, s, n_bootstrap=400, seed=0)
    ref_low, ref_high = _brute_bootstrap(y, s, 400, 0.05, 0)
    assert (low, high) == pytest.approx((ref_low, ref_high), abs=1e-12)
    with pytest.raises(ValueError, match="both classes"):
        roc_auc_with_ci(np.zeros(5), np.arange(5.0))


# ------------------------------------------------------------------------------------------------- age regression
def test_age_regression_matches_ridge(cohort):
    x, _, patients, folds = cohort
    rng = np.random.default_rng(2)
    age = 40 + 10 * x[:, 1] + 2 * rng.normal(size=len(x))
    age[[4, 50, 99]] = np.nan
    keep = ~np.isnan(age)
    errors = []
    for tr, te in _pairs_from_folds(folds, keep):
        scaler = StandardScaler().fit(x[tr])
        ridge = Ridge(alpha=3.0).fit(scaler.transform(x[tr]), age[tr])
        errors.append(np.abs(ridge.predict(scaler.transform(x[te])) - age[te]))
    ref = np.concatenate(errors).mean()
    assert age_regression(x, age, patients, folds=folds, alpha=3.0) == pytest.approx(ref, abs=1e-10)
    # default patient-grouped CV: informative features beat noise features by far
    mae = age_regression(x, age, patients, n_splits=4)
    mae_noise = age_regression(rng.normal(size=x.shape), age, patients, n_splits=4)
    assert mae < 0.5 * mae_noise


# --------------------------------------------------------------------------------------------------- site leakage
def _sites_cohort(n_sites=4, patients_per_site=15, rows=2, seed=0):
    rng = np.random.default_rng(seed)
    site = np.repeat([f"site{s}" for s in range(n_sites)], patients_per_site * rows)
    patients = np.repeat(np.arange(n_sites * patients_per_site), rows)
    return rng, site, patients


def test_site_leakage_high_when_features_encode_site():
    rng, site, patients = _sites_cohort()
    onehot = pd.get_dummies(site).to_numpy(float)
    x = np.hstack([3 * onehot, rng.normal(size=(len(site), 4))]) + 0.3 * rng.normal(size=(len(site), 8))
    leak = site_leakage(x, site, groups=patients, n_splits=5)
    assert leak.n_sites == 4 and leak.chance == 0.25 and leak.n_samples == len(site)
    assert leak.balanced_accuracy > 0.95


def test_site_leakage_chance_on_noise():
    rng, site, patients = _sites_cohort(seed=1)
    x = rng.normal(size=(len(site), 8))
    leak = site_leakage(x, site, groups=patients, n_splits=5)
    assert abs(leak.balanced_accuracy - leak.chance) < 0.15


def test_site_leakage_matches_sklearn_and_drops_missing_sites():
    rng, site, patients = _sites_cohort(n_sites=3, patients_per_site=8, seed=2)
    site = site.astype(object)
    x = rng.normal(size=(len(site), 5)) + 0.7 * pd.get_dummies(site).to_numpy(float) @ rng.normal(size=(3, 5))
    site[[0, 1]] = None  # patient 0 has no site
    folds = np.repeat(rng.permutation(np.arange(24) % 4), 2)
    keep = np.array([s is not None for s in site])
    codes = pd.Series(site).map({"site0": 0, "site1": 1, "site2": 2}).to_numpy()
    true, pred = [], []
    for tr, te in _pairs_from_folds(folds, keep):
        scaler = StandardScaler().fit(x[tr])
        clf = LogisticRegression(C=0.5, max_iter=5000).fit(scaler.transform(x[tr]), codes[tr].astype(int))
        true.append(codes[te])
        pred.append(clf.predict(scaler.transform(x[te])))
    ref = balanced_accuracy_score(np.concatenate(true).astype(int), np.concatenate(pred))
    leak = site_leakage(x, site, groups=patients, folds=folds, C=0.5)
    assert leak.balanced_accuracy == pytest.approx(ref, abs=1e-10)
    assert leak.n_samples == keep.sum() and leak.chance == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------------------------ feature extraction
class _TinyEncoder(torch.nn.Module):
    def __init__(self, in_features: int):
        super().__init__()
        self.linear = torch.nn.Linear(in_features, 3)
        self.dropout = torch.nn.Dropout(0.5)  # would make train-mode outputs random

    def forward(self, x):
        return self.dropout(self.linear(x.flatten(1)))


@pytest.mark.parametrize("spatial", [(4, 4), (3, 3, 3)])
def test_extract_features_keeps_row_order_and_metadata(spatial):
    from monai.data import DataLoader, Dataset

    torch.manual_seed(0)
    items = [
        {
            "image": torch.randn(1, *spatial),
            "patient_id": f"p{i // 2}",
            "age": float(20 + i) if i != 3 else float("nan"),
            "label_x": i % 2,
            "prior": torch.randn(3),  # not one scalar per sample: skipped
        }
        for i in range(10)
    ]
    encoder = _TinyEncoder(int(np.prod(spatial)))
    encoder.train()
    with torch.no_grad():
        encoder.eval()
        expected = torch.stack([encoder(it["image"][None])[0] for it in items]).numpy()
        encoder.train()
    feats, meta = extract_features(encoder, DataLoader(items, batch_size=3, shuffle=False))
    assert encoder.training  # mode restored
    assert feats.shape == (10, 3) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, expected, rtol=1e-6, atol=1e-6)
    assert list(meta.columns) == ["patient_id", "age", "label_x"]
    assert meta["patient_id"].tolist() == [it["patient_id"] for it in items]
    np.testing.assert_array_equal(meta["age"].to_numpy(), np.array([it["age"] for it in items]))
    assert meta["label_x"].tolist() == [it["label_x"] for it in items]

    # a shuffling loader still keeps every feature row with its own metadata
    feats_s, meta_s = extract_features(encoder, DataLoader(Dataset(items), batch_size=4, shuffle=True))
    order = [int(p[1:]) * 2 + (lab % 2) for p, lab in zip(meta_s["patient_id"], meta_s["label_x"])]
    np.testing.assert_allclose(feats_s, expected[order], rtol=1e-6, atol=1e-6)

    # a Dataset is wrapped in a non-shuffling DataLoader; asking for a non-scalar key is an error
    feats_d, _ = extract_features(encoder, Dataset(items), batch_size=4, metadata_keys=["patient_id"])
    np.testing.assert_allclose(feats_d, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="'prior'"):
        extract_features(encoder, Dataset(items), metadata_keys=["prior"])


def test_extract_features_keeps_metatensor_paths():
    from monai.data import DataLoader, MetaTensor

    paths = [f"/x/{i}.nii" for i in range(5)]
    images = [MetaTensor(torch.full((1, 2, 2), float(i)), meta={"filename_or_obj": p}) for i, p in enumerate(paths)]
    items = [{"image": im} for im in images]
    feats, meta = extract_features(torch.nn.Flatten(), DataLoader(items, batch_size=2))
    assert meta["image_path"].tolist() == paths
    np.testing.assert_array_equal(feats[:, 0], np.arange(5, dtype=np.float32))


# -------------------------------------------------------------------------------------------------- report and table
def test_format_table_is_fixed_width():
    rows = [
        ProbeReport("random init", 0.61234, 0.55, 0.67, 0.9, 0.25, 1.23, extra={"seeds": 3}),
        {"method": "kernel DU (age x sex)", "auc": 0.8, "auc_low": 0.75, "auc_high": 0.85, "wall_time_s": 61.0},
    ]
    text = format_table(rows)
    lines = text.splitlines()
    assert len(lines) == 4
    header, rule, first, second = lines
    assert header.startswith("method") and "AUC [95% CI]" in header and "seeds" in header
    assert set(rule) <= {"-", " "}
    assert "0.612 [0.550, 0.670]" in first and "0.900 (0.250)" in first and "1.2 s" in first
    for title, cell_first, cell_second in [
        ("AUC [95% CI]", "0.612", "0.800"),
        ("site leakage", "0.900", "-"),
        ("wall time", "1.2 s", "61.0 s"),
    ]:
        col = header.index(title)
        assert first[col:].startswith(cell_first) and second[col:].startswith(cell_second)
        assert rule[col - 2 : col] == "  " and rule[col] == "-"
    assert first[header.index("seeds") :].startswith("3")


def test_probe_report_combines_the_probes(cohort):
    x, y, patients, _ = cohort
    site = np.where(np.arange(N_PATIENTS) % 2 == 0, "A", "B")[np.repeat(np.arange(N_PATIENTS), ROWS_PER_PATIENT)]
    meta = pd.DataFrame({"patient_id": patients, "label_y": y, "site": site, "age": 30 + 5 * x[:, 2]})
    report = probe_report(x, meta, "plain DU", "label_y", age_column="age", n_bootstrap=100, wall_time_s=2.0, seed=1)
    scores = linear_probe(x, y, groups=patients, n_splits=5, seed=1)
    auc, low, high = roc_auc_with_ci(y, scores.scores, n_bootstrap=100, seed=1, groups=patients)
    assert (report.auc, report.auc_low, report.auc_high) == pytest.approx((auc, low, high), abs=1e-12)
    assert report.site_chance == 0.5 and 0.0 <= report.site_leakage <= 1.0
    assert math.isfinite(report.extra["age MAE"]) and report.wall_time_s == 2.0
    assert "plain DU" in format_table([report])
    with pytest.raises(ValueError, match="'scanner'"):
        probe_report(x, meta, "m", "label_y", site_column="scanner")
