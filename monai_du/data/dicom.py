"""Build a manifest from a folder of DICOM files, reading headers only (in parallel, restartable)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import os
import re
import warnings
from datetime import date
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd

from monai_du.data.crawl import CrawlCheckpoint, check_num_workers, chunked, map_chunks
from monai_du.data.manifest import (
    MAX_AGE_YEARS,
    ManifestBuildResult,
    _make_report,
    _sex_code,
)

__all__ = [
    "SITE_SOURCES",
    "DICOM_MANIFEST_COLUMNS",
    "parse_dicom_age",
    "age_from_dates",
    "pseudonymize",
    "manifest_from_dicom",
]

SITE_SOURCES: dict[str, tuple[str, ...]] = {
    "institution": ("InstitutionName",),
    "manufacturer": ("Manufacturer", "ManufacturerModelName"),
    "station": ("StationName",),
}
"""Choices of ``site_from``: the DICOM keywords joined (with a space) into the ``site`` value."""

DICOM_MANIFEST_COLUMNS: tuple[str, ...] = (
    "image",
    "patient_id",
    "age",
    "sex",
    "site",
    "view",
    "modality",
    "study_id",
    "series_id",
    "study_offset_days",
)
"""Columns of the manifest that :func:`manifest_from_dicom` returns, in order."""

_DAYS_PER_YEAR = 365.25
_AGE_UNITS_IN_YEARS = {"Y": 1.0, "M": 1.0 / 12.0, "W": 7.0 / _DAYS_PER_YEAR, "D": 1.0 / _DAYS_PER_YEAR}
_AGE_PATTERN = re.compile(r"^\s*(\d{1,3})\s*([YMWDymwd])?\s*$")
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_PIXEL_DATA_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
_LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_DATE_FALLBACKS = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")
# the only elements the build reads: parsing (and decoding) the others would cost half the time
_HEADER_KEYWORDS = (
    ("PatientID", "PatientAge", "PatientBirthDate", "PatientSex", "ViewPosition", "Modality", "StudyInstanceUID",
     "SeriesInstanceUID", "SOPClassUID", "DirectoryRecordSequence")
    + _DATE_FALLBACKS
    + tuple(keyword for keywords in SITE_SOURCES.values() for keyword in keywords)
)


def parse_dicom_age(value: object) -> float:
    """Convert a DICOM Age String (``PatientAge``) to years.

    ``nnnY`` is years, ``nnnM`` months (/12), ``nnnW`` weeks (x7/365.25) and ``nnnD`` days (/365.25). A bare
    number (a common non-conformant form, ``"45"``) is read as years. ``"000Y"`` is a valid age of zero and is kept.

    Args:
        value: the tag value (``str``), or None.

    Returns:
        the age in years, or NaN when the value is missing or not an age string.
    """
    if value is None:
        return float("nan")
    match = _AGE_PATTERN.match(str(value))
    if match is None:
        return float("nan")
    number = float(match.group(1))
    unit = (match.group(2) or "Y").upper()
    return number * _AGE_UNITS_IN_YEARS[unit]


def _parse_da(value: object) -> date | None:
    text = re.sub(r"[^0-9]", "", str(value or ""))  # ACR-NEMA wrote 1940.03.05
    if len(text) < 8:
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def age_from_dates(birth_date: object, study_date: object) -> float:
    """Age in years at a study, from two DICOM dates (``YYYYMMDD``): elapsed days / 365.25.

    Args:
        birth_date: ``PatientBirthDate`` value.
        study_date: ``StudyDate`` (or another acquisition date) value.

    Returns:
        the age in years, or NaN when either date is missing or invalid, or the study precedes the birth.
    """
    born, seen = _parse_da(birth_date), _parse_da(study_date)
    if born is None or seen is None or seen < born:
        return float("nan")
    return (seen - born).days / _DAYS_PER_YEAR


def pseudonymize(value: str, salt: str | bytes) -> str:
    """Keyed pseudonym of an identifier: hex HMAC-SHA256 of ``value`` keyed with ``salt``.

    The same value and salt always give the same pseudonym; without the salt it cannot be recomputed from a guessed
    identifier. Keep the salt secret and out of the manifest.

    Args:
        value: identifier, e.g. ``PatientID``.
        salt: secret key.

    Returns:
        64 hexadecimal characters.
    """
    key = salt.encode("utf-8") if isinstance(salt, str) else bytes(salt)
    if not key:
        raise ValueError("pseudonymize_salt must be a non-empty string or bytes")
    return hmac.new(key, str(value).encode("utf-8"), hashlib.sha256).hexdigest()


_ASCII_VRS = frozenset({"AS", "CS", "DA", "UI"})
"""VRs whose values use the default character repertoire only: their raw bytes are decoded here directly, which
costs a fraction of pydicom's per-element conversion (the bulk of a build's time after the read itself)."""


def _text(ds: Any, keyword: str) -> str | None:
    from pydicom.dataelem import RawDataElement

    raw = ds.get_item(_header_tag(keyword))
    if isinstance(raw, RawDataElement) and raw.VR in _ASCII_VRS and isinstance(raw.value, bytes):
        values = raw.value.decode("latin-1").split("\\")
        text = "\\".join(v.strip(" \x00") for v in values).strip()
        return text or None
    value = ds.get(keyword, None)
    if value is None:
        return None
    if not isinstance(value, (str, bytes)) and hasattr(value, "__iter__") and not hasattr(value, "family_name"):
        value = "\\".join(str(v) for v in value)  # multi-valued string
    text = str(value).strip().strip("\x00").strip()
    return text or None


def _pixel_data_problem(fp: BinaryIO, size: int, little_endian: bool, implicit_vr: bool) -> str | None:
    """Check the pixel data element that starts at ``fp``'s position is complete; return a reason if not."""
    start = fp.tell()
    if start >= size:
        return "no pixel data element (file truncated before the pixel data, or not an image)"
    order = "little" if little_endian else "big"
    head = fp.read(8)
    if len(head) < 8:
        return f"truncated: pixel data element header is cut at byte {size}"
    group, element = int.from_bytes(head[0:2], order), int.from_bytes(head[2:4], order)
    if (group, element) not in _PIXEL_DATA_TAGS:
        return None  # headers stopped elsewhere; nothing to check
    if implicit_vr:
        length, header_size = int.from_bytes(head[4:8], order), 8
    elif head[4:6] in _LONG_LENGTH_VRS:
        extra = fp.read(4)
        if len(extra) < 4:
            return f"truncated: pixel data element header is cut at byte {size}"
        length, header_size = int.from_bytes(extra, order), 12
    else:
        length, header_size = int.from_bytes(head[6:8], order), 8
    value_start = start + header_size
    if length != 0xFFFFFFFF:
        if value_start + length > size:
            return f"truncated: pixel data needs {value_start + length} bytes, the file has {size}"
        return None
    # encapsulated pixel data: walk the items up to the sequence delimiter
    position = value_start
    while True:
        fp.seek(position)
        item = fp.read(8)
        if len(item) < 8:
            return f"truncated: encapsulated pixel data has no sequence delimiter before byte {size}"
        tag = (int.from_bytes(item[0:2], order), int.from_bytes(item[2:4], order))
        item_length = int.from_bytes(item[4:8], order)
        if tag == (0xFFFE, 0xE0DD):
            return None
        if tag != (0xFFFE, 0xE000):
            return f"corrupt encapsulated pixel data: unexpected tag {tag[0]:04X},{tag[1]:04X} at byte {position}"
        position += 8 + item_length
        if position > size:
            return f"truncated: pixel data fragment needs {position} bytes, the file has {size}"


def _looks_like_raw_dicom(path: Path) -> bool:
    """True for a file without a DICOM preamble that starts like a dataset (group 0002 or 0008 element)."""
    with open(path, "rb") as fp:
        start = fp.read(4)
    if len(start) < 4:
        return False
    return int.from_bytes(start[0:2], "little") in (0x0002, 0x0008)


@functools.lru_cache(maxsize=1)
def _header_tags() -> list[Any]:
    return [_header_tag(keyword) for keyword in _HEADER_KEYWORDS]


@functools.lru_cache(maxsize=64)
def _header_tag(keyword: str) -> Any:
    from pydicom.tag import Tag

    return Tag(keyword)


def _read_header(path: Path) -> tuple[Any, str | None]:
    """Read the header of one file. Returns (dataset or None, reason when the file cannot be used)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    size = path.stat().st_size
    for force in (False, True):
        if force and not _looks_like_raw_dicom(path):
            return None, "not a DICOM file (no 'DICM' marker and no DICOM elements at the start)"
        try:
            with open(path, "rb") as fp, warnings.catch_warnings():
                # invalid values are handled (and reported) here; pydicom's warnings would only repeat them
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(fp, stop_before_pixels=True, force=force, specific_tags=_header_tags())
                sop_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or "")
                if sop_class == _DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
                    return None, "DICOMDIR (media directory), not an image"
                little_endian, implicit_vr = _encoding(ds)
                problem = _pixel_data_problem(fp, size, little_endian, implicit_vr)
        except InvalidDicomError:
            if not force:
                continue
            return None, "not a DICOM file (unreadable without a 'DICM' marker)"
        except Exception as error:  # one bad file never stops the build
            return None, f"unreadable DICOM ({type(error).__name__}: {error})"
        if force and _text(ds, "PatientID") is None and _text(ds, "SOPClassUID") is None:
            return None, "not a DICOM file (no patient or SOP class elements)"
        if problem is not None:
            return None, problem
        return ds, None
    return None, "not a DICOM file"


def _encoding(ds: Any) -> tuple[bool, bool]:
    encoding = getattr(ds, "original_encoding", None)
    if encoding is not None and None not in encoding:
        implicit_vr, little_endian = encoding
        return bool(little_endian), bool(implicit_vr)
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if syntax == "1.2.840.10008.1.2":
        return True, True
    if syntax == "1.2.840.10008.1.2.2":
        return False, False
    return True, False


def _age(ds: Any) -> tuple[float, str | None]:
    """Age in years from PatientAge, else from PatientBirthDate and the study date; a note when set to missing."""
    raw_age = _text(ds, "PatientAge")
    note = None
    if raw_age is not None:
        years = parse_dicom_age(raw_age)
        if np.isfinite(years):
            if years <= MAX_AGE_YEARS:
                return years, None
            note = f"PatientAge {raw_age!r} is over {MAX_AGE_YEARS:g} years"
        else:
            note = f"PatientAge {raw_age!r} is not a DICOM age string"
    birth = _text(ds, "PatientBirthDate")
    if birth is not None:
        seen = next((v for v in (_text(ds, k) for k in _DATE_FALLBACKS) if v is not None), None)
        years = age_from_dates(birth, seen)
        if np.isfinite(years) and years <= MAX_AGE_YEARS:
            return years, None
        note = (note + "; " if note else "") + "age from birth and study dates unavailable or out of range"
    if note is not None:
        note += "; age set to missing"
    return float("nan"), note


def _site(ds: Any, site_from: str) -> str | None:
    parts = [_text(ds, keyword) for keyword in SITE_SOURCES[site_from]]
    parts = [p for p in parts if p]
    return " ".join(parts) if parts else None


def _walk_files(folder: Path) -> list[Path]:
    files: list[Path] = []
    for directory, subdirectories, names in os.walk(folder):
        subdirectories.sort()
        files.extend(Path(directory) / name for name in sorted(names))
    return files


def _study_day(ds: Any) -> tuple[int | None, str | None]:
    """Day number (proleptic ordinal) of the study: ``StudyDate``, else ``SeriesDate``, ``AcquisitionDate``,
    ``ContentDate``; a note when dates are present but none is valid."""
    invalid = []
    for keyword in _DATE_FALLBACKS:
        value = _text(ds, keyword)
        if value is None:
            continue
        parsed = _parse_da(value)
        if parsed is not None:
            return parsed.toordinal(), None
        invalid.append(f"{keyword} {value!r}")
    if invalid:
        return None, f"{', '.join(invalid)} is not a valid date; study_offset_days set to missing"
    return None, None


def _day_shift(patient: str, salt: str | bytes) -> int:
    """A secret per-patient shift of day numbers (0 to 100 years): offsets within a patient are unchanged, and the
    checkpoint of a pseudonymised build holds no real date."""
    key = salt.encode("utf-8") if isinstance(salt, str) else bytes(salt)
    digest = hmac.new(key, b"study-day-shift\x00" + patient.encode("utf-8"), hashlib.sha256).digest()
    return int.from_bytes(digest[:4], "big") % 36525


def _skipped(path: str, reason: str) -> dict[str, Any]:
    return {"file": path, "row": None, "day": None, "notes": [[reason, "skipped"]]}


def _read_record(path: str, site_from: str, salt: str | bytes | None) -> dict[str, Any]:
    """What the build keeps of one file: ``{"file", "row" (manifest values, or None when skipped), "day" (study day
    number, shifted per patient with a salt), "notes" ([reason, status] report entries)}``. Never raises."""
    with warnings.catch_warnings():
        # invalid values are handled (and reported) here; pydicom's warnings would only repeat them
        warnings.simplefilter("ignore")
        return _read_record_quietly(path, site_from, salt)


def _read_record_quietly(path: str, site_from: str, salt: str | bytes | None) -> dict[str, Any]:
    try:
        ds, reason = _read_header(Path(path))
        if ds is None:
            return _skipped(path, reason or "unreadable")
        patient = _text(ds, "PatientID")
        if patient is None:
            return _skipped(path, "missing required tag PatientID")
        notes: list[list[str]] = []
        age, note = _age(ds)
        if note is not None:
            notes.append([note, "warning"])
        raw_sex = _text(ds, "PatientSex")
        sex, unrecognised = _sex_code(raw_sex)
        if unrecognised:
            notes.append([f"PatientSex {raw_sex!r} is not M, F or O; sex set to missing", "warning"])
        day, note = _study_day(ds)
        if note is not None:
            notes.append([note, "warning"])
        study, series = _text(ds, "StudyInstanceUID"), _text(ds, "SeriesInstanceUID")
        if salt is not None:
            patient = pseudonymize(patient, salt)
            study = pseudonymize(study, salt) if study else None
            series = pseudonymize(series, salt) if series else None
            if day is not None:
                day += _day_shift(patient, salt)
        row = {
            "image": path,
            "patient_id": patient,
            "age": float(age),
            "sex": None if pd.isna(sex) else sex,
            "site": _site(ds, site_from),
            "view": _text(ds, "ViewPosition"),
            "modality": _text(ds, "Modality"),
            "study_id": study,
            "series_id": series,
        }
        return {"file": path, "row": row, "day": day, "notes": notes}
    except Exception as error:  # one bad file never stops the build
        return _skipped(path, f"unexpected error ({type(error).__name__}: {error})")


def _read_chunk(paths: list[str], site_from: str, salt: str | bytes | None) -> list[dict[str, Any]]:
    """:func:`_read_record` for each path (the task a worker process runs)."""
    return [_read_record(path, site_from, salt) for path in paths]


def _lost_record(path: str, reason: str) -> list[dict[str, Any]]:
    return [_skipped(path, reason)]


def _assemble(files: list[str], records: dict[str, dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The manifest and report from the per-file records, in the order of ``files``; offsets from the whole set."""
    rows: list[dict[str, Any]] = []
    days: list[float] = []
    report: list[tuple[str, str, str]] = []
    for path in files:
        record = records[path]
        for reason, status in record["notes"]:
            report.append((path, reason, status))
        if record["row"] is not None:
            rows.append(record["row"])
            days.append(np.nan if record["day"] is None else float(record["day"]))
    columns = [c for c in DICOM_MANIFEST_COLUMNS if c != "study_offset_days"]
    manifest = pd.DataFrame(rows, columns=columns)
    manifest["age"] = manifest["age"].astype(float)
    for column in ("image", "patient_id", "sex", "site", "view", "modality", "study_id", "series_id"):
        manifest[column] = manifest[column].astype(object).where(manifest[column].notna(), np.nan)
    day = pd.Series(days, index=manifest.index, dtype=float)
    first = day.groupby(manifest["patient_id"].to_numpy()).transform("min") if len(day) else day
    manifest["study_offset_days"] = (day - first).astype(float)
    return manifest[list(DICOM_MANIFEST_COLUMNS)], _make_report(report, item_column="file")


def manifest_from_dicom(
    folder: str | os.PathLike,
    site_from: str = "institution",
    pseudonymize_salt: str | bytes | None = None,
    report_path: str | os.PathLike | None = None,
    progress: bool = True,
    num_workers: int | None = 1,
    chunk_size: int = 64,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
) -> ManifestBuildResult:
    """Walk a DICOM tree and build a manifest from the headers (pixel data is never read).

    Every file under ``folder`` (recursively, in sorted order) is tried. One row is made per readable image with a
    ``PatientID`` and complete pixel data. Files that are not DICOM, truncated, DICOMDIRs, without pixel data or
    without ``PatientID`` are skipped and listed in the report with the reason; one bad file never stops the build.

    Columns (:data:`DICOM_MANIFEST_COLUMNS`):

    - ``image``: absolute file path. Note that folder names can themselves carry identifiers.
    - ``patient_id``: ``PatientID``, or its salted pseudonym (:func:`pseudonymize`) when ``pseudonymize_salt`` is
      given; the study and series UIDs are then pseudonymised with the same salt.
    - ``age``: years, from ``PatientAge`` (``nnnY``, ``nnnM``, ``nnnW``, ``nnnD``); when absent or invalid, from
      ``PatientBirthDate`` and ``StudyDate`` (else ``SeriesDate``, ``AcquisitionDate``, ``ContentDate``). The birth
      date is never kept. Missing otherwise.
    - ``sex``: ``PatientSex`` normalised to ``M``/``F``; ``O`` and blank are missing; any other code is missing with
      a warning in the report.
    - ``site``: from ``site_from`` (:data:`SITE_SOURCES`): ``"institution"`` (``InstitutionName``),
      ``"manufacturer"`` (``Manufacturer`` + ``ManufacturerModelName``) or ``"station"`` (``StationName``).
    - ``view`` (``ViewPosition``), ``modality`` (``Modality``), ``study_id`` (``StudyInstanceUID``),
      ``series_id`` (``SeriesInstanceUID``); missing when the tag is absent or blank.
    - ``study_offset_days``: days from the patient's first study in the crawled archive to this one (``StudyDate``,
      else the same fallbacks as for age), per ``patient_id`` (so per pseudonym); missing without a valid date. No
      date column is kept.

    Parallel and restartable builds. With ``num_workers`` > 1 the headers are read in a process pool, in chunks of
    ``chunk_size`` files; the result (rows in walk order, report) is the same as the serial build's. A worker that
    dies (a crash, out of memory) loses no other file: its files are read again one by one, and a file that kills its
    worker alone is reported. With ``checkpoint``, each finished chunk is appended to that file (JSON lines, flushed
    per chunk), so a killed crawl loses at most one chunk; rerun with ``resume=True`` to read only the files the
    checkpoint does not hold yet (kept or skipped). The same call later reads only the files added to the archive
    since (files removed from it are left out; changed files are not read again: delete the checkpoint to rebuild).
    The offsets are computed on the whole manifest at the end. The checkpoint is a working file as sensitive as the
    archive (without a salt it holds the original identifiers; with one, its study day numbers are shifted by a
    secret per-patient amount): keep it beside the archive, not with the manifest.

    Args:
        folder: root of the DICOM tree.
        site_from: which tags make the site.
        pseudonymize_salt: secret key for pseudonymous patient, study and series identifiers; None keeps them.
        report_path: where to also write the report as CSV (columns ``file``, ``reason``, ``status``).
        progress: show a tqdm progress bar (never when the output is not a terminal).
        num_workers: worker processes; 0 or 1 reads in this process, None uses one per CPU.
        chunk_size: files per task (and per checkpoint line).
        checkpoint: file recording finished chunks, for ``resume``.
        resume: continue from ``checkpoint`` (made when absent). Without it an existing checkpoint is refused.

    Returns:
        :class:`~monai_du.data.manifest.ManifestBuildResult`; unpack it as ``manifest, report``. The report has one
        row per skipped file (``status="skipped"``) and per value of a kept file set to missing because it was
        invalid (age, sex, study date; ``status="warning"``).

    Raises:
        ValueError: for an unknown ``site_from``, an empty salt, invalid ``num_workers`` or ``chunk_size``,
            ``resume`` without ``checkpoint``, or a checkpoint of another build (other folder, site or salt).
        FileExistsError: when ``checkpoint`` exists and ``resume`` is False.
        NotADirectoryError: when ``folder`` is not a folder.
    """
    if site_from not in SITE_SOURCES:
        raise ValueError(f"site_from must be one of {sorted(SITE_SOURCES)}, got {site_from!r}")
    if pseudonymize_salt is not None and len(pseudonymize_salt) == 0:
        raise ValueError("pseudonymize_salt must be a non-empty string or bytes (or None)")
    workers = check_num_workers(num_workers, chunk_size)
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=<file> (the file the interrupted build wrote)")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise NotADirectoryError(f"DICOM folder not found: {folder}")

    from tqdm.auto import tqdm

    root = folder.resolve()
    files = [str(path) for path in _walk_files(root)]
    records: dict[str, dict[str, Any]] = {}
    log = None
    if checkpoint is not None:
        salt_id = None if pseudonymize_salt is None else pseudonymize("monai_du checkpoint", pseudonymize_salt)
        header = {"builder": "manifest_from_dicom", "folder": str(root), "site_from": site_from, "salt": salt_id}
        log = CrawlCheckpoint(checkpoint, header, resume=resume)
        records.update(log.done)
    try:
        todo = [path for path in files if path not in records]
        bar = tqdm(total=len(files), initial=len(files) - len(todo), desc="DICOM headers", unit="file",
                   disable=None if progress else True)
        results = map_chunks(_read_chunk, chunked(todo, chunk_size), args=(site_from, pseudonymize_salt),
                             num_workers=workers, failed=_lost_record)
        with bar, contextlib.closing(results):  # closing: an interrupted build stops its workers at once
            for chunk in results:
                if log is not None:
                    log.append(chunk)
                for record in chunk:
                    records[record["file"]] = record
                bar.update(len(chunk))
    finally:
        if log is not None:
            log.close()

    manifest, report_df = _assemble(files, records)
    if report_path is not None:
        report_path = Path(report_path)
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_df.to_csv(report_path, index=False)
    return ManifestBuildResult(manifest=manifest, report=report_df)
