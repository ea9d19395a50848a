"""Tests for monai_du.data.dicom on real DICOM files (pydicom's test files and pydicom-data)."""

from __future__ import annotations

import hashlib
import hmac
import math
import shutil
import warnings
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from monai_du.data.dicom import age_from_dates, manifest_from_dicom, parse_dicom_age
from monai_du.data.manifest import find_phi_columns, validate_manifest


def _testdata(name: str) -> Path | None:
    found = get_testdata_file(name, download=False)
    return Path(found) if found else None


CT_SMALL = _testdata("CT_small.dcm")
MR_SMALL = _testdata("MR_small.dcm")
RG1 = _testdata("RG1_UNCR.dcm")  # pydicom-data: real PA chest radiograph, no PatientAge tag
JPEG2000 = _testdata("JPEG2000.dcm")
pytestmark = pytest.mark.skipif(CT_SMALL is None or MR_SMALL is None, reason="pydicom's bundled test files are absent")


def _expected_pixel_bytes(ds) -> int:
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    return int(ds.Rows) * int(ds.Columns) * int(getattr(ds, "SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8 * frames


def _usable_by_full_read(path: Path) -> bool:
    """Independent reference: read the whole file (pixels included) and check it is a complete image with a patient."""
    try:
        ds = pydicom.dcmread(path)
    except Exception:
        return False
    if "PixelData" not in ds or not str(ds.get("PatientID", "") or "").strip():
        return False
    return len(ds.PixelData) >= _expected_pixel_bytes(ds)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("archive")
    shutil.copytree(CT_SMALL.parent / "dicomdirtests", root / "dicomdirtests")
    shutil.copy(CT_SMALL, root / "CT_small.dcm")
    shutil.copy(MR_SMALL, root / "MR_small.dcm")
    for name in ("MR_small_bigendian.dcm", "MR_small_implicit.dcm"):
        found = _testdata(name)
        if found is not None:
            shutil.copy(found, root / name)
    if RG1 is not None:
        shutil.copy(RG1, root / "RG1_UNCR.dcm")
    data = CT_SMALL.read_bytes()
    (root / "broken").mkdir()
    (root / "broken" / "truncated_ct.dcm").write_bytes(data[: len(data) // 2])
    (root / "broken" / "notes.txt").write_text("not a DICOM file\n" * 20)
    return root


@pytest.fixture(scope="module")
def built(archive):
    return manifest_from_dicom(archive, site_from="manufacturer", progress=True)


def test_rows_are_exactly_the_complete_images(archive, built):
    manifest, report = built
    files = sorted(p for p in archive.rglob("*") if p.is_file())
    expected = {str(p.resolve()) for p in files if _usable_by_full_read(p)}
    assert set(manifest["image"]) == expected
    assert len(manifest) == len(expected) and len(expected) > 20
    # every other file is reported as skipped, none silently dropped
    skipped = set(report.loc[report["status"] == "skipped", "file"])
    assert skipped == {str(p.resolve()) for p in files} - expected


def test_truncated_and_text_files_are_reported_with_reasons(archive, built):
    _, report = built
    reasons = dict(zip(report["file"], report["reason"]))
    assert "truncated" in reasons[str((archive / "broken" / "truncated_ct.dcm").resolve())]
    assert "not a DICOM" in reasons[str((archive / "broken" / "notes.txt").resolve())]
    assert "DICOMDIR" in reasons[str((archive / "dicomdirtests" / "DICOMDIR").resolve())]


def _reference_age(ds) -> float:
    text = str(ds.get("PatientAge", "") or "").strip()
    if text:
        number, unit = int(text[:3]), text[3]
        return {"Y": number, "M": number / 12, "W": number * 7 / 365.25, "D": number / 365.25}[unit]
    return math.nan


def test_values_match_direct_pydicom_reads(built):
    manifest, _ = built
    for row in manifest.itertuples(index=False):
        ds = pydicom.dcmread(row.image, stop_before_pixels=True)
        assert row.patient_id == ds.PatientID
        sex = str(ds.get("PatientSex", "") or "").strip()
        assert (row.sex if isinstance(row.sex, str) else "") == (sex if sex in ("M", "F") else "")
        site = " ".join(v for v in (str(ds.get("Manufacturer", "") or "").strip(),
                                    str(ds.get("ManufacturerModelName", "") or "").strip()) if v)
        assert (row.site if isinstance(row.site, str) else "") == site
        assert row.modality == ds.Modality
        assert row.study_id == ds.StudyInstanceUID and row.series_id == ds.SeriesInstanceUID
        view = str(ds.get("ViewPosition", "") or "").strip()
        assert (row.view if isinstance(row.view, str) else "") == view
        if str(ds.get("PatientAge", "") or "").strip():
            assert row.age == pytest.approx(_reference_age(ds), abs=1e-12)


def test_known_header_values(built, archive):
    manifest, _ = built
    by_file = manifest.set_index("image")
    ct = by_file.loc[str((archive / "CT_small.dcm").resolve())]
    assert ct["age"] == 0.0 and pd.isna(ct["sex"])  # PatientAge 000Y, PatientSex O
    mr = by_file.loc[str((archive / "MR_small.dcm").resolve())]
    assert mr["sex"] == "F" and pd.isna(mr["age"])  # no PatientAge, blank birth date
    cr = manifest[manifest["view"].isin(["AP", "LL"])]
    assert set(cr["age"]) == {47.0}


@pytest.mark.skipif(RG1 is None, reason="pydicom-data's RG1_UNCR.dcm is not installed")
def test_age_from_birth_and_study_dates_on_rg1(built, archive):
    manifest, _ = built
    ds = pydicom.dcmread(RG1, stop_before_pixels=True)
    assert "PatientAge" not in ds
    row = manifest.set_index("image").loc[str((archive / "RG1_UNCR.dcm").resolve())]
    born = date(int(ds.PatientBirthDate[:4]), int(ds.PatientBirthDate[4:6]), int(ds.PatientBirthDate[6:]))
    seen = date(int(ds.StudyDate[:4]), int(ds.StudyDate[4:6]), int(ds.StudyDate[6:]))
    whole_years = seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))
    assert whole_years <= row["age"] < whole_years + 1  # calendar age as an independent bound
    assert row["view"] == "PA" and row["modality"] == "CR" and row["sex"] == "F"


def test_no_phi_in_output(built, archive):
    manifest, _ = built
    assert find_phi_columns(manifest.columns) == {}
    validate_manifest(manifest)
    cells = {str(v) for v in manifest.to_numpy().ravel()}
    for path in manifest["image"]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        name = str(ds.get("PatientName", "") or "")
        birth = str(ds.get("PatientBirthDate", "") or "")
        if name:
            assert not any(name in cell for cell in cells)
        if birth:
            assert not any(birth in cell for cell in cells)


@pytest.mark.parametrize(
    "text, years",
    [("065Y", 65.0), ("006M", 0.5), ("010W", 70 / 365.25), ("003D", 3 / 365.25), ("000Y", 0.0), ("045", 45.0),
     (" 12y ", 12.0), ("12X", math.nan), ("", math.nan), (None, math.nan), ("1234Y", math.nan)],
)
def test_parse_dicom_age_every_form(text, years):
    value = parse_dicom_age(text)
    if math.isnan(years):
        assert math.isnan(value)
    else:
        assert value == pytest.approx(years, rel=1e-12)


def test_age_from_dates():
    assert age_from_dates("20000101", "20010101") == pytest.approx(366 / 365.25)
    elapsed = (date(2004, 3, 5) - date(1940, 3, 5)).days
    assert age_from_dates("1940.03.05", "20040305") == pytest.approx(elapsed / 365.25)
    assert math.isnan(age_from_dates("", "20040101"))
    assert math.isnan(age_from_dates("20050101", "20040101"))


def _write_variant(source: Path, path: Path, **tags) -> Path:
    ds = pydicom.dcmread(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid ages are written on purpose
        _set_tags(ds, tags)
    ds.save_as(path)
    return path


def _set_tags(ds, tags) -> None:
    for keyword, value in tags.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)


def test_every_age_form_through_the_builder(tmp_path):
    cases = {
        "years.dcm": ({"PatientAge": "065Y"}, 65.0),
        "months.dcm": ({"PatientAge": "018M"}, 1.5),
        "weeks.dcm": ({"PatientAge": "026W"}, 26 * 7 / 365.25),
        "days.dcm": ({"PatientAge": "100D"}, 100 / 365.25),
        "dates.dcm": ({"PatientAge": None, "PatientBirthDate": "19800615", "StudyDate": "20000615"},
                      (date(2000, 6, 15) - date(1980, 6, 15)).days / 365.25),
        "bad_age_dates.dcm": ({"PatientAge": "0X5Y", "PatientBirthDate": "19900101", "StudyDate": "20000101"},
                              (date(2000, 1, 1) - date(1990, 1, 1)).days / 365.25),
        "none.dcm": ({"PatientAge": "ABCD", "PatientBirthDate": ""}, math.nan),
        "too_old.dcm": ({"PatientAge": "150Y", "PatientBirthDate": ""}, math.nan),
    }
    for name, (tags, _) in cases.items():
        _write_variant(MR_SMALL, tmp_path / name, **tags)
    manifest, report = manifest_from_dicom(tmp_path, progress=False)
    ages = dict(zip(manifest["image"].map(lambda p: Path(p).name), manifest["age"]))
    for name, (_, years) in cases.items():
        if math.isnan(years):
            assert math.isnan(ages[name])
        else:
            assert ages[name] == pytest.approx(years, rel=1e-12)
    warned = {Path(p).name for p in report.loc[report["status"] == "warning", "file"]}
    assert {"none.dcm", "too_old.dcm"} <= warned and "years.dcm" not in warned
    assert (manifest.columns == ["image", "patient_id", "age", "sex", "site", "view", "modality", "study_id",
                                 "series_id"]).all()


def test_missing_patient_id_is_skipped(tmp_path):
    _write_variant(MR_SMALL, tmp_path / "no_id.dcm", PatientID=None)
    _write_variant(MR_SMALL, tmp_path / "ok.dcm")
    manifest, report = manifest_from_dicom(tmp_path, progress=False)
    assert [Path(p).name for p in manifest["image"]] == ["ok.dcm"]
    assert report["reason"].str.contains("PatientID").tolist() == [True]


@pytest.mark.skipif(JPEG2000 is None, reason="pydicom's JPEG2000.dcm is absent")
def test_truncated_encapsulated_pixel_data(tmp_path):
    data = JPEG2000.read_bytes()
    shutil.copy(JPEG2000, tmp_path / "whole.dcm")
    (tmp_path / "cut.dcm").write_bytes(data[:-100])
    manifest, report = manifest_from_dicom(tmp_path, progress=False)
    assert [Path(p).name for p in manifest["image"]] == ["whole.dcm"]
    assert "truncated" in report["reason"].iloc[0] and Path(report["file"].iloc[0]).name == "cut.dcm"


def test_pseudonymized_ids_are_keyed_hashes_and_stable(archive, tmp_path):
    folder = tmp_path / "two"
    shutil.copytree(archive / "dicomdirtests" / "77654033", folder)
    plain, _ = manifest_from_dicom(folder, progress=False)
    first, _ = manifest_from_dicom(folder, pseudonymize_salt="s3cret", progress=False)
    second, _ = manifest_from_dicom(folder, pseudonymize_salt="s3cret", progress=False)
    other, _ = manifest_from_dicom(folder, pseudonymize_salt="another", progress=False)
    reference = [hmac.new(b"s3cret", pid.encode(), hashlib.sha256).hexdigest() for pid in plain["patient_id"]]
    assert first["patient_id"].tolist() == reference
    assert first["patient_id"].tolist() == second["patient_id"].tolist()
    assert not set(first["patient_id"]) & set(plain["patient_id"])
    assert not set(first["patient_id"]) & set(other["patient_id"])
    assert first["patient_id"].nunique() == plain["patient_id"].nunique()  # one patient, one pseudonym
    assert not set(first["study_id"]) & set(plain["study_id"])
    assert first["study_id"].nunique() == plain["study_id"].nunique()


def test_site_choices_and_report_file(archive, tmp_path):
    report_path = tmp_path / "out" / "report.csv"
    manifest, report = manifest_from_dicom(archive / "dicomdirtests", site_from="institution", progress=False,
                                           report_path=report_path)
    for row in manifest.itertuples(index=False):
        ds = pydicom.dcmread(row.image, stop_before_pixels=True)
        institution = str(ds.get("InstitutionName", "") or "").strip()
        assert (row.site if isinstance(row.site, str) else "") == institution
    written = pd.read_csv(report_path)
    assert list(written.columns) == ["file", "reason", "status"] and len(written) == len(report)
    stations, _ = manifest_from_dicom(MR_SMALL.parent / "dicomdirtests" / "98892003", site_from="station",
                                      progress=False)
    assert len(stations) > 0
    with pytest.raises(ValueError, match="site_from"):
        manifest_from_dicom(archive, site_from="hospital", progress=False)
    with pytest.raises(NotADirectoryError):
        manifest_from_dicom(tmp_path / "missing", progress=False)


def test_empty_folder_gives_empty_valid_manifest(tmp_path):
    manifest, report = manifest_from_dicom(tmp_path, progress=False)
    assert len(manifest) == 0 and len(report) == 0
    validate_manifest(manifest)
    assert np.issubdtype(manifest["age"].dtype, np.floating)
