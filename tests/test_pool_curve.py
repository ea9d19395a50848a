"""Tests of monai_du.pool_curve: nested patient subsets checked by a brute-force walk, and a tiny AUC-against-pool-size
run end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from monai_du.cli import main
from monai_du.phantoms import make_cxr_cohort
from monai_du.pool_curve import nested_pool_subsets


def _pool(n_patients: int = 30) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    counts = rng.integers(1, 5, n_patients)
    return pd.DataFrame({"image": [f"p{p}_{k}.png" for p in range(n_patients) for k in range(counts[p])],
                         "patient_id": [f"p{p}" for p in range(n_patients) for _ in range(counts[p])]})


def test_subsets_are_nested_whole_patients_of_at_least_the_size():
    pool = _pool()
    subsets = nested_pool_subsets(pool, [10, 40, 25, 1000], seed=3)
    assert list(subsets) == [10, 25, 40, 1000]
    previous: set = set()
    order = np.random.default_rng(3).permutation(pool["patient_id"].unique())
    for size, rows in subsets.items():
        patients = set(rows["patient_id"])
        assert previous <= patients  # nested
        assert len(rows) == pool["patient_id"].isin(patients).sum()  # whole patients
        # brute force: the shortest prefix of the shuffled patients that holds at least `size` images (or all)
        taken, n = [], 0
        for patient in order:
            if n >= size:
                break
            taken.append(patient)
            n += int((pool["patient_id"] == patient).sum())
        assert patients == set(taken), size
        previous = patients
    assert len(subsets[1000]) == len(pool)
    with pytest.raises(ValueError, match="pool sizes must be >= 1"):
        nested_pool_subsets(pool, [0])


def test_auc_against_pool_size_end_to_end(tmp_path, capsys):
    labelled = make_cxr_cohort(tmp_path / "labelled", n=40, seed=3, size=32)
    pool = make_cxr_cohort(tmp_path / "pool", n=48, seed=7, size=32)
    out = tmp_path / "out"
    status = main(["compare", "--manifest", str(labelled), "--label", "effusion", "--pool", str(pool),
                   "--pool-sizes", "16", "48", "--methods", "random", "du", "--seeds", "0", "1", "--epochs", "1",
                   "--batch-size", "8", "--folds", "3", "--label-sizes", "5", "--label-draws", "1",
                   "--n-bootstrap", "10", "--no-audit", "--quiet", "--out", str(out), "--set", "num_workers=0",
                   "spatial_size=[32, 32]", "widen_factor=0.125"])
    assert status == 0
    curve = pd.read_csv(out / "pool_curve.csv")
    assert sorted(curve["pool_size"].unique()) == [16, 48] and set(curve["method_key"]) == {"random", "du"}
    for size in (16, 48):
        used = pd.read_csv(out / f"pool_{size}" / "pool_manifest.csv")
        subset = pd.read_csv(out / "pool_subsets" / f"pool_{size}.csv")
        assert len(used) == len(subset) >= min(size, len(pd.read_csv(pool)))
        results = pd.read_csv(out / f"pool_{size}" / "results.csv")
        row = curve[(curve["pool_size"] == size) & (curve["method_key"] == "du")].iloc[0]
        du = results[results["method_key"] == "du"]["auc"]
        assert row["auc_mean"] == pytest.approx(du.mean()) and row["auc_std"] == pytest.approx(du.std(ddof=1))
    assert (out / "pool_curve.png").is_file()
    printed = capsys.readouterr().out
    assert "linear-probe AUC against pool size" in printed and "plain DU" in printed
    assert Path(out / "pool_curve.txt").read_text().strip() in printed
