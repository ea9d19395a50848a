"""Tests for monai_du.data.bids on a BIDS folder built from real NIfTI files (nibabel's anatomical.nii)."""

from __future__ import annotations

import gzip
import math
import shutil
from pathlib import Path

import nibabel
import numpy as np
import pandas as pd
import pytest

from monai_du.data.bids import manifest_from_bids
from monai_du.data.manifest import find_phi_columns, validate_manifest

ANATOMICAL = Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"
pytestmark = pytest.mark.skipif(not ANATOMICAL.is_file(), reason="nibabel's tests/data/anatomical.nii is absent")

PARTICIPANTS = (
    "participant_id\tage\tsex\tSITE_ID\tscanner\tnotes\n"
    "sub-01\t34.5\tM\tNYU\tprisma\tfree text\n"
    "02\t89+\tfemale\tUCLA\ttrio\t\n"
    "sub-03\tn/a\t2\tNYU\tprisma\t\n"
    "sub-04\tabc\t1\tKKI\tskyra\t\n"
    "sub-05\t200\tQ\tKKI\tskyra\t\n"
    "sub-06\t7\tO\t\t\t\n"
)
# participant -> (age, sex, SITE_ID), written by hand from the table above
EXPECTED = {
    "sub-01": (34.5, "M", "NYU"),
    "sub-02": (89.0, "F", "UCLA"),
    "sub-03": (math.nan, "F", "NYU"),
    "sub-04": (math.nan, "M", "KKI"),
    "sub-05": (math.nan, None, "KKI"),
    "sub-06": (7.0, None, None),
}


def _copy_nifti(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.name.endswith(".gz"):
        with open(ANATOMICAL, "rb") as source, gzip.open(target, "wb") as out:
            shutil.copyfileobj(source, out)
    else:
        shutil.copy(ANATOMICAL, target)
    return target


@pytest.fixture()
def bids_root(tmp_path) -> Path:
    root = tmp_path / "bids"
    root.mkdir()
    (root / "participants.tsv").write_text(PARTICIPANTS)
    _copy_nifti(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    _copy_nifti(root / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_T1w.nii")
    _copy_nifti(root / "sub-02" / "ses-2" / "anat" / "sub-02_ses-2_run-1_T1w.nii.gz")
    _copy_nifti(root / "sub-04" / "anat" / "sub-04_T1w.nii")
    _copy_nifti(root / "sub-04" / "anat" / "sub-04_T2w.nii")  # not T1-weighted: ignored
    _copy_nifti(root / "sub-05" / "anat" / "sub-05_T1w.nii.gz")
    _copy_nifti(root / "sub-06" / "anat" / "sub-06_T1w.nii.gz")
    _copy_nifti(root / "sub-99" / "anat" / "sub-99_T1w.nii.gz")  # not in participants.tsv
    return root


def test_rows_metadata_and_report(bids_root):
    manifest, report = manifest_from_bids(bids_root)
    expected_files = sorted(str(p.resolve()) for p in bids_root.rglob("*T1w.nii*"))
    assert sorted(manifest["image"]) == expected_files
    for row in manifest.itertuples(index=False):
        assert Path(row.image).is_absolute()
        assert nibabel.load(row.image).shape == nibabel.load(ANATOMICAL).shape  # real, loadable images
        if row.patient_id == "sub-99":
            assert math.isnan(row.age) and pd.isna(row.sex) and pd.isna(row.site)
            continue
        age, sex, site = EXPECTED[row.patient_id]
        assert (math.isnan(row.age) and math.isnan(age)) or row.age == age
        assert (pd.isna(row.sex) and sex is None) or row.sex == sex
        assert (pd.isna(row.site) and site is None) or row.site == site
    sessions = manifest.loc[manifest["patient_id"] == "sub-02", ["session", "study_id"]].sort_values("session")
    assert sessions["session"].tolist() == ["ses-1", "ses-2"]
    assert sessions["study_id"].tolist() == ["sub-02_ses-1", "sub-02_ses-2"]
    skipped = report.loc[report["status"] == "skipped", "item"].tolist()
    assert skipped == ["sub-03"]  # a participant without a T1w image
    warnings = " ".join(report.loc[report["status"] == "warning", ["item", "reason"]].astype(str).agg(" ".join, axis=1))
    assert "sub-99" in warnings and "'abc'" in warnings and "'200'" in warnings
    sex_rows = report[report["reason"].str.contains("sex=")]
    assert sex_rows["item"].tolist() == ["sub-05"] and "sex='Q'" in sex_rows["reason"].iloc[0]  # O: no row


def test_no_phi_and_valid_schema(bids_root):
    manifest, _ = manifest_from_bids(bids_root)
    assert "notes" not in manifest.columns and find_phi_columns(manifest.columns) == {}
    validate_manifest(manifest)


def test_column_override_and_errors(bids_root, tmp_path):
    manifest, _ = manifest_from_bids(bids_root, site_column="scanner")
    sites = dict(zip(manifest["patient_id"], manifest["site"]))
    assert sites["sub-01"] == "prisma" and sites["sub-04"] == "skyra"
    with pytest.raises(ValueError, match="hospital"):
        manifest_from_bids(bids_root, site_column="hospital")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="participants.tsv"):
        manifest_from_bids(empty)
    (empty / "participants.tsv").write_text("subject\tage\ns1\t3\n")
    with pytest.raises(ValueError, match="participant_id"):
        manifest_from_bids(empty)
    with pytest.raises(NotADirectoryError):
        manifest_from_bids(tmp_path / "missing")


def test_real_template_volume(tmp_path):
    nilearn_datasets = pytest.importorskip("nilearn.datasets")
    root = tmp_path / "bids"
    (root / "sub-mni" / "anat").mkdir(parents=True)
    template = nilearn_datasets.load_mni152_template(resolution=2)
    template.to_filename(root / "sub-mni" / "anat" / "sub-mni_T1w.nii.gz")
    (root / "participants.tsv").write_text("participant_id\tAge\tGender\tsite\nmni\t30\tmale\tMNI\n")
    manifest, report = manifest_from_bids(root)
    assert len(manifest) == 1 and len(report) == 0
    row = manifest.iloc[0]
    assert (row["patient_id"], row["age"], row["sex"], row["site"]) == ("sub-mni", 30.0, "M", "MNI")
    np.testing.assert_array_equal(nibabel.load(row["image"]).shape, template.shape)


def _fully_loadable(path: Path) -> bool:
    """Independent reference: decode the whole image."""
    try:
        np.asarray(nibabel.load(path).dataobj)
    except Exception:
        return False
    return True


def test_truncated_and_corrupt_images_are_skipped_with_reasons(bids_root):
    anat = bids_root / "sub-06" / "anat"
    whole_gz = (bids_root / "sub-01" / "anat" / "sub-01_T1w.nii.gz").read_bytes()
    whole = ANATOMICAL.read_bytes()
    (anat / "sub-06_run-2_T1w.nii.gz").write_bytes(whole_gz[: len(whole_gz) // 2])
    (anat / "sub-06_run-3_T1w.nii").write_bytes(whole[: len(whole) - 100])
    (anat / "sub-06_run-4_T1w.nii.gz").write_bytes(b"not a gzip file at all")
    multi = anat / "sub-06_run-5_T1w.nii.gz"  # a valid gzip of two members: the trailer gives only the second's size
    multi.write_bytes(gzip.compress(whole[:1000]) + gzip.compress(whole[1000:]))
    manifest, report = manifest_from_bids(bids_root)
    images = sorted(bids_root.rglob("*T1w.nii*"))
    assert sorted(manifest["image"]) == sorted(str(p.resolve()) for p in images if _fully_loadable(p))
    assert str(multi.resolve()) in set(manifest["image"])
    skipped = report[report["status"] == "skipped"].set_index("item")["reason"]
    assert "truncated" in skipped[str((anat / "sub-06_run-2_T1w.nii.gz").resolve())]
    assert "truncated" in skipped[str((anat / "sub-06_run-3_T1w.nii").resolve())]
    assert "unreadable" in skipped[str((anat / "sub-06_run-4_T1w.nii.gz").resolve())]
    unchecked, _ = manifest_from_bids(bids_root, check_images=False)
    assert len(unchecked) == len(images)
    parallel = manifest_from_bids(bids_root, num_workers=2, chunk_size=1)
    pd.testing.assert_frame_equal(parallel.manifest, manifest)
    pd.testing.assert_frame_equal(parallel.report, report)
    with pytest.raises(ValueError, match="num_workers"):
        manifest_from_bids(bids_root, num_workers="two")
