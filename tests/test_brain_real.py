"""The brain MRI side on real volumes: the shipped IXI cohort through the bundle's loading (orientation, intensity,
field of view), the pictures of the augmented views, and compare's sex probe and age regression."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from monai.bundle import ConfigParser
from PIL import Image

from monai_du.bundles import bundle_path
from monai_du.compare import CompareConfig, _split, run_compare
from monai_du.data.loading import load_image_transforms
from monai_du.data.manifest import label_values
from monai_du.data.real_cohort import IXI_T1_DEV_DIR, ixi_t1_dev_manifest
from monai_du.view_pictures import PLANES, save_view_pictures, view_grid

BRAIN_TRAIN = bundle_path("brain") / "configs" / "train.yaml"


def _bundle_loading() -> dict:
    parser = ConfigParser()
    parser.read_config(str(BRAIN_TRAIN))
    return dict(parser.get_parsed_content("image_loading")), list(parser["spatial_size"])


def _small_manifest(tmp_path, n: int) -> str:
    df = pd.read_csv(ixi_t1_dev_manifest())
    picked = pd.concat([df[df.sex == "M"].head(n // 2), df[df.sex == "F"].head(n - n // 2)])
    picked = picked.assign(image=[str(IXI_T1_DEV_DIR / p) for p in picked["image"]])
    path = tmp_path / "ixi_small.csv"
    picked.to_csv(path, index=False)
    return str(path)


def test_the_shipped_cohort_is_real_and_carries_its_licence():
    df = pd.read_csv(ixi_t1_dev_manifest())
    assert len(df) == df["patient_id"].nunique() == 136 and set(df["sex"]) == {"M", "F"}
    assert df["age"].between(18, 90).all()
    assert "CC BY-SA 3.0" in (IXI_T1_DEV_DIR / "LICENSE.md").read_text()
    image = nib.load(IXI_T1_DEV_DIR / df["image"].iloc[0])
    assert image.shape == (40, 40, 30) and np.allclose(np.abs(image.affine[:3, :3]).sum(axis=0), 6.0)


def test_a_real_volume_reaches_the_network_in_ras_scaled_by_its_percentiles():
    """Reference: nibabel's own reorientation to RAS (as_closest_canonical) and numpy percentiles."""
    loading, size = _bundle_loading()
    assert loading == {"modality": "3d", "intensity": "percentile", "size_mode": "longest"}
    path = IXI_T1_DEV_DIR / pd.read_csv(ixi_t1_dev_manifest())["image"].iloc[0]
    assert nib.aff2axcodes(nib.load(path).affine) != ("R", "A", "S")  # the files are not stored in RAS
    full = load_image_transforms(spatial_size=None, **loading)({"image": str(path)})["image"]
    canonical = nib.as_closest_canonical(nib.load(path))
    reference = np.asarray(canonical.get_fdata(), dtype=np.float64)
    low, high = np.percentile(reference, [0.5, 99.5])
    reference = np.clip((reference - low) / (high - low), 0.0, 1.0)
    assert full.shape[1:] == reference.shape
    np.testing.assert_allclose(np.asarray(full[0], dtype=np.float64), reference, atol=1e-4)
    assert np.all(np.diag(np.asarray(full.affine)[:3, :3]) > 0)  # RAS: every axis runs towards R, A, S
    # what the network sees: the bundle's size, values in [0, 1], the whole head kept (aspect kept, zero padding on
    # the shorter left-right axis, the head not cut at the other borders)
    seen = np.asarray(load_image_transforms(spatial_size=size, **loading)({"image": str(path)})["image"][0])
    assert list(seen.shape) == size and seen.min() >= 0.0 and seen.max() <= 1.0
    assert seen[0].max() == 0.0 and seen[-1].max() == 0.0
    assert seen[:, :, -1].mean() < 0.05  # above the vertex: air


def test_view_grid_shows_the_middle_slices_of_every_view():
    rng = np.random.default_rng(0)
    views = rng.random((3, 2, 1, 6, 8, 10)).astype(np.float32)
    gap = 1
    for plane, axis in PLANES.items():
        grid = view_grid(views, plane, gap=gap)
        tile = np.take(views[1, 1, 0], views.shape[3 + axis] // 2, axis=axis).T[::-1]
        h, w = tile.shape
        expected = (np.clip(tile, 0, 1) * 255 + 0.5).astype(np.uint8)
        np.testing.assert_array_equal(grid[h + gap:2 * h + gap, w + gap:2 * w + gap], expected)
        assert grid.shape == (3 * h + 2 * gap, 2 * w + gap)
    flat = rng.random((2, 2, 1, 5, 7)).astype(np.float32)
    np.testing.assert_array_equal(view_grid(flat, gap=0)[:7, :5], (flat[0, 0, 0].T * 255 + 0.5).astype(np.uint8))
    with pytest.raises(ValueError, match="plane"):
        view_grid(views, "oblique")


def test_save_view_pictures_writes_one_picture_per_plane(tmp_path):
    views = np.random.default_rng(1).random((6, 2, 1, 8, 8, 8)).astype(np.float32)
    files = save_view_pictures(views, tmp_path, max_images=4, scale=2)
    assert sorted(f.name for f in files) == ["views_axial.png", "views_coronal.png", "views_sagittal.png"]
    assert Image.open(files[0]).size == ((2 * 8 + 2) * 2, (4 * 8 + 3 * 2) * 2)


def test_label_values_reads_sex_and_names_bad_text():
    np.testing.assert_array_equal(label_values(pd.Series(["M", "F", None, " m"]), "sex", "m.csv").to_numpy(),
                                  [1.0, 0.0, np.nan, 1.0])
    np.testing.assert_array_equal(label_values(pd.Series([1, 0, -1, None]), "label_x", "m.csv").to_numpy(),
                                  [1.0, 0.0, -1.0, np.nan])
    with pytest.raises(ValueError, match="m.csv: label column 'label_x' holds \\['yes'\\]"):
        label_values(pd.Series([1, "yes"]), "label_x", "m.csv")


def test_a_bad_age_column_is_named(tmp_path):
    manifest = _small_manifest(tmp_path, 12)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="age column 'years' is not in the manifest"):
        run_compare(CompareConfig(manifest, "sex", bundle="brain", age="years", methods=("random",), seeds=(0,),
                                  out=out, audit=False, plots=False), log=None)
    df = pd.read_csv(manifest)
    df["age"] = df["age"].astype(object)
    df.loc[3, "age"] = "forty"
    df.to_csv(tmp_path / "bad_age.csv", index=False)
    with pytest.raises(ValueError, match="column 'age' is not a number at row 3"):
        run_compare(CompareConfig(tmp_path / "bad_age.csv", "sex", bundle="brain", age="age", methods=("random",),
                                  seeds=(0,), out=out, audit=False, plots=False), log=None)


def test_compare_probes_sex_and_regresses_age_on_real_volumes(tmp_path):
    manifest = _small_manifest(tmp_path, 24)
    config = CompareConfig(manifest, "sex", bundle="brain", age="age", methods=("random", "du"), seeds=(0,),
                           epochs=1, batch_size=4, out=tmp_path / "out", label_sizes=(None,), label_draws=1,
                           n_bootstrap=50, audit=False, plots=False,
                           overrides={"spatial_size": [16, 16, 16], "widen_factor": 0.125, "num_workers": 0})
    result = run_compare(config, log=None)
    results = result["results"]
    assert {"age_mae", "age_mae_low", "age_mae_high", "age_floor_mae"} <= set(results.columns)
    for _, row in results.iterrows():
        assert row["age_mae_low"] <= row["age_mae"] <= row["age_mae_high"] and 0 < row["age_mae"] < 60
        assert 0.0 <= row["auc"] <= 1.0
    # the floor: the training patients' mean age predicted for every held-out patient, by hand
    df = pd.read_csv(manifest)
    train = _split(df, 0, config.test_fraction)
    floor = np.abs(df.loc[~train, "age"] - df.loc[train, "age"].mean()).mean()
    np.testing.assert_allclose(results["age_floor_mae"].to_numpy(), floor, rtol=1e-9)
    assert "age MAE, years (floor)" in result["table"] and any("age MAE" in s for s in result["verdict"])
    pictures = sorted(p.name for p in (tmp_path / "out" / "runs" / "seed0" / "du" / "eval").glob("views_*.png"))
    assert pictures == ["views_axial.png", "views_coronal.png", "views_sagittal.png"]
    saved = json.loads((tmp_path / "out" / "runs" / "seed0" / "du" / "eval" / "probe.json").read_text())
    assert saved["age_floor_mae"] == pytest.approx(floor)
