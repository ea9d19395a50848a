from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, RandSpatialCrop
from monai.utils import MAX_SEED, set_determinism

from monai_du.transforms import (
    AssemblePriord,
    MultiViewd,
    PriorEncoder,
    brain_augmentations,
    cxr_augmentations,
)

# --------------------------------------------------------------------------------------------------------------------
# MultiViewd
# --------------------------------------------------------------------------------------------------------------------


def _sample_2d(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(1, 24, 20, generator=g), "age": 63.0, "sex": "F", "meta": {"id": "p1"}}


def test_multiview_2d_shape_views_differ_and_other_keys_untouched():
    data = _sample_2d()
    original = data["image"].clone()
    t = MultiViewd(keys="image", transform=cxr_augmentations((16, 16)), num_views=3)
    t.set_random_state(seed=1)
    out = t(data)
    assert out["image"].shape == (3, 1, 16, 16)
    assert out["image"].dtype == torch.float32
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.allclose(out["image"][i], out["image"][j])
    assert set(out) == set(data)
    for key in ("age", "sex", "meta"):
        assert out[key] is data[key]
    assert torch.equal(data["image"], original)  # the input dict is not modified


def test_multiview_3d_shape_and_channels():
    g = torch.Generator().manual_seed(3)
    data = {"image": torch.rand(2, 16, 14, 18, generator=g), "site": "A"}
    t = MultiViewd(keys="image", transform=brain_augmentations((12, 10, 8)), num_views=2)
    t.set_random_state(seed=0)
    out = t(data)
    assert out["image"].shape == (2, 2, 12, 10, 8)
    assert not torch.allclose(out["image"][0], out["image"][1])
    assert out["site"] == "A"


def test_multiview_views_are_successive_calls_of_a_seeded_transform():
    # reference: the per-view transform seeded the way MultiViewd documents (seed drawn from its own state),
    # called V times in a loop
    data = _sample_2d(5)
    seed, views = 11, 4
    t = MultiViewd(keys="image", transform=cxr_augmentations((16, 16)), num_views=views).set_random_state(seed)
    out = t(data)["image"]
    reference = cxr_augmentations((16, 16))
    reference.set_random_state(seed=int(np.random.RandomState(seed).randint(MAX_SEED, dtype="uint32")))
    expected = torch.stack([torch.as_tensor(reference(data["image"])) for _ in range(views)])
    torch.testing.assert_close(out, expected)


def test_multiview_reproducible_with_set_random_state():
    data = _sample_2d(2)
    a = MultiViewd("image", cxr_augmentations((16, 16)), 2).set_random_state(seed=42)(data)["image"]
    b = MultiViewd("image", cxr_augmentations((16, 16)), 2).set_random_state(seed=42)(data)["image"]
    c = MultiViewd("image", cxr_augmentations((16, 16)), 2).set_random_state(seed=43)(data)["image"]
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_multiview_reproducible_through_outer_compose_and_dataloader():
    samples = [_sample_2d(i) for i in range(4)]
    pipeline = Compose([MultiViewd("image", cxr_augmentations((16, 16)), 2)])

    def one_epoch(seed: int) -> torch.Tensor:
        set_determinism(seed=seed)
        loader = DataLoader(Dataset(samples, transform=pipeline), batch_size=4, num_workers=0)
        return next(iter(loader))["image"]

    try:
        first, second, other = one_epoch(0), one_epoch(0), one_epoch(1)
    finally:
        set_determinism(seed=None)
    assert first.shape == (4, 2, 1, 16, 16)
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)


def test_multiview_identity_transform_and_numpy_input():
    image = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    out = MultiViewd("image", transform=None, num_views=3)({"image": image})["image"]
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out, torch.from_numpy(image)[None].repeat(3, 1, 1, 1))


def test_multiview_multiple_keys_and_missing_keys():
    data = {"a": torch.rand(1, 8, 8), "b": torch.rand(1, 6, 6)}
    out = MultiViewd(["a", "b", "c"], transform=None, num_views=2, allow_missing_keys=True)(data)
    assert out["a"].shape == (2, 1, 8, 8) and out["b"].shape == (2, 1, 6, 6)
    assert "c" not in out
    with pytest.raises(KeyError):
        MultiViewd(["a", "c"], transform=None)(data)


def test_multiview_bad_arguments():
    with pytest.raises(ValueError, match="num_views"):
        MultiViewd("image", None, num_views=0)
    with pytest.raises(ValueError, match="callable"):
        MultiViewd("image", transform=3)
    with pytest.raises(ValueError, match="shape"):
        MultiViewd("image", None)({"image": torch.rand(5)})
    # views of different sizes (no final fixed-size step) are refused with the shapes in the message
    ragged = MultiViewd("image", RandSpatialCrop(roi_size=(2, 2), random_size=True), num_views=6)
    ragged.set_random_state(seed=0)
    with pytest.raises(ValueError, match="different shapes"):
        ragged({"image": torch.rand(1, 32, 32)})


# --------------------------------------------------------------------------------------------------------------------
# Augmentation recipes
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_shape", [(1, 40, 30), (1, 10, 12), (3, 16, 16)])
def test_cxr_recipe_keeps_requested_size(in_shape):
    recipe = cxr_augmentations((16, 24), rotate_prob=1.0, contrast_prob=1.0, noise_prob=1.0)
    recipe.set_random_state(seed=0)
    for _ in range(3):
        out = recipe(torch.rand(*in_shape))
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        assert out.shape == (in_shape[0], 16, 24)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("in_shape", [(1, 20, 16, 12), (1, 8, 8, 8)])
def test_brain_recipe_keeps_requested_size(in_shape):
    recipe = brain_augmentations(
        (10, 12, 8), affine_prob=1.0, flip_prob=1.0, blur_prob=1.0, noise_prob=1.0, bias_field_prob=1.0
    )
    recipe.set_random_state(seed=0)
    for _ in range(2):
        out = recipe(torch.rand(*in_shape))
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        assert out.shape == (1, 10, 12, 8)
        assert torch.isfinite(out).all()


def test_cxr_recipe_without_randomness_is_a_plain_resize():
    recipe = cxr_augmentations(
        (12, 10), crop_scale=(1.0, 1.0), rotate_prob=0.0, intensity_prob=0.0, contrast_prob=0.0, noise_prob=0.0
    )
    image = torch.rand(1, 30, 25, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(image[None].double(), size=(12, 10), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(recipe(image).double(), expected, rtol=1e-5, atol=1e-5)


def test_recipes_reject_wrong_spatial_size():
    with pytest.raises(ValueError, match="2 positive integers"):
        cxr_augmentations((16, 16, 16))
    with pytest.raises(ValueError, match="3 positive integers"):
        brain_augmentations((16, 16))
    with pytest.raises(ValueError, match="crop_scale"):
        cxr_augmentations((16, 16), crop_scale=(0.0, 1.0))


# --------------------------------------------------------------------------------------------------------------------
# PriorEncoder
# --------------------------------------------------------------------------------------------------------------------


def _manifest(n: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    age = rng.uniform(20, 90, n)
    age[rng.random(n) < 0.2] = np.nan
    sex = rng.choice(np.array(["M", "F", None], dtype=object), n)
    site = rng.choice(np.array(["S3", "S1", "S10", "S2"], dtype=object), n)
    return pd.DataFrame({"age": age, "sex": sex, "site": site, "patient_id": [f"p{i}" for i in range(n)]})


def _brute_force(df: pd.DataFrame) -> np.ndarray:
    sexes = sorted({s for s in df["sex"] if isinstance(s, str)})
    sites = sorted({s for s in df["site"] if isinstance(s, str)})
    rows = []
    for _, r in df.iterrows():
        sex = float(sexes.index(r["sex"])) if isinstance(r["sex"], str) else np.nan
        site = float(sites.index(r["site"])) if isinstance(r["site"], str) else np.nan
        rows.append([r["age"], sex, site])
    return np.asarray(rows, dtype=np.float32)


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


# --------------------------------------------------------------------------------------------------------------------
# AssemblePriord
# --------------------------------------------------------------------------------------------------------------------


def test_assemble_prior_writes_float32_tensor_and_keeps_keys(tmp_path):
    df = _manifest(seed=1)
    encoder = PriorEncoder(continuous=["age"], categorical=["sex", "site"]).fit(df)
    expected = _brute_force(df)
    for source in (encoder, encoder.save(tmp_path / "enc.json"), str(tmp_path / "enc.json"), encoder.to_dict()):
        t = AssemblePriord(keys=["site", "age", "sex"], encoder=source)
        for i, row in enumerate(df.to_dict("records")[:5]):
            row["image"] = torch.zeros(1, 4, 4)
            out = t(row)
            assert isinstance(out["prior"], torch.Tensor) and out["prior"].dtype == torch.float32
            assert out["prior"].shape == (3,)
            np.testing.assert_array_equal(out["prior"].numpy(), expected[i])
            for key in row:
                assert out[key] is row[key]


def test_assemble_prior_nan_age_passes_through_and_collates():
    df = pd.DataFrame({"age": [30.0, np.nan], "sex": ["M", "F"]})
    encoder = PriorEncoder(continuous=["age"], categorical=["sex"]).fit(df)
    samples = [{"image": torch.rand(1, 8, 8), "age": a, "sex": s} for a, s in zip(df["age"], df["sex"])]
    pipeline = Compose([AssemblePriord(encoder=encoder)])
    batch = next(iter(DataLoader(Dataset(samples, transform=pipeline), batch_size=2)))
    assert batch["prior"].shape == (2, 2)
    np.testing.assert_array_equal(batch["prior"].numpy(), np.array([[30.0, 1.0], [np.nan, 0.0]], dtype=np.float32))


def test_assemble_prior_key_checks():
    encoder = PriorEncoder(continuous=["age"], categorical=["sex"]).fit(pd.DataFrame({"age": [1.0], "sex": ["M"]}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['site'\]"):
        AssemblePriord(keys=["age", "sex", "site"], encoder=encoder)
    with pytest.raises(ValueError, match=r"missing attribute\(s\) \['sex'\]"):
        AssemblePriord(keys=["age"], encoder=encoder)
    with pytest.raises(ValueError, match="encoder="):
        AssemblePriord(keys=["age"])
    with pytest.raises(RuntimeError, match="not fitted"):
        AssemblePriord(encoder=PriorEncoder(continuous=["age"]))
    with pytest.raises(ValueError, match=r"no key 'sex'.*x\.png"):
        AssemblePriord(encoder=encoder)({"image": "x.png", "age": 3.0})
    out = AssemblePriord(encoder=encoder, prior_key="p", allow_missing_keys=True)({"age": 3.0})
    np.testing.assert_array_equal(out["p"].numpy(), np.array([3.0, np.nan], dtype=np.float32))
