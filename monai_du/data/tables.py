"""Build a manifest from a public dataset's metadata table through a column-mapping adapter.

An adapter (a packaged one by name, see :mod:`monai_du.data.adapters`, or a YAML / JSON file) says which source
columns make each manifest column. Everything is vectorised pandas: CheXpert's 223k rows take about a second.
The adapter format is documented in ``data_manifests/README.md``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from monai_du.data.adapters import ADAPTERS, adapter_names, get_adapter
from monai_du.data.manifest import (
    LABEL_PREFIX,
    LABEL_VALUES,
    MAX_AGE_YEARS,
    ManifestBuildResult,
    _as_text,
    _canonical_key,
    _is_blank,
    _make_report,
    _per_unique,
    _resolve_images,
    _unrecognised_sex,
    find_phi_columns,
    label_column_name,
    normalize_sex,
    validate_manifest,
)

__all__ = [
    "ADAPTER_FIELDS",
    "UNCERTAIN_POLICIES",
    "load_adapter",
    "validate_adapter",
    "read_source_table",
    "manifest_from_table",
]

ADAPTER_FIELDS: tuple[str, ...] = (
    "image",
    "patient_id",
    "age",
    "sex",
    "site",
    "view",
    "study_id",
    "series_id",
    "modality",
)
"""Manifest columns an adapter's ``fields`` may define (``image`` and ``patient_id`` are required)."""

UNCERTAIN_POLICIES: dict[str, float | None] = {"keep": -1.0, "zeros": 0.0, "ones": 1.0, "missing": np.nan}
"""What an uncertain label (-1) becomes: kept as -1, set to 0 (U-Zeros), to 1 (U-Ones) or to NaN."""

_SOURCE_KEYS = ("column", "template", "value", "from_birth", "days_since_first")
_SPEC_KEYS = set(_SOURCE_KEYS) | {"regex", "map", "keep_unmapped", "add", "add_years_since", "fallback", "optional"}
_ROW_NOTES = "__row_notes__"  # notes key: (where, (N,) mask of rows set to missing, the values before, what)
_ADAPTER_KEYS = {
    "name", "description", "source", "read", "joins", "files", "derive", "fields", "extra", "labels", "uncertain"
}
_LABEL_KINDS = {"columns", "multi_hot", "single"}
_DAYS_PER_YEAR = 365.25
_ROW = "__source_row__"


# ----------------------------------------------------------------------------------------------------- adapters
def _check_spec(spec: Any, where: str) -> None:
    if isinstance(spec, str):
        return
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where}: expected a column name or a mapping, got {type(spec).__name__}")
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_SPEC_KEYS)}")
    sources = [k for k in _SOURCE_KEYS if k in spec]
    if len(sources) != 1:
        raise ValueError(f"{where}: needs exactly one of {list(_SOURCE_KEYS)}, got {sources}")
    if "regex" in spec:
        pattern = re.compile(spec["regex"])
        if pattern.groups < 1:
            raise ValueError(f"{where}.regex: {spec['regex']!r} needs a capture group")
    if "map" in spec and not isinstance(spec["map"], Mapping):
        raise ValueError(f"{where}.map: expected a mapping, got {type(spec['map']).__name__}")
    if "from_birth" in spec:
        _check_keys(spec["from_birth"], {"birth", "date"}, {"date_format", "birth_format"}, f"{where}.from_birth")
    if "days_since_first" in spec:
        _check_keys(spec["days_since_first"], {"date", "by"}, {"date_format"}, f"{where}.days_since_first")
    if "add" in spec and (isinstance(spec["add"], bool) or not isinstance(spec["add"], (int, float))):
        raise ValueError(f"{where}.add: expected a number, got {spec['add']!r}")
    if "add_years_since" in spec:
        _check_keys(spec["add_years_since"], {"year", "date"}, {"date_format"}, f"{where}.add_years_since")
    if "fallback" in spec:
        _check_spec(spec["fallback"], f"{where}.fallback")


def _check_keys(value: Any, required: set[str], optional: set[str], where: str) -> None:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a mapping with keys {sorted(required)}")
    missing, unknown = required - set(value), set(value) - required - optional
    if missing or unknown:
        raise ValueError(f"{where}: missing key(s) {sorted(missing)}, unknown key(s) {sorted(unknown)}")


def validate_adapter(adapter: Mapping[str, Any], source: str = "adapter") -> dict[str, Any]:
    """Check an adapter's structure and return a normalised deep copy.

    Raises:
        ValueError: naming the adapter key that is wrong.
    """
    if not isinstance(adapter, Mapping):
        raise ValueError(f"{source}: an adapter must be a mapping, got {type(adapter).__name__}")
    adapter = copy.deepcopy(dict(adapter))
    unknown = set(adapter) - _ADAPTER_KEYS
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_ADAPTER_KEYS)}")
    fields = adapter.get("fields")
    if not isinstance(fields, Mapping):
        raise ValueError(f"{source}: 'fields' must map manifest columns to source specs")
    for required in ("image", "patient_id"):
        if required not in fields:
            raise ValueError(f"{source}: 'fields' must define '{required}'")
    for name, spec in fields.items():
        if name not in ADAPTER_FIELDS:
            raise ValueError(f"{source}: fields.{name} is not a manifest column; allowed: {list(ADAPTER_FIELDS)} "
                             "(put other columns under 'extra')")
        _check_spec(spec, f"{source}: fields.{name}")
    extra = adapter.setdefault("extra", {}) or {}
    adapter["extra"] = extra
    for name, spec in extra.items():
        if name in ADAPTER_FIELDS or str(name).startswith(LABEL_PREFIX) or name == "split":
            raise ValueError(f"{source}: extra.{name} clashes with a schema column")
        _check_spec(spec, f"{source}: extra.{name}")
    phi = find_phi_columns(extra)
    if phi:
        raise ValueError(f"{source}: extra column(s) {phi} look like protected health information")
    for name, spec in (adapter.get("derive") or {}).items():
        _check_spec(spec, f"{source}: derive.{name}")
    joins = adapter.setdefault("joins", []) or []
    adapter["joins"] = joins
    for i, join in enumerate(joins):
        if isinstance(join, dict) and True in join and "on" not in join:
            join["on"] = join.pop(True)  # YAML 1.1 reads an unquoted `on:` key as the boolean true
        if isinstance(join, Mapping) and isinstance(join.get("on"), str):
            join["on"] = [join["on"]]
        _check_keys(join, {"name", "on"}, {"required", "read"}, f"{source}: joins[{i}]")
    if adapter.get("files") is not None:
        _check_keys(adapter["files"], {"glob", "key_regex", "key_column", "column"}, set(), f"{source}: files")
    labels = adapter.setdefault("labels", []) or []
    adapter["labels"] = labels
    join_names = {j["name"] for j in joins}
    for i, label in enumerate(labels):
        where = f"{source}: labels[{i}]"
        kind = label.get("kind") if isinstance(label, Mapping) else None
        if kind not in _LABEL_KINDS:
            raise ValueError(f"{where}: 'kind' must be one of {sorted(_LABEL_KINDS)}, got {kind!r}")
        if kind == "columns":
            _check_keys(label, {"kind", "columns"}, {"map", "requires_join"}, where)
        elif kind == "multi_hot":
            _check_keys(label, {"kind", "column"}, {"sep", "format", "classes", "unknown", "requires_join"}, where)
            if label.get("format", "separated") not in ("separated", "python_list"):
                raise ValueError(f"{where}: 'format' must be 'separated' or 'python_list'")
            if label.get("unknown", "error") not in ("error", "ignore"):
                raise ValueError(f"{where}: 'unknown' must be 'error' or 'ignore'")
        else:
            _check_keys(label, {"kind", "name", "column"}, {"map", "requires_join"}, where)
        if label.get("requires_join") is not None and label["requires_join"] not in join_names:
            raise ValueError(f"{where}: requires_join {label['requires_join']!r} is not in joins {sorted(join_names)}")
    policy = adapter.setdefault("uncertain", "keep")
    if policy not in UNCERTAIN_POLICIES:
        raise ValueError(f"{source}: 'uncertain' must be one of {list(UNCERTAIN_POLICIES)}, got {policy!r}")
    adapter.setdefault("name", source)
    adapter.setdefault("read", {})
    return adapter


def load_adapter(adapter: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Load and validate an adapter.

    Args:
        adapter: a packaged adapter name (``"chexpert"``, ``"nih_cxr14"``, ``"mimic_cxr"``, ``"padchest"``,
            ``"openbhb"``, ``"abide"``, ``"ixi"``), a path to a ``.yaml``/``.yml``/``.json`` adapter file, or an
            adapter mapping.

    Returns:
        the validated adapter (a new dict).

    Raises:
        ValueError: for an unknown name or an invalid adapter; FileNotFoundError for a missing file.
    """
    if isinstance(adapter, Mapping):
        return validate_adapter(adapter, source=str(adapter.get("name", "adapter")))
    text = str(adapter)
    if text in ADAPTERS and not Path(text).is_file():
        return validate_adapter(get_adapter(text), source=f"adapter '{text}'")
    path = Path(text).expanduser()
    if path.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise ValueError(f"unknown adapter {text!r}: not a packaged adapter {adapter_names()} nor a .yaml/.json file")
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    if path.suffix.lower() == ".json":
        loaded = json.loads(path.read_text(encoding="utf-8"))
    else:
        import yaml

        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    return validate_adapter(loaded, source=str(path))


# ------------------------------------------------------------------------------------------------------- tables
def read_source_table(
    path: str | os.PathLike, sep: str | None = None, na_values: list[str] | None = None
) -> pd.DataFrame:
    """Read a metadata table with every column as text; only empty fields (and ``na_values``) are missing.

    ``.csv``, ``.tsv`` (optionally compressed) and ``.xls``/``.xlsx`` (needs xlrd / openpyxl) are read.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"table not found: {path}")
    name = path.name.lower()
    if name.endswith((".xls", ".xlsx")):
        try:
            table = pd.read_excel(path, dtype=str)
        except ImportError as error:
            message = f"{path}: reading Excel needs xlrd (.xls) or openpyxl (.xlsx); or export it to CSV"
            raise ImportError(message) from error
    else:
        if sep is None:
            sep = "\t" if re.search(r"\.(tsv|tab)(\.\w+)?$", name) else ","
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[""] + list(na_values or []))
    table.columns = [str(c).strip() for c in table.columns]
    return table


def _strip_uniques(uniques: pd.Series) -> pd.Series:
    stripped = uniques.str.strip()
    # a column of integers with a gap is written by pandas as 1.0, 2.0, ...: give the integers back
    if len(stripped) and stripped.str.fullmatch(r"-?\d+\.0+").all():
        stripped = stripped.str.replace(r"\.0+$", "", regex=True)
    return stripped


def _text(values: pd.Series) -> pd.Series:
    """Text with surrounding white space removed, NaN where missing (computed once per distinct value).

    When every value is an integer written as a float (``"12.0"``), the ``.0`` is dropped."""
    text = _as_text(values)
    return pd.Series(_per_unique(text, _strip_uniques), index=values.index, dtype=object)


_canonical = _canonical_key


def _map_values(
    values: pd.Series, mapping: Mapping[Any, Any], keep_unmapped: bool, notes: dict[str, int]
) -> pd.Series:
    """Map through ``mapping`` (keys compared with :func:`_canonical`); unmapped values counted in ``notes``."""
    table = {_canonical(k): v for k, v in mapping.items()}
    present = values.dropna()
    lookup: dict[Any, Any] = {}
    for raw in pd.unique(present.to_numpy()):
        key = _canonical(raw)
        if key in table:
            lookup[raw] = table[key]
        elif keep_unmapped:
            lookup[raw] = raw
        else:
            lookup[raw] = np.nan
            notes[str(raw)] = notes.get(str(raw), 0) + int((present == raw).sum())
    mapped = values.map(lookup)
    return mapped.astype(object).where(mapped.notna(), np.nan)


def _column(table: pd.DataFrame, names: Any, where: str) -> str:
    candidates = [names] if isinstance(names, str) else list(names)
    for name in candidates:
        if name in table.columns:
            return name
    raise ValueError(f"{where}: source column(s) {candidates} not found; table columns: {list(table.columns)}")


def _format_one(value: Any, spec: str, conversion: str | None) -> str:
    if conversion == "r":
        value = repr(value)
    elif conversion in ("s", "a"):
        value = str(value)
    if spec and spec[-1] in "dxXobcn":
        value = int(float(value))
    elif spec and spec[-1] in "eEfFgG%":
        value = float(value)
    return format(value, spec)


def _render_template(template: str, table: pd.DataFrame, where: str) -> pd.Series:
    result = pd.Series("", index=table.index, dtype=object)
    missing = np.zeros(len(table), dtype=bool)
    for literal, field_name, spec, conversion in string.Formatter().parse(template):
        if literal:
            result = result + literal
        if field_name is None:
            continue
        column = _column(table, field_name, f"{where} template field {{{field_name}}}")
        values = _text(table[column])
        missing |= values.isna().to_numpy()
        if spec or conversion:
            uniques = pd.unique(values.dropna().to_numpy())
            try:
                lookup = {u: _format_one(u, spec, conversion) for u in uniques}
            except (TypeError, ValueError) as error:
                raise ValueError(f"{where}: cannot format column '{column}' with {{:{spec}}}: {error}") from error
            values = values.map(lookup)
        result = result + values.fillna("").astype(str)
    return result.where(~missing, np.nan)


def _dates(values: pd.Series, date_format: str | None) -> pd.Series:
    text = _text(values)
    return pd.to_datetime(text, format=date_format, errors="coerce")


def _age_from_birth(table: pd.DataFrame, spec: Mapping[str, Any], where: str) -> pd.Series:
    birth_text = _text(table[_column(table, spec["birth"], where + ".birth")])
    year_only = birth_text.str.fullmatch(r"\d{4}(\.0+)?").fillna(False).astype(bool)
    born = pd.to_datetime(birth_text.where(~year_only), format=spec.get("birth_format"), errors="coerce")
    years = pd.to_numeric(birth_text.where(year_only), errors="coerce")
    mid_year = pd.to_datetime(years.dropna().astype(int).astype(str) + "-07-01", format="%Y-%m-%d")
    born = born.where(~year_only, mid_year.reindex(born.index))
    seen = _dates(table[_column(table, spec["date"], where + ".date")], spec.get("date_format"))
    return ((seen - born).dt.days / _DAYS_PER_YEAR).astype(float)


def _days_since_first(table: pd.DataFrame, spec: Mapping[str, Any], where: str, notes: dict) -> pd.Series:
    """Days from the first date of the row's group (``by``: the patient column) to the row's date; NaN without a
    date. A present date that does not parse is reported."""
    raw = _text(table[_column(table, spec["date"], where + ".date")])
    seen = pd.to_datetime(raw, format=spec.get("date_format"), errors="coerce")
    invalid = (seen.isna() & raw.notna()).to_numpy()
    if invalid.any():
        notes.setdefault(_ROW_NOTES, []).append((where, invalid, raw, "is not a valid date"))
    group = _text(table[_column(table, spec["by"], where + ".by")])
    first = seen.groupby(group.to_numpy(), dropna=True).transform("min")
    return ((seen - first).dt.days).astype(float).where(group.notna())


def _evaluate(spec: Any, table: pd.DataFrame, where: str, notes: dict[str, Any]) -> pd.Series:
    """Evaluate a field spec on the table: an (N,) series of text or numbers, NaN where missing."""
    if isinstance(spec, str):
        spec = {"column": spec}
    stripped = False  # values are already _text output
    if "column" in spec:
        name = _column(table, spec["column"], where)
        values = table[name]
        if not pd.api.types.is_numeric_dtype(values.dtype):
            cache = notes.setdefault("__text_cache__", {})
            if name not in cache:
                cache[name] = _text(values)
            values, stripped = cache[name], True
    elif "template" in spec:
        values = _render_template(spec["template"], table, where)
    elif "value" in spec:
        values = pd.Series([spec["value"]] * len(table), index=table.index, dtype=object)
    elif "days_since_first" in spec:
        values = _days_since_first(table, spec["days_since_first"], where + ".days_since_first", notes)
    else:
        values = _age_from_birth(table, spec["from_birth"], where + ".from_birth")
    if "regex" in spec:
        values = (values if stripped else _text(values)).str.extract(spec["regex"], expand=False)
    if "map" in spec:
        unmapped: dict[str, int] = {}
        before = values
        values = _map_values(values, spec["map"], bool(spec.get("keep_unmapped", False)), unmapped)
        if unmapped:
            mask = (before.notna() & before.map(str, na_action="ignore").isin(list(unmapped))).to_numpy()
            notes.setdefault(_ROW_NOTES, []).append((where, mask, before, "is not in the map"))
    if "add" in spec:
        values = pd.to_numeric(values, errors="coerce") + spec["add"]
    if "add_years_since" in spec:
        extra = spec["add_years_since"]
        year_column = _column(table, extra["year"], where + ".add_years_since.year")
        base_year = pd.to_numeric(_text(table[year_column]), errors="coerce")
        seen = _dates(table[_column(table, extra["date"], where + ".add_years_since.date")], extra.get("date_format"))
        values = pd.to_numeric(values, errors="coerce") + (seen.dt.year - base_year)
    if "fallback" in spec:
        other = _evaluate(spec["fallback"], table, where + ".fallback", notes)
        values = values.astype(object).where(values.notna(), other.astype(object))
        # a value the fallback filled in was not set to missing
        still_missing = values.isna().to_numpy()
        notes[_ROW_NOTES] = [
            (w, mask & still_missing if w == where or w.startswith(where + ".") else mask, before, what)
            for w, mask, before, what in notes.get(_ROW_NOTES, [])
        ]
    return values


# ------------------------------------------------------------------------------------------------------- labels
def _label_values(
    raw: pd.Series, mapping: Mapping[Any, Any] | None, column: str, source: str, rows: pd.Series
) -> pd.Series:
    """Label column as float 1/0/-1/NaN; raises naming the source rows for any other value (or unmapped code)."""
    if mapping is not None:
        unmapped: dict[str, int] = {}
        mapped = _map_values(raw, mapping, False, unmapped)
        values = pd.to_numeric(mapped, errors="coerce")
        not_number = (mapped.notna() & values.isna()) | raw.astype(object).map(str, na_action="ignore").isin(
            list(unmapped)
        )
    else:
        values = pd.to_numeric(raw, errors="coerce")
        suspicious = (values.isna() & raw.notna()).to_numpy()
        not_number = pd.Series(False, index=raw.index)
        if suspicious.any():  # slow path for the few values with white space or text
            text = _text(raw[suspicious])
            retried = pd.to_numeric(text, errors="coerce")
            values = values.astype(float)
            values[suspicious] = retried.to_numpy(dtype=float)
            not_number[suspicious] = (retried.isna() & text.notna() & (text != "")).to_numpy()
    bad = not_number | (values.notna() & ~values.isin(LABEL_VALUES))
    if bad.any():
        positions = np.flatnonzero(bad.to_numpy())[:5]
        shown = "; ".join(f"{_row_label(rows.iloc[int(p)])}: {raw.iloc[int(p)]!r}" for p in positions)
        raise ValueError(f"{source}: label column '{column}' has values other than 1, 0, -1 or blank at {shown}")
    return values.astype(float)


def _split_tokens(values: pd.Series, label: Mapping[str, Any]) -> pd.DataFrame:
    """(N, classes) 0/1 indicators from a multi-label text column; all-NaN rows where the source is missing."""
    text = _text(values)
    if label.get("format", "separated") == "python_list":
        joined = text.str.replace(r"^\s*\[|\]\s*$", "", regex=True)
        joined = joined.str.replace(r"['\"]\s*,\s*['\"]", "|", regex=True).str.replace(r"['\"]", "", regex=True)
        sep = "|"
    else:
        joined, sep = text, label.get("sep", "|")
    dummies = joined.fillna("").str.get_dummies(sep=sep)
    merged: dict[str, pd.Series] = {}
    for column in dummies.columns:
        token = str(column).strip()
        if token:
            merged[token] = merged[token] | dummies[column] if token in merged else dummies[column]
    indicators = pd.DataFrame(merged, index=values.index).astype(float)
    indicators.loc[text.isna().to_numpy()] = np.nan
    return indicators


def _labels(table: pd.DataFrame, label: Mapping[str, Any], source: str) -> dict[str, pd.Series]:
    kind = label["kind"]
    out: dict[str, pd.Series] = {}
    if kind == "columns":
        columns = label["columns"]
        pairs = columns.items() if isinstance(columns, Mapping) else [(c, c) for c in columns]
        for src, name in pairs:
            column = _column(table, src, f"{source}: labels")
            values = _label_values(table[column], label.get("map"), column, source, table[_ROW])
            out[label_column_name(name)] = values
    elif kind == "single":
        column = _column(table, label["column"], f"{source}: labels")
        values = _label_values(table[column], label.get("map"), column, source, table[_ROW])
        out[label_column_name(label["name"])] = values
    else:
        column = _column(table, label["column"], f"{source}: labels")
        indicators = _split_tokens(table[column], label)
        classes = label.get("classes")
        if classes is None:
            names = {token: token for token in sorted(indicators.columns)}
        else:
            names = dict(classes) if isinstance(classes, Mapping) else {c: c for c in classes}
            unknown = sorted(set(indicators.columns) - set(names))
            if unknown and label.get("unknown", "error") == "error":
                raise ValueError(f"{source}: column '{column}' has label(s) {unknown} not in the adapter's classes "
                                 f"{sorted(names)}; add them or set unknown: ignore")
        present = _text(table[column]).notna().to_numpy()
        for token, name in names.items():
            values = indicators[token] if token in indicators.columns else pd.Series(0.0, index=table.index)
            out[label_column_name(name)] = values.where(present, np.nan).astype(float)
    return out


# ------------------------------------------------------------------------------------------------------ builder
def _row_label(row: int) -> str:
    """A main-table row as ``row i (line i+2)``: line 1 of the file is the header."""
    return f"row {int(row)} (line {int(row) + 2})"


def _match_files(
    table: pd.DataFrame, spec: Mapping[str, Any], root: Path | None, source: str, report: list[tuple[str, str, str]]
) -> pd.DataFrame:
    if root is None:
        raise ValueError(f"{source}: this adapter finds image files on disk ({spec['glob']}); pass root=<image folder>")
    pattern = re.compile(spec["key_regex"])
    files, keys = [], []
    for path in sorted(p for p in root.glob(spec["glob"]) if p.is_file()):
        match = pattern.search(path.name)
        if match is None:
            report.append((str(path), f"file name does not match {spec['key_regex']!r}", "skipped"))
            continue
        files.append(str(path))
        keys.append(_canonical(match.group(1)))
    key_column = _column(table, spec["key_column"], f"{source}: files.key_column")
    key_text = _text(table[key_column])
    table = table.assign(__key__=key_text.map(_canonical, na_action="ignore"))
    duplicated = table["__key__"].notna() & table["__key__"].duplicated()
    for row, key in zip(table.loc[duplicated, _ROW], table.loc[duplicated, key_column]):
        report.append((_row_label(row), f"{key_column}={key!r} repeats an earlier row; ignored", "skipped"))
    table = table.loc[~duplicated]
    found = pd.DataFrame({"__key__": keys, spec["column"]: files})
    merged = table.merge(found, on="__key__", how="left", sort=False)
    no_file = merged[spec["column"]].isna()
    for row, key in zip(merged.loc[no_file, _ROW], merged.loc[no_file, key_column]):
        report.append((_row_label(row), f"no image file for {key_column}={key!r} under {root}", "skipped"))
    orphans = ~found["__key__"].isin(table["__key__"].dropna())
    for path in found.loc[orphans, spec["column"]]:
        report.append((path, f"image file has no row in the table ({key_column})", "skipped"))
    return merged.loc[~no_file].drop(columns="__key__").reset_index(drop=True)


def manifest_from_table(
    csv_path: str | os.PathLike,
    adapter: str | os.PathLike | Mapping[str, Any],
    root: str | os.PathLike | None = None,
    tables: Mapping[str, str | os.PathLike] | None = None,
    check_files: bool = False,
    uncertain: str | None = None,
) -> ManifestBuildResult:
    """Build a manifest from a public dataset's metadata table through an adapter.

    Only the columns the adapter names are read into the manifest, so names, birth dates and free text in the
    source never reach it. Rows without an image path or patient id are skipped and reported; ages outside
    [0, 130] and unrecognised codes become missing with a warning; label values other than 1/0/-1/blank raise.

    Args:
        csv_path: the main table (CSV/TSV, optionally compressed; Excel with xlrd/openpyxl).
        adapter: a packaged adapter name (``"chexpert"``, ``"nih_cxr14"``, ``"mimic_cxr"``, ``"padchest"``,
            ``"openbhb"``, ``"abide"``, ``"ixi"``), a path to an adapter YAML/JSON file, or an adapter mapping.
        root: image folder. Relative image paths become absolute under it; without it they stay as in the
            table. Required by adapters that find files on disk (``ixi``).
        tables: extra tables for adapters with ``joins``, by join name (MIMIC-CXR:
            ``{"patients": ..., "chexpert": ...}``).
        check_files: also skip (and report) rows whose image file does not exist.
        uncertain: override the adapter's policy for uncertain labels (-1): ``"keep"``, ``"zeros"``, ``"ones"``
            or ``"missing"`` (:data:`UNCERTAIN_POLICIES`).

    Returns:
        :class:`~monai_du.data.manifest.ManifestBuildResult` (unpack as ``manifest, report``); report columns
        ``item`` (``"row i (line i+2)"`` of the main table, or a file), ``reason``, ``status``.

    Raises:
        ValueError: for an invalid adapter, a source column it needs that the table lacks, a missing required
            join table, or label values outside {1, 0, -1, blank}.
    """
    spec = load_adapter(adapter)
    name = spec.get("name", "adapter")
    source = f"{Path(csv_path).name} via adapter '{name}'"
    policy = spec["uncertain"] if uncertain is None else uncertain
    if policy not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain must be one of {list(UNCERTAIN_POLICIES)}, got {policy!r}")
    read = spec.get("read") or {}
    table = read_source_table(csv_path, sep=read.get("sep"), na_values=read.get("na_values"))
    table[_ROW] = np.arange(len(table))
    report: list[tuple[str, str, str]] = []

    tables = dict(tables or {})
    unknown_tables = set(tables) - {j["name"] for j in spec["joins"]}
    if unknown_tables:
        raise ValueError(f"{source}: tables {sorted(unknown_tables)} are not joins of this adapter "
                         f"({[j['name'] for j in spec['joins']]})")
    joined: set[str] = set()
    for join in spec["joins"]:
        if join["name"] not in tables:
            if join.get("required", False):
                raise ValueError(f"{source}: needs tables={{'{join['name']}': <path>}} (joined on {join['on']})")
            continue
        other_read = join.get("read") or {}
        other = read_source_table(
            tables[join["name"]], sep=other_read.get("sep"), na_values=other_read.get("na_values")
        )
        keys = list(join["on"])
        for key in keys:
            _column(table, key, f"{source}: join '{join['name']}' key")
            _column(other, key, f"{tables[join['name']]}: join key")
        left_keys = table[keys].apply(lambda c: c.map(_canonical, na_action="ignore"))
        right_keys = other[keys].apply(lambda c: c.map(_canonical, na_action="ignore"))
        if right_keys.duplicated().any():
            raise ValueError(f"{tables[join['name']]}: key {keys} is not unique; cannot join without duplicating rows")
        other = other.drop(columns=keys).assign(**{f"__k{i}": right_keys[k].to_numpy() for i, k in enumerate(keys)})
        left = table.assign(**{f"__k{i}": left_keys[k].to_numpy() for i, k in enumerate(keys)})
        overlap = [c for c in other.columns if c in left.columns and not c.startswith("__k")]
        other = other.drop(columns=overlap)
        table = left.merge(other, on=[f"__k{i}" for i in range(len(keys))], how="left", sort=False)
        table = table.drop(columns=[f"__k{i}" for i in range(len(keys))])
        joined.add(join["name"])

    root_path = Path(root).expanduser().resolve() if root is not None else None
    if spec.get("files") is not None:
        table = _match_files(table, spec["files"], root_path, source, report)

    notes: dict[str, Any] = {}
    for derived, derived_spec in (spec.get("derive") or {}).items():
        table[derived] = _evaluate(derived_spec, table, f"{source}: derive.{derived}", notes)

    out = pd.DataFrame(index=table.index)
    for field_name in ADAPTER_FIELDS:
        if field_name in spec["fields"]:
            out[field_name] = _evaluate(spec["fields"][field_name], table, f"{source}: fields.{field_name}", notes)
    for extra_name, extra_spec in spec["extra"].items():
        if isinstance(extra_spec, Mapping) and extra_spec.get("optional") and "column" in extra_spec:
            names = [extra_spec["column"]] if isinstance(extra_spec["column"], str) else extra_spec["column"]
            if not any(n in table.columns for n in names):
                continue
        out[extra_name] = _evaluate(extra_spec, table, f"{source}: extra.{extra_name}", notes)
    for label in spec["labels"]:
        if label.get("requires_join") is not None and label["requires_join"] not in joined:
            continue
        for column, values in _labels(table, label, source).items():
            out[column] = values
    label_columns = [c for c in out.columns if str(c).startswith(LABEL_PREFIX)]
    if label_columns and policy != "keep":
        labels = out[label_columns]
        out[label_columns] = labels.mask(labels == -1.0, UNCERTAIN_POLICIES[policy])

    notes.pop("__text_cache__", None)
    for where, mask, before, what in notes.pop(_ROW_NOTES, []):
        name = where.split(": ", 1)[-1]
        for row, value in zip(table.loc[mask, _ROW], before[mask]):
            report.append((_row_label(row), f"{name}: value {value!r} {what}; set to missing", "warning"))

    if "sex" in out.columns:
        unknown = _unrecognised_sex(out["sex"])
        for row, value in zip(table.loc[unknown, _ROW], out.loc[unknown, "sex"]):
            reason = f"fields.sex: {value!r} is not a sex code (M/F, male/female, 1 = male, 2 = female); set to missing"
            report.append((_row_label(row), reason, "warning"))
        out["sex"], _ = normalize_sex(out["sex"])
    if "age" in out.columns:
        age = pd.to_numeric(out["age"], errors="coerce").astype(float)
        bad = ((age < 0) | (age > MAX_AGE_YEARS) | np.isinf(age)).to_numpy()
        for row, value in zip(table.loc[bad, _ROW], age[bad]):
            reason = f"age {value:g} outside [0, {MAX_AGE_YEARS:g}]; set to missing"
            report.append((_row_label(row), reason, "warning"))
        out["age"] = age.where(~bad)
    for text_column in [c for c in out.columns if c != "age" and not str(c).startswith(LABEL_PREFIX)]:
        values = out[text_column]
        if not pd.api.types.is_numeric_dtype(values.dtype):
            out[text_column] = _as_text(values)

    keep = np.ones(len(out), dtype=bool)
    for required in ("image", "patient_id"):
        blank = _is_blank(out[required])
        for row in table.loc[blank & keep, _ROW]:
            report.append((_row_label(row), f"empty {required}; row skipped", "skipped"))
        keep &= ~blank
    out = out.loc[keep]
    rows = table.loc[keep, _ROW]
    if root_path is not None:
        out["image"] = _resolve_images(out["image"], root_path)
    if check_files:
        exists = np.fromiter((os.path.isfile(p) for p in out["image"]), dtype=bool, count=len(out))
        for row, path in zip(rows[~exists], out.loc[~exists, "image"]):
            report.append((_row_label(row), f"image file not found: {path}", "skipped"))
        out = out.loc[exists]
    out = validate_manifest(out.reset_index(drop=True), source=source)
    return ManifestBuildResult(manifest=out, report=_make_report(report))
