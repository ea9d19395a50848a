"""Tests for monai_du.data.splits.patient_split: leakage, reproducibility, fractions and stratification."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from monai_du.data.splits import patient_split, select_split

CHEXPERT = Path(__file__).resolve().parents[2] / "shared" / "data" / "chexpert_train.csv.gz"
FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def _toy(n_patients: int = 50, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    images_per_patient = rng.integers(1, 6, n_patients)
    patients = np.repeat([f"p{i:03d}" for i in range(n_patients)], images_per_patient)
    site = np.repeat(rng.choice(["A", "B", "C"], n_patients, p=[0.6, 0.3, 0.1]), images_per_patient)
    return pd.DataFrame({"image": [f"{i}.png" for i in range(len(patients))], "patient_id": patients, "site": site})


def _patients_per_split(df: pd.DataFrame) -> dict[str, int]:
    return df.groupby("split")["patient_id"].nunique().to_dict()


@pytest.fixture(scope="module")
def chexpert_manifest() -> pd.DataFrame:
    if not CHEXPERT.is_file():
        pytest.skip(f"{CHEXPERT} not found (the shared real-metadata folder beside the repo is absent)")
    from monai_du.data.tables import manifest_from_table

    return manifest_from_table(CHEXPERT, "chexpert").manifest


def test_chexpert_split_invariants(chexpert_manifest):
    out = patient_split(chexpert_manifest, FRACTIONS, seed=0)
    assert len(out) == len(chexpert_manifest) and out["split"].notna().all()
    assert set(out["split"]) == set(FRACTIONS)
    assert (out.groupby("patient_id")["split"].nunique() == 1).all()  # no patient in two splits
    n = chexpert_manifest["patient_id"].nunique()
    counts = _patients_per_split(out)
    assert sum(counts.values()) == n
    for name, fraction in FRACTIONS.items():
        assert abs(counts[name] - n * fraction) < 1.0
    pd.testing.assert_frame_equal(out.drop(columns="split"), chexpert_manifest)  # nothing else changed


def test_chexpert_stratified_by_sex(chexpert_manifest):
    out = patient_split(chexpert_manifest, FRACTIONS, seed=3, stratify="sex")
    assert (out.groupby("patient_id")["split"].nunique() == 1).all()
    # the patient-level stratum, computed independently: the most frequent sex among the patient's rows
    sex = chexpert_manifest["sex"].fillna("missing")
    stratum = pd.crosstab(chexpert_manifest["patient_id"], sex).idxmax(axis=1)
    split = out.groupby("patient_id")["split"].first()
    table = pd.crosstab(stratum, split.reindex(stratum.index))
    for value, row in table.iterrows():
        n_s = row.sum()
        for name, fraction in FRACTIONS.items():
            assert math.floor(n_s * fraction) <= row.get(name, 0) <= math.floor(n_s * fraction) + 1, (value, name)


def test_reproducible_and_independent_of_row_order():
    df = _toy()
    a = patient_split(df, FRACTIONS, seed=7)
    b = patient_split(df, FRACTIONS, seed=7)
    assert a["split"].tolist() == b["split"].tolist()
    shuffled = patient_split(df.sample(frac=1.0, random_state=1), FRACTIONS, seed=7)
    by_patient = a.groupby("patient_id")["split"].first()
    assert (shuffled.groupby("patient_id")["split"].first() == by_patient).all()
    others = [patient_split(df, FRACTIONS, seed=s).groupby("patient_id")["split"].first() for s in range(8, 12)]
    assert any((o != by_patient).any() for o in others)


def test_exact_counts_on_a_small_example():
    df = _toy(n_patients=10)
    out = patient_split(df, {"train": 0.5, "test": 0.5}, seed=0)
    assert _patients_per_split(out) == {"train": 5, "test": 5}
    everything = patient_split(df, {"train": 1.0}, seed=0)
    assert set(everything["split"]) == {"train"}


def test_stratify_by_site_and_by_several_columns():
    df = _toy(n_patients=200)
    df["label_x"] = (df.index % 3 == 0).astype(float)
    out = patient_split(df, FRACTIONS, seed=1, stratify="site")
    assert (out.groupby("patient_id")["split"].nunique() == 1).all()
    site = df.groupby("patient_id")["site"].first()
    split = out.groupby("patient_id")["split"].first()
    table = pd.crosstab(site, split)
    for _, row in table.iterrows():
        for name, fraction in FRACTIONS.items():
            assert abs(row.get(name, 0) - row.sum() * fraction) <= 1.0
    both = patient_split(df, FRACTIONS, seed=1, stratify=["site", "label_x"])
    assert (both.groupby("patient_id")["split"].nunique() == 1).all()
    assert abs(_patients_per_split(both)["train"] - 0.8 * 200) <= 6  # one unit per stratum at most


@pytest.mark.parametrize(
    "fractions, message",
    [
        ({"train": 0.8, "val": 0.1}, "sum to 1"),
        ({"train": 1.2, "val": -0.2}, ">= 0"),
        ({"train": 0.8, "holdout": 0.2}, "holdout"),
        ({"train": "most"}, "number"),
        ({}, "non-empty"),
        ({"train": float("nan"), "test": 1.0}, "finite"),
    ],
)
def test_invalid_fractions(fractions, message):
    with pytest.raises(ValueError, match=message):
        patient_split(_toy(), fractions)


def test_invalid_columns_and_ids():
    df = _toy()
    with pytest.raises(ValueError, match="scanner"):
        patient_split(df, stratify="scanner")
    with pytest.raises(ValueError, match="patient_id"):
        patient_split(df.drop(columns="patient_id"))
    broken = df.copy()
    broken.loc[3, "patient_id"] = None
    with pytest.raises(ValueError, match="row"):
        patient_split(broken)



def test_select_split_uses_existing_split_or_patient_level_split():
    df = pd.DataFrame({"patient_id": [f"p{i // 3}" for i in range(60)], "image": [f"{i}.png" for i in range(60)]})
    train = select_split(df, "train", seed=3)
    rest = df.drop(index=train.index)
    assert set(train.patient_id).isdisjoint(set(rest.patient_id))  # no patient on both sides
    assert 0.6 < len(train) / len(df) < 0.95
    from monai_du.data.splits import patient_split

    direct = patient_split(df, seed=3)
    assert list(train.index) == list(direct.index[direct.split == "train"])
    given = df.assign(split=["val"] * 30 + ["train"] * 29 + [None])
    assert list(select_split(given, "train").index) == list(range(30, 59))
    assert len(select_split(given, ["train", "val"])) == 59
    with pytest.raises(ValueError, match="no manifest row in split"):
        select_split(given, "test")


def test_select_split_refuses_a_hand_set_split_that_puts_a_patient_in_two_splits():
    df = pd.DataFrame({"patient_id": ["a", "a", "b", "c", "c", "d"], "image": [f"{i}.png" for i in range(6)],
                       "split": ["train", "test", "train", "val", "train", "test"]})
    # reference, by brute force: patients with more than one split among their rows
    leaking = sorted(p for p in set(df.patient_id) if df.loc[df.patient_id == p, "split"].nunique() > 1)
    assert leaking == ["a", "c"]
    with pytest.raises(ValueError) as info:
        select_split(df, "train")
    message = str(info.value)
    assert all(f"'{p}'" in message for p in leaking) and "'b'" not in message and "'d'" not in message
    fixed = df.assign(split=["train", "train", "train", "val", "val", "test"])
    assert select_split(fixed, "train")["patient_id"].tolist() == ["a", "a", "b"]
    # an assignment made by patient_split never leaks
    redone = select_split(df.drop(columns="split"), ["train", "val", "test"])
    assert redone.groupby("patient_id")["split"].nunique().max() == 1
