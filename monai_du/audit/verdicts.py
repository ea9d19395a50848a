"""Verdict thresholds and verdicts of the audit (:func:`audit_verdict`), the ranking of the audit table
(:func:`rank_audit`) and its text report (:func:`format_audit`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

COARSE_RANK_FRACTION = 0.10
"""A batch kernel whose effective rank is below this share of the batch size is too coarse: with ``G`` equal groups
the effective rank is about ``G``, so 10% of a batch of 64 is fewer than ~6 groups of ~10 or more samples each, and
kernel DU replaces each centroid by (mostly) its group's mean."""

COARSE_MEAN_OFFDIAG = 0.5
"""A batch kernel whose mean off-diagonal value is above this is too coarse: a typical pair of samples in the batch
counts as more similar than not (two equal categorical groups give ~0.49, a constant kernel 1)."""

CONSTANT_MEAN_OFFDIAG = 0.9
"""A batch kernel whose mean off-diagonal value is above this is nearly constant inside the batches (e.g. a site
kernel on within-site batches): it cannot tell a batch's images apart, so it is too coarse whatever it says about the
label between batches."""

IDENTITY_RANK_FRACTION = 0.90
"""Together with :data:`IDENTITY_MEAN_OFFDIAG`: a batch kernel whose effective rank is at least this share of the
batch size is near the identity, and kernel DU is then plain DU."""

IDENTITY_MEAN_OFFDIAG = 0.01
"""Mean off-diagonal value at or below which (with :data:`IDENTITY_RANK_FRACTION`) a batch kernel is near identity."""

P_VALUE_ALPHA = 0.05
"""Significance level of the patient-level permutation test of the HSIC."""

CHANCE_AUC_MARGIN = 0.05
"""A patient-grouped CV AUC at most ``0.5 + CHANCE_AUC_MARGIN`` counts as chance (a prior does not predict the label
from other patients), whatever the sample size. AUCs below 0.5 count as chance too: out-of-fold kernel smoothers dip
below 0.5 under the null."""

VERDICT_COARSE = "too coarse: will average groups"
VERDICT_IDENTITY = "near identity: equals plain DU"
VERDICT_UNINFORMATIVE = "uninformative of your labels"
VERDICT_INFORMATIVE = "informative"
VERDICTS: tuple[str, ...] = (VERDICT_INFORMATIVE, VERDICT_IDENTITY, VERDICT_UNINFORMATIVE, VERDICT_COARSE)
"""The verdicts, best first: the order of the ranked table. An informative prior can help; a near-identity prior
trains plain DU; an uninformative prior pools images whose similarity does not follow the label, and a coarse one
pools whole groups of them, so those two can only cost."""


def audit_verdict(row: Mapping[str, Any]) -> str:
    """The plain-language verdict of one audit row (see :mod:`monai_du.audit` for the rules and their order).

    Args:
        row: a mapping (or ``pandas.Series``) with ``eff_rank_fraction`` (or ``eff_rank`` and ``batch_size``),
            ``mean_offdiag``, ``p_value``, ``cv_auc`` and optionally ``auc_chance``.
    """
    fraction, off = _rank_fraction(row), float(row["mean_offdiag"])
    if fraction >= IDENTITY_RANK_FRACTION and off <= IDENTITY_MEAN_OFFDIAG:
        return VERDICT_IDENTITY
    if off > CONSTANT_MEAN_OFFDIAG:
        return VERDICT_COARSE
    if _carries_label_information(row):
        return VERDICT_INFORMATIVE
    if _is_coarse(fraction, off):
        return VERDICT_COARSE
    return VERDICT_UNINFORMATIVE


def _rank_fraction(row: Mapping[str, Any]) -> float:
    """``eff_rank_fraction`` of an audit row, or ``eff_rank / batch_size`` when it is missing."""
    fraction = row.get("eff_rank_fraction")
    if fraction is None or (isinstance(fraction, float) and math.isnan(fraction)):
        fraction = float(row["eff_rank"]) / float(row["batch_size"])
    return float(fraction)


def _is_coarse(fraction: float, mean_offdiag: float) -> bool:
    return fraction < COARSE_RANK_FRACTION or mean_offdiag > COARSE_MEAN_OFFDIAG


def _carries_label_information(row: Mapping[str, Any]) -> bool:
    p, auc = float(row["p_value"]), float(row["cv_auc"])
    significant = not math.isnan(p) and p <= P_VALUE_ALPHA
    chance = 0.5 + CHANCE_AUC_MARGIN
    if row.get("auc_chance") is not None and not math.isnan(float(row["auc_chance"])):
        chance = max(chance, float(row["auc_chance"]))
    predictive = not math.isnan(auc) and auc > chance
    return significant or predictive


def _reason(row: Mapping[str, Any]) -> str:
    verdict, b = row["verdict"], int(row["batch_size"])
    rank, off = float(row["eff_rank"]), float(row["mean_offdiag"])
    if verdict == VERDICT_COARSE:
        return (f"effective rank {rank:.1f} of {b}, mean off-diagonal {off:.2f}: kernel DU pulls whole groups of "
                "centroids to their mean")
    if verdict == VERDICT_IDENTITY:
        return f"effective rank {rank:.1f} of {b}, mean off-diagonal {off:.3f}: the batch kernel is ~ the identity"
    info = f"KTA {float(row['kta']):.3f}, p = {float(row['p_value']):.3f} ({row['null']} permutations), " \
           f"CV AUC {float(row['cv_auc']):.2f} (chance up to {float(row.get('auc_chance', math.nan)):.2f})"
    if verdict == VERDICT_UNINFORMATIVE:
        return f"{info}: its similarities do not follow {row['label']}"
    if _is_coarse(_rank_fraction(row), off):
        return (f"{info}; effective rank {rank:.1f} of {b}, mean off-diagonal {off:.2f}: it pools groups of images, "
                f"and the groups follow {row['label']}")
    return f"{info}; effective rank {rank:.1f} of {b}"


def format_audit(df: pd.DataFrame) -> str:
    """The audit as text: one ranked table per label, then a verdict with its reason for each prior."""
    settings = df.attrs.get("settings", {})
    lines = []
    if settings:
        pool = (f", kernels and batches from the pool {settings['pool']} ({settings.get('n_pool_rows')} rows)"
                if settings.get("pool") else "")
        lines.append(
            f"Prior audit of {settings.get('source')} ({settings.get('n_rows')} rows){pool}: "
            f"batch {settings.get('batch_size')}, "
            f"sampler {settings.get('sampler')}, {settings.get('n_batches')} batches, lam {settings.get('lam'):g}, "
            f"instance weight {settings.get('instance_weight'):g}, {settings.get('n_permutations')} permutations."
        )
        if settings.get("pool_note"):
            lines.append(str(settings["pool_note"]))
    header = (f"{'#':>2}  {'prior':<16} {'eff.rank':>9} {'offdiag':>8} {'pooled':>6} {'KTA':>7} {'HSIC':>8} {'p':>6} "
              f"{'AUC':>5} {'chance':>6}  verdict")
    for label, part in df.groupby("label", sort=False):
        first = part.iloc[0]
        lines += ["", f"{label}: {first['n_labelled']} labelled rows ({first['n_positive']} positive), "
                      f"{first['n_patients']} patients", header]
        for row in part.to_dict("records"):
            lines.append(
                f"{row['rank']:>2}  {str(row['prior'])[:16]:<16} {row['eff_rank']:>5.1f}/{row['batch_size']:<3d} "
                f"{row['mean_offdiag']:>8.3f} {100 * row['pooled']:>5.1f}% {row['kta']:>7.3f} {row['hsic']:>8.4f} "
                f"{row['p_value']:>6.3f} "
                f"{row['cv_auc']:>5.2f} {row['auc_chance']:>6.2f}  {row['verdict']}"
            )
        lines.append("")
        for row in part.to_dict("records"):
            own = f" (its own batches: {row['sampler']})" if row["sampler"] != settings.get("sampler") else ""
            lines.append(f"- {row['prior']}{own}: {row['verdict']} ({_reason(row)})")
    for name, reason in df.attrs.get("skipped", {}).items():
        lines.append(f"- {name}: skipped ({reason})")
    for name, note in df.attrs.get("notes", {}).items():
        lines.append(f"- {name}: note: {note}")
    return "\n".join(lines).lstrip("\n")


def rank_audit(records: Sequence[Mapping[str, Any]], label_columns: Sequence[str]) -> pd.DataFrame:
    """The audit table from its rows (one per (prior, label)): ``pooled`` and ``verdict`` (:func:`audit_verdict`)
    filled in, ranked within each label (column ``rank``, best first; labels in the order of ``label_columns``):
    verdicts in the order of :data:`VERDICTS`, informative priors by KTA, the others by their ``pooled`` share."""
    columns = ["rank", "prior", "label", "kernel", "batch_size", "sampler", "eff_rank", "eff_rank_fraction",
               "mean_offdiag", "centroid_dof", "pooled", "n_labelled", "n_positive", "n_patients", "kta", "hsic",
               "p_value", "null", "cv_auc", "auc_chance", "verdict"]
    out = pd.DataFrame.from_records(records)
    if len(out):
        out["pooled"] = 1.0 - out["centroid_dof"] / out["batch_size"]
        out["verdict"] = [audit_verdict(row) for row in out.to_dict("records")]
        out["_order"] = out["verdict"].map({v: i for i, v in enumerate(VERDICTS)})
        out["_label_order"] = out["label"].map({c: i for i, c in enumerate(label_columns)})
        # informative priors by their alignment with the label; the others by how little they pool
        informative = out["verdict"] == VERDICT_INFORMATIVE
        out["_score"] = np.where(informative, out["kta"].fillna(0.0), -out["pooled"])
        out = out.sort_values(["_label_order", "_order", "_score", "p_value", "cv_auc"],
                              ascending=[True, True, False, True, False], kind="stable")
        out["rank"] = out.groupby("label").cumcount() + 1
        out = out[columns].reset_index(drop=True)
    else:
        out = pd.DataFrame(columns=columns)
    return out
