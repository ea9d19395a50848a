"""Label statistics of a prior kernel (centred KTA, HSIC, its patient-level permutation p-value, the patient-grouped
CV AUC and its chance level) and the statistics of the loss's batch kernel (:func:`batch_kernel_stats`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from monai_du.evaluation import patient_grouped_splits
from monai_du.kernels import PriorKernel, kernel_summary

AUC_CHANCE_QUANTILE = 0.95
"""A CV AUC at most this quantile of its permutation distribution (``auc_chance``) also counts as chance: at the
p-value's level ``1 - AUC_CHANCE_QUANTILE``, the AUC is beyond what a prior independent of the label reaches."""

CV_FOLDS = 5
"""Folds of the patient-grouped cross-validation (fewer when there are fewer patients)."""


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
        groups: (n,) patient ids. A patient's labels move together, to a patient with as many rows (see
            :mod:`monai_du.audit`). None: every row is its own patient. When ``gram`` is zero between patients,
            single rows are permuted instead (the within-patient statistic cannot move under patient-level
            exchanges).
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
