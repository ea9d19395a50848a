"""Tests of monai_du.bundle_priors: a method's prior as the pretrain bundle builds it, checked against brute-force
loops over the bundle's own settings (read from its YAML files) and against its sampler's batch composition."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from monai_du.bundle_priors import method_prior
from monai_du.bundles import kernel_methods
from monai_du.data.splits import select_split

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "cxr_du_pretrain" / "configs"


def _setting(name: str, method: str | None = None):
    """A bundle id as its YAML file writes it: the method file first, then train.yaml."""
    files = ([BUNDLE / "methods" / f"{method}.yaml"] if method else []) + [BUNDLE / "train.yaml"]
    for path in files:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
        if name in content:
            return content[name]
    raise KeyError(name)


def _pretraining_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows the bundle pretrains on, by the split settings its train.yaml writes."""
    return select_split(df, _setting("pretrain_split"), fractions=_setting("split_fractions"),
                        seed=_setting("split_seed"))


def _manifest(tmp_path: Path, n_patients: int = 60, sites: int = 1) -> Path:
    """Patients with 1..6 studies (follow_up 0..), age, sex, sites, a label; no image files (none is read)."""
    rng = np.random.default_rng(0)
    rows = []
    for p in range(n_patients):
        age, sex = float(rng.uniform(20, 90)), "MF"[int(rng.integers(0, 2))]
        for visit in range(int(rng.integers(1, 7))):
            rows.append({"image": f"img/{p:03d}_{visit}.png", "patient_id": f"p{p:03d}", "age": age + visit,
                         "sex": sex, "site": f"s{p % sites}", "follow_up": visit,
                         "label_x": float(rng.integers(0, 2))})
    path = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_kernel_methods_are_the_method_files_with_a_kernel():
    assert kernel_methods("cxr") == ["kdu_attr", "kdu_encoder", "kdu_gen", "kdu_patient", "yaware"]
    assert kernel_methods("brain") == ["kdu_age", "kdu_attr", "kdu_encoder", "kdu_gen", "kdu_patient", "yaware",
                                       "yaware_age"]


def test_patient_time_prior_matches_a_loop_over_the_bundle_settings(tmp_path):
    path = _manifest(tmp_path)
    df = pd.read_csv(path)
    prior = method_prior("cxr", "kdu_patient", path, overrides={"batch_size": 16}, n_batches=12)
    h = float(_setting("time_bandwidth", "kdu_patient"))
    assert prior.lam == _setting("lam") and prior.instance_weight == _setting("instance_weight")
    assert prior.sampler == "pk:patient_id K=2 by follow_up" and prior.batch_size == 16
    # every manifest row, pretraining split or not: 1[same patient] * exp(-(t - t')^2 / (2 h^2))
    gram = prior.kernel(prior.prior).double().numpy()
    pid, t = df["patient_id"].to_numpy(), df["follow_up"].to_numpy(float)
    for i in range(0, len(df), 7):
        for j in range(len(df)):
            expected = math.exp(-((t[i] - t[j]) ** 2) / (2 * h * h)) if pid[i] == pid[j] else 0.0
            assert gram[i, j] == pytest.approx(expected, abs=1e-6)
    # the batches are the bundle sampler's: P patients x 2 consecutive studies of the pretraining split
    train = _pretraining_rows(df).reset_index(drop=True)
    assert len(prior.batch_prior) == len(train)
    counts = train["patient_id"].value_counts()
    same = 0
    for batch in prior.batches:
        assert len(batch) == 16
        for a, b in zip(batch[0::2], batch[1::2]):
            pa, pb = train.loc[a, "patient_id"], train.loc[b, "patient_id"]
            if pa != pb:  # the sampler's pool of patients with a single image ("merge")
                assert counts[pa] == 1 and counts[pb] == 1
                continue
            same += 1
            visits = sorted(train.loc[train["patient_id"] == pa, "follow_up"])
            pair = [train.loc[a, "follow_up"], train.loc[b, "follow_up"]]
            assert pair in [visits[k:k + 2] for k in range(len(visits) - 1)] + [[visits[-1], visits[0]]]
    assert same > 0.6 * 8 * len(prior.batches)


def test_attribute_prior_batches_stay_within_a_site(tmp_path):
    path = _manifest(tmp_path, n_patients=80, sites=2)
    prior = method_prior("cxr", "kdu_attr", path, overrides={"batch_size": 16}, n_batches=10)
    train = _pretraining_rows(pd.read_csv(path)).reset_index(drop=True)
    assert prior.sampler == "within:site"
    assert all(train.loc[batch, "site"].nunique() == 1 for batch in prior.batches)
    assert prior.prior.shape == (len(pd.read_csv(path)), 2) and "DecoupledUniformityLoss" in prior.description
    assert method_prior("cxr", "yaware", path, overrides={"batch_size": 16}).description.startswith("YAware")


def test_bad_methods_and_tables_are_clear_errors(tmp_path):
    path = _manifest(tmp_path)
    with pytest.raises(ValueError, match="sets no kernel"):
        method_prior("cxr", "du", path)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        method_prior("cxr", "nope", path)
    df = pd.read_csv(path)
    train = _pretraining_rows(df)
    rng = np.random.default_rng(1)
    table = pd.DataFrame({"image": train["image"], "gen_0": rng.normal(size=len(train)), "gen_1": 0.0})
    table.to_csv(tmp_path / "train_only.csv", index=False)  # what `monai-du prior` writes by default
    with pytest.raises(ValueError, match=r"method 'kdu_encoder': .*have no row in .*train_only.csv.*--split all"):
        method_prior("cxr", "kdu_encoder", path, overrides={"prior_table": str(tmp_path / "train_only.csv")})
    table[:10].to_csv(tmp_path / "short.csv", index=False)  # not even the pretraining rows: the run itself fails
    with pytest.raises(ValueError, match=r"method 'kdu_encoder': .*have no row in .*short.csv"):
        method_prior("cxr", "kdu_encoder", path, overrides={"prior_table": str(tmp_path / "short.csv")})
