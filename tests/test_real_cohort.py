"""Tests of monai_du.data.real_cohort: the shipped NIH manifest is what the nih_cxr14 adapter builds, and it loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from monai_du.data.loading import load_image_transforms
from monai_du.data.manifest import find_phi_columns, read_manifest
from monai_du.data.real_cohort import NIH_CXR_DEV_DIR, build_nih_cxr_dev_manifest, nih_cxr_dev_manifest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
NIH_TABLE = SHARED / "nih_cxr14_data_entry_2017_v2020.csv.gz"


def test_shipped_manifest_is_valid_and_every_image_is_there():
    df = read_manifest(nih_cxr_dev_manifest())
    assert len(df) == 498 and df["patient_id"].nunique() == 140
    assert not find_phi_columns(df.columns)
    assert df["image"].is_unique
    assert all(Path(p).is_file() for p in df["image_path"])
    shipped = sorted(p.name for p in (NIH_CXR_DEV_DIR / "images").glob("*.png"))
    assert sorted(Path(p).name for p in df["image_path"]) == shipped
    assert df["label_no_finding"].mean() == pytest.approx(0.5)


def test_images_load_through_the_monai_pipeline_as_64px():
    df = read_manifest(nih_cxr_dev_manifest())
    path = df["image_path"].iloc[0]
    item = load_image_transforms(keys="image", modality="2d", spatial_size=(64, 64))({"image": path})
    raw = np.asarray(Image.open(path), dtype=np.float64)
    assert tuple(item["image"].shape) == (1, 64, 64)
    loaded = np.asarray(item["image"][0], dtype=np.float64)
    # same picture up to MONAI's (H, W) -> (W, H) orientation: compare the correlation with the raw pixels
    best = max(np.corrcoef(raw.ravel(), x.ravel())[0, 1] for x in (loaded, loaded.T))
    assert best > 0.999


@pytest.mark.skipif(not NIH_TABLE.is_file(), reason="needs ../shared/data (the NIH ChestX-ray14 table)")
def test_shipped_manifest_equals_the_adapter_join_of_the_real_table(tmp_path):
    rebuilt = build_nih_cxr_dev_manifest(NIH_TABLE, NIH_CXR_DEV_DIR / "images", tmp_path / "manifest.csv")
    expected = pd.read_csv(rebuilt, dtype=str, keep_default_na=False)
    expected["image"] = [f"images/{Path(p).name}" for p in expected["image"]]
    shipped = pd.read_csv(nih_cxr_dev_manifest(), dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(shipped, expected)
    table = pd.read_csv(NIH_TABLE).set_index("Image Index").loc[[Path(p).name for p in shipped["image"]]]
    assert (shipped["patient_id"].astype(int).to_numpy() == table["Patient ID"].to_numpy()).all()
    assert (shipped["follow_up"].astype(float).to_numpy() == table["Follow-up #"].to_numpy()).all()
    no_finding = (table["Finding Labels"] == "No Finding").to_numpy()
    assert (shipped["label_no_finding"].astype(float).to_numpy() == no_finding).all()
