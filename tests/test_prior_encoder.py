"""Tests of monai_du.prior_encoder: codes against a brute-force loop, missing values, errors, save and load."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from monai_du.prior_encoder import PriorEncoder

sys.path.insert(0, str(Path(__file__).parent))
from _prior_rows import _brute_force, _manifest  # noqa: E402

# --------------------------------------------------------------------------------------------------------------------
# PriorEncoder
# --------------------------------------------------------------------------------------------------------------------


def test_prior_encoder_codes_match_brute_force():
    df = _manifest()
    encoder = PriorEncoder(continuous=["age"], categorical=["sex", "site"]).fit(df)
    expected = _brute_force(df)
    np.testing.assert_array_equal(encoder.transform(df), expected)  # NaN == NaN for this assert
    for i, (_, row) in enumerate(df.iterrows()):
        got = encoder.transform_row(row.to_dict())
        assert got.dtype == np.float32 and got.shape == (3,)
        np.testing.assert_array_equal(got, expected[i])
    assert encoder.categories["site"] == ["S1", "S10", "S2", "S3"]


def test_prior_encoder_columns_and_index():
    encoder = PriorEncoder(continuous=["age", "bmi"], categorical=["sex", "site"])
    assert encoder.columns == {"age": 0, "bmi": 1, "sex": 2, "site": 3}
    assert [encoder.index(n) for n in ("age", "bmi", "sex", "site")] == [0, 1, 2, 3]
    assert encoder.continuous_columns == [0, 1] and encoder.categorical_columns == [2, 3]
    assert len(encoder) == 4
    with pytest.raises(ValueError, match="unknown attribute 'view'"):
        encoder.index("view")


def test_prior_encoder_missing_and_unknown_values_give_nan():
    df = pd.DataFrame({"age": [30.0, np.nan, 50.0], "sex": ["M", "Unknown", "F"], "site": ["a", "", None]})
    encoder = PriorEncoder(continuous=["age"], categorical=["sex", "site"]).fit(df)
    assert encoder.categories == {"sex": ["F", "M"], "site": ["a"]}
    out = encoder.transform(df)
    assert np.isnan(out[1, 0]) and np.isnan(out[1, 1]) and np.isnan(out[1, 2]) and np.isnan(out[2, 2])
    row = encoder.transform_row({"age": None, "sex": "X", "site": "never-seen"})
    assert np.isnan(row).all()
    row = encoder.transform_row({"age": " 41 ", "sex": torch.tensor(float("nan")), "site": "a"})
    np.testing.assert_array_equal(row, np.array([41.0, np.nan, 0.0], dtype=np.float32))
    with pytest.raises(ValueError, match="no key 'site'"):
        encoder.transform_row({"age": 1.0, "sex": "M"})
    partial = encoder.transform_row({"age": 1.0, "sex": "M"}, allow_missing_keys=True)
    np.testing.assert_array_equal(partial, np.array([1.0, 1.0, np.nan], dtype=np.float32))


def test_prior_encoder_numeric_categories_are_one_category():
    df = pd.DataFrame({"site": [1, 2, 10, 1]})
    encoder = PriorEncoder(categorical="site").fit(df)
    assert encoder.categories["site"] == ["1", "10", "2"]
    codes = [encoder.transform_row({"site": v})[0] for v in (1, 1.0, "1", np.int64(1), "10", 2.0)]
    assert codes == [0.0, 0.0, 0.0, 0.0, 1.0, 2.0]


def test_prior_encoder_continuous_stats_and_standardisation():
    df = _manifest(seed=3)
    ages = df["age"].to_numpy(dtype=np.float64)
    raw = PriorEncoder(continuous=["age"]).fit(df)
    stats = raw.stats["age"]
    assert stats["mean"] == pytest.approx(np.nanmean(ages))
    assert stats["std"] == pytest.approx(np.nanstd(ages))
    assert stats["count"] == int(np.isfinite(ages).sum()) and stats["n_missing"] == int(np.isnan(ages).sum())
    np.testing.assert_allclose(raw.transform(df)[:, 0], ages.astype(np.float32))  # raw years by default
    z = PriorEncoder(continuous=["age"], standardize=True).fit(df).transform(df)[:, 0]
    expected = (ages - np.nanmean(ages)) / np.nanstd(ages)
    np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-5)
    assert np.isnan(z).sum() == np.isnan(ages).sum()


def test_prior_encoder_errors_name_column_and_row():
    df = pd.DataFrame({"age": [30, "sixty", 40]}, index=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"'age'.*'sixty'.*row 'b'"):
        PriorEncoder(continuous=["age"]).fit(df)
    with pytest.raises(ValueError, match=r"no column\(s\) \['sex'\]"):
        PriorEncoder(continuous=["age"], categorical=["sex"]).fit(pd.DataFrame({"age": [1.0]}))
    with pytest.raises(ValueError, match="at least one attribute"):
        PriorEncoder()
    with pytest.raises(ValueError, match="more than once"):
        PriorEncoder(continuous=["age"], categorical=["age"])
    with pytest.raises(RuntimeError, match="not fitted"):
        PriorEncoder(continuous=["age"]).transform_row({"age": 1.0})


def test_prior_encoder_save_load_round_trip(tmp_path):
    df = _manifest(seed=7)
    encoder = PriorEncoder(continuous=["age"], categorical=["sex", "site"], standardize=True).fit(df)
    path = encoder.save(tmp_path / "run" / "prior_encoder.json")
    # strict JSON: no NaN / Infinity tokens
    json.loads(path.read_text(), parse_constant=lambda token: pytest.fail(f"non-standard JSON token {token}"))
    loaded = PriorEncoder.load(path)
    assert loaded.to_dict() == encoder.to_dict()
    assert PriorEncoder.from_dict(encoder.to_dict()).to_dict() == encoder.to_dict()
    np.testing.assert_array_equal(loaded.transform(df), encoder.transform(df))
    assert repr(loaded) == repr(encoder)
    assert "age" in repr(loaded) and "site" in repr(loaded)
    assert not list(tmp_path.glob("run/*.tmp"))  # atomic write leaves no temporary file


def test_prior_encoder_load_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        PriorEncoder.load(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="bad.json"):
        PriorEncoder.load(bad)


def test_unseen_categories_get_codes_of_their_own():
    train = pd.DataFrame({"age": [30.0, 50.0, 70.0], "patient_id": ["b", "a", "b"]})
    rows = pd.DataFrame({"age": [50.0, 40.0, 40.0, 60.0], "patient_id": ["a", "c", "c", "d"]})
    encoder = PriorEncoder(continuous=["age"], categorical=["patient_id"]).fit(train)
    wider = encoder.with_unseen_categories(rows)
    known = encoder.transform(rows)
    assert np.isnan(known[1:, 1]).all()  # unseen patients are unknown to the fitted encoder
    codes = wider.transform(rows)[:, 1]
    assert codes[0] == known[0, 1]  # a known patient keeps its code
    assert codes[1] == codes[2] and len({codes[0], codes[1], codes[3]}) == 3 and not np.isnan(codes).any()
    np.testing.assert_array_equal(wider.transform(rows)[:, 0], known[:, 0])  # continuous scaling unchanged
    assert encoder.categories == {"patient_id": ["a", "b"]}  # the original is untouched
