"""Tests for monai_du.data.dicom on real DICOM files (pydicom's test files and pydicom-data)."""

from __future__ import annotations

import hashlib
import hmac
import math
import multiprocessing
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
    assert manifest.columns.tolist() == ["image", "patient_id", "age", "sex", "site", "view", "modality", "study_id",
                                         "series_id", "study_offset_days"]


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


# ------------------------------------------------------------------ generated longitudinal archive, parallel, resume
def _write_dicom(path: Path, patient: str, study_date: str | None, sex: str = "F", age: str = "045Y",
                 institution: str = "Hospital A") -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray, for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientSex, ds.PatientAge, ds.PatientName = patient, sex, age, f"Doe^{patient}"
    if study_date is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid dates are written on purpose
            ds.StudyDate = study_date
    ds.InstitutionName, ds.Modality, ds.ViewPosition = institution, "DX", "PA"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(range(16))
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid values (sex Q, a bad date) are written on purpose
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


# patient -> study dates (YYYYMMDD), written by hand; None: no StudyDate tag
STUDIES = {
    "P1": ["20200101", "20200115", "20210101"],
    "P2": ["20191231", "20200101"],
    "P3": ["20180301"],
    "P4": ["20200229", None, "20240229"],
    "P5": ["20220601", "20220601", "20220510", "20230601"],
    "P6": ["20150707", "20150708", "20160707", "20170707", "20180707"],
}


@pytest.fixture(scope="module")
def longitudinal(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("longitudinal")
    for patient, dates in STUDIES.items():
        for i, study_date in enumerate(dates):
            _write_dicom(root / patient / f"study{i}" / "img.dcm", patient, study_date)
    _write_dicom(root / "odd" / "sex_q.dcm", "P7", "20200101", sex="Q")
    _write_dicom(root / "odd" / "sex_o.dcm", "P8", "20200101", sex="O")
    _write_dicom(root / "odd" / "bad_date.dcm", "P9", "20201345")
    data = (root / "P1" / "study0" / "img.dcm").read_bytes()
    (root / "odd" / "truncated.dcm").write_bytes(data[:-5])
    (root / "odd" / "readme.txt").write_text("not DICOM\n")
    return root


def _reference_offsets(root: Path) -> dict[str, float]:
    """Independent reference: days since each patient's first dated study, from the STUDIES table."""
    expected = {}
    for patient, dates in STUDIES.items():
        days = [None if d is None else date(int(d[:4]), int(d[4:6]), int(d[6:])) for d in dates]
        first = min(d for d in days if d is not None)
        for i, day in enumerate(days):
            path = str((root / patient / f"study{i}" / "img.dcm").resolve())
            expected[path] = math.nan if day is None else float((day - first).days)
    return expected


def _by_name(manifest: pd.DataFrame) -> dict[str, pd.Series]:
    return {row["image"]: row for _, row in manifest.iterrows()}


def test_study_offset_days_from_study_dates_and_no_date_column(longitudinal):
    manifest, report = manifest_from_dicom(longitudinal, progress=False)
    rows = _by_name(manifest)
    for path, offset in _reference_offsets(longitudinal).items():
        value = rows[path]["study_offset_days"]
        assert (math.isnan(offset) and math.isnan(value)) or value == offset, path
    assert np.issubdtype(manifest["study_offset_days"].dtype, np.floating)
    assert not [c for c in manifest.columns if "date" in c.lower()]
    cells = {str(v) for v in manifest.to_numpy().ravel()}
    assert not {d for dates in STUDIES.values() for d in dates if d} & cells
    validate_manifest(manifest)
    bad_date = str((longitudinal / "odd" / "bad_date.dcm").resolve())
    assert math.isnan(rows[bad_date]["study_offset_days"])
    notes = report[report["file"] == bad_date]
    assert notes["status"].tolist() == ["warning"] and "StudyDate '20201345'" in notes["reason"].iloc[0]
    # a salt changes the identifiers, not the offsets
    salted, _ = manifest_from_dicom(longitudinal, pseudonymize_salt="k", progress=False)
    np.testing.assert_array_equal(salted["study_offset_days"].to_numpy(), manifest["study_offset_days"].to_numpy())


def test_unknown_sex_code_is_reported(longitudinal):
    manifest, report = manifest_from_dicom(longitudinal, progress=False)
    rows = _by_name(manifest)
    for name in ("sex_q.dcm", "sex_o.dcm"):
        assert pd.isna(rows[str((longitudinal / "odd" / name).resolve())]["sex"])
    warned = report[report["status"] == "warning"]
    q = warned[warned["file"].str.endswith("sex_q.dcm")]
    assert len(q) == 1 and "PatientSex 'Q'" in q["reason"].iloc[0] and "missing" in q["reason"].iloc[0]
    assert not warned["file"].str.endswith("sex_o.dcm").any()  # O (other) is a valid code for missing


@pytest.mark.parametrize("folder", ["longitudinal", "archive"])
def test_parallel_build_equals_serial_build(folder, request):
    root = request.getfixturevalue(folder)
    serial = manifest_from_dicom(root, site_from="manufacturer", progress=False)
    parallel = manifest_from_dicom(root, site_from="manufacturer", progress=False, num_workers=2, chunk_size=3)
    pd.testing.assert_frame_equal(parallel.manifest, serial.manifest)
    pd.testing.assert_frame_equal(parallel.report, serial.report)
    files = [str(p) for p in _walk_order(root)]
    kept = [f for f in files if f in set(serial.manifest["image"])]
    assert serial.manifest["image"].tolist() == kept  # rows in walk order


def _walk_order(root: Path) -> list[Path]:
    import os

    out = []
    for directory, subdirectories, names in os.walk(root.resolve()):
        subdirectories.sort()
        out.extend(Path(directory) / n for n in sorted(names))
    return out


class _Killed(RuntimeError):
    pass


def _count_reads(monkeypatch) -> list[str]:
    from monai_du.data import dicom

    seen: list[str] = []
    original = dicom._read_record

    def counting(path, site_from, salt):
        seen.append(path)
        return original(path, site_from, salt)

    monkeypatch.setattr(dicom, "_read_record", counting)
    return seen


def test_killed_build_resumes_to_the_fresh_result(longitudinal, tmp_path, monkeypatch):
    from monai_du.data.crawl import CrawlCheckpoint

    fresh = manifest_from_dicom(longitudinal, progress=False, pseudonymize_salt="s")
    checkpoint = tmp_path / "crawl.jsonl"
    original_append = CrawlCheckpoint.append
    calls = []

    def append_then_die(self, records):
        if len(calls) == 2:
            raise _Killed("simulated kill after 2 chunks")
        calls.append(len(records))
        original_append(self, records)

    with monkeypatch.context() as patch:
        patch.setattr(CrawlCheckpoint, "append", append_then_die)
        with pytest.raises(_Killed):
            manifest_from_dicom(longitudinal, progress=False, pseudonymize_salt="s", checkpoint=checkpoint,
                                chunk_size=4, num_workers=2)
    assert multiprocessing.active_children() == []  # the interrupted build stopped its workers
    assert len(checkpoint.read_text().splitlines()) == 3  # header + 2 chunks
    text = checkpoint.read_text()
    assert "Doe^" not in text and not [d for dates in STUDIES.values() for d in dates if d and d in text]
    seen = _count_reads(monkeypatch)
    resumed = manifest_from_dicom(longitudinal, progress=False, pseudonymize_salt="s", checkpoint=checkpoint,
                                  resume=True, chunk_size=4)
    pd.testing.assert_frame_equal(resumed.manifest, fresh.manifest)
    pd.testing.assert_frame_equal(resumed.report, fresh.report)
    assert len(seen) == len(_walk_order(longitudinal)) - sum(calls)  # only the files not yet in the checkpoint
    seen.clear()
    again = manifest_from_dicom(longitudinal, progress=False, pseudonymize_salt="s", checkpoint=checkpoint,
                                resume=True)
    assert seen == [] and again.manifest.equals(fresh.manifest)  # skipped files are not read again either


def test_cut_off_checkpoint_line_is_dropped(longitudinal, tmp_path, monkeypatch):
    fresh = manifest_from_dicom(longitudinal, progress=False)
    checkpoint = tmp_path / "crawl.jsonl"
    manifest_from_dicom(longitudinal, progress=False, checkpoint=checkpoint, chunk_size=5)
    lines = checkpoint.read_bytes().split(b"\n")
    kept = b"\n".join(lines[:3]) + b"\n"
    checkpoint.write_bytes(kept + lines[3][: len(lines[3]) // 2])  # a kill in the middle of writing chunk 3
    seen = _count_reads(monkeypatch)
    resumed = manifest_from_dicom(longitudinal, progress=False, checkpoint=checkpoint, resume=True, chunk_size=5)
    pd.testing.assert_frame_equal(resumed.manifest, fresh.manifest)
    pd.testing.assert_frame_equal(resumed.report, fresh.report)
    assert len(seen) == len(_walk_order(longitudinal)) - 2 * 5
    assert checkpoint.read_bytes().startswith(kept) and checkpoint.read_bytes().endswith(b"\n")
    broken = checkpoint.read_bytes().split(b"\n")
    broken[2] = b'{"records": [oops'
    checkpoint.write_bytes(b"\n".join(broken))
    with pytest.raises(ValueError, match="line 3"):
        manifest_from_dicom(longitudinal, progress=False, checkpoint=checkpoint, resume=True)


def test_incremental_build_reads_only_new_files_and_recomputes_offsets(longitudinal, tmp_path, monkeypatch):
    root = tmp_path / "archive"
    shutil.copytree(longitudinal, root)
    checkpoint = tmp_path / "crawl.jsonl"
    manifest_from_dicom(root, progress=False, checkpoint=checkpoint, resume=True)  # made when absent
    _write_dicom(root / "P1" / "study_early" / "img.dcm", "P1", "20191201")  # an earlier study of P1
    _write_dicom(root / "P10" / "a.dcm", "P10", "20200101")
    seen = _count_reads(monkeypatch)
    updated = manifest_from_dicom(root, progress=False, checkpoint=checkpoint, resume=True)
    assert sorted(Path(p).parent.name for p in seen) == ["P10", "study_early"]
    fresh = manifest_from_dicom(root, progress=False)
    pd.testing.assert_frame_equal(updated.manifest, fresh.manifest)
    rows = _by_name(updated.manifest)
    first_p1 = str((root / "P1" / "study0" / "img.dcm").resolve())
    assert rows[first_p1]["study_offset_days"] == (date(2020, 1, 1) - date(2019, 12, 1)).days


def test_checkpoint_of_another_build_and_bad_arguments(longitudinal, tmp_path):
    checkpoint = tmp_path / "crawl.jsonl"
    manifest_from_dicom(longitudinal, progress=False, checkpoint=checkpoint)
    with pytest.raises(FileExistsError, match="resume=True"):
        manifest_from_dicom(longitudinal, progress=False, checkpoint=checkpoint)
    with pytest.raises(ValueError, match="another build"):
        manifest_from_dicom(longitudinal, progress=False, checkpoint=checkpoint, resume=True, site_from="station")
    with pytest.raises(ValueError, match="another build"):
        manifest_from_dicom(longitudinal, progress=False, checkpoint=checkpoint, resume=True, pseudonymize_salt="x")
    with pytest.raises(ValueError, match="checkpoint"):
        manifest_from_dicom(longitudinal, progress=False, resume=True)
    with pytest.raises(ValueError, match="num_workers"):
        manifest_from_dicom(longitudinal, progress=False, num_workers=-1)
    with pytest.raises(ValueError, match="chunk_size"):
        manifest_from_dicom(longitudinal, progress=False, chunk_size=0)


def _crash_on(name: str):
    import os

    from monai_du.data import dicom

    original = dicom._read_header

    def read_header(path):
        if Path(path).name == name:
            os._exit(3)  # a reader that kills its process (segfault, out of memory)
        return original(path)

    return read_header


def test_a_crashing_worker_loses_only_its_file(longitudinal, tmp_path, monkeypatch):
    from monai_du.data import dicom

    root = tmp_path / "archive"
    shutil.copytree(longitudinal, root)
    crash = _write_dicom(root / "P2" / "crash.dcm", "P2", "20200101")
    monkeypatch.setattr(dicom, "_read_header", _crash_on("crash.dcm"))
    manifest, report = manifest_from_dicom(root, progress=False, num_workers=2, chunk_size=3)
    monkeypatch.undo()
    crash.unlink()
    reference = manifest_from_dicom(root, progress=False)
    pd.testing.assert_frame_equal(manifest, reference.manifest)
    lost = report[report["file"] == str(crash.resolve())]
    assert lost["status"].tolist() == ["skipped"] and "worker process died" in lost["reason"].iloc[0]
    pd.testing.assert_frame_equal(report[report["file"] != str(crash.resolve())].reset_index(drop=True),
                                  reference.report)
