"""The manifest: one table row per image, with weak metadata and no patient-identifying data.

The schema (documented in ``data_manifests/README.md``):

================= ======== ==========================================================================================
column            required content
================= ======== ==========================================================================================
image             yes      path of the image, absolute or relative to a root (the manifest's folder)
patient_id        yes      patient identifier (a pseudonym where possible); splits never share a patient
age               no       float years, NaN when missing, within [0, 130]
sex               no       ``"M"``, ``"F"`` or missing
site              no       acquisition site / scanner / vendor, as a string
view              no       view position (``"PA"``, ``"AP"``, ``"LATERAL"``, ...)
study_id          no       study identifier
series_id         no       series identifier
modality          no       DICOM modality (``"CR"``, ``"DX"``, ``"MR"``, ...)
split             no       ``"train"``, ``"val"``, ``"test"`` or missing (unassigned); a patient is in one split only
study_offset_days no       float days since the patient's first study (DICOM, MIMIC-CXR), NaN when unknown; >= 0
follow_up         no       float follow-up number of the image for its patient (0 = first; NIH, CheXpert); >= 0
label_*           no       one column per label, values 1 (positive), 0 (negative), -1 (uncertain), NaN
================= ======== ==========================================================================================

Image paths are unique: two rows never name the same image. ``study_offset_days`` and ``follow_up`` order a
patient's images in time (the patient x time prior); no date column is ever kept.

Other columns are allowed unless they look like protected health information (names, birth dates, free text,
contact details; see :func:`find_phi_columns`), which are refused on read and on write.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import lzma
import os
import re
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "REQUIRED_COLUMNS",
    "STRING_COLUMNS",
    "LABEL_PREFIX",
    "LABEL_VALUES",
    "SPLIT_VALUES",
    "TIME_COLUMNS",
    "RESOLVED_IMAGE_COLUMN",
    "MAX_AGE_YEARS",
    "REPORT_COLUMNS",
    "ManifestBuildResult",
    "find_phi_columns",
    "patients_in_several_splits",
    "label_values",
    "normalize_sex",
    "label_column_name",
    "validate_manifest",
    "read_manifest",
    "write_manifest",
]

REQUIRED_COLUMNS: tuple[str, ...] = ("image", "patient_id")
"""Columns every manifest must have, with a non-empty value in every row."""

STRING_COLUMNS: tuple[str, ...] = (
    "image",
    "patient_id",
    "sex",
    "site",
    "view",
    "study_id",
    "series_id",
    "modality",
    "split",
)
"""Schema columns read as text (so that identifiers such as ``"00042"`` keep their leading zeros)."""

LABEL_PREFIX = "label_"
"""Prefix of every label column."""

LABEL_VALUES: tuple[float, ...] = (1.0, 0.0, -1.0)
"""Allowed non-missing label values: positive, negative, uncertain."""

SPLIT_VALUES: tuple[str, ...] = ("train", "val", "test")
"""Allowed values of the ``split`` column."""

TIME_COLUMNS: tuple[str, ...] = ("study_offset_days", "follow_up")
"""Optional numeric columns that place an image in its patient's history (for a patient x time prior): days since
the patient's first study, and the follow-up number. Each is float, >= 0 or missing; ``follow_up`` is a whole
number."""

RESOLVED_IMAGE_COLUMN = "image_path"
"""Column added by :func:`read_manifest`: the absolute image path. ``image`` keeps the value written in the file."""

MAX_AGE_YEARS = 130.0
"""Largest age accepted, in years."""

REPORT_COLUMNS: tuple[str, ...] = ("item", "reason", "status")
"""Columns of a builder's report of skipped items (``status`` is ``"skipped"`` or ``"warning"``)."""

# Column names are compared after lower-casing and removing everything but letters and digits.
_PHI_PATTERNS: tuple[tuple[str, re.Pattern], ...] = (
    ("a birth date", re.compile(r"birth|^dob$")),
    (
        "a person's name",
        re.compile(
            r"^(full|first|last|given|family|middle|maiden|sur)?names?$"
            r"|(patient|person|physician|operator|doctor|radiologist|nurse|first|last|sur|given|family|middle|maiden)"
            r"s?names?$"
        ),
    ),
    (
        "free text",
        re.compile(r"(report|reports|reporttext|notes?|comments?|freetext|impressions?|history|indication|narrative)$"),
    ),
    (
        "contact details",
        re.compile(r"(address|phone|telephone|telephonenumbers?|phonenumbers?|email|ssn|socialsecuritynumber)$"),
    ),
    ("a date of death", re.compile(r"^(dod|dateofdeath|deathdate|deathtime)$")),
)


def _normalised_name(column: object) -> str:
    return re.sub(r"[^a-z0-9]", "", str(column).lower())


def find_phi_columns(columns: Iterable[object]) -> dict[str, str]:
    """Find column names that look like protected health information.

    The rules look for birth dates (``PatientBirthDate``, ``birth_date``, ``DOB``, ``PatientBirth``), names of
    people (``PatientName``, ``patient_name``, ``ReferringPhysicianName``, ``name``), free text (``report``,
    ``notes``, ``comments``, ``impression``, ``history``), contact details and dates of death. Label columns
    (``label_*``) are exempt from the free-text rule, since their values are validated as numbers. Names such as
    ``InstitutionName`` or ``StationName`` are not personal names and are allowed.

    Args:
        columns: column names.

    Returns:
        ``{column: what it looks like}`` for each offending column, in the given order; empty when none.
    """
    found: dict[str, str] = {}
    for column in columns:
        name = _normalised_name(column)
        for what, pattern in _PHI_PATTERNS:
            if what == "free text" and str(column).startswith(LABEL_PREFIX):
                continue
            if pattern.search(name):
                found[str(column)] = what
                break
    return found


def _raise_on_phi(columns: Iterable[object], source: str) -> None:
    phi = find_phi_columns(columns)
    if phi:
        listed = ", ".join(f"'{c}' ({what})" for c, what in phi.items())
        raise ValueError(
            f"{source}: refusing columns that look like protected health information: {listed}. "
            "Manifests never carry names, birth dates or free text; drop these columns first."
        )


_SEX_CODES: dict[str, str] = {
    "m": "M",
    "male": "M",
    "man": "M",
    "1": "M",
    "f": "F",
    "female": "F",
    "woman": "F",
    "2": "F",
}
_SEX_MISSING = {"", "o", "other", "u", "unknown", "n/a", "na", "nan", "none", "null", "-", "?", "x"}


def normalize_sex(values: pd.Series) -> tuple[pd.Series, dict[str, int]]:
    """Map the common sex codings to ``"M"``, ``"F"`` or missing.

    Accepted, case-insensitive: ``M``/``male``/``man``/``1`` and ``F``/``female``/``woman``/``2`` (the 1 = male,
    2 = female coding of ABIDE, IXI and many participants tables). Numbers such as ``1.0`` count as ``1``.
    ``O``, ``other``, ``unknown``, ``n/a`` and blanks are missing without comment; any other value is also missing,
    and is counted in the second return value so that the caller can report it.

    Args:
        values: (N,) series of codes.

    Returns:
        ``(sex, unrecognised)``: an (N,) series of ``"M"``, ``"F"`` or NaN with the input's index, and
        ``{unrecognised value: count}``.
    """
    text = pd.Series(_per_unique(values, lambda u: u.map(_canonical_key)), index=values.index, dtype=object)
    sex = text.map(_SEX_CODES)
    unknown = sex.isna() & text.notna() & ~text.isin(_SEX_MISSING)
    unrecognised = {str(k): int(v) for k, v in text[unknown].value_counts().items()}
    return sex.astype(object).where(sex.notna(), np.nan), unrecognised


def _sex_code(value: object) -> tuple[object, bool]:
    """One value through :func:`normalize_sex`'s rules: ``("M" | "F" | NaN, whether a present value was not
    recognised)``. Codes that mean "unknown" (``O``, ``n/a``, blank) give ``(NaN, False)``."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return np.nan, False
    key = _canonical_key(value)
    code = _SEX_CODES.get(key)
    if code is not None:
        return code, False
    return np.nan, key not in _SEX_MISSING


def _unrecognised_sex(values: pd.Series) -> np.ndarray:
    """(N,) bool: the rows whose sex code :func:`normalize_sex` sets to missing without recognising it."""
    flags = _per_unique(values, lambda u: u.map(lambda v: _sex_code(v)[1]))
    return np.where(pd.isna(flags), False, flags).astype(bool)


def _canonical_key(value: object) -> str:
    """Key for matching codes: integral numbers as ``"1"`` (so 1, 1.0 and "1.0" agree), else stripped lower-case."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text.lower()
    if np.isfinite(number) and number == int(number):
        return str(int(number))
    return repr(number)


def _as_text(values: pd.Series) -> pd.Series:
    """Strings for a series, with integral floats written without ``.0`` and missing values kept as NaN."""
    if pd.api.types.is_bool_dtype(values.dtype):
        return values.astype(object).where(values.notna(), np.nan).map(str, na_action="ignore")
    if pd.api.types.is_float_dtype(values.dtype):
        finite = values.dropna()
        if len(finite) and np.all(np.mod(finite.to_numpy(), 1.0) == 0.0):
            return values.astype("Int64").astype(object).where(values.notna(), np.nan).map(str, na_action="ignore")
    text = values.astype(object).where(values.notna(), np.nan)
    if not pd.api.types.is_numeric_dtype(values.dtype):
        if pd.api.types.infer_dtype(text, skipna=True) in ("string", "empty"):
            return text
    return text.map(str, na_action="ignore")


def label_column_name(name: str) -> str:
    """Label column for a finding name: ``"Pleural Effusion"`` -> ``"label_pleural_effusion"``."""
    slug = re.sub(r"[^a-z0-9]+", "_", str(name).strip().lower()).strip("_")
    if not slug:
        raise ValueError(f"label name {name!r} has no letters or digits")
    return LABEL_PREFIX + slug


def resolve_label_column(df: pd.DataFrame, name: str, source: str = "manifest") -> str:
    """The label column that ``name`` means: the column itself, ``label_<name>``, or the column of a finding name
    (``"Pleural Effusion"`` -> ``label_pleural_effusion``, :func:`label_column_name`).

    Raises:
        ValueError: naming ``source`` and the label columns it has, when none matches.
    """
    candidates = [str(name), LABEL_PREFIX + str(name)]
    try:
        candidates.append(label_column_name(name))
    except ValueError:
        pass
    for column in candidates:
        if column in df.columns:
            return column
    known = [c for c in df.columns if str(c).startswith(LABEL_PREFIX)]
    raise ValueError(f"{source}: label column {name!r} is not in the manifest (label columns: {known}).")


def label_values(values: pd.Series, column: str, source: str) -> pd.Series:
    """The label as numbers: 0/1 (and -1 uncertain, blank missing) as they are; a sex column (``M``/``F``) as
    male = 1, female = 0.

    Raises:
        ValueError: naming the column and a few of its values, for any other text.
    """
    numeric = pd.to_numeric(values, errors="coerce")
    text = values[values.notna() & numeric.isna()].astype(str).str.strip()
    if text.empty:
        return numeric
    if set(text.str.upper()) <= {"M", "F"}:
        return values.astype(str).str.strip().str.upper().map({"M": 1.0, "F": 0.0}).where(values.notna())
    raise ValueError(f"{source}: label column {column!r} holds {sorted(text.unique())[:5]}: a label is 0/1 (-1 "
                     "uncertain, blank missing), or M/F for sex (male = 1).")


@dataclass
class ManifestBuildResult:
    """What a manifest builder returns: the manifest and the report of what it skipped or changed.

    It unpacks like a pair: ``manifest, report = manifest_from_dicom(folder)``.

    Attributes:
        manifest: the manifest DataFrame, one row per image.
        report: one row per skipped item or warning. Columns: the item (``file`` for DICOM builds, ``item``
            otherwise), ``reason`` and ``status`` (``"skipped"``: not in the manifest; ``"warning"``: kept, with a
            value set to missing or a note).
    """

    manifest: pd.DataFrame
    report: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(REPORT_COLUMNS)))

    def __iter__(self) -> Iterator[pd.DataFrame]:
        return iter((self.manifest, self.report))

    @property
    def skipped(self) -> pd.DataFrame:
        """Rows of the report whose item is not in the manifest."""
        return self.report[self.report["status"] == "skipped"]


def _row_reference(positions: np.ndarray, index: pd.Index, from_file: bool) -> list[str]:
    if from_file:
        # data row i (0-based) sits on line i + 2 of a CSV file with a header line
        return [f"row {int(p)} (line {int(p) + 2})" for p in positions]
    return [f"row {int(p)} (index {index[int(p)]!r})" for p in positions]


def _describe(problem: str, column: str, mask: np.ndarray, values: pd.Series, from_file: bool, limit: int = 5) -> str:
    positions = np.flatnonzero(mask)
    refs = _row_reference(positions[:limit], values.index, from_file)
    shown = [f"{ref}: {values.iloc[int(p)]!r}" for ref, p in zip(refs, positions[:limit])]
    more = f" and {len(positions) - limit} more" if len(positions) > limit else ""
    return f"column '{column}' {problem} at " + "; ".join(shown) + more


def _per_unique(values: pd.Series, func) -> np.ndarray:
    """Apply ``func`` (Series -> array-like) to the distinct non-missing values only; (N,) object result, NaN where
    the input is missing. Fast for the low-cardinality columns typical of metadata."""
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    mapped = np.asarray(func(pd.Series(np.asarray(uniques, dtype=object), dtype=object)), dtype=object)
    out = np.empty(len(codes), dtype=object)
    valid = codes >= 0
    out[valid] = mapped[codes[valid]]
    out[~valid] = np.nan
    return out


def _is_blank(values: pd.Series) -> np.ndarray:
    """(N,) bool: missing, or text that is empty after stripping white space."""
    if pd.api.types.is_numeric_dtype(values.dtype):
        return values.isna().to_numpy()
    blank = _per_unique(values, lambda u: u.astype(str).str.strip() == "")
    return np.where(pd.isna(blank), True, blank).astype(bool)


def validate_manifest(df: pd.DataFrame, source: str = "manifest", from_file: bool = False) -> pd.DataFrame:
    """Check a manifest against the schema and return a normalised copy.

    Checks: required columns present; ``image`` and ``patient_id`` non-empty in every row; no image path in two
    rows; ``age`` numeric within [0, 130] or missing; ``sex`` in ``M``/``F``/missing; ``split`` in
    ``train``/``val``/``test``/missing, and no patient in two splits; ``study_offset_days`` a number >= 0 and
    ``follow_up`` a whole number >= 0, or missing; every ``label_*`` value in {1, 0, -1, NaN}; no column that looks
    like protected health information.

    The copy has ``age``, the time columns (:data:`TIME_COLUMNS`) and label columns as float64, blank strings in
    text columns as NaN, and identifiers as text.

    Args:
        df: the manifest.
        source: the name used in error messages (a file path for :func:`read_manifest`).
        from_file: whether rows came from a CSV file, so that messages also give the file line number.

    Returns:
        the normalised copy.

    Raises:
        ValueError: listing every failed check, each naming the column and the first offending rows.
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{source}: expected a pandas DataFrame, got {type(df).__name__}")
    _raise_on_phi(df.columns, source)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{source}: missing required column(s) {missing}; columns present: {list(df.columns)}")
    duplicated = df.columns[df.columns.duplicated()].tolist()
    if duplicated:
        raise ValueError(f"{source}: duplicated column name(s) {duplicated}")

    out = df.copy()
    problems: list[str] = []

    for column in REQUIRED_COLUMNS:
        blank = _is_blank(out[column])
        if blank.any():
            problems.append(_describe("is empty", column, blank, out[column], from_file))

    for column in STRING_COLUMNS:
        if column in out.columns:
            text = _as_text(out[column])
            text = text.where(~_is_blank(text), np.nan)
            out[column] = text

    if "age" in out.columns:
        raw = out["age"]
        age = pd.to_numeric(raw, errors="coerce").astype(float)
        not_number = (age.isna() & ~_is_blank(raw)).to_numpy()
        if not_number.any():
            problems.append(_describe("is not a number", "age", not_number, raw, from_file))
        out_of_range = ((age < 0) | (age > MAX_AGE_YEARS) | np.isinf(age)).to_numpy()
        if out_of_range.any():
            problems.append(_describe(f"is outside [0, {MAX_AGE_YEARS:g}] years", "age", out_of_range, raw, from_file))
        out["age"] = age

    if "sex" in out.columns:
        bad = (out["sex"].notna() & ~out["sex"].isin(["M", "F"])).to_numpy()
        if bad.any():
            problems.append(_describe("is not 'M', 'F' or empty", "sex", bad, out["sex"], from_file))

    if "split" in out.columns:
        bad = (out["split"].notna() & ~out["split"].isin(list(SPLIT_VALUES))).to_numpy()
        if bad.any():
            problem = f"is not one of {list(SPLIT_VALUES)} or empty"
            problems.append(_describe(problem, "split", bad, out["split"], from_file))
        elif "patient_id" in out.columns:
            leaks = patients_in_several_splits(out)
            if leaks:
                problems.append(_describe_leaks(leaks))

    for column in [c for c in TIME_COLUMNS if c in out.columns]:
        raw = out[column]
        value = pd.to_numeric(raw, errors="coerce").astype(float)
        not_number = (value.isna() & ~_is_blank(raw)).to_numpy()
        if not_number.any():
            problems.append(_describe("is not a number", column, not_number, raw, from_file))
        bad = ((value < 0) | np.isinf(value)).to_numpy()
        if column == "follow_up":
            bad = bad | (value.notna() & np.isfinite(value) & (np.mod(value, 1.0) != 0.0)).to_numpy()
        if bad.any():
            what = "a whole number >= 0" if column == "follow_up" else "a finite number >= 0"
            problems.append(_describe(f"is not {what}", column, bad, raw, from_file))
        out[column] = value

    if "image" in out.columns and not _is_blank(out["image"]).any():
        duplicated = _describe_duplicates(out["image"], out["patient_id"], "image", from_file)
        if duplicated:
            problems.append(duplicated)

    for column in [c for c in out.columns if str(c).startswith(LABEL_PREFIX)]:
        raw = out[column]
        value = pd.to_numeric(raw, errors="coerce").astype(float)
        bad = ((value.isna() & ~_is_blank(raw)) | (value.notna() & ~value.isin(LABEL_VALUES))).to_numpy()
        if bad.any():
            problems.append(_describe("is not 1, 0, -1 or empty", str(column), bad, raw, from_file))
        out[column] = value

    if problems:
        raise ValueError(f"{source}: invalid manifest:\n  - " + "\n  - ".join(problems))
    return out


def patients_in_several_splits(df: pd.DataFrame, patient_column: str = "patient_id") -> dict[str, list[str]]:
    """Patients whose rows are assigned to more than one split (a leak between train and test).

    Rows without a split (unassigned) are ignored.

    Args:
        df: manifest with ``patient_id`` and ``split`` columns.
        patient_column: the patient identifier column.

    Returns:
        ``{patient id: sorted split names}`` for each leaking patient, sorted by patient id; empty when none.
    """
    if "split" not in df.columns or patient_column not in df.columns:
        return {}
    assigned = pd.DataFrame({"patient": _as_text(df[patient_column]).to_numpy(), "split": df["split"].to_numpy()})
    assigned = assigned[assigned["split"].notna() & assigned["patient"].notna()]
    counts = assigned.groupby("patient", sort=True)["split"].nunique()
    leaking = counts.index[counts > 1]
    if len(leaking) == 0:
        return {}
    subset = assigned[assigned["patient"].isin(leaking)]
    return {str(p): sorted(map(str, g.unique())) for p, g in subset.groupby("patient", sort=True)["split"]}


def _describe_leaks(leaks: dict[str, list[str]], limit: int = 5) -> str:
    shown = "; ".join(f"patient_id {p!r} in {splits}" for p, splits in list(leaks.items())[:limit])
    more = f" and {len(leaks) - limit} more" if len(leaks) > limit else ""
    return f"column 'split' puts a patient in more than one split (a leak between splits): {shown}{more}"


def _describe_duplicates(
    paths: pd.Series, patients: pd.Series | None, column: str, from_file: bool, limit: int = 5
) -> str | None:
    """Message naming each path given by more than one row (its rows and patient ids), or None."""
    text = paths.astype(str).to_numpy()
    repeated = pd.Series(text).duplicated(keep=False).to_numpy()
    if not repeated.any():
        return None
    positions = np.flatnonzero(repeated)
    groups: dict[str, list[int]] = {}
    for position in positions:
        groups.setdefault(text[position], []).append(int(position))
    parts = []
    for path, rows in list(groups.items())[:limit]:
        refs = ", ".join(_row_reference(np.asarray(rows[:limit]), paths.index, from_file))
        ids = "" if patients is None else f" (patient_id {sorted({str(patients.iloc[r]) for r in rows})})"
        parts.append(f"{path!r} at {refs}{ids}")
    more = f" and {len(groups) - limit} more" if len(groups) > limit else ""
    return f"column '{column}' names the same image in more than one row: " + "; ".join(parts) + more


def _is_absolute(paths: pd.Series) -> pd.Series:
    # POSIX absolute, Windows drive (C:\ or C:/) or UNC (\\server)
    return paths.str.match(r"^(/|\\\\|[A-Za-z]:[\\/])")


def _resolve_images(images: pd.Series, root: Path) -> pd.Series:
    text = images.astype(str)
    prefix = str(root).rstrip("/\\") + os.sep
    return text.where(_is_absolute(text), prefix + text)


def _parquet_engine_available() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def _file_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".parquet") or name.endswith(".pq"):
        return "parquet"
    if name.endswith((".tsv", ".tsv.gz", ".tab")):
        return "tsv"
    if name.endswith((".csv", ".csv.gz", ".csv.bz2", ".csv.zip", ".csv.xz", ".txt")):
        return "csv"
    raise ValueError(f"{path}: unknown manifest format; use .csv, .csv.gz, .tsv or .parquet")


def _decompressed_bytes(path: Path) -> bytes:
    """The bytes of a (possibly compressed) text manifest, decompressed by its suffix as pandas would."""
    name = path.name.lower()
    try:
        if name.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                return fh.read()
        if name.endswith(".bz2"):
            with bz2.open(path, "rb") as fh:
                return fh.read()
        if name.endswith(".xz"):
            with lzma.open(path, "rb") as fh:
                return fh.read()
        if name.endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                members = [m for m in archive.namelist() if not m.endswith("/")]
                if len(members) != 1:
                    raise ValueError(f"manifest {path}: a zipped manifest must hold one file, found {len(members)}")
                return archive.read(members[0])
    except (OSError, EOFError, lzma.LZMAError, zipfile.BadZipFile) as error:
        raise ValueError(f"manifest {path} cannot be decompressed ({type(error).__name__}: {error})") from error
    return path.read_bytes()


def _manifest_text(path: Path) -> str:
    """The manifest file as text: UTF-8 (a leading byte-order mark dropped), or a ValueError naming the line of the
    first byte that is not UTF-8."""
    raw = _decompressed_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise ValueError(
            f"manifest {path} is not UTF-8 text (byte 0x{raw[error.start]:02x} at line {line}); save it as UTF-8"
        ) from None
    return text[1:] if text.startswith("\ufeff") else text


def _check_field_counts(text: str, sep: str, path: Path, limit: int = 5) -> None:
    """Refuse rows with more or fewer fields than the header (pandas fills short rows with NaN, and takes an extra
    leading field as the index), counted with the csv module (quoted fields may hold the separator or a newline)."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    n_header: int | None = None
    bad: list[tuple[int, int]] = []
    line = 1
    for record in reader:
        start, line = line, reader.line_num + 1  # a quoted field can span lines: report the record's first line
        if not record:  # blank line: pandas skips it
            continue
        if n_header is None:
            n_header = len(record)
        elif len(record) != n_header:
            bad.append((start, len(record)))
    if not bad:
        return
    first_line, n_fields = bad[0]
    more = ""
    if len(bad) > 1:
        shown = ", ".join(str(b[0]) for b in bad[1:limit]) + (", ..." if len(bad) > limit else "")
        more = f"; {len(bad) - 1} more line(s) with another field count (line {shown})"
    raise ValueError(
        f"manifest {path}: line {first_line} has {n_fields} field{'s' if n_fields != 1 else ''}, "
        f"the header has {n_header}{more}"
    )


def read_manifest(path: str | os.PathLike, root: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read, validate and resolve a manifest file.

    CSV and TSV files (optionally compressed) are read with text identifiers, so that ``"00042"`` stays
    ``"00042"``, and only empty fields count as missing (``"NA"`` stays a string). They must be UTF-8 text, and
    every row must have as many fields as the header (counted with the csv module, so quoted fields may hold the
    separator). Parquet needs ``pyarrow``.

    Args:
        path: ``.csv``, ``.csv.gz``, ``.tsv`` or ``.parquet`` file.
        root: folder that relative ``image`` paths are relative to. Default: the manifest's own folder.

    Returns:
        the validated manifest (see :func:`validate_manifest`), with an extra column ``image_path``
        (:data:`RESOLVED_IMAGE_COLUMN`): the absolute image path. ``image`` keeps the value in the file.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ImportError: for a Parquet file when pyarrow is not installed.
        ValueError: naming the file: an empty file, a header without rows, text that is not UTF-8 (with the line),
            a row with another number of fields than the header (with the line), or an invalid manifest, naming the
            row and the column; also when two rows name one image once relative paths are resolved.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest file not found: {path}")
    kind = _file_kind(path)
    if kind == "parquet":
        if not _parquet_engine_available():
            raise ImportError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow); or use a CSV manifest")
        df = pd.read_parquet(path)
        if len(df) == 0:
            raise ValueError(f"manifest {path} has columns but no rows.")
    else:
        sep = "\t" if kind == "tsv" else ","
        text = _manifest_text(path)
        try:
            header = pd.read_csv(io.StringIO(text), sep=sep, nrows=0)
        except pd.errors.EmptyDataError as error:
            raise ValueError(
                f"{path}: the manifest file is empty (no header line); it needs at least the columns "
                f"{list(REQUIRED_COLUMNS)}"
            ) from error
        _check_field_counts(text, sep, path)
        dtypes = {c: str for c in header.columns if c in STRING_COLUMNS}
        df = pd.read_csv(io.StringIO(text), sep=sep, dtype=dtypes, keep_default_na=False, na_values=[""])
        if len(df) == 0:
            raise ValueError(f"manifest {path} has a header but no rows.")
    if RESOLVED_IMAGE_COLUMN in df.columns:
        df = df.drop(columns=[RESOLVED_IMAGE_COLUMN])
    df = validate_manifest(df, source=str(path), from_file=kind != "parquet")
    base = Path(root) if root is not None else path.parent
    df[RESOLVED_IMAGE_COLUMN] = _resolve_images(df["image"], base.expanduser().resolve())
    # "a.png", "./a.png" and "<root>/a.png" are one image
    normalised = df[RESOLVED_IMAGE_COLUMN].map(os.path.normpath)
    duplicated = _describe_duplicates(normalised, df["patient_id"], RESOLVED_IMAGE_COLUMN, kind != "parquet")
    if duplicated:
        raise ValueError(f"{path}: invalid manifest:\n  - {duplicated} (after resolving 'image' against {base})")
    return df


def write_manifest(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Validate a manifest and write it as CSV, TSV or Parquet.

    The derived ``image_path`` column added by :func:`read_manifest` is not written, so that reading the file back
    resolves ``image`` again against the new location.

    Args:
        df: the manifest.
        path: destination ``.csv``, ``.csv.gz``, ``.tsv`` or ``.parquet``; parent folders are created.

    Returns:
        the path written.

    Raises:
        ValueError: for a column that looks like protected health information, or an invalid manifest.
        ImportError: for Parquet without pyarrow.
    """
    path = Path(path)
    _raise_on_phi(df.columns, f"write_manifest({path})")
    kind = _file_kind(path)
    out = df.drop(columns=[RESOLVED_IMAGE_COLUMN]) if RESOLVED_IMAGE_COLUMN in df.columns else df
    out = validate_manifest(out, source=f"write_manifest({path})")
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "parquet":
        if not _parquet_engine_available():
            raise ImportError(f"{path}: writing Parquet needs pyarrow (pip install pyarrow); or write a .csv")
        out.to_parquet(path, index=False)
    else:
        out.to_csv(path, sep="\t" if kind == "tsv" else ",", index=False)
    return path


def _make_report(rows: list[tuple[str, str, str]], item_column: str = "item") -> pd.DataFrame:
    return pd.DataFrame(rows, columns=[item_column, "reason", "status"])
