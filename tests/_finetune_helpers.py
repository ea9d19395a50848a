"""Helpers of the fine-tune bundle tests (test_bundles_finetune.py, and its torchrun run in
test_bundles_distributed.py); not a test module.

The chest X-ray runs use 48 images of the embedded real NIH cohort (a smaller manifest in ``<tmp>/data`` pointing at
the shipped images) with the bundle's default labels; the brain runs a tiny brain phantom that the bundle makes in
``<tmp>/data`` (``--demo_cohort phantom``, label ``label_lesion``), or 12 volumes copied from the shipped IXI cohort
(:func:`_ixi_subset`, at 16^3). AUC references are computed with scikit-learn from the predictions CSV.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from monai_du.data.real_cohort import NIH_CXR_DEV_DIR, ixi_t1_dev_manifest, nih_cxr_dev_manifest
from monai_du.data.splits import patient_split

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
TIMEOUT = 600

# the test cohort: small, with half of the patients in the validation split so that both classes are likely there
SPLIT = {"train": 0.5, "val": 0.5}
SETTINGS = {
    "cxr_finetune": {
        "spatial_dims": 2,
        "labels": ["label_no_finding", "label_effusion"],  # the bundle's default labels
        "image_shape": (64, 64),
        "overrides": ["--batch_size", "8", "--num_threads", "1"],
    },
    "brain_mri_finetune": {
        "spatial_dims": 3,
        "labels": ["label_lesion"],
        "image_shape": (32, 32, 32),
        "overrides": ["--demo_cohort", "phantom", "--demo_num_images", "16", "--demo_image_size", "32",
                      "--labels", "['label_lesion']", "--batch_size", "4", "--num_threads", "1"],
    },
}
N_REAL = 48  # images of the real cohort used by the chest X-ray runs (at most 2 per patient)
# the brain runs on real volumes: 12 IXI subjects (6 male, 6 female) copied to <tmp>/data, at 16^3
N_IXI = 12
IXI_OVERRIDES = ["--spatial_size", "[16,16,16]", "--batch_size", "4", "--num_workers", "0", "--num_threads", "1"]

def _run(args: list[str], cwd: Path, expect_ok: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {args}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def _copy_bundle(name: str, dest: Path) -> Path:
    target = dest / name
    shutil.copytree(BUNDLES / name, target, ignore=shutil.ignore_patterns("data", "models", "eval", "__pycache__"))
    if name == "cxr_finetune":  # a smaller manifest of the real cohort, image paths relative to the shipped folder
        real = pd.read_csv(nih_cxr_dev_manifest(), dtype={"patient_id": str})
        subset = real.groupby("patient_id", sort=False).head(2).head(N_REAL)
        (dest / "data").mkdir(exist_ok=True)
        subset.to_csv(dest / "data" / "manifest.csv", index=False)
    return target


def _data_args(bundle: Path, name: str) -> list[str]:
    """The data of a run: the real-cohort subset (cxr) or the brain phantom made by the bundle in ``data``."""
    data = bundle.parent / "data"
    if name == "cxr_finetune":
        return ["--manifest", str(data / "manifest.csv"), "--dataset_dir", str(NIH_CXR_DEV_DIR)]
    return ["--dataset_dir", str(data)]


def _ixi_subset(dest: Path, n: int = N_IXI) -> list[str]:
    """Copy ``n`` volumes of the shipped IXI cohort (the first n/2 male and n/2 female subjects) with their manifest
    rows to ``dest/data``; returns the bundle arguments that select them."""
    shipped = ixi_t1_dev_manifest()
    real = pd.read_csv(shipped, dtype={"patient_id": str})
    subset = pd.concat([real[real["sex"] == "M"].head(n // 2), real[real["sex"] == "F"].head(n - n // 2)]).sort_index()
    data = dest / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    for image in subset["image"]:
        shutil.copy(shipped.parent / image, data / image)
    subset.to_csv(data / "manifest.csv", index=False)
    return ["--manifest", str(data / "manifest.csv"), "--dataset_dir", str(data)]


def _infer(bundle: Path, name: str) -> pd.DataFrame:
    _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.yaml"),
          "--bundle_root", str(bundle), *_data_args(bundle, name), *SETTINGS[name]["overrides"]], cwd=bundle.parent)
    return pd.read_csv(bundle / "eval" / "predictions.csv", dtype={"patient_id": str})


def _logged_metrics(bundle: Path) -> dict[str, float]:
    """eval/metrics.csv written by MONAI's MetricsSaver: one 'name,value' line per metric."""
    out = {}
    for line in (bundle / "eval" / "metrics.csv").read_text().splitlines():
        key, value = line.split(",", 1)
        out[key] = float(value)
    return out


def _label_name(column: str) -> str:
    return column[len("label_"):] if column.startswith("label_") else column


def _sklearn_val_auc(bundle: Path, predictions: pd.DataFrame, labels: list[str]) -> dict[str, float]:
    """ROC AUC per label on the validation patients, from the predictions CSV, with scikit-learn (NaN: one class).
    A sex column counts male as the positive class."""
    manifest = pd.read_csv(bundle.parent / "data" / "manifest.csv", dtype={"patient_id": str})  # the run's manifest
    assert len(predictions) == len(manifest)
    assert predictions["image"].tolist() == manifest["image"].tolist()
    assert predictions["patient_id"].tolist() == manifest["patient_id"].tolist()
    val = patient_split(manifest, fractions=SPLIT, seed=0)["split"].to_numpy() == "val"
    aucs = {}
    for column in labels:
        name = _label_name(column)
        y = manifest.loc[val, column]
        y = (y.map({"M": 1.0, "F": 0.0}) if column == "sex" else y).astype(float).to_numpy()
        score = predictions.loc[val, f"prob_{name}"].to_numpy()
        aucs[f"val_auc_{name}"] = roc_auc_score(y, score) if len(np.unique(y)) == 2 else math.nan
    aucs["val_mean_auc"] = float(np.mean(list(aucs.values())))
    return aucs


def _assert_close_or_both_nan(logged: dict[str, float], reference: dict[str, float]) -> None:
    assert any(not math.isnan(v) for v in reference.values()), f"no label has both classes in validation: {reference}"
    for key, ref in reference.items():
        assert key in logged, f"{key} not logged; logged {sorted(logged)}"
        if math.isnan(ref):
            assert math.isnan(logged[key]), (key, logged[key])
        else:
            assert logged[key] == pytest.approx(ref, abs=1e-6), key
