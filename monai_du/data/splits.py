"""Patient-level train / validation / test splits."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from monai_du.data.manifest import (
    SPLIT_VALUES,
    _as_text,
    _describe_leaks,
    _is_blank,
    patients_in_several_splits,
    read_manifest,
)

__all__ = ["DEFAULT_FRACTIONS", "patient_split", "pool_without_patients", "select_split"]

DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}
"""Default fractions of patients per split."""

_MISSING_STRATUM = "<missing>"


def _validate_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(fractions, Mapping) or not fractions:
        raise ValueError(f"fractions must be a non-empty mapping such as {DEFAULT_FRACTIONS}, got {fractions!r}")
    unknown = [k for k in fractions if k not in SPLIT_VALUES]
    if unknown:
        raise ValueError(f"fractions has unknown split name(s) {unknown}; allowed: {list(SPLIT_VALUES)}")
    clean: dict[str, float] = {}
    for name in SPLIT_VALUES:  # a fixed order, whatever the mapping's order
        if name not in fractions:
            continue
        try:
            value = float(fractions[name])
        except (TypeError, ValueError) as error:
            raise ValueError(f"fractions[{name!r}] must be a number, got {fractions[name]!r}") from error
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"fractions[{name!r}] must be finite and >= 0, got {value}")
        clean[name] = value
    total = sum(clean.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {total:.6g} from {dict(fractions)}")
    return clean


def _patient_strata(df: pd.DataFrame, patient_column: str, columns: Sequence[str]) -> pd.Series:
    """One stratum per patient: the most frequent value of each column among its rows (ties: smallest value)."""
    keys = None
    for column in columns:
        values = _as_text(df[column]).fillna(_MISSING_STRATUM)
        table = pd.DataFrame({"patient": df[patient_column].to_numpy(), "value": values.to_numpy()})
        counts = table.groupby(["patient", "value"], sort=False).size().reset_index(name="n")
        counts = counts.sort_values(["patient", "n", "value"], ascending=[True, False, True], kind="mergesort")
        mode = counts.drop_duplicates("patient").set_index("patient")["value"]
        keys = mode if keys is None else keys + "|" + mode.reindex(keys.index)
    return keys


def _allocate(n: int, fractions: dict[str, float], deficit: dict[str, float]) -> dict[str, int]:
    """Counts for ``n`` patients: floor(n * f) each, the remaining units to the splits furthest behind target."""
    counts = {name: int(math.floor(n * f + 1e-9)) for name, f in fractions.items()}
    left = n - sum(counts.values())
    if left > 0:
        # how far each split is behind after this stratum's floors, on the running global target
        behind = {name: deficit[name] + n * fractions[name] - counts[name] for name in fractions}
        order = sorted(fractions, key=lambda name: (-behind[name], list(fractions).index(name)))
        for name in order[:left]:
            counts[name] += 1
    for name in fractions:
        deficit[name] += n * fractions[name] - counts[name]
    return counts


def patient_split(
    df: pd.DataFrame,
    fractions: Mapping[str, float] | None = None,
    seed: int = 0,
    stratify: str | Sequence[str] | None = None,
    patient_column: str = "patient_id",
) -> pd.DataFrame:
    """Assign every row a split so that no patient is in two splits.

    Patients (not rows) are split in the given fractions. The result depends only on the set of patients, their
    strata and the seed, not on the row order. With ``stratify``, each patient gets a stratum (the most frequent
    value of the column(s) among its rows, missing values forming their own stratum) and every stratum is split
    in the fractions: each split receives ``floor(n_s * f)`` or one more of a stratum's ``n_s`` patients, the extra
    units going to the splits furthest behind their overall target so that the totals stay close to the
    fractions. Stratify by categorical columns (site, sex, a label); bin continuous ones (age) first.

    Args:
        df: manifest with a ``patient_id`` column.
        fractions: ``{"train": f1, "val": f2, "test": f3}`` (any subset of these names), each >= 0, summing to 1.
            Default :data:`DEFAULT_FRACTIONS` (0.8 / 0.1 / 0.1).
        seed: random seed; the same seed gives the same split.
        stratify: a column name or a list of column names to stratify by, or None.
        patient_column: the patient identifier column.

    Returns:
        a copy of ``df`` with a ``split`` column (replacing any existing one).

    Raises:
        ValueError: for invalid fractions, a missing column, or empty patient identifiers (naming the rows).
    """
    fractions = _validate_fractions(DEFAULT_FRACTIONS if fractions is None else fractions)
    if patient_column not in df.columns:
        raise ValueError(f"patient_split: column '{patient_column}' not found; columns: {list(df.columns)}")
    columns = [] if stratify is None else [stratify] if isinstance(stratify, str) else list(stratify)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"patient_split: stratify column(s) {missing} not found; columns: {list(df.columns)}")
    patients = _as_text(df[patient_column])
    blank = _is_blank(patients)
    if blank.any():
        rows = np.flatnonzero(blank)[:5].tolist()
        raise ValueError(
            f"patient_split: column '{patient_column}' is empty at row(s) {rows} ({int(blank.sum())} in all)"
        )

    work = df.assign(**{patient_column: patients.to_numpy()})
    if columns:
        strata = _patient_strata(work, patient_column, columns)
    else:
        strata = pd.Series(_MISSING_STRATUM, index=pd.Index(pd.unique(patients.to_numpy())))
    strata = strata.sort_index()

    rng = np.random.default_rng(seed)
    deficit = {name: 0.0 for name in fractions}
    assignment: dict[str, str] = {}
    for _, members in strata.groupby(strata, sort=True):
        ids = members.index.to_numpy()
        ids = ids[rng.permutation(len(ids))]
        counts = _allocate(len(ids), fractions, deficit)
        start = 0
        for name, count in counts.items():
            for patient in ids[start : start + count]:
                assignment[patient] = name
            start += count

    out = df.copy()
    out["split"] = patients.map(assignment).to_numpy()
    return out


def select_split(
    manifest: pd.DataFrame,
    split: str | Sequence[str] = "train",
    fractions: Mapping[str, float] | None = None,
    seed: int = 0,
    stratify: str | Sequence[str] | None = None,
) -> pd.DataFrame:
    """The rows of one patient-level split (or several).

    When the manifest has a ``split`` column with at least one value, that assignment is used as it is (rows without a
    split are left out). Otherwise patients are split with :func:`monai_du.data.splits.patient_split` (``fractions``,
    ``seed``, ``stratify``), so that the pretraining and fine-tuning bundles, given the same arguments, agree on which
    patients are held out. The index labels (manifest rows) are kept, so errors can name them.

    Args:
        manifest: the manifest.
        split: the split name(s) to keep: "train", "val", "test".
        fractions: fractions of patients per split (default 0.8 / 0.1 / 0.1).
        seed: seed of the patient split.
        stratify: column(s) to stratify the patient split by.

    Returns:
        the selected rows, with a ``split`` column.

    Raises:
        ValueError: when a given ``split`` column puts one patient in two splits (naming the patients), or no row is
            in the named split(s).
    """
    names = [split] if isinstance(split, str) else list(split)
    if not names:
        raise ValueError("select_split: give at least one split name.")
    if "split" in manifest.columns and manifest["split"].notna().any():
        if "patient_id" in manifest.columns:
            leaks = patients_in_several_splits(manifest)
            if leaks:
                raise ValueError(f"select_split: the manifest's {_describe_leaks(leaks)}; fix the split column, or "
                                 "drop it to split by patient with patient_split.")
        assigned = manifest
    else:
        assigned = patient_split(manifest, fractions=fractions, seed=seed, stratify=stratify)
    selected = assigned[assigned["split"].isin(names)]
    if selected.empty:
        counts = assigned["split"].value_counts(dropna=False).to_dict()
        raise ValueError(f"select_split: no manifest row in split(s) {names}; split counts: {counts}.")
    return selected


def pool_without_patients(
    pool: str | os.PathLike, labelled: pd.DataFrame, pool_dataset_dir: str | os.PathLike | None = None,
    keep_labelled: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(every pool row, the rows pretraining reads)``: the pool manifest less the patients of ``labelled`` (unless
    ``keep_labelled``), so that no probe of the labelled cohort scores a patient the encoder saw.

    Raises:
        ValueError: when no pool row is left.
    """
    rows = read_manifest(pool, root=pool_dataset_dir)
    shared = rows["patient_id"].astype(str).isin(set(labelled["patient_id"].astype(str)))
    kept = rows if keep_labelled else rows[~shared]
    if kept.empty:
        raise ValueError(f"pool {pool}: no row is left once the labelled manifest's patients are removed.")
    return rows, kept
