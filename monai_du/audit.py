"""Audit candidate priors before pretraining: which prior can help kernel DU on *your* labels?

Kernel DU replaces each centroid by its conditional-mean estimate ``c = (K + lam I)^-1 K mu`` given the batch's priors.
A prior helps only when (a) its batch kernel sits between the two degenerate ends, and (b) it carries
information about the diagnosis that augmentations cannot create. Both can be measured before any training, from the
manifest and the few labels a user has. For each candidate prior this module reports:

- **The batch kernel** at the bundle's batch size and sampler: the kernel ``K + instance_weight * I`` that the loss
  builds, on ``n_batches`` batches drawn by :class:`~monai_du.data.samplers.AttributeBatchSampler`. Its effective
  rank and mean off-diagonal value (:func:`~monai_du.kernels.kernel_summary`, as the loss logs them), and the degrees
  of freedom of the centroid smoother ``trace((K + lam I)^-1 K)`` (``B`` for plain DU), averaged over the batches.
- **Its information about each label**, on the labelled rows (label 0 or 1; NaN and -1 rows are left out):

  - the centred kernel-target alignment ``KTA = <HKH, HLH>_F / (||HKH||_F ||HLH||_F)`` and the (biased) HSIC
    ``tr(K H L H) / (n - 1)^2``, with ``H = I - 11^T / n`` and the label kernel ``L[i, j] = [y_i == y_j]``
    (:func:`centred_kta`, :func:`hsic`). Here ``K`` is the prior kernel alone, over all labelled rows;
  - a permutation p-value of the HSIC (:func:`permutation_pvalue`). Images of one patient share their labels and
    most of their prior, so permuting single images would make the null far too narrow. Labels are permuted **at
    the patient level**: a patient's label vector is exchanged whole with that of another patient holding as many
    labelled images (patients with a unique count stay in place: the test stays exact, with a little less power).
    That null keeps the within-patient agreement and tests what the prior says *between* patients. A kernel that is
    zero between patients (patient x time) says nothing between patients; for it the null is that labels do not
    follow the patient, and single images are permuted (column ``null`` says which);
  - the patient-grouped cross-validated AUC of predicting the label from the prior alone: out-of-fold
    Nadaraya-Watson scores ``sum_j K_ij y_j / sum_j K_ij`` over the training folds' rows (negative kernel values
    clipped to 0), folds from :func:`~monai_du.evaluation.patient_grouped_splits` grouped by patient
    (:func:`grouped_cv_auc`), and its chance level ``auc_chance``: the ``AUC_CHANCE_QUANTILE`` quantile of the same
    CV AUC under the permutations of the p-value (:func:`cv_auc_chance_level`). With a few hundred patients a prior
    that knows nothing reaches a CV AUC of 0.6 by chance now and then; the chance level says how far chance goes.

A verdict follows (:func:`audit_verdict`), tested in this order with the documented thresholds below:

- ``"near identity: equals plain DU"``: effective rank at least ``IDENTITY_RANK_FRACTION`` of the batch size and
  mean off-diagonal at most ``IDENTITY_MEAN_OFFDIAG``;
- ``"too coarse: will average groups"`` when the batch kernel is nearly constant (mean off-diagonal above
  ``CONSTANT_MEAN_OFFDIAG``, e.g. a site kernel on within-site batches): it cannot tell a batch's images apart;
- ``"informative"``: p-value at most ``P_VALUE_ALPHA``, or CV AUC above ``0.5 + CHANCE_AUC_MARGIN`` and above its
  chance level ``auc_chance``. A coarse kernel (below) whose groups follow the label is informative too: kernel DU
  then pools images of the same label, which is what a prior is for;
- ``"too coarse: will average groups"``: effective rank below ``COARSE_RANK_FRACTION`` of the batch size, or mean
  off-diagonal above ``COARSE_MEAN_OFFDIAG``: kernel DU pulls whole groups of centroids to their mean, and the groups
  do not follow the label;
- ``"uninformative of your labels"`` otherwise.

The ranked table orders the verdicts as :data:`VERDICTS` (informative, near identity, uninformative, too coarse):
informative priors by KTA (their alignment with the label over every labelled pair, within and between patients;
the CV AUC sees only what a prior says between patients, and is 0.5 by construction for a patient kernel), the
others by their ``pooled`` share ``1 - trace((K_b + lam I)^-1 K_b) / B`` (least
first: the share of the centroids kernel DU replaces by pooling), since a prior that does not follow the label can
only cost.

Candidates: with a pretrain bundle (:func:`run_audit`, ``monai-du audit``; :func:`bundle_candidates`), each method
file of the bundle that sets a kernel (``kdu_attr``, ``kdu_patient``, ``kdu_gen``, ``kdu_encoder``, ``yaware``) is a
candidate built by the bundle itself: the kernel its run fits, its prior vector, and batches of its own sampler, with
its ``lam`` and ``instance_weight``. Besides them, and without a bundle (:func:`default_candidates`): each attribute
among age (RBF, neighbourhood-scale ``"knn"`` bandwidth fitted for the batch size and sampler, as the bundles do), sex,
site and view (categorical), and without a bundle also age x sex, patient x time (when the manifest has
``patient_id`` and ``study_offset_days`` or ``follow_up``) and one candidate per prior table (an RBF with the
``"knn"`` bandwidth).

Python::

    df = audit_priors(manifest_df, labels=["label_no_finding"], prior_tables={"vae": "prior_table.csv"})
    print(format_audit(df))

Command line (the bundle's methods, the attributes, and an encoder prior through the ``kdu_encoder`` method)::

    monai-du audit --manifest M.csv --label label_no_finding --prior-table du_encoder=enc_prior.csv --out report/
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from monai_du.data.manifest import LABEL_PREFIX, label_column_name, read_manifest
from monai_du.data.samplers import AttributeBatchSampler, draw_batches
from monai_du.evaluation import patient_grouped_splits
from monai_du.io import write_text_atomic
from monai_du.kernels import CategoricalKernel, PriorKernel, RBFKernel, kernel_summary, patient_time_kernel
from monai_du.prior_encoder import PriorEncoder
from monai_du.priors import attach_prior_table, generative_prior_kernel, load_prior_table, prior_columns

__all__ = [
    "COARSE_RANK_FRACTION",
    "COARSE_MEAN_OFFDIAG",
    "CONSTANT_MEAN_OFFDIAG",
    "IDENTITY_RANK_FRACTION",
    "IDENTITY_MEAN_OFFDIAG",
    "P_VALUE_ALPHA",
    "CHANCE_AUC_MARGIN",
    "AUC_CHANCE_QUANTILE",
    "MAX_LABELLED_ROWS",
    "CV_FOLDS",
    "TIME_COLUMNS",
    "VERDICT_COARSE",
    "VERDICT_IDENTITY",
    "VERDICT_UNINFORMATIVE",
    "VERDICT_INFORMATIVE",
    "VERDICTS",
    "PriorCandidate",
    "default_candidates",
    "batch_kernel_stats",
    "centred_kta",
    "hsic",
    "permutation_pvalue",
    "grouped_cv_auc",
    "cv_auc_chance_level",
    "audit_priors",
    "audit_verdict",
    "format_audit",
    "write_audit",
    "run_audit",
]

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

AUC_CHANCE_QUANTILE = 0.95
"""A CV AUC at most this quantile of its permutation distribution (``auc_chance``) also counts as chance: at the
p-value's level ``1 - AUC_CHANCE_QUANTILE``, the AUC is beyond what a prior independent of the label reaches."""

MAX_LABELLED_ROWS = 2000
"""At most this many labelled rows enter the label statistics (whole patients drawn at random beyond it): the label
statistics cost O(n^2) memory and O(n^2 * n_permutations) time."""

CV_FOLDS = 5
"""Folds of the patient-grouped cross-validation (fewer when there are fewer patients)."""

TIME_COLUMNS: tuple[str, ...] = ("study_offset_days", "follow_up")
"""Manifest columns read as the time of an image for the patient x time prior, in order of preference."""

VERDICT_COARSE = "too coarse: will average groups"
VERDICT_IDENTITY = "near identity: equals plain DU"
VERDICT_UNINFORMATIVE = "uninformative of your labels"
VERDICT_INFORMATIVE = "informative"
VERDICTS: tuple[str, ...] = (VERDICT_INFORMATIVE, VERDICT_IDENTITY, VERDICT_UNINFORMATIVE, VERDICT_COARSE)
"""The verdicts, best first: the order of the ranked table. An informative prior can help; a near-identity prior
trains plain DU; an uninformative prior pools images whose similarity does not follow the label, and a coarse one
pools whole groups of them, so those two can only cost."""

ATTRIBUTE_COLUMNS: tuple[str, ...] = ("age", "sex", "site", "view")
_SAMPLER = "sampler"  # fit_groups value: the groups of a "within" sampler


@dataclass
class PriorCandidate:
    """A candidate prior: a kernel and the prior vectors it reads.

    Args:
        kernel: the prior kernel (fitted here when it is not fitted yet).
        prior: (N, P) prior vectors, one row per manifest row (NaN for a missing value).
        fit_groups: groups the kernel's ``"knn"`` bandwidth rule is fitted within: ``"sampler"`` (default) for the
            groups of a ``"within"`` sampler (none for other samplers), None for mixed batches, or an (N,) array.
        description: a short description of the kernel for the report (default: its class name).
        batches: the candidate's own training batches (lists of indices into ``batch_prior``), e.g. those of its
            bundle method's sampler (:func:`bundle_candidates`); None: batches of the audit's sampler.
        batch_prior: (N_train, P) prior vectors the ``batches`` index (with ``batches``).
        sampler: the sampler of ``batches`` in words.
        lam: the candidate's ridge (None: the audit's ``lam``).
        instance_weight: the candidate's identity term (None: the audit's ``instance_weight``).
    """

    kernel: PriorKernel
    prior: np.ndarray
    fit_groups: Any = _SAMPLER
    description: str = ""
    batches: list[list[int]] | None = None
    batch_prior: np.ndarray | None = None
    sampler: str | None = None
    lam: float | None = None
    instance_weight: float | None = None


# ---------------------------------------------------------------------------------------------------------------------
# label statistics
# ---------------------------------------------------------------------------------------------------------------------
def _as_gram(gram: Any) -> np.ndarray:
    k = gram.detach().cpu().numpy() if isinstance(gram, torch.Tensor) else np.asarray(gram)
    k = np.asarray(k, dtype=np.float64)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"gram must be a square (n, n) matrix, got shape {k.shape}.")
    if not np.isfinite(k).all():
        raise ValueError("gram holds NaN or infinite values.")
    return k


def _as_binary(y: Any, n: int) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if len(y) != n:
        raise ValueError(f"y has {len(y)} values for a ({n}, {n}) gram.")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"y must hold binary labels 0/1, got values {sorted(set(y.tolist()))[:5]}.")
    return y


def _centred_statistic(k: np.ndarray, y: np.ndarray) -> float:
    """``y^T H K H y`` for (n, n) ``k`` and (n,) ``y``."""
    yc = y - y.mean()
    return float(yc @ k @ yc)


def centred_kta(gram: Any, y: Any) -> float:
    """Centred kernel-target alignment ``<HKH, HLH>_F / (||HKH||_F ||HLH||_F)`` with ``L[i, j] = [y_i == y_j]``.

    For binary labels ``HLH = 2 (Hy)(Hy)^T``, so the alignment is ``y^T H K H y / (||HKH||_F ||Hy||^2)``, in [-1, 1].

    Args:
        gram: (n, n) prior kernel matrix.
        y: (n,) binary labels.

    Returns:
        the alignment; NaN when ``HKH`` or ``Hy`` is zero (a constant kernel or a constant label).
    """
    k = _as_gram(gram)
    y = _as_binary(y, len(k))
    kc = k - k.mean(0, keepdims=True) - k.mean(1, keepdims=True) + k.mean()
    yc = y - y.mean()
    denom = float(np.linalg.norm(kc)) * float(yc @ yc)
    return _centred_statistic(k, y) / denom if denom > 0 else math.nan


def hsic(gram: Any, y: Any) -> float:
    """Biased HSIC estimate ``tr(K H L H) / (n - 1)^2`` with the label kernel ``L[i, j] = [y_i == y_j]``.

    Args:
        gram: (n, n) prior kernel matrix.
        y: (n,) binary labels.
    """
    k = _as_gram(gram)
    y = _as_binary(y, len(k))
    n = len(k)
    return 2.0 * _centred_statistic(k, y) / max(n - 1, 1) ** 2


def _patient_codes(groups: Any, n: int) -> np.ndarray:
    if groups is None:
        return np.arange(n)
    values = np.asarray(groups.tolist() if hasattr(groups, "tolist") else list(groups), dtype=object)
    if len(values) != n:
        raise ValueError(f"groups has {len(values)} entries for {n} rows.")
    if all(isinstance(v, (int, np.integer)) for v in values):  # codes already: keep their order
        return np.unique(values.astype(np.int64), return_inverse=True)[1].reshape(-1)
    return np.unique(values.astype(str), return_inverse=True)[1].reshape(-1)


def _permutation_indices(codes: np.ndarray, n_permutations: int, rng: np.random.Generator) -> np.ndarray:
    """(n_permutations, n) row indices: ``y[idx[p]]`` is the p-th patient-level permutation of ``y``.

    Patients (``codes``, (n,)) are exchanged whole with patients holding the same number of rows; row ``r`` of the
    ``i``-th image of a patient receives the label of the ``i``-th image of the patient it is exchanged with.
    """
    n = len(codes)
    idx = np.tile(np.arange(n), (n_permutations, 1))
    order = np.argsort(codes, kind="stable")
    members = np.split(order, np.cumsum(np.bincount(codes))[:-1])
    sizes = np.array([len(m) for m in members])
    for size in np.unique(sizes):
        patients = np.flatnonzero(sizes == size)
        if len(patients) < 2:
            continue
        rows = np.stack([members[p] for p in patients])  # (m, size)
        perm = np.argsort(rng.random((n_permutations, len(patients))), axis=1)  # (n_permutations, m)
        idx[:, rows.reshape(-1)] = rows[perm].reshape(n_permutations, -1)
    return idx


def _pvalue(k: np.ndarray, y: np.ndarray, idx: np.ndarray) -> float:
    """Permutation p-value ``(1 + #{T_perm >= T_obs}) / (1 + n_perm)`` of ``T = y^T H K H y``."""
    yc = y - y.mean()
    observed = float(yc @ k @ yc)
    permuted = yc[idx]  # (n_perm, n), still centred
    stats = np.einsum("pi,pi->p", permuted @ k, permuted)
    tol = 1e-9 * max(abs(observed), float(np.abs(k).sum()) * 1e-6, 1e-12)  # ties (invariant statistics) count
    return float((1 + np.count_nonzero(stats >= observed - tol)) / (1 + len(idx)))


def _within_patient_only(k: np.ndarray, codes: np.ndarray) -> bool:
    """Whether ``k`` is zero between every pair of rows of different patients (and there are several patients)."""
    other = codes[:, None] != codes[None, :]
    return bool(other.any()) and float(np.abs(k[other]).max()) <= 1e-12


def permutation_pvalue(gram: Any, y: Any, groups: Any = None, n_permutations: int = 999, seed: int = 0) -> float:
    """Patient-level permutation p-value of the HSIC between a prior kernel and a binary label.

    Args:
        gram: (n, n) prior kernel matrix.
        y: (n,) binary labels.
        groups: (n,) patient ids. A patient's labels move together, to a patient with as many rows (see the module
            docstring). None: every row is its own patient. When ``gram`` is zero between patients, single rows are
            permuted instead (the within-patient statistic cannot move under patient-level exchanges).
        n_permutations: number of permutations (>= 1).
        seed: seed of the permutations.

    Returns:
        ``(1 + #{HSIC_perm >= HSIC_obs}) / (1 + n_permutations)``, in ``(0, 1]``.
    """
    k = _as_gram(gram)
    y = _as_binary(y, len(k))
    if int(n_permutations) < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}.")
    codes = _patient_codes(groups, len(k))
    if _within_patient_only(k, codes):
        codes = np.arange(len(k))
    return _pvalue(k, y, _permutation_indices(codes, int(n_permutations), np.random.default_rng(seed)))


def _nw_oof_scores(k: np.ndarray, y: np.ndarray, splits: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Out-of-fold Nadaraya-Watson scores for labels ``y`` (n,) or label vectors (m, n); same shape as ``y``."""
    labels = np.atleast_2d(y)
    fold = np.full(k.shape[0], -1)
    for f, (_, test) in enumerate(splits):
        fold[test] = f
    # row i weighs the rows of the other folds only: its fold's training rows
    weights = np.where(fold[:, None] != fold[None, :], np.clip(k, 0.0, None), 0.0)
    den = weights.sum(1)
    ok = den > 1e-300
    # a row with no weight on the training folds gets one score shared by all such rows, whatever their fold (a
    # fold's own prevalence would anti-correlate with the held-out labels and push the AUC below 0.5)
    prevalence = labels.mean(1, keepdims=True)
    scores = np.where(ok[None, :], (labels @ weights.T) / np.where(ok, den, 1.0)[None, :], prevalence)
    return scores if np.ndim(y) == 2 else scores[0]


def _row_aucs(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC of every row of (m, n) binary ``labels`` against (m, n) ``scores`` (ties count one half)."""
    ranks = rankdata(scores, axis=1)  # average ranks of ties
    n_pos = labels.sum(1)
    n_neg = labels.shape[1] - n_pos
    return ((ranks * labels).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _cv_splits(y: np.ndarray, codes: np.ndarray, n_splits: int, seed: int) -> list | None:
    n_patients = len(np.unique(codes))
    if n_patients < 2 or len(np.unique(y)) < 2:
        return None
    folds = min(int(n_splits), n_patients)
    return patient_grouped_splits(None, groups=codes, n_splits=folds, seed=seed)


def grouped_cv_auc(gram: Any, y: Any, groups: Any = None, n_splits: int = CV_FOLDS, seed: int = 0) -> float:
    """Patient-grouped cross-validated AUC of predicting ``y`` from the prior kernel alone.

    Each held-out row is scored by the kernel-weighted label mean of the training folds' rows (Nadaraya-Watson;
    negative kernel values are clipped to 0; rows with no weight on the training rows all get the label's mean).
    Folds are :func:`~monai_du.evaluation.patient_grouped_splits` grouped by patient and not stratified: folds that
    do not depend on the labels treat permuted labels exactly as the observed ones, so the chance level
    (:func:`cv_auc_chance_level`) is exact. The AUC is computed once on the pooled out-of-fold scores.

    Args:
        gram: (n, n) prior kernel matrix.
        y: (n,) binary labels, both classes present.
        groups: (n,) patient ids (None: each row is its own patient).
        n_splits: number of folds (at most the number of patients).
        seed: seed of the folds.

    Returns:
        the AUC, or NaN when there are fewer than 2 patients or one class.
    """
    k = _as_gram(gram)
    y = _as_binary(y, len(k))
    splits = _cv_splits(y, _patient_codes(groups, len(k)), n_splits, seed)
    return math.nan if splits is None else float(roc_auc_score(y, _nw_oof_scores(k, y, splits)))


def _auc_chance(k: np.ndarray, y: np.ndarray, splits: list | None, idx: np.ndarray) -> float:
    if splits is None:
        return math.nan
    labels = y[idx]
    return float(np.quantile(_row_aucs(labels, _nw_oof_scores(k, labels, splits)), AUC_CHANCE_QUANTILE))


def cv_auc_chance_level(
    gram: Any, y: Any, groups: Any = None, n_splits: int = CV_FOLDS, n_permutations: int = 999, seed: int = 0
) -> float:
    """The ``AUC_CHANCE_QUANTILE`` quantile of :func:`grouped_cv_auc` under the permutations of
    :func:`permutation_pvalue` (same folds, permuted labels): how high the CV AUC of a prior independent of the label
    goes by chance.

    Args:
        gram: (n, n) prior kernel matrix.
        y: (n,) binary labels.
        groups: (n,) patient ids (None: each row is its own patient).
        n_splits: number of folds.
        n_permutations: permutations (>= 1).
        seed: seed of the folds and of the permutations.

    Returns:
        the chance level, or NaN when the CV AUC is undefined.
    """
    k = _as_gram(gram)
    y = _as_binary(y, len(k))
    if int(n_permutations) < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}.")
    codes = _patient_codes(groups, len(k))
    splits = _cv_splits(y, codes, n_splits, seed)
    if _within_patient_only(k, codes):
        codes = np.arange(len(k))
    idx = _permutation_indices(codes, int(n_permutations), np.random.default_rng(seed))
    return _auc_chance(k, y, splits, idx)


# ---------------------------------------------------------------------------------------------------------------------
# batch kernel statistics
# ---------------------------------------------------------------------------------------------------------------------
def batch_kernel_stats(
    kernel: PriorKernel,
    prior: Any,
    batches: Sequence[Sequence[int]],
    instance_weight: float = 0.05,
    lam: float = 0.01,
) -> dict[str, float]:
    """Mean statistics of the loss's batch kernel ``K_b = kernel(prior[b]) + instance_weight * I`` over batches.

    Args:
        kernel: a fitted prior kernel.
        prior: (N, P) prior vectors.
        batches: lists of row indices, e.g. drawn by an :class:`~monai_du.data.samplers.AttributeBatchSampler`.
        instance_weight: identity term added to the kernel, as in the loss (>= 0).
        lam: ridge of the conditional mean embedding, as in the loss (> 0).

    Returns:
        ``eff_rank`` (participation ratio, :func:`~monai_du.kernels.kernel_summary`), ``eff_rank_fraction`` (the
        rank over the batch's size), ``mean_offdiag`` and ``centroid_dof`` (``trace((K_b + lam I)^-1 K_b)``, the
        degrees of freedom of the centroid smoother; the batch size for plain DU), each averaged over the batches,
        and ``batch_size`` (the mean batch size).
    """
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}.")
    if not instance_weight >= 0:
        raise ValueError(f"instance_weight must be >= 0, got {instance_weight}.")
    if len(batches) == 0:
        raise ValueError("batch_kernel_stats needs at least one batch.")
    x = torch.as_tensor(np.asarray(prior, dtype=np.float64))
    ranks, fractions, offs, dofs, sizes = [], [], [], [], []
    for batch in batches:
        idx = torch.as_tensor(list(batch), dtype=torch.long)
        gram = kernel(x[idx]).to(torch.float64)
        gram.diagonal().add_(instance_weight)
        summary = kernel_summary(gram)
        eig = torch.linalg.eigvalsh(0.5 * (gram + gram.T)).clamp_min(0)
        ranks.append(summary["kernel_effective_rank"])
        fractions.append(summary["kernel_effective_rank"] / len(batch))
        offs.append(summary["kernel_mean_offdiag"])
        dofs.append(float((eig / (eig + lam)).sum()))
        sizes.append(len(batch))
    return {
        "batch_size": float(np.mean(sizes)),
        "eff_rank": float(np.mean(ranks)),
        "eff_rank_fraction": float(np.mean(fractions)),
        "mean_offdiag": float(np.mean(offs)),
        "centroid_dof": float(np.mean(dofs)),
    }


# ---------------------------------------------------------------------------------------------------------------------
# candidates
# ---------------------------------------------------------------------------------------------------------------------
def _distinct(df: pd.DataFrame, column: str) -> int:
    return int(df[column].nunique(dropna=True)) if column in df.columns else 0


def _numeric(df: pd.DataFrame, column: str) -> pd.Series:
    return pd.to_numeric(df[column], errors="coerce").astype(float)


def _has_repeat_times(patients: np.ndarray, times: np.ndarray) -> bool:
    """Whether some patient has two different (non-missing) times."""
    frame = pd.DataFrame({"p": patients, "t": times}).dropna()
    return bool((frame.groupby("p")["t"].nunique() > 1).any())


def default_candidates(
    df: pd.DataFrame,
    batch_size: int = 64,
    prior_tables: Mapping[str, pd.DataFrame | str | os.PathLike] | None = None,
    knn_k: int = 5,
    attributes: Sequence[str] = ATTRIBUTE_COLUMNS,
    combined: bool = True,
) -> dict[str, PriorCandidate]:
    """The candidate priors a manifest supports.

    - each attribute of ``attributes`` present with at least two distinct values: ``age`` as an RBF with the
      ``"knn"`` bandwidth (``knn_k``-th neighbour in batches of ``batch_size``), the others as categorical kernels;
    - ``"age x sex"``: their product (the pretrain bundles' default prior);
    - ``"patient x time"`` when the manifest has ``patient_id`` and a time column (:data:`TIME_COLUMNS`):
      :func:`~monai_du.kernels.patient_time_kernel` with the ``"gap"`` bandwidth (the median gap between a patient's
      consecutive times: an adjacent visit weighs ``exp(-1/2)``; 1 time unit when no patient has two times);
    - one candidate per prior table (``name -> table or path``; ``image`` + ``gen_*`` columns, matched to the
      manifest's ``image`` column): an RBF on the embedding with the ``"knn"`` bandwidth.

    Args:
        df: the manifest.
        batch_size: the training batch size (the ``"knn"`` bandwidths are fitted for it).
        prior_tables: generative or encoder prior tables by name.
        knn_k: neighbour rank of the ``"knn"`` bandwidth rule.
        attributes: manifest columns considered as single-attribute priors.
        combined: add ``"age x sex"`` and ``"patient x time"`` (False when the bundle's methods stand for them,
            :func:`bundle_candidates`).

    Returns:
        candidates by name, kernels not yet fitted.
    """
    out: dict[str, PriorCandidate] = {}
    present = [a for a in attributes if _distinct(df, a) >= 2]
    for name in present:
        if name == "age":
            encoder = PriorEncoder(continuous=["age"]).fit(df)
            kernel: PriorKernel = RBFKernel("knn", columns=[0], knn_k=knn_k, knn_batch_size=batch_size)
            out[name] = PriorCandidate(kernel, encoder.transform(df).astype(np.float64), description="RBF(knn)[age]")
        else:
            encoder = PriorEncoder(categorical=[name]).fit(df)
            out[name] = PriorCandidate(CategoricalKernel(columns=[0]), encoder.transform(df).astype(np.float64),
                                       description=f"Cat[{name}]")
    if combined and "age" in present and "sex" in present:
        encoder = PriorEncoder(continuous=["age"], categorical=["sex"]).fit(df)
        kernel = RBFKernel("knn", columns=[0], knn_k=knn_k, knn_batch_size=batch_size) * CategoricalKernel(columns=[1])
        out["age x sex"] = PriorCandidate(kernel, encoder.transform(df).astype(np.float64),
                                          description="RBF(knn)[age] * Cat[sex]")
    time_column = next((c for c in TIME_COLUMNS if c in df.columns and _numeric(df, c).notna().any()), None)
    if combined and "patient_id" in df.columns and time_column is not None:
        patients = PriorEncoder(categorical=["patient_id"]).fit(df).transform(df)[:, 0].astype(np.float64)
        times = _numeric(df, time_column).to_numpy()
        bandwidth: float | str = "gap" if _has_repeat_times(patients, times) else 1.0
        out["patient x time"] = PriorCandidate(
            patient_time_kernel(0, 1, bandwidth=bandwidth), np.stack([patients, times], 1), fit_groups=None,
            description=f"Cat[patient_id] * RBF({bandwidth})[{time_column}]",
        )
    for name, table in (prior_tables or {}).items():
        if name in out:
            raise ValueError(f"prior table name {name!r} is also an attribute candidate; give the table another name.")
        attached = attach_prior_table(df[["image"]] if "image" in df.columns else df, table)
        columns = prior_columns(attached)
        kernel = generative_prior_kernel(len(columns), knn_k=knn_k, knn_batch_size=batch_size)
        out[name] = PriorCandidate(kernel, attached[columns].to_numpy(np.float64),
                                   description=f"RBF(knn)[{len(columns)}-d table]")
    return out


def _as_candidate(name: str, value: Any, n: int) -> PriorCandidate:
    if isinstance(value, PriorCandidate):
        candidate = value
    elif isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], PriorKernel):
        candidate = PriorCandidate(value[0], value[1])
    else:
        raise ValueError(f"candidate {name!r} must be a PriorCandidate or a (kernel, prior) pair, got {type(value)}.")
    prior = np.array(candidate.prior, dtype=np.float64)  # a writable copy
    if prior.ndim == 1:
        prior = prior[:, None]
    if prior.ndim != 2 or prior.shape[0] != n:
        raise ValueError(f"candidate {name!r}: prior must have shape ({n}, P), got {prior.shape}.")
    if np.isinf(prior).any():
        raise ValueError(f"candidate {name!r}: prior holds infinite values; use NaN for a missing value.")
    if (candidate.batches is None) != (candidate.batch_prior is None):
        raise ValueError(f"candidate {name!r}: give batches and batch_prior together.")
    description = candidate.description or type(candidate.kernel).__name__
    return dataclasses.replace(candidate, prior=prior, description=description)


# ---------------------------------------------------------------------------------------------------------------------
# the audit
# ---------------------------------------------------------------------------------------------------------------------
def _resolve_label(df: pd.DataFrame, name: str, source: str) -> str:
    for column in (name, LABEL_PREFIX + str(name)):
        if column in df.columns:
            return column
    try:
        slug = label_column_name(name)
    except ValueError:
        slug = None
    if slug in df.columns:
        return slug
    known = [c for c in df.columns if str(c).startswith(LABEL_PREFIX)]
    raise ValueError(f"{source}: label column {name!r} is not in the manifest (label columns: {known}).")


def _binary_label(df: pd.DataFrame, column: str, source: str) -> np.ndarray:
    """(N,) float labels: 0/1, NaN for unlabelled (NaN or -1 uncertain) rows."""
    values = pd.to_numeric(df[column], errors="coerce").astype(float)
    bad_text = df[column].notna() & values.isna()
    if bad_text.any():
        raise ValueError(f"{source}: label column {column!r} holds non-numeric value {df[column][bad_text].iloc[0]!r}.")
    values = values.mask(values == -1.0)
    other = values.notna() & ~values.isin([0.0, 1.0])
    if other.any():
        raise ValueError(
            f"{source}: label column {column!r} must be binary (1, 0, -1 or blank); found {values[other].iloc[0]!r}."
        )
    classes = sorted(values.dropna().unique().tolist())
    if len(classes) < 2:
        found = f"one class ({classes[0]:g})" if classes else "no labelled row"
        raise ValueError(
            f"{source}: label column {column!r} has {found} among its {int(values.notna().sum())} labelled rows; "
            "the audit needs positives and negatives."
        )
    return values.to_numpy()


def _subsample_patients(rows: np.ndarray, codes: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    if len(rows) <= limit:
        return rows
    patients = rng.permutation(np.unique(codes[rows]))
    counts = pd.Series(codes[rows]).value_counts()
    keep = patients[np.cumsum(counts.loc[patients].to_numpy()) <= limit]
    return rows[np.isin(codes[rows], keep)]


def _default_sampler(df: pd.DataFrame, mode: str | None, attribute: str | None) -> tuple[str, str | None]:
    if mode is None:
        mode = "within" if _distinct(df, "site") > 1 else "random"
    if mode in ("random", "neighbourhood", "neighborhood"):
        return mode, None
    if attribute is None:
        attribute = "site" if mode in ("within", "balanced") else "patient_id"
    return mode, attribute


def _make_sampler(
    mode: str, batch_size: int, groups: np.ndarray | None, features: np.ndarray, seed: int, kwargs: Mapping[str, Any]
) -> AttributeBatchSampler:
    common = dict(batch_size=int(batch_size), mode=mode, drop_last=True, seed=int(seed), num_replicas=1, rank=0)
    if mode == "random":
        return AttributeBatchSampler(num_samples=len(features), **common, **kwargs)
    if mode in ("neighbourhood", "neighborhood"):
        return AttributeBatchSampler(features=features, **common, **kwargs)
    return AttributeBatchSampler(groups=groups, **common, **kwargs)


def audit_priors(
    manifest_df: pd.DataFrame,
    labels: Sequence[str] | str,
    candidates: Mapping[str, PriorCandidate | tuple[PriorKernel, Any]] | None = None,
    prior_tables: Mapping[str, pd.DataFrame | str | os.PathLike] | None = None,
    batch_size: int = 64,
    sampler_mode: str | None = None,
    sampler_attribute: str | None = None,
    sampler_kwargs: Mapping[str, Any] | None = None,
    images_per_patient: int | None = None,
    sampler_order: str | None = None,
    n_batches: int = 20,
    n_permutations: int = 999,
    lam: float = 0.01,
    instance_weight: float = 0.05,
    knn_k: int = 5,
    seed: int = 0,
    source: str = "manifest",
    extra_candidates: Mapping[str, PriorCandidate] | None = None,
    combined: bool = True,
) -> pd.DataFrame:
    """Audit candidate priors on a manifest against a few labels (see the module docstring).

    Args:
        manifest_df: the manifest (one row per image; ``patient_id`` groups the rows by patient when present).
        labels: label columns (``"label_no_finding"``, or ``"no_finding"``); binary 1/0, with -1 and blank unlabelled.
        candidates: candidate priors by name (:class:`PriorCandidate` or ``(kernel, prior (N, P))``); None: the
            manifest's :func:`default_candidates` (plus ``prior_tables``).
        prior_tables: prior tables by name (tables or paths), added to the default candidates.
        batch_size: the training batch size ``B``.
        sampler_mode: the training sampler's mode; None: ``"within"`` when the manifest has more than one site, else
            ``"random"``. ``"neighbourhood"`` batches are drawn on each candidate's own prior.
        sampler_attribute: the manifest column of the sampler's groups (default ``site``; ``patient_id`` for other
            grouped modes).
        sampler_kwargs: further arguments of :class:`~monai_du.data.samplers.AttributeBatchSampler`.
        images_per_patient: K of a ``"pk"`` sampler (P patients x K images per batch): its ``images_per_group``.
        sampler_order: manifest column whose order the K images of a ``"pk"`` block follow (the bundles'
            ``sampler_order``, e.g. ``follow_up``); None: random images of the patient.
        n_batches: batches whose kernel statistics are averaged.
        n_permutations: permutations of the p-value.
        lam: the loss's ridge ``lam`` (> 0).
        instance_weight: the loss's identity term (>= 0).
        knn_k: neighbour rank of the ``"knn"`` bandwidths of the default candidates.
        seed: seed of the batches, permutations, folds and subsampling.
        source: name of the manifest in error messages (its file).
        extra_candidates: candidates added to the others, e.g. the bundle's methods (:func:`bundle_candidates`).
        combined: with ``candidates=None``, include the default ``"age x sex"`` and ``"patient x time"`` candidates.

    Returns:
        one row per (prior, label), ranked within each label (column ``rank``, best first): ``prior``, ``label``,
        ``kernel``, ``batch_size``, ``sampler``, ``eff_rank``, ``eff_rank_fraction``, ``mean_offdiag``,
        ``centroid_dof``, ``pooled`` (``1 - centroid_dof / batch_size``: the share of the centroids that kernel DU
        replaces by pooling, 0 for plain DU), ``n_labelled``, ``n_positive``, ``n_patients``, ``kta``, ``hsic``,
        ``p_value``, ``null``
        (``"patient"`` or ``"image"`` permutations), ``cv_auc``, ``auc_chance``, ``verdict``.
        ``attrs["settings"]`` holds the settings and ``attrs["skipped"]`` the default candidates that could not be
        fitted, with the reason.

    Raises:
        ValueError: for a missing label column, a label with one class, a missing sampler attribute, a batch size
            larger than the sampler allows, or a candidate whose prior does not match the manifest.
    """
    if not isinstance(manifest_df, pd.DataFrame):
        raise ValueError(f"audit_priors: manifest_df must be a pandas DataFrame, got {type(manifest_df).__name__}.")
    df = manifest_df.reset_index(drop=True)
    n = len(df)
    if isinstance(labels, str):
        labels = [labels]
    if not labels:
        raise ValueError(f"{source}: give at least one label column to audit the priors against.")
    if isinstance(batch_size, bool) or int(batch_size) < 2:
        raise ValueError(f"batch_size must be an integer >= 2, got {batch_size!r}.")
    batch_size = int(batch_size)
    if n < batch_size:
        raise ValueError(f"{source}: {n} rows, fewer than the batch size {batch_size}; lower --batch-size.")
    if int(n_batches) < 1 or int(n_permutations) < 1:
        raise ValueError(f"n_batches and n_permutations must be >= 1, got {n_batches} and {n_permutations}.")
    if not (lam > 0 and math.isfinite(lam)) or not (instance_weight >= 0 and math.isfinite(instance_weight)):
        raise ValueError(f"need lam > 0 and instance_weight >= 0, got lam={lam}, instance_weight={instance_weight}.")
    label_columns = list(dict.fromkeys(_resolve_label(df, str(name), source) for name in labels))
    label_values = {column: _binary_label(df, column, source) for column in label_columns}

    mode, attribute = _default_sampler(df, sampler_mode, sampler_attribute)
    groups = None
    if attribute is not None:
        if attribute not in df.columns:
            raise ValueError(
                f"{source}: sampler attribute {attribute!r} is not a manifest column (columns: {list(df.columns)}); "
                "pass another sampler attribute or sampler mode 'random'."
            )
        groups = df[attribute].to_numpy(dtype=object)
    sampler_name = mode if attribute is None else f"{mode}:{attribute}"
    sampler_kwargs = dict(sampler_kwargs or {})
    if mode == "pk" and images_per_patient is None and "images_per_group" not in sampler_kwargs:
        raise ValueError("sampler mode 'pk' needs images_per_patient (--images-per-patient): K images of one patient "
                         "per block, as in the pretraining bundle.")
    if images_per_patient is not None:
        if mode != "pk":
            raise ValueError(f"images_per_patient is only used by sampler mode 'pk', not {mode!r}.")
        sampler_kwargs["images_per_group"] = int(images_per_patient)
        sampler_name += f" K={int(images_per_patient)}"
    if sampler_order is not None:
        if mode != "pk":
            raise ValueError(f"sampler_order is only used by sampler mode 'pk', not {mode!r}.")
        if sampler_order not in df.columns:
            raise ValueError(f"{source}: sampler order column {sampler_order!r} is not a manifest column (columns: "
                             f"{list(df.columns)}).")
        sampler_kwargs["block_order"] = df[sampler_order].to_numpy()
        sampler_name += f" by {sampler_order}"
    patients = _patient_codes(df["patient_id"] if "patient_id" in df.columns else None, n)

    skipped: dict[str, str] = {}
    if candidates is None:
        raw = default_candidates(df, batch_size=batch_size, prior_tables=prior_tables, knn_k=knn_k, combined=combined)
        user = False
    else:
        raw = dict(candidates)
        if prior_tables:
            raw.update(default_candidates(df, batch_size, prior_tables=prior_tables, knn_k=knn_k, attributes=()))
        user = True
    for name, value in (extra_candidates or {}).items():
        if name in raw:
            raise ValueError(f"candidate prior {name!r} is given twice; give it another name.")
        raw[name] = value
    if not raw:
        raise ValueError(f"{source}: no candidate prior (no age, sex, site or view with 2 values, and no prior table).")
    prepared = {name: _as_candidate(name, value, n) for name, value in raw.items()}

    shared_batches = None
    if mode not in ("neighbourhood", "neighborhood"):
        try:
            sampler = _make_sampler(mode, batch_size, groups, np.zeros((n, 1)), seed, sampler_kwargs)
        except ValueError as err:
            raise ValueError(f"{source}: batch sampler {sampler_name!r} with batch size {batch_size}: {err}") from None
        shared_batches = draw_batches(sampler, int(n_batches))

    # rows, permutations and folds of each label, shared by every candidate
    rng = np.random.default_rng(seed)
    label_plans = {}
    for column, values in label_values.items():
        rows = _subsample_patients(np.flatnonzero(~np.isnan(values)), patients, MAX_LABELLED_ROWS, rng)
        y = values[rows]
        codes = np.unique(patients[rows], return_inverse=True)[1].reshape(-1)
        perm_rng = np.random.default_rng([seed, len(label_plans)])
        label_plans[column] = dict(
            rows=rows, y=y, codes=codes, splits=_cv_splits(y, codes, CV_FOLDS, seed),
            patient_idx=_permutation_indices(codes, int(n_permutations), perm_rng),
            image_idx=_permutation_indices(np.arange(len(rows)), int(n_permutations), perm_rng),
        )

    records = []
    for name, candidate in prepared.items():
        kernel, prior = candidate.kernel, candidate.prior
        fit_groups = candidate.fit_groups
        if isinstance(fit_groups, str) and fit_groups == _SAMPLER:
            fit_groups = groups if mode == "within" else None
        if not kernel.is_fitted:
            try:
                kernel.fit(prior, groups=fit_groups)
            except ValueError as err:
                if user and name in (candidates or {}):
                    raise ValueError(f"candidate prior {name!r}: fitting {candidate.description}: {err}") from None
                skipped[name] = str(err)
                continue
        own = candidate.batches is not None
        batches, batch_prior = (candidate.batches, candidate.batch_prior) if own else (shared_batches, prior)
        if batches is None:
            sampler = _make_sampler(mode, batch_size, None, prior, seed, sampler_kwargs)
            batches = draw_batches(sampler, int(n_batches))
        stats = batch_kernel_stats(
            kernel, batch_prior, batches,
            instance_weight=instance_weight if candidate.instance_weight is None else candidate.instance_weight,
            lam=lam if candidate.lam is None else candidate.lam,
        )
        for column, plan in label_plans.items():
            rows, y, codes = plan["rows"], plan["y"], plan["codes"]
            k = kernel(torch.as_tensor(prior[rows])).to(torch.float64).numpy()
            within = _within_patient_only(k, codes)
            idx = plan["image_idx"] if within else plan["patient_idx"]
            splits = plan["splits"]
            records.append({
                "prior": name,
                "label": column,
                "kernel": candidate.description,
                "batch_size": len(batches[0]) if own else batch_size,
                "sampler": (candidate.sampler or "own batches") if own else sampler_name,
                **{key: stats[key] for key in ("eff_rank", "eff_rank_fraction", "mean_offdiag", "centroid_dof")},
                "n_labelled": len(rows),
                "n_positive": int(y.sum()),
                "n_patients": int(len(np.unique(codes))),
                "kta": centred_kta(k, y),
                "hsic": hsic(k, y),
                "p_value": _pvalue(k, y, idx),
                "null": "image" if within else "patient",
                "cv_auc": math.nan if splits is None else float(roc_auc_score(y, _nw_oof_scores(k, y, splits))),
                "auc_chance": _auc_chance(k, y, splits, idx),
            })
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
    out.attrs["settings"] = {
        "source": source, "n_rows": n, "labels": label_columns, "batch_size": batch_size, "sampler": sampler_name,
        "n_batches": int(n_batches), "n_permutations": int(n_permutations), "lam": float(lam),
        "instance_weight": float(instance_weight), "knn_k": int(knn_k), "seed": int(seed),
    }
    out.attrs["skipped"] = skipped
    return out


def audit_verdict(row: Mapping[str, Any]) -> str:
    """The plain-language verdict of one audit row (see the module docstring for the rules and their order).

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
        lines.append(
            f"Prior audit of {settings.get('source')} ({settings.get('n_rows')} rows): "
            f"batch {settings.get('batch_size')}, "
            f"sampler {settings.get('sampler')}, {settings.get('n_batches')} batches, lam {settings.get('lam'):g}, "
            f"instance weight {settings.get('instance_weight'):g}, {settings.get('n_permutations')} permutations."
        )
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
    return "\n".join(lines).lstrip("\n")


def write_audit(df: pd.DataFrame, out: str | os.PathLike) -> dict[str, Path]:
    """Write the audit to the folder ``out``: ``audit.csv``, ``audit.json`` (settings, skipped, rows) and ``audit.txt``
    (:func:`format_audit`). Returns the paths by kind."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    rows = json.loads(df.to_json(orient="records"))  # NaN -> null
    payload = {"settings": df.attrs.get("settings", {}), "skipped": df.attrs.get("skipped", {}), "rows": rows}
    return {
        "csv": write_text_atomic(folder / "audit.csv", df.to_csv(index=False)),
        "json": write_text_atomic(folder / "audit.json", json.dumps(payload, indent=2) + "\n"),
        "txt": write_text_atomic(folder / "audit.txt", format_audit(df) + "\n"),
    }


def _root_message(err: BaseException) -> str:
    """The first line of the innermost cause: MONAI's config parser wraps an expression's error in a RuntimeError."""
    from monai_du.bundle_priors import innermost_cause

    text = str(innermost_cause(err)).strip()
    return text.splitlines()[0] if text else type(err).__name__


def bundle_candidates(
    bundle: str | os.PathLike,
    manifest: str | os.PathLike,
    methods: Sequence[str] | None = None,
    prior_tables: Mapping[str, str | os.PathLike] | None = None,
    dataset_dir: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    n_batches: int = 20,
    work_dir: str | os.PathLike | None = None,
) -> tuple[dict[str, PriorCandidate], dict[str, str]]:
    """Candidates that the pretrain bundle's method files build (:func:`~monai_du.bundle_priors.method_prior`).

    Each candidate is a method's kernel as its run fits it, the prior vector it reads, and batches of its own sampler
    with its own ``lam`` and ``instance_weight``: the audit row of ``kdu_patient`` is the prior that
    ``monai-du compare`` trains ``kdu_patient`` with.

    Args:
        bundle: the pretrain bundle (``"cxr"``, ``"brain"`` or its folder).
        manifest: the manifest file.
        methods: method keys; None: every method file of the bundle that sets a kernel.
        prior_tables: ``name -> table file``. A name that is a method reading a ``prior_table`` (``kdu_gen``,
            ``kdu_encoder``) gives that method its table; any other name becomes a candidate of the ``kdu_encoder``
            method with that table. The table must cover every manifest image (``monai-du prior --split all``).
        dataset_dir: folder of relative image paths.
        overrides: bundle ids for every method (e.g. ``batch_size``).
        n_batches: batches drawn from each method's sampler.
        work_dir: folder for what a method builds (``kdu_gen``'s VAE table, under ``<work_dir>/<method>``); None: a
            temporary folder.

    Returns:
        ``(candidates, skipped)``: candidates by name, and ``{name: reason}`` for the default methods that could
        not be built (a method needing a table that was not given, or a column the manifest lacks).
    """
    from monai_du.bundle_priors import kernel_methods, method_prior, prior_table_setting
    from monai_du.compare import bundle_path

    folder = bundle_path(bundle)
    named = methods is not None
    keys = list(methods) if named else kernel_methods(folder)
    tables = {str(k): v for k, v in (prior_tables or {}).items()}
    jobs: list[tuple[str, str, dict[str, Any]]] = []  # (row name, method, overrides)
    skipped: dict[str, str] = {}
    for key in keys:
        reads, builds = prior_table_setting(folder, key)
        if key in tables:
            if not reads:
                raise ValueError(f"method {key!r} of {folder} reads no prior table; name the table otherwise.")
            jobs.append((key, key, {"prior_table": str(tables.pop(key))}))
        elif reads and not builds:
            skipped[key] = f"needs a prior table: --prior-table {key}=FILE (monai-du prior --encoder ... --split all)"
        else:
            jobs.append((key, key, {}))
    for name, table in tables.items():
        jobs.append((name, "kdu_encoder", {"prior_table": str(table)}))
    out: dict[str, PriorCandidate] = {}
    for name, method, extra in jobs:
        root = None if work_dir is None else Path(work_dir) / name
        try:
            prior = method_prior(folder, method, manifest, dataset_dir=dataset_dir,
                                 overrides={**dict(overrides or {}), **extra}, n_batches=n_batches,
                                 bundle_root=root, name=name)
        except (ValueError, KeyError, RuntimeError) as err:
            reason = _root_message(err)
            if named or name not in keys:
                raise ValueError(f"candidate prior {name!r}: {reason}") from None
            skipped[name] = reason
            continue
        out[name] = PriorCandidate(
            prior.kernel, prior.prior, fit_groups=None, description=f"{method}: {prior.description}",
            batches=prior.batches, batch_prior=prior.batch_prior, sampler=prior.sampler, lam=prior.lam,
            instance_weight=prior.instance_weight,
        )
    return out, skipped


def run_audit(
    manifest: str | os.PathLike,
    labels: Sequence[str],
    dataset_dir: str | os.PathLike | None = None,
    prior_tables: Mapping[str, str | os.PathLike] | None = None,
    out: str | os.PathLike | None = None,
    bundle: str | os.PathLike | None = "cxr",
    methods: Sequence[str] | None = None,
    bundle_overrides: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> pd.DataFrame:
    """Read a manifest file and its prior tables, audit the priors, and write the report to ``out`` (if given).

    Args:
        manifest: manifest file (read with :func:`~monai_du.data.manifest.read_manifest`).
        labels: label columns.
        dataset_dir: folder of relative image paths (default: the manifest's folder).
        prior_tables: prior table files by name.
        out: report folder (``audit.csv``, ``audit.json``, ``audit.txt``), or None.
        bundle: the pretrain bundle whose method files give the kernel methods' candidates
            (:func:`bundle_candidates`; ``"cxr"``, ``"brain"`` or a folder); None: the generic candidates of
            :func:`default_candidates` only, with the prior tables as RBF candidates.
        methods: the bundle's methods to audit (None: every method file that sets a kernel).
        bundle_overrides: bundle ids for every method, as ``monai-du compare --set`` gives them to every run (e.g.
            ``{"time_column": "study_offset_days"}``).
        kwargs: further arguments of :func:`audit_priors`.

    Returns:
        the audit table (:func:`audit_priors`).
    """
    try:
        df = read_manifest(manifest, root=dataset_dir)
    except FileNotFoundError as err:
        raise ValueError(str(err)) from None
    tables: dict[str, str] = {}
    for name, path in (prior_tables or {}).items():
        if not str(name).strip():
            raise ValueError(f"prior table {str(path)!r} needs a name (NAME=path).")
        load_prior_table(path)  # checked before any work; attach_prior_table names the file in its errors
        tables[str(name)] = str(path)
    try:
        if bundle is None:
            result = audit_priors(df, labels, prior_tables=tables, source=str(manifest), **kwargs)
        else:
            overrides = {"batch_size": int(kwargs.get("batch_size", 64)), "seed": int(kwargs.get("seed", 0)),
                         **dict(bundle_overrides or {})}
            work_dir = None if out is None else Path(out) / "methods"
            extra, skipped = bundle_candidates(
                bundle, manifest, methods=methods, prior_tables=tables, dataset_dir=dataset_dir, overrides=overrides,
                n_batches=int(kwargs.get("n_batches", 20)), work_dir=work_dir,
            )
            result = audit_priors(df, labels, source=str(manifest), extra_candidates=extra, combined=False, **kwargs)
            result.attrs["skipped"] = {**result.attrs.get("skipped", {}), **skipped}
            result.attrs["settings"]["bundle"] = str(bundle)
    except ValueError as err:
        raise ValueError(str(err)) from None
    if out is not None:
        write_audit(result, out)
    return result
