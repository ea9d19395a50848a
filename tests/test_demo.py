"""Tests of monai_du.demo: the demo is `compare` on the embedded cohort, with the demo's label and budget."""

from __future__ import annotations

import pandas as pd
import pytest

from monai_du.bundles import bundle_path
from monai_du.data.real_cohort import nih_cxr_dev_manifest
from monai_du.demo import DEMO_DEFAULTS, DEMO_METHODS, demo_config


def test_cxr_demo_is_compare_on_the_real_embedded_cohort(tmp_path):
    config = demo_config(out=tmp_path)
    assert config.manifest == nih_cxr_dev_manifest() and config.bundle == bundle_path("cxr")
    assert config.label == "label_no_finding" and tuple(config.methods) == DEMO_METHODS
    assert (config.epochs, config.batch_size) == (DEMO_DEFAULTS["cxr"]["epochs"], DEMO_DEFAULTS["cxr"]["batch_size"])
    assert config.label in pd.read_csv(config.manifest).columns
    assert demo_config(out=tmp_path, epochs=3, seeds=(5,)).epochs == 3


def test_brain_demo_generates_its_phantom_cohort(tmp_path):
    config = demo_config("brain", out=tmp_path)
    df = pd.read_csv(config.manifest)
    assert len(df) == DEMO_DEFAULTS["brain"]["n"] and config.label in df.columns
    assert config.bundle == bundle_path("brain")
    with pytest.raises(ValueError, match="modality"):
        demo_config("ct", out=tmp_path)
