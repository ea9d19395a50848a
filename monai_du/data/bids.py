"""Build a manifest from a BIDS folder: ``participants.tsv`` plus the T1-weighted anatomical images (whose headers
are checked in parallel)."""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from monai_du.data.crawl import check_num_workers, chunked, map_chunks
from monai_du.data.manifest import (
    MAX_AGE_YEARS,
    ManifestBuildResult,
    _make_report,
    _unrecognised_sex,
    normalize_sex,
)

__all__ = ["AGE_COLUMN_NAMES", "SEX_COLUMN_NAMES", "SITE_COLUMN_NAMES", "BIDS_MANIFEST_COLUMNS", "manifest_from_bids"]

AGE_COLUMN_NAMES: tuple[str, ...] = ("age", "age_at_scan", "ageatscan", "age_years", "ageyears")
"""Candidate ``participants.tsv`` age columns, compared case-insensitively ignoring ``_``/``-``; first match wins."""

SEX_COLUMN_NAMES: tuple[str, ...] = ("sex", "gender", "sex_id")
"""Candidate sex columns (same matching as :data:`AGE_COLUMN_NAMES`)."""

SITE_COLUMN_NAMES: tuple[str, ...] = ("site", "site_id", "site_name", "scanner", "center", "centre", "institution")
"""Candidate site columns (same matching as :data:`AGE_COLUMN_NAMES`)."""

BIDS_MANIFEST_COLUMNS: tuple[str, ...] = ("image", "patient_id", "age", "sex", "site", "session", "study_id")
"""Columns of the manifest that :func:`manifest_from_bids` returns, in order."""

_T1W_PATTERN = re.compile(r"^(sub-[A-Za-z0-9]+)(?:_(ses-[A-Za-z0-9]+))?_.*T1w\.nii(\.gz)?$")


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _find_column(
    columns: list[str], candidates: tuple[str, ...], chosen: str | None, what: str, tsv: Path
) -> str | None:
    if chosen is not None:
        if chosen not in columns:
            raise ValueError(f"{tsv}: {what} column {chosen!r} not found; columns: {columns}")
        return chosen
    by_key = {_key(c): c for c in columns}
    for candidate in candidates:
        if _key(candidate) in by_key:
            return by_key[_key(candidate)]
    return None


def _participant_label(values: pd.Series) -> pd.Series:
    text = values.astype(str).str.strip()
    return text.where(text.str.startswith("sub-"), "sub-" + text)


def _find_t1w_images(root: Path) -> list[tuple[str, str | None, Path]]:
    """(participant, session or None, path) for each ``sub-*/[ses-*/]anat/*T1w.nii[.gz]``, sorted."""
    found = []
    for pattern in ("sub-*/anat/*T1w.nii*", "sub-*/ses-*/anat/*T1w.nii*"):
        for path in root.glob(pattern):
            match = _T1W_PATTERN.match(path.name)
            if match is None or not path.is_file():
                continue
            subject, session = match.group(1), match.group(2)
            folder_subject = path.relative_to(root).parts[0]
            if folder_subject != subject:
                continue  # a file named for another participant is not this participant's image
            found.append((subject, session, path))
    return sorted(found, key=lambda item: str(item[2]))


def _parse_age(raw: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """Numeric ages; ``"89+"`` (BIDS's de-identified cap) reads as 89. Returns (ages, bad-value mask)."""
    text = raw.astype(object).where(raw.notna(), np.nan).map(str, na_action="ignore").str.strip()
    text = text.str.replace(r"^(\d+(?:\.\d+)?)\s*\+$", r"\1", regex=True)
    age = pd.to_numeric(text, errors="coerce").astype(float)
    blank = text.isna() | text.str.lower().isin(["", "n/a", "na", "nan"])
    bad = (age.isna() & ~blank) | (age < 0) | (age > MAX_AGE_YEARS)
    return age.where(~bad), bad.to_numpy()


def _uncompressed_size(path: str) -> int:
    """Bytes of a gzip file once decompressed (streamed); raises for a truncated or corrupt file."""
    total = 0
    with gzip.open(path, "rb") as fp:
        while block := fp.read(1 << 22):
            total += len(block)
    return total


def _image_problem(path: str) -> str | None:
    """Why a NIfTI file cannot be used (unreadable header, data cut short), or None. Reads the header only, plus the
    gzip trailer (the uncompressed size) of a ``.nii.gz``; the file is decompressed only when the trailer disagrees
    (a truncated file, or a gzip of several members)."""
    import nibabel

    try:
        image = nibabel.load(path)
        header, proxy = image.header, image.dataobj
        # the proxy's offset: a single-file NIfTI whose vox_offset is unset (0) keeps its data after the header
        offset = int(getattr(proxy, "offset", header.get_data_offset()))
        voxels = int(np.prod(header.get_data_shape()))
        needed = offset + voxels * header.get_data_dtype().itemsize
    except Exception as error:
        return f"unreadable NIfTI header ({type(error).__name__}: {error})"
    if not path.endswith(".gz"):
        size = os.path.getsize(path)
        if size < needed:
            return f"truncated: the image needs {needed} bytes, the file has {size}"
        return None
    with open(path, "rb") as fp:
        fp.seek(0, os.SEEK_END)
        if fp.tell() >= 4:
            fp.seek(-4, os.SEEK_END)
            if int.from_bytes(fp.read(4), "little") == needed % (1 << 32):
                return None
    try:
        size = _uncompressed_size(path)
    except (EOFError, OSError, zlib.error) as error:
        return f"truncated or corrupt gzip ({type(error).__name__}: {error})"
    if size < needed:
        return f"truncated: the image needs {needed} bytes uncompressed, the file holds {size}"
    return None


def _check_chunk(paths: list[str]) -> list[dict[str, Any]]:
    """:func:`_image_problem` for each path (the task a worker process runs); never raises."""
    out = []
    for path in paths:
        try:
            problem = _image_problem(path)
        except Exception as error:  # one bad file never stops the build
            problem = f"unexpected error ({type(error).__name__}: {error})"
        out.append({"file": path, "problem": problem})
    return out


def _lost_check(path: str, reason: str) -> list[dict[str, Any]]:
    return [{"file": path, "problem": reason}]


def _image_problems(paths: list[str], num_workers: int, chunk_size: int, progress: bool) -> dict[str, str | None]:
    from tqdm.auto import tqdm

    problems: dict[str, str | None] = {}
    results = map_chunks(_check_chunk, chunked(paths, chunk_size), num_workers=num_workers, failed=_lost_check)
    bar = tqdm(total=len(paths), desc="NIfTI headers", unit="file", disable=None if progress else True)
    with bar, contextlib.closing(results):  # closing: an interrupted build stops its workers at once
        for chunk in results:
            problems.update((record["file"], record["problem"]) for record in chunk)
            bar.update(len(chunk))
    return problems


def manifest_from_bids(
    root: str | os.PathLike,
    age_column: str | None = None,
    sex_column: str | None = None,
    site_column: str | None = None,
    check_images: bool = True,
    num_workers: int | None = 1,
    chunk_size: int = 32,
    progress: bool = False,
) -> ManifestBuildResult:
    """Build a manifest from a BIDS dataset's ``participants.tsv`` and its T1-weighted images.

    Images are ``sub-<label>/anat/*T1w.nii[.gz]`` and ``sub-<label>/ses-<label>/anat/*T1w.nii[.gz]``; each one is a
    row. Metadata comes from ``participants.tsv`` (``participant_id`` with or without the ``sub-`` prefix):

    - age: the first of :data:`AGE_COLUMN_NAMES` present (``age``, ``AGE_AT_SCAN``, ...), in years. ``"89+"`` is
      read as 89; ``n/a`` and blanks are missing; non-numbers and ages outside [0, 130] become missing with a warning.
    - sex: the first of :data:`SEX_COLUMN_NAMES` present, coded ``M``/``F``/``male``/``female``/``m``/``f`` (any
      case) or ``1`` = male, ``2`` = female. ``O``, ``other``, ``n/a`` are missing; other codes become missing with
      a warning.
    - site: the first of :data:`SITE_COLUMN_NAMES` present (``site``, ``SITE_ID``, ``scanner``, ...), as text.

    ``patient_id`` is the participant label (``sub-01``); ``session`` is the session label or missing;
    ``study_id`` is ``sub-01`` or ``sub-01_ses-1``. Other ``participants.tsv`` columns are not copied.

    With ``check_images``, each image's NIfTI header is read (in a process pool of ``num_workers``, in chunks of
    ``chunk_size`` files) and its data size checked against the file (for ``.nii.gz``, the gzip trailer's size;
    the file is decompressed only when that disagrees): unreadable or truncated images are skipped and reported.
    The result is the same at any number of workers.

    Args:
        root: the BIDS dataset folder.
        age_column: use this column for age instead of searching the candidates.
        sex_column: use this column for sex.
        site_column: use this column for site.
        check_images: read every image's header and skip the unreadable or truncated ones.
        num_workers: worker processes for the header checks; 0 or 1 checks in this process, None one per CPU.
        chunk_size: files per worker task.
        progress: show a tqdm progress bar over the header checks (never when the output is not a terminal).

    Returns:
        :class:`~monai_du.data.manifest.ManifestBuildResult` (unpack as ``manifest, report``). The report (columns
        ``item``, ``reason``, ``status``) lists participants without a T1w image (``skipped``), images whose
        participant is not in ``participants.tsv`` (``warning``: kept, with missing metadata), duplicated
        participant rows (``warning``: the first is used), values set to missing (``warning``, one row per
        participant and value) and unreadable or truncated images (``skipped``, with ``check_images``).

    Raises:
        NotADirectoryError: when ``root`` is not a folder.
        FileNotFoundError: when ``participants.tsv`` is absent.
        ValueError: when ``participants.tsv`` has no ``participant_id`` column, a named column is absent, or
            ``num_workers`` / ``chunk_size`` is invalid.
    """
    workers = check_num_workers(num_workers, chunk_size)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise NotADirectoryError(f"BIDS folder not found: {root}")
    root = root.resolve()
    tsv = root / "participants.tsv"
    if not tsv.is_file():
        raise FileNotFoundError(f"{tsv} not found: a BIDS dataset needs participants.tsv for age, sex and site")
    participants = pd.read_csv(tsv, sep="\t", dtype=str, keep_default_na=False, na_values=["", "n/a", "N/A"])
    participants.columns = [str(c).strip() for c in participants.columns]
    columns = list(participants.columns)
    if "participant_id" not in columns:
        raise ValueError(f"{tsv}: missing the 'participant_id' column; columns: {columns}")

    report: list[tuple[str, str, str]] = []
    no_id = participants["participant_id"].isna().to_numpy()
    for position in np.flatnonzero(no_id):
        report.append((f"{tsv.name} line {int(position) + 2}", "empty participant_id; row ignored", "skipped"))
    participants = participants.loc[~no_id].copy()
    participants["participant_id"] = _participant_label(participants["participant_id"])
    duplicated = participants["participant_id"].duplicated()
    for label in participants.loc[duplicated, "participant_id"].unique():
        report.append((str(label), f"{tsv.name}: participant listed more than once; the first row is used", "warning"))
    participants = participants.loc[~duplicated].set_index("participant_id")

    meta = pd.DataFrame(index=participants.index)
    age_name = _find_column(columns, AGE_COLUMN_NAMES, age_column, "age", tsv)
    if age_name is not None:
        meta["age"], bad = _parse_age(participants[age_name])
        for label, value in zip(participants.index[bad], participants[age_name][bad]):
            reason = f"{tsv.name}: {age_name}={value!r} is not an age in [0, {MAX_AGE_YEARS:g}]; set to missing"
            report.append((str(label), reason, "warning"))
    else:
        meta["age"] = np.nan
    sex_name = _find_column(columns, SEX_COLUMN_NAMES, sex_column, "sex", tsv)
    if sex_name is not None:
        meta["sex"], _ = normalize_sex(participants[sex_name])
        unknown = _unrecognised_sex(participants[sex_name])
        for label, value in zip(participants.index[unknown], participants[sex_name][unknown]):
            reason = (f"{tsv.name}: {sex_name}={value!r} is not a sex code (M/F, male/female, 1 = male, 2 = female); "
                      "set to missing")
            report.append((str(label), reason, "warning"))
    else:
        meta["sex"] = np.nan
    site_name = _find_column(columns, SITE_COLUMN_NAMES, site_column, "site", tsv)
    meta["site"] = participants[site_name].str.strip() if site_name is not None else np.nan

    images = _find_t1w_images(root)
    problems = _image_problems([str(p) for _, _, p in images], workers, chunk_size, progress) if check_images else {}
    rows = []
    with_image = set()
    for subject, session, path in images:
        with_image.add(subject)
        if problems.get(str(path)) is not None:
            report.append((str(path), str(problems[str(path)]), "skipped"))
            continue
        if subject not in meta.index:
            reason = f"participant {subject} is not in {tsv.name}; kept with missing age, sex and site"
            report.append((str(path), reason, "warning"))
            age, sex, site = np.nan, np.nan, np.nan
        else:
            age, sex, site = meta.at[subject, "age"], meta.at[subject, "sex"], meta.at[subject, "site"]
        rows.append(
            {
                "image": str(path),
                "patient_id": subject,
                "age": age,
                "sex": sex,
                "site": site,
                "session": session if session is not None else np.nan,
                "study_id": subject if session is None else f"{subject}_{session}",
            }
        )
    for subject in meta.index:
        if subject not in with_image:
            report.append((str(subject), "no sub-*/[ses-*/]anat/*T1w.nii[.gz] image found", "skipped"))

    manifest = pd.DataFrame(rows, columns=list(BIDS_MANIFEST_COLUMNS))
    manifest["age"] = manifest["age"].astype(float)
    for column in ("image", "patient_id", "sex", "site", "session", "study_id"):
        manifest[column] = manifest[column].astype(object).where(manifest[column].notna(), np.nan)
    return ManifestBuildResult(manifest=manifest, report=_make_report(report))
