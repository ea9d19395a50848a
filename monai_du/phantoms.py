"""Generated phantom cohorts for fast tests and the brain demo: synthetic chest X-rays (PNG / DICOM) and T1-like
brain MRIs (NIfTI, BIDS).

The cohorts are phantoms drawn on a coordinate grid, written as real image files together with a manifest that
follows the schema of ``data_manifests/README.md``. They carry the structure that makes prior knowledge matter:

- **age and sex change the anatomy** (heart size, aortic knob, diaphragm level, bone density and breast shadows
  on the chest X-rays; head size, cortical thickness, ventricle size and atrophy on the brains);
- **each site changes the acquisition** (intensity offset, gain and gamma, noise, blur, field of view, burned-in
  marker, MONOCHROME1 storage for the X-rays; intensity scale, grey/white contrast, Rician noise, bias field and
  field of view for the MRIs), so site is a nuisance attribute;
- **a diagnosis is visible and more frequent with age** (``label_cardiomegaly``: enlarged heart;
  ``label_effusion``: blunted costophrenic angle with a basal opacity; ``label_lesion``: T1-hypointense
  periventricular white-matter lesions).

The metadata distributions come from real tables, summarised once into the constants below so that the package
works without ``../shared`` (tests recompute them from the real tables when those are present).

Everything is deterministic for a seed: the metadata come from ``numpy.random.default_rng(seed)``, each image's
noise from ``default_rng([seed, index])``, and the DICOM UIDs from ``pydicom.uid.generate_uid(entropy_srcs=...)``.
Site profiles depend only on the number of sites, not on the seed, so that different seeds draw new patients from
the same hospitals.
"""

from __future__ import annotations

import datetime
import gzip
import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock

from monai_du.io import DoneMarker, package_version

__all__ = [
    "make_cxr_cohort",
    "make_brain_cohort",
    "cxr_site_profiles",
    "brain_site_profiles",
    "NIH_AGE_BIN_EDGES",
    "NIH_PATIENT_AGE_HIST",
    "NIH_IMAGES_PER_PATIENT",
    "NIH_FOLLOWUP_AGE_STEP",
    "NIH_AP_FRACTION",
    "CHEXPERT_LABEL_LOGIT",
    "ABIDE_SITES",
    "BRAIN_LESION_LOGIT",
    "DEMO_COHORT_DEFAULTS",
    "ensure_demo_cohort",
]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# Real-table summaries (computed once; tests/test_cohorts.py recomputes them from ../shared/data when present).
# ---------------------------------------------------------------------------------------------------------------

#: Edges (years) of the 20 age bins used for NIH_PATIENT_AGE_HIST; the last bin is closed on the right.
NIH_AGE_BIN_EDGES: tuple[int, ...] = tuple(range(0, 101, 5))

#: Patients per age bin at their first study (lowest ``Follow-up #``), per sex, from NIH ChestX-ray14
#: ``Data_Entry_2017_v2020.csv`` (112,120 images, 30,805 patients: 16,630 M, 14,175 F); columns ``Patient Age``,
#: ``Patient Gender``, ``Patient ID``, ``Follow-up #``. np.histogram(age, NIH_AGE_BIN_EDGES).
NIH_PATIENT_AGE_HIST: dict[str, tuple[int, ...]] = {
    "M": (129, 225, 316, 499, 901, 1062, 1259, 1264, 1477, 1695, 1913, 1892, 1640, 1119, 708, 354, 131, 40, 6, 0),
    "F": (104, 168, 254, 397, 804, 961, 1178, 1239, 1487, 1686, 1745, 1567, 1165, 723, 367, 215, 82, 27, 5, 1),
}

#: Number of NIH patients with exactly 1, 2, ..., 10 images, and (last entry) with more than 10 images.
NIH_IMAGES_PER_PATIENT: tuple[int, ...] = (17503, 4113, 2100, 1330, 938, 787, 608, 494, 387, 320, 2225)

#: Histogram of the age difference (whole years, 0..13) between consecutive NIH studies of one patient,
#: ordered by ``Follow-up #`` (81,315 differences).
NIH_FOLLOWUP_AGE_STEP: tuple[int, ...] = (67333, 9348, 2293, 1010, 508, 325, 178, 139, 82, 46, 28, 16, 7, 2)

#: Fraction of NIH images with ``View Position == "AP"`` (44,810 / 112,120).
NIH_AP_FRACTION: float = 0.3997

#: Age logistic models of the CheXpert training table (223,414 images): ``logit P(label == 1) = b0 + b1 * (age - 50)
#: / 10``, fitted by maximum likelihood (scikit-learn ``LogisticRegression(C=1e6)``) with blank, 0 and -1 as
#: negatives. Columns ``Cardiomegaly`` (12.1 % positive) and ``Pleural Effusion`` (38.6 % positive). CheXpert is used
#: rather than NIH because NIH's text-mined ``Cardiomegaly`` shows almost no age trend (b1 = 0.015).
CHEXPERT_LABEL_LOGIT: dict[str, tuple[float, float]] = {
    "cardiomegaly": (-2.1603, 0.1448),
    "effusion": (-0.6115, 0.1340),
}

#: ABIDE I phenotypic table (1,112 subjects, 20 sites): per ``SITE_ID`` the number of subjects, the number of
#: females (``SEX == 2``) and the 0, 10, ..., 100 % quantiles of ``AGE_AT_SCAN`` (numpy's linear interpolation,
#: rounded to 0.01 y). Ordered by site size.
ABIDE_SITES: dict[str, tuple[int, int, tuple[float, ...]]] = {
    "NYU": (184, 37, (6.47, 8.53, 9.8, 10.85, 12.1, 13.46, 14.73, 16.75, 20.83, 24.19, 39.1)),
    "UM_1": (110, 26, (8.2, 9.79, 10.8, 11.27, 12.2, 12.85, 14.0, 15.23, 16.18, 17.44, 19.2)),
    "USM": (101, 0, (8.77, 14.41, 16.38, 17.33, 18.28, 20.17, 22.44, 25.43, 28.09, 32.96, 50.22)),
    "UCLA_1": (82, 11, (8.36, 10.42, 11.07, 11.72, 12.38, 13.34, 13.76, 14.5, 14.98, 16.02, 17.94)),
    "MAX_MUN": (57, 7, (7.0, 10.6, 12.2, 21.8, 23.4, 26.0, 29.0, 31.2, 32.8, 45.0, 58.0)),
    "PITT": (57, 8, (9.33, 12.2, 12.99, 13.92, 15.49, 16.99, 19.13, 21.27, 24.18, 31.08, 35.2)),
    "YALE": (56, 16, (7.0, 8.8, 9.92, 11.0, 11.92, 12.75, 13.75, 14.29, 15.75, 16.58, 17.83)),
    "KKI": (55, 13, (8.07, 8.39, 8.5, 9.3, 9.73, 10.18, 10.47, 10.81, 11.19, 11.83, 12.77)),
    "TRINITY": (49, 0, (12.0, 12.73, 13.8, 14.76, 15.4, 16.83, 17.91, 19.38, 19.93, 21.45, 25.91)),
    "STANFORD": (40, 8, (7.53, 8.26, 8.41, 8.93, 9.1, 9.42, 10.06, 11.2, 11.73, 12.26, 12.94)),
    "CALTECH": (38, 8, (17.0, 19.91, 20.2, 20.9, 21.84, 23.1, 24.64, 29.19, 38.6, 44.13, 56.2)),
    "OLIN": (36, 5, (10.0, 12.0, 14.0, 15.0, 16.0, 17.0, 18.0, 19.0, 20.0, 21.0, 24.0)),
    "SDSU": (36, 7, (8.67, 12.41, 12.9, 13.56, 13.88, 14.44, 14.98, 15.56, 16.13, 16.6, 17.15)),
    "LEUVEN_2": (35, 8, (12.1, 12.3, 12.48, 13.64, 13.86, 14.2, 14.3, 14.7, 15.22, 16.44, 16.9)),
    "UM_2": (35, 2, (12.8, 13.24, 13.96, 14.42, 14.8, 15.2, 15.8, 16.5, 17.24, 17.8, 28.8)),
    "SBL": (30, 0, (20.0, 26.9, 27.0, 30.0, 31.0, 33.5, 36.0, 37.3, 39.4, 42.0, 64.0)),
    "LEUVEN_1": (29, 0, (18.0, 19.0, 19.0, 21.0, 22.0, 22.0, 22.0, 23.0, 24.4, 28.2, 32.0)),
    "OHSU": (28, 0, (8.0, 8.92, 9.41, 9.69, 10.01, 10.4, 10.66, 11.44, 12.19, 13.85, 15.23)),
    "CMU": (27, 6, (19.0, 20.6, 21.0, 21.8, 24.4, 27.0, 27.0, 30.0, 31.0, 33.0, 40.0)),
    "UCLA_2": (27, 2, (9.79, 10.55, 11.26, 11.7, 12.03, 12.64, 12.87, 13.09, 13.34, 14.16, 16.47)),
}

#: Design choice, not fitted on a real table (ABIDE has no such label): ``logit P(lesion) = b0 + b1 * (age - 20) /
#: 10``, i.e. 15 % at 20 years and an odds ratio of 2.0 per decade.
BRAIN_LESION_LOGIT: tuple[float, float] = (-1.7346, 0.6931)

_MANUFACTURERS = (
    ("Agfa", "DX-D 300"),
    ("Carestream Health", "DRX-Evolution"),
    ("FUJIFILM Corporation", "FCR PROFECT"),
    ("GE Healthcare", "Discovery XR656"),
    ("Philips Medical Systems", "DigitalDiagnost"),
    ("Siemens Healthineers", "Ysio Max"),
    ("Canon Medical Systems", "CXDI-710C"),
    ("Konica Minolta", "AeroDR"),
)
_SOP_CLASS = {"DX": "1.2.840.10008.5.1.4.1.1.1.1", "CR": "1.2.840.10008.5.1.4.1.1.1"}
_UID_ROOT = "monai_du-demo-cxr"


# ---------------------------------------------------------------------------------------------------------------
# Small numerical helpers
# ---------------------------------------------------------------------------------------------------------------


def _spread(n: int, lo: float, hi: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` values spread over [lo, hi] (one per stratum, strata in random order): a 1D Latin hypercube."""
    strata = rng.permutation(n)
    return lo + (hi - lo) * (strata + rng.uniform(0.2, 0.8, size=n)) / n


def _ramp(signed_distance: np.ndarray, width: float) -> np.ndarray:
    """Soft inside-indicator: 1 well inside (distance > width/2), 0 well outside, linear partial volume between."""
    return np.clip(signed_distance / width + 0.5, 0.0, 1.0)


def _logistic(x: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _label_logits(
    labels: Sequence[str],
    prevalence: dict[str, float] | None,
    age_odds_ratio: dict[str, float] | None,
) -> dict[str, tuple[float, float]]:
    """Per label (b0, b1) of ``logit p = b0 + b1 * (age - 50) / 10``, defaults from CHEXPERT_LABEL_LOGIT."""
    out = {}
    for name in labels:
        if name not in CHEXPERT_LABEL_LOGIT:
            raise ValueError(f"unknown label {name!r}; choose from {sorted(CHEXPERT_LABEL_LOGIT)}.")
        b0, b1 = CHEXPERT_LABEL_LOGIT[name]
        if age_odds_ratio and name in age_odds_ratio:
            if age_odds_ratio[name] <= 0:
                raise ValueError(f"age_odds_ratio[{name!r}] must be > 0, got {age_odds_ratio[name]}.")
            b1 = math.log(age_odds_ratio[name])
        if prevalence and name in prevalence:
            p = prevalence[name]
            if not 0.0 < p < 1.0:
                raise ValueError(f"prevalence[{name!r}] must be in (0, 1), got {p}.")
            b0 = math.log(p / (1 - p))  # prevalence at age 50
        out[name] = (b0, b1)
    for d, what in ((prevalence, "prevalence"), (age_odds_ratio, "age_odds_ratio")):
        unknown = set(d or {}) - set(labels)
        if unknown:
            raise ValueError(f"{what} names labels {sorted(unknown)} that are not in labels={list(labels)}.")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Chest X-ray cohort
# ---------------------------------------------------------------------------------------------------------------


def cxr_site_profiles(n_sites: int = 4) -> list[dict]:
    """Acquisition profiles of the demo chest X-ray sites (independent of the cohort seed).

    Each parameter is spread over its range across the sites (a Latin hypercube with a fixed seed), so that any two
    sites differ clearly in at least some parameters.

    Args:
        n_sites: number of sites, >= 1.

    Returns:
        one dict per site: ``site``, ``institution``, ``manufacturer``, ``model``, ``modality`` ("DX"/"CR"),
        ``photometric`` ("MONOCHROME1"/"MONOCHROME2", DICOM storage only), ``weight`` (share of the cohort),
        ``ap_fraction``, ``offset``, ``gain``, ``gamma``, ``noise``, ``blur``, ``zoom``, ``shift`` (x, y),
        ``marker`` (None, "TL", "TR") and ``shutter`` (collimation border as a fraction of the width).
    """
    if n_sites < 1:
        raise ValueError(f"n_sites must be >= 1, got {n_sites}.")
    rng = np.random.default_rng(20240917 + n_sites)
    cols = {
        "offset": _spread(n_sites, 0.0, 0.14, rng),
        "gain": _spread(n_sites, 0.72, 0.98, rng),
        "gamma": _spread(n_sites, 0.7, 1.45, rng),
        "noise": _spread(n_sites, 0.006, 0.05, rng),
        "blur": _spread(n_sites, 0.0, 0.7, rng),
        "zoom": _spread(n_sites, 0.88, 1.16, rng),
        "shift_y": _spread(n_sites, -0.07, 0.07, rng),
        "ap_fraction": _spread(n_sites, NIH_AP_FRACTION - 0.2, NIH_AP_FRACTION + 0.2, rng),
        "shutter": _spread(n_sites, 0.0, 0.06, rng),
    }
    weights = rng.dirichlet(np.full(n_sites, 6.0))
    profiles = []
    for k in range(n_sites):
        letter = chr(ord("A") + k) if k < 26 else f"{k:02d}"
        manufacturer, model = _MANUFACTURERS[k % len(_MANUFACTURERS)]
        modality = "CR" if k % 2 == 1 else "DX"
        profiles.append(
            {
                "site": f"site{letter}",
                "institution": f"Demo Hospital {letter}",
                "manufacturer": manufacturer,
                "model": model,
                "modality": modality,
                "photometric": "MONOCHROME1" if k % 4 == 1 else "MONOCHROME2",
                "weight": float(weights[k]),
                "ap_fraction": float(cols["ap_fraction"][k]),
                "offset": float(cols["offset"][k]),
                "gain": float(cols["gain"][k]),
                "gamma": float(cols["gamma"][k]),
                "noise": float(cols["noise"][k]),
                "blur": float(cols["blur"][k]),
                "zoom": float(cols["zoom"][k]),
                "shift": (0.0, float(cols["shift_y"][k])),
                "marker": (None, "TL", "TR")[k % 3],
                "shutter": float(cols["shutter"][k]) if k % 2 == 0 else 0.0,
            }
        )
    return profiles


def _sample_nih_age(rng: np.random.Generator, sex: str) -> int:
    hist = np.asarray(NIH_PATIENT_AGE_HIST[sex], dtype=np.float64)
    b = rng.choice(len(hist), p=hist / hist.sum())
    lo, hi = NIH_AGE_BIN_EDGES[b], NIH_AGE_BIN_EDGES[b + 1]
    return int(rng.integers(lo, hi + (1 if b == len(hist) - 1 else 0)))


def _sample_cxr_table(
    n: int, seed: int, profiles: list[dict], logits: dict[str, tuple[float, float]], max_images_per_patient: int
) -> pd.DataFrame:
    """Metadata of every image, patients drawn until ``n`` images exist (the last patient may be truncated)."""
    rng = np.random.default_rng(seed)
    counts = np.asarray(NIH_IMAGES_PER_PATIENT[: min(max_images_per_patient, 10)], dtype=np.float64)
    if max_images_per_patient > 10:
        counts = np.append(counts, NIH_IMAGES_PER_PATIENT[10])  # ">10" lumped at max_images_per_patient
    steps = np.asarray(NIH_FOLLOWUP_AGE_STEP, dtype=np.float64)
    n_m, n_f = sum(NIH_PATIENT_AGE_HIST["M"]), sum(NIH_PATIENT_AGE_HIST["F"])
    site_w = np.array([p["weight"] for p in profiles])
    rows: list[dict] = []
    pid = 0
    while len(rows) < n:
        k_images = int(rng.choice(len(counts), p=counts / counts.sum())) + 1
        if max_images_per_patient > 10 and k_images == len(counts):
            k_images = max_images_per_patient
        k_images = min(k_images, n - len(rows))
        sex = "M" if rng.random() < n_m / (n_m + n_f) else "F"
        age = float(_sample_nih_age(rng, sex))
        site = int(rng.choice(len(profiles), p=site_w / site_w.sum()))
        # patient-level anatomy and disease liabilities, kept across follow-ups
        anatomy = {
            "width": float(rng.normal(1.0, 0.04)),
            "ctr_resid": float(rng.normal(0.0, 0.025)),
            "lung_h": float(rng.normal(1.0, 0.04)),
            "rib_phase": float(rng.uniform(-0.3, 0.3)),
            "heart_dx": float(rng.normal(0.0, 0.03)),
            "cardio_extra": float(rng.uniform(0.09, 0.16)),
            "eff_side": int(rng.integers(0, 3)),  # 0 right, 1 left, 2 both
            "eff_height": float(rng.uniform(0.25, 0.50)),
        }
        liability = {name: float(rng.random()) for name in logits}
        days = int(rng.integers(0, 3650))
        if age < 1:  # infants carry an age in months
            age = float(rng.integers(1, 12)) / 12.0
        for k in range(k_images):
            if k > 0:
                step = int(rng.choice(len(steps), p=steps / steps.sum()))
                age = min(age + step, 100.0)
                days += 365 * step + int(rng.integers(3, 120))
            view = "AP" if rng.random() < profiles[site]["ap_fraction"] else "PA"
            row = {
                "patient_index": pid,
                "study_index": k,
                "sex": sex,
                "age": age,
                "site_index": site,
                "view": view,
                "study_days": days,
                "tilt": float(rng.normal(0.0, 0.03)),
                "dx": float(rng.normal(0.0, 0.025)),
                "inspiration": float(rng.normal(1.0, 0.03)),
                **anatomy,
            }
            for name, (b0, b1) in logits.items():
                # a fixed patient liability below a rising probability: once positive, stays positive with age
                row[f"label_{name}"] = int(liability[name] < _logistic(b0 + b1 * (age - 50.0) / 10.0))
            rows.append(row)
        pid += 1
    return pd.DataFrame(rows)


def _cxr_attenuation(row: dict, xx: np.ndarray, yy: np.ndarray, px: float) -> np.ndarray:
    """Line-integral "attenuation" of one chest, (H, W), on patient coordinates ``xx``, ``yy`` (PA display)."""
    age, female, ap = row["age"], row["sex"] == "F", row["view"] == "AP"
    eps = 1.5 * px  # partial-volume width in normalised units
    child = math.exp(-age / 6.0)
    w = 0.74 * row["width"] * (0.93 if female else 1.0) * (1.0 - 0.12 * child)
    ax = np.abs(xx)

    # body: a cylinder-like soft-tissue slab narrowing to the neck above y = -0.8
    neck = np.clip((-0.78 - yy) / 0.25, 0.0, 1.0)
    body_w = 1.18 * w * (1.0 - 0.62 * neck)
    a = 1.0 * np.sqrt(np.clip(1.0 - (xx / body_w) ** 2, 0.0, 1.0))

    # spine, mediastinum and heart (solid organs displace the lungs)
    spine = _ramp(0.075 - ax, eps) * (0.85 + 0.15 * np.cos(2 * math.pi * yy / 0.16))
    a += 0.32 * spine
    medi = _ramp(0.10 * w / 0.74 - np.abs(xx - 0.015), 2 * eps) * _ramp(0.35 - yy, 4 * eps)
    a += 0.30 * medi

    insp = row["inspiration"] * row["lung_h"] * (0.94 if ap else 1.0)
    dome_base = (0.50 + 0.0015 * (age - 40.0)) * insp
    lung_cy, lung_b, lung_a, lung_cx = -0.08, 0.64 * insp, 0.41 * w, 0.47 * w

    # heart: cardiothoracic ratio grows with age; cardiomegaly and AP magnification enlarge it
    ctr = 0.41 + 0.0010 * (age - 40.0) + 0.07 * child + row["ctr_resid"]
    if row.get("label_cardiomegaly", 0) == 1:
        ctr += row["cardio_extra"]
    if ap:
        ctr *= 1.10
    half_w = ctr * (lung_cx + lung_a)
    hcx, hcy = 0.22 * half_w + row["heart_dx"], dome_base - 0.70 * half_w + 0.02
    r2 = ((xx - hcx) / half_w) ** 2 + ((yy - hcy) / (0.72 * half_w)) ** 2
    a += 0.55 * np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))
    heart = _ramp((1.0 - np.sqrt(r2)) * half_w, 2 * eps)

    # lungs: two ellipses cut by the hemidiaphragm domes, displaced by heart and mediastinum
    lungs = np.zeros_like(xx)
    eff_mask = np.zeros_like(xx)
    for side in (-1.0, 1.0):  # -1: image left = patient's right
        cx = side * lung_cx
        r2 = ((xx - cx) / lung_a) ** 2 + ((yy - lung_cy) / lung_b) ** 2
        dome = dome_base + (0.03 if side > 0 else 0.0) - 0.16 * (1.0 - ((xx - cx) / lung_a) ** 2)
        profile = np.sqrt(np.clip(1.0 - r2, 0.0, 1.0)) * _ramp(dome - yy, 2 * eps)
        lungs += profile
        if row.get("label_effusion", 0) == 1 and (row["eff_side"] == 2 or (row["eff_side"] == 0) == (side < 0)):
            # fluid in the costophrenic recess: a meniscus rising laterally
            lateral = np.clip(side * (xx - cx) / lung_a, -1.0, 1.0)
            level = dome_base + 0.03 * (side > 0) - row["eff_height"] * (0.75 + 0.45 * lateral)
            eff_mask += profile * (0.85 * _ramp(yy - level, 3 * eps) + 0.15 * _ramp(yy - level + 0.2, 0.2))
    # abdomen below the hemidiaphragms: liver and spleen as dense as the heart (cardiophrenic silhouette)
    sx = np.where(xx < 0, -1.0, 1.0)
    diaphragm = dome_base + 0.03 * (sx > 0) - 0.16 * np.clip(1.0 - ((xx - sx * lung_cx) / lung_a) ** 2, 0.0, 1.0)
    a += 0.5 * _ramp(yy - diaphragm, 3 * eps) * np.sqrt(np.clip(1.0 - (xx / body_w) ** 2, 0.0, 1.0))
    keep = (1.0 - heart) * (1.0 - medi)
    a -= 0.80 * lungs * keep
    a += 0.80 * eff_mask * keep

    # aortic knob: unfolds and grows with age
    knob_r = 0.045 + 0.0009 * max(age - 30.0, 0.0)
    r2 = ((xx - (0.10 * w / 0.74 + 0.6 * knob_r)) ** 2 + (yy + 0.30) ** 2) / knob_r**2
    a += 0.35 * np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))

    # bones: density falls after 30, faster for women after 50
    bone = 1.0 - 0.006 * max(age - 30.0, 0.0) - (0.007 * max(age - 50.0, 0.0) if female else 0.0)
    bone = max(bone, 0.35)
    rib_y = yy - 0.42 * (ax / w) ** 2 + 0.05 * (ax / w) - row["rib_phase"] * 0.1
    v = (rib_y + 0.82) / 0.135
    in_cage = (v > -0.5) & (v < 9.5)
    ribs = np.exp(-(((v - np.round(v)) * 0.135 / 0.026) ** 2)) * in_cage * _ramp(w * 0.98 - ax, 2 * eps)
    a += 0.20 * bone * ribs * _ramp(ax - 0.06, eps)
    clav_y = -0.80 - (0.06 if ap else 0.0) - 0.10 * (ax / w)
    clav = np.exp(-(((yy - clav_y) / 0.03) ** 2)) * _ramp(0.78 * w - ax, 2 * eps) * _ramp(ax - 0.05, eps)
    a += 0.40 * bone * clav
    if ap:  # scapulae projected over the lateral lung fields
        a += 0.12 * bone * _ramp(ax - 0.80 * w, 3 * eps) * _ramp(0.2 - yy, 4 * eps) * _ramp(yy + 0.7, 4 * eps)

    # breast shadows over the lower lateral fields
    if female and age >= 14:
        amp = 0.22 * min((age - 12.0) / 10.0, 1.0)
        for side in (-1.0, 1.0):
            r2 = ((xx - side * 0.56 * w) / (0.42 * w)) ** 2 + ((yy - 0.46) / 0.30) ** 2
            a += amp * np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))

    # gastric air bubble under the left hemidiaphragm
    r2 = ((xx - 0.45 * w) / 0.10) ** 2 + ((yy - dome_base - 0.17) / 0.06) ** 2
    a -= 0.22 * np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))
    return np.clip(a, 0.0, None)


def _render_cxr(row: dict, profile: dict, size: int, seed: int, index: int) -> np.ndarray:
    """One chest X-ray as float64 (size, size) in [0, 1], row-major (rows = top to bottom)."""
    rng = np.random.default_rng([seed, index])
    u = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    uu, vv = np.meshgrid(u, u)  # uu: columns (x), vv: rows (y)
    zoom = profile["zoom"]
    th = row["tilt"]
    xs, ys = uu / zoom, vv / zoom + profile["shift"][1]
    xx = math.cos(th) * xs - math.sin(th) * ys + row["dx"]
    yy = math.sin(th) * xs + math.cos(th) * ys
    att = _cxr_attenuation(row, xx, yy, px=2.0 / size / zoom)
    img = 1.0 - np.exp(-1.25 * att)
    img = profile["offset"] + profile["gain"] * img ** profile["gamma"]
    if profile["blur"] > 0:
        b = profile["blur"] / 2.0
        for axis in (0, 1):
            img = (1 - 2 * b) * img + b * (np.roll(img, 1, axis) + np.roll(img, -1, axis))
    img = img + profile["noise"] * np.sqrt(np.clip(img, 0.05, None)) * rng.standard_normal(img.shape)
    if profile["shutter"] > 0:  # collimator shutters: bright unexposed borders
        m = max(int(round(profile["shutter"] * size)), 1)
        img[:, :m] = img[:, -m:] = 0.92
    if profile["marker"] is not None:  # burned-in laterality marker
        h = max(size // 12, 2)
        margin = max(size // 16, 1)
        r0, c0 = margin, (margin if profile["marker"] == "TL" else size - margin - h)
        img[r0 : r0 + h, c0 : c0 + max(h // 3, 1)] = 1.0
        img[r0 + h - max(h // 3, 1) : r0 + h, c0 : c0 + h] = 1.0
    return np.clip(img, 0.0, 1.0)


def _dicom_age(age: float) -> str:
    """DICOM AS value: whole years ``065Y``, or months ``006M`` under one year."""
    if age < 1.0:
        return f"{int(round(age * 12)):03d}M"
    return f"{int(age):03d}Y"


def _write_cxr_dicom(path: Path, pixels: np.ndarray, meta: dict, profile: dict, fov_mm: float) -> None:
    """Write a (rows, cols) float image in [0, 1] as a 12-bit DX/CR DICOM file."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    stored = np.round(pixels * 4095.0).astype(np.uint16)
    if profile["photometric"] == "MONOCHROME1":
        stored = (4095 - stored).astype(np.uint16)
    sop_class = _SOP_CLASS[profile["modality"]]
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = sop_class
    fm.MediaStorageSOPInstanceUID = meta["sop_uid"]
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    fm.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta["sop_uid"]
    ds.StudyInstanceUID = meta["study_id"]
    ds.SeriesInstanceUID = meta["series_id"]
    ds.StudyDate = meta["study_date"]
    ds.SeriesDate = meta["study_date"]
    ds.StudyTime = "100000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"{meta['study_index'] + 1}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientName = ""
    ds.PatientID = meta["patient_id"]
    ds.PatientBirthDate = ""
    ds.PatientSex = meta["sex"]
    ds.PatientAge = _dicom_age(meta["age"])
    ds.Modality = profile["modality"]
    ds.InstitutionName = profile["institution"]
    ds.Manufacturer = profile["manufacturer"]
    ds.ManufacturerModelName = profile["model"]
    ds.StationName = f"{profile['site'].upper()}-XR1"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = meta["view"]
    ds.PatientOrientation = ["L", "F"]
    if profile["modality"] == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageLaterality = "U"
    spacing = f"{fov_mm / pixels.shape[0]:.4f}"
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelSpacing = [spacing, spacing]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = profile["photometric"]
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "2048"
    ds.WindowWidth = "4096"
    ds.PixelData = stored.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def make_cxr_cohort(
    out_dir: str | Path,
    n: int = 1000,
    seed: int = 0,
    size: int = 64,
    formats: Sequence[str] = ("png",),
    n_sites: int = 4,
    bit_depth: int = 8,
    labels: Sequence[str] = ("cardiomegaly", "effusion"),
    prevalence: dict[str, float] | None = None,
    age_odds_ratio: dict[str, float] | None = None,
    max_images_per_patient: int = 5,
    progress: bool = False,
) -> Path:
    """Generate the demo chest X-ray cohort as real PNG and/or DICOM files plus ``manifest.csv``.

    Patients are drawn with NIH ChestX-ray14's age-by-sex distribution and follow-up counts (capped at
    ``max_images_per_patient``; follow-ups age by NIH's between-study steps and keep the patient's anatomy), so
    patient-level splits matter. Each label has a fixed patient liability compared with a probability that is
    logistic in age (CheXpert's fit by default), so prevalence rises with age and a positive patient stays positive.

    Files: ``images/<patient_id>/<patient_id>_<k>.png`` (grey, 8- or 16-bit) and/or ``.dcm`` (12-bit DX or CR,
    PatientAge ``065Y``, PatientSex, InstitutionName and Manufacturer per site, ViewPosition, UIDs derived from the
    seed; one site in four stores MONOCHROME1). The PNG shows MONOCHROME2 (bone bright) pixels for every site.

    Args:
        out_dir: output folder, created if needed; the manifest's ``image`` paths are relative to it.
        n: number of images, >= 1.
        seed: seed of everything random.
        size: image side in pixels, >= 16.
        formats: any of "png" and "dicom"; ``image`` points at the first, and with several formats each also gets
            an ``image_<format>`` column.
        n_sites: number of acquisition sites (see :func:`cxr_site_profiles`).
        bit_depth: PNG bit depth, 8 or 16.
        labels: diagnoses to simulate, among "cardiomegaly" and "effusion"; each becomes ``label_<name>`` (0/1).
        prevalence: optional prevalence at age 50 per label (overrides CheXpert's intercept).
        age_odds_ratio: optional odds ratio per decade of age per label (overrides CheXpert's slope).
        max_images_per_patient: cap on follow-up images per patient, >= 1.
        progress: show a tqdm progress bar.

    Returns:
        path of ``out_dir/manifest.csv``, with columns image, patient_id, study_id, series_id, age, sex, site, view,
        modality, the ``label_*`` columns and, with several formats, ``image_<format>``.
    """
    formats = tuple(f.lower() for f in ([formats] if isinstance(formats, str) else formats))
    bad = [f for f in formats if f not in ("png", "dicom")]
    if not formats or bad:
        raise ValueError(f"formats must be a non-empty subset of ('png', 'dicom'), got {formats}.")
    if n < 1 or size < 16 or max_images_per_patient < 1:
        raise ValueError(
            f"need n >= 1, size >= 16 and max_images_per_patient >= 1; got {n}, {size}, {max_images_per_patient}."
        )
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}.")
    from PIL import Image

    logits = _label_logits(labels, prevalence, age_odds_ratio)
    profiles = cxr_site_profiles(n_sites)
    table = _sample_cxr_table(n, seed, profiles, logits, max_images_per_patient)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from pydicom.uid import generate_uid

    records = []
    iterator = table.to_dict("records")
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="cxr cohort", unit="img")
    for index, row in enumerate(iterator):
        profile = profiles[row["site_index"]]
        patient_id = f"P{seed:04d}{row['patient_index']:05d}"
        study_key = [_UID_ROOT, str(seed), patient_id, str(row["study_index"])]
        # UIDs whatever the formats, so that a seed gives the same manifest columns for PNG and DICOM
        study_uid = generate_uid(entropy_srcs=study_key + ["study"])
        series_uid = generate_uid(entropy_srcs=study_key + ["series"])
        sop_uid = generate_uid(entropy_srcs=study_key + ["sop"])
        pixels = _render_cxr(row, profile, size, seed, index)
        stem = f"images/{patient_id}/{patient_id}_{row['study_index']:02d}"
        rec = {
            "patient_id": patient_id,
            "study_id": study_uid,
            "series_id": series_uid,
            "age": float(round(row["age"], 3)),
            "sex": row["sex"],
            "site": profile["site"],
            "view": row["view"],
            "modality": profile["modality"],
        }
        for name in labels:
            rec[f"label_{name}"] = int(row[f"label_{name}"])
        (out / stem).parent.mkdir(parents=True, exist_ok=True)
        for fmt in formats:
            if fmt == "png":
                rel = f"{stem}.png"
                if bit_depth == 8:
                    Image.fromarray(np.round(pixels * 255.0).astype(np.uint8)).save(out / rel)
                else:
                    Image.fromarray(np.round(pixels * 65535.0).astype(np.uint16)).save(out / rel)
            else:
                rel = f"{stem}.dcm"
                date = datetime.date(2010, 1, 1) + datetime.timedelta(days=int(row["study_days"]))
                meta = {
                    **rec,
                    "sop_uid": sop_uid,
                    "study_index": int(row["study_index"]),
                    "study_date": date.strftime("%Y%m%d"),
                }
                _write_cxr_dicom(out / rel, pixels, meta, profile, fov_mm=430.0 / profile["zoom"])
            rec[f"image_{fmt}"] = rel
        records.append({"image": rec[f"image_{formats[0]}"], **rec})
    df = pd.DataFrame(records)
    if len(formats) == 1:
        df = df.drop(columns=[f"image_{formats[0]}"])
    path = out / "manifest.csv"
    df.to_csv(path, index=False, lineterminator="\n")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Brain MRI cohort
# ---------------------------------------------------------------------------------------------------------------


def brain_site_profiles(n_sites: int = 4, sites: Sequence[str] | None = None) -> list[dict]:
    """Acquisition profiles of the demo brain MRI sites (independent of the cohort seed).

    The demographics of each site (number of subjects, sex ratio, age quantiles) are those of an ABIDE I site; the
    scanner properties are invented and spread across sites.

    Args:
        n_sites: number of sites, 1..20; the largest ABIDE sites are used unless ``sites`` names them.
        sites: optional ABIDE ``SITE_ID`` values to use instead.

    Returns:
        one dict per site: ``site`` (the ABIDE id), ``n_real``, ``female_fraction``, ``age_quantiles``, ``gain``,
        ``gm_contrast`` (GM / WM intensity), ``noise`` (fraction of WM), ``bias`` (bias-field strength),
        ``fov_mm`` and ``offset_mm`` (3,).
    """
    if sites is None:
        if not 1 <= n_sites <= len(ABIDE_SITES):
            raise ValueError(f"n_sites must be in 1..{len(ABIDE_SITES)}, got {n_sites}.")
        sites = list(ABIDE_SITES)[:n_sites]
    unknown = [s for s in sites if s not in ABIDE_SITES]
    if unknown or not sites:
        raise ValueError(f"unknown ABIDE sites {unknown}; choose from {list(ABIDE_SITES)}.")
    m = len(sites)
    rng = np.random.default_rng(7031 + m)
    gain = _spread(m, 600.0, 1400.0, rng)
    contrast = _spread(m, 0.55, 0.78, rng)
    noise = _spread(m, 0.012, 0.05, rng)
    bias = _spread(m, 0.0, 0.3, rng)
    fov = _spread(m, 215.0, 260.0, rng)
    profiles = []
    for k, s in enumerate(sites):
        n_real, n_female, q = ABIDE_SITES[s]
        profiles.append(
            {
                "site": s,
                "n_real": n_real,
                "female_fraction": n_female / n_real,
                "age_quantiles": q,
                "gain": float(gain[k]),
                "gm_contrast": float(contrast[k]),
                "noise": float(noise[k]),
                "bias": float(bias[k]),
                "bias_dir": tuple(float(v) for v in rng.normal(size=3)),
                "fov_mm": float(fov[k]),
                "offset_mm": tuple(float(v) for v in rng.normal(0.0, 6.0, size=3)),
            }
        )
    return profiles


def _ellipsoid_r2(x: np.ndarray, y: np.ndarray, z: np.ndarray, c: Sequence[float], a: Sequence[float]) -> np.ndarray:
    """Normalised squared radius on a broadcast grid: x (X,1,1), y (1,Y,1), z (1,1,Z) -> (X,Y,Z)."""
    return ((x - c[0]) / a[0]) ** 2 + ((y - c[1]) / a[1]) ** 2 + ((z - c[2]) / a[2]) ** 2


def _inside(r2: np.ndarray, mean_axis: float, vx: float) -> np.ndarray:
    """Partial-volume indicator of an ellipsoid, from its normalised squared radius."""
    return _ramp((1.0 - np.sqrt(r2)) * mean_axis, vx)


def _render_brain(row: dict, profile: dict, size: int, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """One T1-like volume (size, size, size) int16 in RAS voxel order, and its affine (4, 4) in mm."""
    rng = np.random.default_rng([seed, index])
    age, female = row["age"], row["sex"] == "F"
    vx = profile["fov_mm"] / size
    off = np.asarray(profile["offset_mm"]) + np.asarray(row["shift"])
    coords = (np.arange(size, dtype=np.float32) - (size - 1) / 2.0) * vx
    x = (coords - off[0]).reshape(-1, 1, 1)
    y = (coords - off[1]).reshape(1, -1, 1)
    z = (coords - off[2]).reshape(1, 1, -1)

    growth = 1.0 - 0.07 * math.exp(-(age - 6.0) / 4.0)
    s = row["head_scale"] * (0.95 if female else 1.0) * growth
    head_a = (71.0 * s, 90.0 * s, 78.0 * s)
    atrophy = 0.05 * max(age - 25.0, 0.0)  # mm of extra CSF over the brain surface
    brain_a = tuple(h - 11.0 - atrophy for h in head_a)
    # phantom cortex: thicker than real so that 64^3 resolves it, thinning fastest in childhood and adolescence
    gm_thick = 6.0 - 2.0 * (1.0 - math.exp(-(age - 6.0) / 15.0)) - 0.01 * max(age - 30.0, 0.0)

    r2_head = _ellipsoid_r2(x, y, z, (0, 0, 0), head_a)
    img = 0.80 * _inside(r2_head, float(np.mean(head_a)), vx)  # scalp fat
    skull_a = tuple(h - 4.0 for h in head_a)
    img = img + (0.06 - img) * _inside(_ellipsoid_r2(x, y, z, (0, 0, 0), skull_a), float(np.mean(skull_a)), vx)
    csf_a = tuple(h - 10.0 for h in head_a)
    img = img + (0.15 - img) * _inside(_ellipsoid_r2(x, y, z, (0, 0, 0), csf_a), float(np.mean(csf_a)), vx)

    # brain with sulci: the zero set of a smooth random field f (unit variance, ~30 mm wavelength) marks the sulcal
    # fundi; near them the surface is pushed in by up to 12 mm, so the grey-matter ribbon follows the folds.
    r2_brain = _ellipsoid_r2(x, y, z, (0, 0, 4.0), brain_a)
    depth = (1.0 - np.sqrt(r2_brain)) * float(np.mean(brain_a))  # approx. mm inside the brain's hull
    f = np.zeros_like(depth)
    for k in range(len(row["fold_phase"])):
        w = row["fold_dirs"][k]
        f += np.cos((w[0] * x + w[1] * y + w[2] * z) * (2 * math.pi / 30.0) + row["fold_phase"][k])
    f *= math.sqrt(2.0 / len(row["fold_phase"]))
    width = 0.30 * (1.0 + 0.025 * max(age - 10.0, 0.0))  # sulci widen with age
    d_eff = depth - 12.0 * np.exp(-((f / width) ** 2))
    gm_level, wm_level = profile["gm_contrast"], 1.0
    img = img + (gm_level - img) * _ramp(d_eff, vx)
    img = img + (wm_level - img) * _ramp(d_eff - gm_thick, vx)

    # deep grey matter, ventricles (enlarging with age), lesions
    for side in (-1.0, 1.0):
        c = (side * 11.0, -6.0, 6.0)
        img = img + (0.5 * (gm_level + wm_level) - img) * _inside(_ellipsoid_r2(x, y, z, c, (8.0, 12.0, 8.0)), 9.0, vx)
    v = (1.0 + 0.01 * max(age - 6.0, 0.0) + 0.01 * max(age - 40.0, 0.0)) * row["vent_scale"]
    vent = np.zeros_like(img)
    for side in (-1.0, 1.0):
        a = (4.5 * v, 24.0 * min(v, 1.3), 8.0 * v)
        vent = np.maximum(vent, _inside(_ellipsoid_r2(x, y, z, (side * (4.0 + 2.0 * v), 2.0, 16.0), a), 9.0 * v, vx))
    img = img + (0.15 - img) * vent
    for c, rad in row["lesions"]:
        img = img + (0.32 - img) * _inside(_ellipsoid_r2(x, y, z, c, (rad, rad, 0.8 * rad)), rad, vx)

    # cerebellum (foliated) and brainstem
    cb = _inside(_ellipsoid_r2(x, y, z, (0.0, -48.0 * s, -34.0 * s), (44.0 * s, 24.0 * s, 16.0 * s)), 25.0 * s, vx)
    folia = gm_level + (wm_level - gm_level) * (0.5 + 0.5 * np.sin(z * (2 * math.pi / 7.0)))
    img = img + (folia - img) * cb
    stem = _ramp(9.0 * s - np.sqrt(x**2 + (y + 18.0 * s) ** 2), vx) * _ramp(-4.0 - z, vx)
    img = img + (0.92 - img) * stem

    # acquisition: bias field, Rician noise, scale
    d = np.asarray(profile["bias_dir"]) / (np.linalg.norm(profile["bias_dir"]) + 1e-12)
    lin = (d[0] * x + d[1] * y + d[2] * z) / 100.0
    img = img * np.exp(profile["bias"] * lin - 0.5 * profile["bias"] * (x**2 + y**2) / 100.0**2).astype(np.float32)
    sigma = np.float32(profile["noise"])
    n1 = rng.standard_normal(img.shape, dtype=np.float32)
    n2 = rng.standard_normal(img.shape, dtype=np.float32)
    img = np.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2)
    data = np.clip(np.round(img * profile["gain"]), 0, 32767).astype(np.int16)
    affine = np.diag([vx, vx, vx, 1.0])
    affine[:3, 3] = -(size - 1) / 2.0 * vx
    return data, affine


def _sample_brain_table(n: int, seed: int, profiles: list[dict], lesion_logit: tuple[float, float]) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    w = np.array([p["n_real"] for p in profiles], dtype=np.float64)
    rows = []
    b0, b1 = lesion_logit
    qs = np.linspace(0.0, 1.0, 11)
    for _ in range(n):
        k = int(rng.choice(len(profiles), p=w / w.sum()))
        p = profiles[k]
        age = float(np.interp(rng.random(), qs, p["age_quantiles"]))
        sex = "F" if rng.random() < p["female_fraction"] else "M"
        lesion = int(rng.random() < _logistic(b0 + b1 * (age - 20.0) / 10.0))
        dirs = rng.normal(size=(8, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        lesions = []
        if lesion:
            for _ in range(int(rng.integers(4, 9))):
                side = rng.choice([-1.0, 1.0])
                c = (side * rng.uniform(12.0, 24.0), rng.uniform(-25.0, 25.0), rng.uniform(12.0, 28.0))
                lesions.append((c, float(rng.uniform(4.5, 8.0))))
        rows.append(
            {
                "site_index": k,
                "age": round(age, 2),
                "sex": sex,
                "label_lesion": lesion,
                "head_scale": float(rng.normal(1.0, 0.03)),
                "vent_scale": float(rng.lognormal(0.0, 0.08)),
                "fold_dirs": dirs.tolist(),
                "fold_phase": rng.uniform(0, 2 * math.pi, size=8).tolist(),
                "shift": tuple(float(v) for v in rng.normal(0.0, 3.0, size=3)),
                "lesions": lesions,
            }
        )
    return pd.DataFrame(rows)


def make_brain_cohort(
    out_dir: str | Path,
    n: int = 200,
    seed: int = 0,
    size: int = 64,
    n_sites: int = 4,
    sites: Sequence[str] | None = None,
    lesion_prevalence_at_20: float | None = None,
    lesion_odds_ratio_per_decade: float | None = None,
    progress: bool = False,
) -> Path:
    """Generate the demo brain MRI cohort: T1-like NIfTI volumes in a BIDS layout plus ``manifest.csv``.

    Subjects are drawn per site with the ABIDE I site sizes, sex ratios and age quantiles (so site and age are
    confounded, as in ABIDE). Age thins the cortex, enlarges the ventricles and widens the sulci and the CSF over
    the brain (atrophy), and children have smaller heads; women have 5 % smaller heads. ``label_lesion`` marks
    T1-hypointense periventricular white-matter lesions, logistic in age (see BRAIN_LESION_LOGIT).

    Files: ``dataset_description.json``, ``participants.tsv`` (participant_id, age, sex, site, label_lesion),
    ``participants.json`` and ``sub-XXX/anat/sub-XXX_T1w.nii.gz`` (int16, RAS affine, voxel size = the site's
    field of view / size, i.e. ~3.7 mm at 64 and ~0.9 mm at 256).

    Args:
        out_dir: output folder (the BIDS root), created if needed.
        n: number of subjects, >= 1.
        seed: seed of everything random.
        size: volume side in voxels, >= 16.
        n_sites: number of sites (the largest ABIDE sites); ignored when ``sites`` is given.
        sites: ABIDE ``SITE_ID`` values whose demographics to use.
        lesion_prevalence_at_20: optional override of the lesion prevalence at age 20.
        lesion_odds_ratio_per_decade: optional override of the lesion odds ratio per decade.
        progress: show a tqdm progress bar.

    Returns:
        path of ``out_dir/manifest.csv`` with columns image, patient_id, age, sex, site, modality, label_lesion.
    """
    if n < 1 or size < 16:
        raise ValueError(f"need n >= 1 and size >= 16, got n={n}, size={size}.")
    import nibabel as nib

    b0, b1 = BRAIN_LESION_LOGIT
    if lesion_prevalence_at_20 is not None:
        if not 0.0 < lesion_prevalence_at_20 < 1.0:
            raise ValueError(f"lesion_prevalence_at_20 must be in (0, 1), got {lesion_prevalence_at_20}.")
        b0 = math.log(lesion_prevalence_at_20 / (1 - lesion_prevalence_at_20))
    if lesion_odds_ratio_per_decade is not None:
        if lesion_odds_ratio_per_decade <= 0:
            raise ValueError(f"lesion_odds_ratio_per_decade must be > 0, got {lesion_odds_ratio_per_decade}.")
        b1 = math.log(lesion_odds_ratio_per_decade)
    profiles = brain_site_profiles(n_sites, sites)
    table = _sample_brain_table(n, seed, profiles, (b0, b1))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(n)))
    records = []
    iterator = table.to_dict("records")
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="brain cohort", unit="vol")
    for index, row in enumerate(iterator):
        profile = profiles[row["site_index"]]
        sub = f"sub-{index + 1:0{width}d}"
        data, affine = _render_brain(row, profile, size, seed, index)
        img = nib.Nifti1Image(data, affine)
        img.header.set_xyzt_units("mm", "sec")
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        rel = f"{sub}/anat/{sub}_T1w.nii.gz"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        # gzip with mtime=0 so that the same seed gives byte-identical files
        (out / rel).write_bytes(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))
        records.append(
            {
                "image": rel,
                "patient_id": sub,
                "age": float(row["age"]),
                "sex": row["sex"],
                "site": profile["site"],
                "modality": "MR",
                "label_lesion": int(row["label_lesion"]),
            }
        )
    df = pd.DataFrame(records)
    participants = df.rename(columns={"patient_id": "participant_id"})[
        ["participant_id", "age", "sex", "site", "label_lesion"]
    ]
    participants.to_csv(out / "participants.tsv", sep="\t", index=False, lineterminator="\n")
    sidecar = {
        "age": {"Description": "age at scan", "Units": "year"},
        "sex": {"Description": "sex", "Levels": {"M": "male", "F": "female"}},
        "site": {"Description": "acquisition site (demographics of the ABIDE I site of this name)"},
        "label_lesion": {
            "Description": "synthetic T1-hypointense white-matter lesions",
            "Levels": {"0": "absent", "1": "present"},
        },
    }
    (out / "participants.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    description = {
        "Name": "monai_du synthetic brain demo cohort",
        "BIDSVersion": "1.8.0",
        "DatasetType": "raw",
        "GeneratedBy": [{"Name": "monai_du.phantoms.make_brain_cohort", "Description": f"seed={seed}"}],
    }
    (out / "dataset_description.json").write_text(json.dumps(description, indent=2) + "\n")
    path = out / "manifest.csv"
    df.to_csv(path, index=False, lineterminator="\n")
    return path


#: Default size of the embedded demo cohorts: number of images and image side (pixels / voxels).
DEMO_COHORT_DEFAULTS: dict[str, dict[str, int]] = {"cxr": {"n": 256, "size": 64}, "brain": {"n": 128, "size": 32}}

_DEMO_MARKER = ".monai_du_demo.json"
_DEMO_PARTIAL = ".monai_du_demo.partial"
_DEMO_LOCK = ".monai_du_demo.lock"


def ensure_demo_cohort(
    dataset_dir: str | os.PathLike,
    modality: str = "cxr",
    n: int | None = None,
    seed: int = 0,
    size: int | None = None,
    **kwargs: Any,
) -> Path:
    """The manifest of the embedded demo cohort in ``dataset_dir``, generated on first use.

    The cohort is made by :func:`make_cxr_cohort` (PNG chest X-rays) or :func:`make_brain_cohort` (NIfTI brain MRIs,
    BIDS layout). A :class:`monai_du.io.DoneMarker` written last records what shapes the cohort (modality, n, seed,
    size, the other arguments and the monai_du version); the next call with the same inputs returns at once. A cohort
    left half-written (by a killed run) or made with other inputs is deleted and made again. Concurrent calls (the
    ranks of a ``torchrun`` job) wait on a lock file (``filelock.FileLock``), so the cohort is generated once.

    A ``dataset_dir`` that holds other files but no demo cohort is refused, so that user data is never deleted.

    Args:
        dataset_dir: the cohort folder (created if needed).
        modality: "cxr" or "brain".
        n: number of images (default :data:`DEMO_COHORT_DEFAULTS`).
        seed: cohort seed.
        size: image side in pixels / voxels (default :data:`DEMO_COHORT_DEFAULTS`).
        kwargs: further arguments of the cohort function (JSON-serialisable).

    Returns:
        path of ``dataset_dir/manifest.csv``.
    """
    modality = str(modality).lower()
    if modality not in DEMO_COHORT_DEFAULTS:
        raise ValueError(
            f"ensure_demo_cohort: modality must be one of {sorted(DEMO_COHORT_DEFAULTS)}, got {modality!r}."
        )
    defaults = DEMO_COHORT_DEFAULTS[modality]
    params = {"modality": modality, "n": int(n if n is not None else defaults["n"]), "seed": int(seed),
              "size": int(size if size is not None else defaults["size"]), **kwargs}
    folder = Path(dataset_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    partial, manifest = folder / _DEMO_PARTIAL, folder / "manifest.csv"
    done = DoneMarker(folder / _DEMO_MARKER, {**params, "monai_du_version": package_version()})
    with FileLock(folder / _DEMO_LOCK):
        if done.is_done() and manifest.is_file() and not partial.exists():
            return manifest
        ours = done.path.exists() or partial.exists()
        others = [p for p in folder.iterdir() if p.name not in (_DEMO_LOCK, _DEMO_MARKER, _DEMO_PARTIAL)]
        if others and not ours:
            raise ValueError(
                f"ensure_demo_cohort: {folder} holds files ({sorted(p.name for p in others)[:5]}) but no demo cohort; "
                "choose an empty dataset_dir for the demo, or set manifest to your own manifest file."
            )
        if others:
            logger.info(f"Removing an incomplete or outdated demo cohort from {folder}.")
        partial.write_text(json.dumps(params) + "\n", encoding="utf-8")  # claims the folder before anything goes
        done.clear()
        for path in others:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        logger.info(f"Generating the {modality} demo cohort ({params['n']} images) in {folder}.")
        make = make_cxr_cohort if modality == "cxr" else make_brain_cohort
        extra = {k: v for k, v in params.items() if k != "modality"}
        written = Path(make(folder, **extra))
        if written.resolve() != manifest.resolve():
            raise RuntimeError(f"ensure_demo_cohort: the cohort function wrote {written}, expected {manifest}.")
        done.write()
        partial.unlink()
    return manifest
