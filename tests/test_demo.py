"""Tests of monai_du.demo: the demo is `compare` on the embedded cohort, with the demo's label and budget."""

from __future__ import annotations

import pandas as pd
import pytest

from monai_du.bundles import bundle_path
from monai_du.data.real_cohort import ixi_t1_dev_manifest, nih_cxr_dev_manifest
from monai_du.demo import BRAIN_DEMO_METHODS, DEMO_DEFAULTS, DEMO_METHODS, demo_config


def test_cxr_demo_is_compare_on_the_real_embedded_cohort(tmp_path):
    config = demo_config(out=tmp_path)
    assert config.manifest == nih_cxr_dev_manifest() and config.bundle == bundle_path("cxr")
    assert config.label == "label_no_finding" and tuple(config.methods) == DEMO_METHODS
    assert (config.epochs, config.batch_size) == (DEMO_DEFAULTS["cxr"]["epochs"], DEMO_DEFAULTS["cxr"]["batch_size"])
    assert config.label in pd.read_csv(config.manifest).columns
    assert demo_config(out=tmp_path, epochs=3, seeds=(5,)).epochs == 3


def test_brain_demo_is_compare_on_the_shipped_ixi_cohort(tmp_path):
    config = demo_config("brain", out=tmp_path)
    df = pd.read_csv(config.manifest)
    assert config.manifest == ixi_t1_dev_manifest() and config.bundle == bundle_path("brain")
    assert config.label == "sex" and config.age == "age" and tuple(config.methods) == BRAIN_DEMO_METHODS
    assert set(df["sex"]) == {"M", "F"} and df["age"].notna().all() and len(df) == df["patient_id"].nunique()
    assert (config.manifest.parent / "LICENSE.md").is_file()  # CC BY-SA 3.0: the licence travels with the images
    with pytest.raises(ValueError, match="modality"):
        demo_config("ct", out=tmp_path)
