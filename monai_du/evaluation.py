"""Evaluation of frozen representations: linear and kNN probes, label efficiency, ROC AUC CIs, age MAE, site leakage.

Every probe takes frozen features ``(N, F)`` (a numpy array) plus per-row metadata (arrays, Series or a DataFrame),
so it can score any encoder. :func:`extract_features` turns an encoder and a MONAI ``Dataset``/``DataLoader`` of
dicts into such features and a metadata DataFrame whose rows are aligned with them::

    features, meta = extract_features(model.encoder, loader)
    result = linear_probe(features, meta["label_effusion"], groups=meta["patient_id"])  # C chosen by inner CV
    auc, low, high = result.roc_auc()                         # patient-level (cluster) bootstrap CI
    result.chosen_C                                           # the C of each outer fold
    leak = site_leakage(features, meta["site"], groups=meta["patient_id"])
    print(format_table([ProbeReport("plain DU", auc, low, high, leak.balanced_accuracy, leak.chance, 61.2)]))

The linear probe chooses its L2 strength itself: with ``C="cv"`` (default) every outer split runs an inner
patient-grouped cross-validation on its own training rows (:func:`select_C`: 5 shuffled stratified patient-grouped
partitions, the grid :data:`DEFAULT_CS`, mean ROC AUC, the one-standard-error rule) and reports the chosen values
in ``ProbeScores.chosen_C``. A fixed ``C`` (a float) stays available. :func:`label_efficiency` measures the probe's
held-out AUC when only 25, 50, ... labelled training patients are available; :func:`summarise_label_efficiency`,
:func:`format_label_efficiency` and :func:`plot_label_efficiency` turn its draws into a table and a figure::

    curve = label_efficiency(features, meta["label_effusion"], meta["patient_id"], train_mask)
    summaries = {"plain DU": summarise_label_efficiency(curve)}
    print(format_label_efficiency(summaries))
    plot_label_efficiency(summaries, "label_efficiency.png")

:func:`regression_probe` is the ridge probe of a continuous target (age from brain MRI): the ridge alpha is chosen per
outer split by an inner patient-grouped CV (grid :data:`DEFAULT_ALPHAS`, mean validation MAE), and the mean-target
floor is scored on the same splits::

    reg = regression_probe(features, meta["age"], groups=meta["patient_id"])
    reg.mae_ci(), reg.mae_ci(floor=True), reg.alphas_chosen   # (MAE, low, high) with a patient bootstrap CI

Splits. Every probe evaluates either one train/test split (``train_mask``, optionally ``test_mask``), explicit
``folds`` (an integer test-fold id per row), or ``n_splits``-fold cross-validation. Cross-validation is grouped by
patient when ``groups`` (patient ids) is given: scikit-learn's ``StratifiedGroupKFold`` with ``shuffle=True`` and
``random_state=seed``, stratified by the label (by site for :func:`site_leakage`, by age quintile for
:func:`age_regression`). A patient therefore never appears in a training and a test fold together; a ``train_mask``
or ``folds`` argument that splits a patient raises a ``ValueError``. Scores are *out-of-fold*: each row is scored by
the model that did not see it, and metrics are computed once on the pooled out-of-fold scores.

Label policy (binary labels, as in CheXpert: 1 positive, 0 negative, -1 uncertain, blank unknown):

- NaN: the row is dropped *for that label only* (it is neither trained on nor scored; its score stays NaN).
- -1 (uncertain): ``uncertain="drop"`` (default) drops the row like NaN; ``"zero"`` maps it to 0 and ``"one"`` to 1
  (the U-Zeros and U-Ones policies).
- Any other value than 0/1 after the policy raises a ``ValueError`` naming the label.

Cross-validation folds are built per label on that label's kept rows. Pass ``folds`` to share folds across labels
and methods.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sklearn
import torch
from joblib import Parallel, delayed
from scipy.stats import rankdata
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from monai_du.networks import to_device

__all__ = [
    "extract_features",
    "patient_grouped_splits",
    "ProbeScores",
    "DEFAULT_CS",
    "FALLBACK_C",
    "CSearch",
    "select_C",
    "binary_auc",
    "C_RULES",
    "DEFAULT_C_RULE",
    "DEFAULT_C_REPEATS",
    "linear_probe",
    "knn_probe",
    "label_efficiency",
    "summarise_label_efficiency",
    "format_label_efficiency",
    "plot_label_efficiency",
    "roc_auc_with_ci",
    "age_regression",
    "DEFAULT_ALPHAS",
    "RegressionScores",
    "regression_probe",
    "SiteLeakage",
    "site_leakage",
    "ProbeReport",
    "probe_report",
    "format_table",
    "UNCERTAIN_POLICIES",
]

UNCERTAIN_POLICIES = ("drop", "zero", "one")
_AGE_BINS = 5  # age quantile bins used to stratify age-regression folds
#: default grid of inverse L2 strengths searched by ``linear_probe(C="cv")``: 1e-4 ... 1e2, 13 values.
DEFAULT_CS = np.logspace(-4, 2, 13)
#: rules of :func:`select_C` for the C chosen from the inner cross-validation.
C_RULES = ("best", "one_se")
#: default rule and inner partitions of :func:`select_C` / ``linear_probe(C="cv")``: the one-standard-error rule on
#: 5 partitions, measured by ``benchmarks/probe_c_rule.py`` (see :func:`select_C`).
DEFAULT_C_RULE, DEFAULT_C_REPEATS = "one_se", 5
#: C used (with a warning) when a training set is too small to cross-validate. Heavy regularisation suits
#: standardised high-dimensional frozen features: on 1,000 real chest X-rays C=0.01 beat C=1.0 for every encoder.
FALLBACK_C = 0.01
#: default ridge-alpha grid searched by :func:`regression_probe`: 1e-2 ... 1e5, 15 values. Features are standardised
#: and may outnumber the rows, so the grid reaches strong regularisation (predictions near the training mean).
DEFAULT_ALPHAS = np.logspace(-2, 5, 15)


# ---------------------------------------------------------------------------------------------------------------------
# feature extraction
# ---------------------------------------------------------------------------------------------------------------------
def _per_sample_column(value: Any, batch_size: int) -> list | None:
    """Return ``value`` as a list of ``batch_size`` scalars, or None when it is not one scalar per sample."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.ndim == 0 or value.shape[0] != batch_size or value[0].numel() != 1:
            return None
        return value.reshape(batch_size).tolist()
    if isinstance(value, np.ndarray):
        if value.ndim == 0 or value.shape[0] != batch_size or value[0].size != 1:
            return None
        return value.reshape(batch_size).tolist()
    if isinstance(value, (list, tuple)) and len(value) == batch_size:
        out = []
        for item in value:
            if isinstance(item, (torch.Tensor, np.ndarray)):
                if (item.size if isinstance(item, np.ndarray) else item.numel()) != 1:
                    return None
                item = item.item()
            if not (item is None or isinstance(item, (str, bytes, int, float, bool, np.generic))):
                return None
            out.append(item)
        return out
    return None


def extract_features(
    encoder: torch.nn.Module,
    loader: Iterable[Mapping[str, Any]] | torch.utils.data.Dataset,
    device: str | torch.device = "cpu",
    image_key: str = "image",
    metadata_keys: Sequence[str] | None = None,
    batch_size: int = 32,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Encode every batch of ``loader`` with a frozen ``encoder`` and keep the batches' metadata aligned with the rows.

    The encoder runs in eval mode under ``torch.no_grad()``; its previous train/eval mode is restored afterwards.

    Args:
        encoder: module mapping images (B, C, *spatial) to features (B, F) (outputs (B, F, 1, ...) are flattened).
        loader: an iterable of dict batches (e.g. ``monai.data.DataLoader``), or a ``Dataset`` of dicts, which is
            wrapped in a non-shuffling ``monai.data.DataLoader`` with ``batch_size``.
        device: device the encoder and the images are moved to.
        image_key: key of the image tensor (B, C, *spatial) in each batch.
        metadata_keys: keys to keep as metadata columns; each must hold one scalar per sample (error otherwise).
            ``None`` keeps every key that holds one scalar per sample (numbers, strings) and skips the others
            (e.g. (B, P) prior vectors, meta dicts). When the image is a ``MetaTensor`` whose meta holds
            ``filename_or_obj``, that path is kept as column ``f"{image_key}_path"``.
        batch_size: batch size used only when ``loader`` is a ``Dataset``.

    Returns:
        ``(features, metadata)``: a float32 array (N, F) and a DataFrame with N rows in the same order (index 0..N-1).
    """
    if isinstance(loader, torch.utils.data.Dataset):
        from monai.data import DataLoader

        loader = DataLoader(loader, batch_size=batch_size, shuffle=False, num_workers=0)
    was_training = encoder.training
    encoder.eval()
    to_device(encoder, device)
    feats: list[np.ndarray] = []
    frames: list[pd.DataFrame] = []
    try:
        with torch.no_grad():
            for b, batch in enumerate(loader):
                if not isinstance(batch, Mapping) or image_key not in batch:
                    raise ValueError(f"batch {b} is not a dict holding key {image_key!r} (got {type(batch).__name__}).")
                images = batch[image_key]
                if not isinstance(images, torch.Tensor) or images.ndim < 3:
                    shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
                    raise ValueError(f"batch {b}: {image_key!r} must be a tensor (B, C, *spatial), got {shape}.")
                n = images.shape[0]
                plain = images.as_tensor() if hasattr(images, "as_tensor") else images  # drop MetaTensor meta
                out = encoder(plain.to(device))
                if not isinstance(out, torch.Tensor):
                    raise ValueError(f"encoder must return a tensor (B, F), got {type(out).__name__} for batch {b}.")
                if out.ndim < 2 or out.shape[0] != n:
                    raise ValueError(f"encoder output for batch {b} has shape {tuple(out.shape)}; expected ({n}, F).")
                feats.append(out.reshape(n, -1).float().cpu().numpy())
                columns: dict[str, list] = {}
                keys = metadata_keys if metadata_keys is not None else [k for k in batch if k != image_key]
                for key in keys:
                    if key not in batch:
                        raise ValueError(f"batch {b} has no metadata key {key!r}; keys are {sorted(batch)}.")
                    col = _per_sample_column(batch[key], n)
                    if col is None:
                        if metadata_keys is not None:
                            raise ValueError(f"batch {b}: metadata key {key!r} does not hold one scalar per sample.")
                        continue
                    columns[key] = col
                meta = getattr(images, "meta", None)
                path_key = f"{image_key}_path"
                if isinstance(meta, Mapping) and path_key not in columns and "filename_or_obj" in meta:
                    col = _per_sample_column(meta["filename_or_obj"], n)
                    if col is not None:
                        columns[path_key] = col
                frames.append(pd.DataFrame(columns, index=range(n)))
    finally:
        encoder.train(was_training)
    if not feats:
        raise ValueError("loader yielded no batches.")
    widths = {f.shape[1] for f in feats}
    if len(widths) != 1:
        raise ValueError(f"encoder returned different feature sizes across batches: {sorted(widths)}.")
    metadata = pd.concat(frames, ignore_index=True)
    return np.concatenate(feats, axis=0), metadata


# ---------------------------------------------------------------------------------------------------------------------
# input checks and splits
# ---------------------------------------------------------------------------------------------------------------------
def _check_features(features: Any) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must have shape (N, F), got {x.shape}.")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise ValueError(f"features hold NaN/inf in {bad.size} rows (first: row {bad[0]}).")
    return x


def _check_rows(values: Any, n: int, name: str) -> np.ndarray:
    arr = values.to_numpy() if isinstance(values, (pd.Series, pd.Index)) else np.asarray(values)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match features, got {arr.shape}.")
    return arr


def _check_groups(groups: Any, n: int) -> np.ndarray | None:
    if groups is None:
        return None
    g = _check_rows(groups, n, "groups")
    missing = np.flatnonzero(pd.isna(g))
    if missing.size:
        raise ValueError(f"groups (patient ids) are missing in {missing.size} rows (first: row {missing[0]}).")
    return g


def _label_columns(labels: Any, n: int) -> list[tuple[str, np.ndarray]]:
    """Split labels (N,), (N, L), Series or DataFrame into (name, float64 values) pairs."""
    if isinstance(labels, pd.DataFrame):
        pairs = [(str(c), labels[c]) for c in labels.columns]
    elif isinstance(labels, pd.Series):
        pairs = [(str(labels.name) if labels.name is not None else "label", labels)]
    else:
        arr = np.asarray(labels)
        if arr.ndim == 1:
            pairs = [("label", arr)]
        elif arr.ndim == 2:
            pairs = [(f"label_{j}", arr[:, j]) for j in range(arr.shape[1])]
        else:
            raise ValueError(f"labels must have shape (N,) or (N, L), got {arr.shape}.")
    out = []
    for name, col in pairs:
        col = _check_rows(col, n, f"label {name!r}")
        try:
            out.append((name, pd.to_numeric(pd.Series(col), errors="raise").to_numpy(dtype=np.float64)))
        except (ValueError, TypeError) as e:
            raise ValueError(f"label {name!r} must be numeric (1/0/-1/NaN): {e}") from e
    return out


def _apply_uncertain_policy(y: np.ndarray, uncertain: str, name: str) -> np.ndarray:
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain must be one of {UNCERTAIN_POLICIES}, got {uncertain!r}.")
    y = y.copy()
    y[y == -1] = {"drop": np.nan, "zero": 0.0, "one": 1.0}[uncertain]
    kept = y[~np.isnan(y)]
    bad = sorted(set(np.unique(kept).tolist()) - {0.0, 1.0})
    if bad:
        raise ValueError(f"label {name!r} holds values {bad[:5]}; expected 1, 0, -1 (uncertain) or NaN.")
    return y


def patient_grouped_splits(
    y: Any = None, groups: Any = None, n_splits: int = 5, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, patient-grouped K-fold splits (scikit-learn ``StratifiedGroupKFold``, shuffled with ``seed``).

    Args:
        y: discrete values (N,) to stratify by (labels, site codes, age bins), or None for no stratification.
        groups: patient ids (N,); every patient's rows land in the same test fold. None: each row is its own group.
        n_splits: number of folds (>= 2).
        seed: ``random_state`` of the splitter.

    Returns:
        ``n_splits`` pairs ``(train_idx, test_idx)`` of row indices.
    """
    if y is None and groups is None:
        raise ValueError("patient_grouped_splits needs y or groups to know the number of rows.")
    n = len(y) if y is not None else len(groups)
    y = np.zeros(n, dtype=np.int64) if y is None else _check_rows(y, n, "y")
    g = np.arange(n) if groups is None else _check_groups(groups, n)
    if int(n_splits) < 2:
        raise ValueError(f"n_splits must be >= 2, got {n_splits}.")
    n_groups = len(pd.unique(g))
    if n_groups < n_splits:
        raise ValueError(f"only {n_groups} patients (groups) for n_splits={n_splits}; lower n_splits.")
    _, codes = np.unique(y, return_inverse=True)
    splitter = StratifiedGroupKFold(n_splits=int(n_splits), shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "The least populated class in y has only k members": folds still never split a patient; a fold whose
        # training rows lack a class is reported by the probe itself.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return [(tr, te) for tr, te in splitter.split(np.zeros((n, 1)), codes, groups=g)]


def _resolve_splits(
    rows: np.ndarray,
    strata: np.ndarray | None,
    groups: np.ndarray | None,
    train_mask: Any,
    test_mask: Any,
    folds: Any,
    n_splits: int,
    seed: int,
    n: int,
    what: str,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Train/test row indices (into all N rows), restricted to ``rows`` (the rows usable for this target)."""
    if train_mask is not None and folds is not None:
        raise ValueError("pass either train_mask (one split) or folds (cross-validation), not both.")
    usable = np.zeros(n, dtype=bool)
    usable[rows] = True
    if train_mask is not None:
        tr = _check_rows(train_mask, n, "train_mask").astype(bool)
        te = ~tr if test_mask is None else _check_rows(test_mask, n, "test_mask").astype(bool)
        if (tr & te).any():
            raise ValueError(f"train_mask and test_mask overlap in {(tr & te).sum()} rows.")
        pairs = [(np.flatnonzero(tr & usable), np.flatnonzero(te & usable))]
    elif folds is not None:
        f = _check_rows(folds, n, "folds").astype(np.int64)
        ids = np.unique(f[usable & (f >= 0)])
        pairs = [(np.flatnonzero(usable & (f >= 0) & (f != k)), np.flatnonzero(usable & (f == k))) for k in ids]
    else:
        local = patient_grouped_splits(strata, None if groups is None else groups[rows], n_splits, seed)
        pairs = [(rows[tr], rows[te]) for tr, te in local]
    if groups is not None:
        for k, (tr, te) in enumerate(pairs):
            shared = np.intersect1d(groups[tr], groups[te])
            if shared.size:
                pid = shared[0].item() if isinstance(shared[0], np.generic) else shared[0]
                raise ValueError(f"{what}: patient {pid!r} is in both the training and test rows of split {k}.")
    for k, (tr, te) in enumerate(pairs):
        if tr.size == 0 or te.size == 0:
            raise ValueError(f"{what}: split {k} has {tr.size} training and {te.size} test rows.")
    return pairs


# ---------------------------------------------------------------------------------------------------------------------
# choice of the L2 strength by inner patient-grouped cross-validation
# ---------------------------------------------------------------------------------------------------------------------
def _check_grid(Cs: Any) -> np.ndarray:
    grid = DEFAULT_CS if Cs is None else np.asarray(Cs, dtype=np.float64).reshape(-1)
    if grid.size == 0 or not np.isfinite(grid).all() or (grid <= 0).any():
        raise ValueError(f"Cs must be a non-empty grid of finite values > 0, got {np.asarray(Cs).tolist()}.")
    return np.unique(grid)  # ascending: the first of tied C values is the most regularised


def _check_fallback(fallback_C: Any) -> None:
    if not (isinstance(fallback_C, (int, float, np.number)) and math.isfinite(fallback_C) and fallback_C > 0):
        raise ValueError(f"fallback_C must be a finite float > 0, got {fallback_C!r}.")


def _check_C(C: Any, fallback_C: Any) -> None:
    if isinstance(C, str):
        if C != "cv":
            raise ValueError(f"C must be 'cv' (chosen by inner grouped cross-validation) or a float > 0, got {C!r}.")
    elif not (isinstance(C, (int, float, np.number)) and math.isfinite(C) and C > 0):
        raise ValueError(f"C must be 'cv' or a finite float > 0, got {C!r}.")
    _check_fallback(fallback_C)


@dataclass
class CSearch:
    """Result of :func:`select_C`: the inner, patient-grouped search of the inverse L2 strength of one fit.

    Attributes:
        C: the chosen inverse L2 strength (the fixed ``fallback_C`` when ``fallback`` is True).
        Cs: (K,) the grid searched, ascending.
        fold_auc: (S, K) ROC AUC of each inner validation fold for each C; a row is NaN for a fold that was not
            scored because its training or validation rows held a single class.
        splits: the S inner folds as ``(train_idx, val_idx)`` row-index pairs. :func:`select_C` returns indices
            into the rows it was given; :attr:`ProbeScores.c_search` holds indices into all N rows of the probe.
        fallback: True when no inner fold could be scored, so that C is the fixed fallback.
    """

    C: float
    Cs: np.ndarray
    fold_auc: np.ndarray
    splits: list[tuple[np.ndarray, np.ndarray]]
    fallback: bool = False

    @property
    def scored(self) -> np.ndarray:
        """(S,) bool mask of the inner folds that were scored."""
        return ~np.isnan(self.fold_auc).all(axis=1) if self.fold_auc.size else np.zeros(len(self.splits), bool)

    @property
    def mean_auc(self) -> np.ndarray:
        """(K,) mean validation ROC AUC over the scored inner folds for each C (NaN when none was scored)."""
        if not self.scored.any():
            return np.full(self.Cs.shape, np.nan)
        return self.fold_auc[self.scored].mean(axis=0)

    @property
    def se_auc(self) -> np.ndarray:
        """(K,) standard error of :attr:`mean_auc` over the scored folds (``std(ddof=1) / sqrt(S)``; 0 for one)."""
        scored = self.fold_auc[self.scored]
        if len(scored) < 2:
            return np.zeros(self.Cs.shape)
        return scored.std(axis=0, ddof=1) / math.sqrt(len(scored))


def binary_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of 0/1 labels (both classes present) by the Mann-Whitney rank sum, ties given their mean rank: the
    value of ``sklearn.metrics.roc_auc_score`` without its input checks, for the inner loops of :func:`select_C`.

    Args:
        y_true: (N,) labels 0/1.
        scores: (N,) scores, higher for the positive class.
    """
    positive = np.asarray(y_true) == 1
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _inner_fold_aucs(x_fit: np.ndarray, y_fit: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, grid: np.ndarray,
                     standardize: bool, max_iter: int) -> np.ndarray:
    """(len(grid),) validation ROC AUC of the logistic-regression probe fitted with each C of ``grid`` on one inner
    fold (features ``(n_fit, F)`` and ``(n_val, F)``, labels 0/1, both classes on both sides)."""
    # thousands of small fits: scikit-learn's per-call input checks cost as much as the fits (x was checked before)
    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        if standardize:
            scaler = StandardScaler().fit(x_fit)
            x_fit, x_val = scaler.transform(x_fit), scaler.transform(x_val)
        targets = y_fit.astype(np.int64)
        return np.array([binary_auc(y_val, LogisticRegression(C=float(c), max_iter=max_iter).fit(x_fit, targets)
                                    .decision_function(x_val)) for c in grid])


def select_C(
    features: Any,
    labels: Any,
    groups: Any = None,
    Cs: Sequence[float] | np.ndarray | None = None,
    n_splits: int = 5,
    standardize: bool = True,
    max_iter: int = 5000,
    fallback_C: float = FALLBACK_C,
    what: str = "select_C",
    rule: str = DEFAULT_C_RULE,
    repeats: int = DEFAULT_C_REPEATS,
) -> CSearch:
    """Choose the inverse L2 strength C of a logistic-regression probe by patient-grouped cross-validation.

    The rows are split into ``repeats`` partitions of ``n_splits`` patient-grouped folds (by default 5 shuffled
    ``StratifiedGroupKFold`` partitions, seeds 0-4, 25 folds; ``repeats=1``: one ``GroupKFold``), so a patient never
    sits on both sides of an inner split. For each fold, ``StandardScaler`` (if ``standardize``) is fit on the fold's
    training rows only, ``LogisticRegression(C=c, max_iter=max_iter)`` is fit for every ``c`` in the grid, and the
    validation rows are scored by ROC AUC (of ``decision_function``). The default rule (``"one_se"``) takes the
    smallest C whose mean AUC over the scored folds is within one standard error of the highest; ``"best"`` takes
    the highest (among tied values the smallest C, the strongest regularisation, wins).

    Why this default: of the rules measured by ``benchmarks/probe_c_rule.py`` (best or one-SE on 1, 3 or 5
    partitions, a paired step-down, a fixed C), it is the one that stays within 0.02 AUC of the best fixed C of the
    grid on both a needs-strong-L2 and a needs-weak-L2 synthetic case (0.012 and 0.001, medians of 40 draws) while
    rarely picking a C that a fresh inner CV does not clearly prefer over the next stronger L2 (14 of 120 picks on
    real chest X-ray features, against 54 for the former ``"best"`` on one partition); its cross-fitted AUC was
    0.006 above the former rule's on the embedded cohort (15 encoders) and 0.002 below it on the real pool (9).
    With very few training patients it can over-regularise (0.018 short on a 30-patient needs-weak-L2 case).

    The inner folds run one after the other in this process or, inside ``joblib.parallel_config(n_jobs=...)`` (as
    ``monai-du compare`` runs its probes), spread over processes, with the same result.

    Small training sets: with fewer patients than ``n_splits`` the number of folds drops to the number of patients.
    A fold whose training or validation rows hold a single class is not scored. When no fold can be scored (fewer
    than 2 patients, or every fold single-class), C falls back to ``fallback_C`` with a warning that names it.

    Args:
        features: (N, F) features of the training rows.
        labels: (N,) binary labels 0/1 (no NaN).
        groups: (N,) patient ids; None makes every row its own group.
        Cs: grid of C values; None uses :data:`DEFAULT_CS` (``np.logspace(-4, 2, 13)``).
        n_splits: number of inner folds (>= 2).
        standardize: standardise the features with the statistics of each inner training fold.
        max_iter: lbfgs iterations.
        fallback_C: C used when no inner fold can be scored.
        what: name used in the warning.
        rule: ``"best"``: the C of the highest mean AUC; ``"one_se"``: the smallest C (strongest regularisation)
            whose mean AUC is within one standard error (over the inner folds) of the highest, the one-standard-error
            rule, which is less swayed by an inner fold that favours a weak regularisation by chance.
        repeats: 1: one ``GroupKFold`` partition; R > 1: R shuffled ``StratifiedGroupKFold`` partitions (seeds
            0 .. R-1), every fold of every partition scored, which lowers the variance of the inner curve.

    Returns:
        A :class:`CSearch` (its ``splits`` index the N rows given here).
    """
    if rule not in C_RULES:
        raise ValueError(f"rule must be one of {C_RULES}, got {rule!r}.")
    if isinstance(repeats, bool) or int(repeats) < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}.")
    grid = _check_grid(Cs)
    _check_fallback(fallback_C)
    if int(n_splits) < 2:
        raise ValueError(f"n_splits (inner folds) must be >= 2, got {n_splits}.")
    x = _check_features(features)
    n = x.shape[0]
    y = np.asarray(_check_rows(labels, n, "labels"), dtype=np.float64)
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("select_C: labels must hold only 0/1 (drop NaN and uncertain rows first).")
    g = np.arange(n) if groups is None else _check_groups(groups, n)
    n_groups = len(pd.unique(g))
    k = min(int(n_splits), n_groups)
    splits: list[tuple[np.ndarray, np.ndarray]] = []
    if k >= 2 and int(repeats) == 1:
        splits = [(tr, va) for tr, va in GroupKFold(n_splits=k).split(x, y, groups=g)]
    elif k >= 2 and min(int(np.sum(y == 0)), int(np.sum(y == 1))) >= 2:
        # stratified folds need a few rows of each class: no more folds than the larger class has rows
        k = min(k, int(max(np.sum(y == 0), np.sum(y == 1))))
        for r in range(int(repeats)):
            splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=r)
            splits += [(tr, va) for tr, va in splitter.split(x, y, groups=g)]
    fold_auc = np.full((len(splits), grid.size), np.nan)
    scored = [s for s, (tr, va) in enumerate(splits) if np.unique(y[tr]).size == 2 and np.unique(y[va]).size == 2]
    # one task per inner fold: in this process, or spread over processes inside a joblib.parallel_config (compare)
    aucs = Parallel()(delayed(_inner_fold_aucs)(x[splits[s][0]], y[splits[s][0]], x[splits[s][1]], y[splits[s][1]],
                                                grid, standardize, max_iter) for s in scored)
    for s, values in zip(scored, aucs):
        fold_auc[s] = values
    result = CSearch(float(fallback_C), grid, fold_auc, splits, fallback=True)
    if not result.scored.any():
        warnings.warn(
            f"{what}: cannot choose C by inner cross-validation ({n} training rows of {n_groups} patients, "
            f"{len(splits)} inner folds, none holding both classes on both sides); using the fixed "
            f"fallback C={fallback_C:g}.",
            stacklevel=2,
        )
        return result
    mean = result.mean_auc
    best = int(np.argmax(mean))
    if rule == "one_se":
        best = int(np.flatnonzero(mean >= mean[best] - result.se_auc[best])[0])  # the grid is ascending
    result.C, result.fallback = float(grid[best]), False
    return result


# ---------------------------------------------------------------------------------------------------------------------
# classification probes
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ProbeScores:
    """Out-of-fold (or test-split) scores of one binary label.

    Attributes:
        label: the label's name.
        y_true: (N,) float labels after the uncertainty policy; NaN for rows dropped for this label.
        scores: (N,) predicted probability of the positive class for evaluated rows; NaN elsewhere.
        folds: (N,) int id of the split that scored the row; -1 for rows never scored.
        groups: (N,) patient ids, or None; used by :meth:`roc_auc` for a patient-level bootstrap.
        chosen_C: (S,) the inverse L2 strength used by each of the S outer splits (split ``k`` scored the rows with
            ``folds == k``); the fixed C repeated when C was fixed. None for probes without a C (kNN).
        c_search: for ``C="cv"``, the S inner searches (:class:`CSearch`, split indices into all N rows); else None.
    """

    label: str
    y_true: np.ndarray
    scores: np.ndarray
    folds: np.ndarray
    groups: np.ndarray | None = None
    chosen_C: np.ndarray | None = None
    c_search: list[CSearch] | None = None

    @property
    def evaluated(self) -> np.ndarray:
        """(N,) bool mask of the rows that have a score."""
        return self.folds >= 0

    def roc_auc(self, n_bootstrap: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
        """ROC AUC of the evaluated rows with a bootstrap CI (by patient when ``groups`` is set)."""
        m = self.evaluated
        g = None if self.groups is None else self.groups[m]
        return roc_auc_with_ci(
            self.y_true[m], self.scores[m], n_bootstrap=n_bootstrap, alpha=alpha, seed=seed, groups=g
        )


# fit_split(x_train, y_train, groups_train or None) -> (fitted model, C used or None, CSearch or None)
_FitSplit = Callable[[np.ndarray, np.ndarray, Any], tuple[Any, Any, Any]]


def _run_binary_probe(
    fit_split: _FitSplit,
    features: Any,
    labels: Any,
    groups: Any,
    train_mask: Any,
    test_mask: Any,
    folds: Any,
    n_splits: int,
    seed: int,
    uncertain: str,
    probe: str,
) -> ProbeScores | dict[str, ProbeScores]:
    x = _check_features(features)
    n = x.shape[0]
    g = _check_groups(groups, n)
    results: dict[str, ProbeScores] = {}
    for name, raw in _label_columns(labels, n):
        y = _apply_uncertain_policy(raw, uncertain, name)
        rows = np.flatnonzero(~np.isnan(y))
        if rows.size == 0:
            raise ValueError(f"label {name!r} has no rows left after dropping NaN/uncertain values.")
        pairs = _resolve_splits(rows, y[rows], g, train_mask, test_mask, folds, n_splits, seed, n, f"label {name!r}")
        scores = np.full(n, np.nan)
        fold_of_row = np.full(n, -1, dtype=np.int64)
        chosen: list[float | None] = []
        searches: list[CSearch | None] = []
        for k, (tr, te) in enumerate(pairs):
            if np.unique(y[tr]).size < 2:
                raise ValueError(
                    f"{probe}: the training rows of split {k} hold only class {y[tr][0]:g} for label {name!r}; "
                    "use fewer folds or more labelled patients."
                )
            model, c_used, search = fit_split(x[tr], y[tr].astype(np.int64), None if g is None else g[tr])
            positive = list(model.classes_).index(1)
            scores[te] = model.predict_proba(x[te])[:, positive]
            fold_of_row[te] = k
            chosen.append(c_used)
            if search is not None:  # inner split indices -> rows of the full feature matrix
                search = replace(search, splits=[(tr[a], tr[b]) for a, b in search.splits])
            searches.append(search)
        chosen_C = None if any(c is None for c in chosen) else np.asarray(chosen, dtype=np.float64)
        c_search = None if any(s is None for s in searches) else searches
        results[name] = ProbeScores(name, y, scores, fold_of_row, g, chosen_C, c_search)
    single = not isinstance(labels, pd.DataFrame) and np.asarray(labels).ndim == 1
    return next(iter(results.values())) if single else results


def linear_probe(
    features: Any,
    labels: Any,
    groups: Any = None,
    train_mask: Any = None,
    test_mask: Any = None,
    folds: Any = None,
    n_splits: int = 5,
    C: float | str = "cv",
    standardize: bool = True,
    max_iter: int = 5000,
    uncertain: str = "drop",
    seed: int = 0,
    Cs: Sequence[float] | np.ndarray | None = None,
    inner_splits: int = 5,
    fallback_C: float = FALLBACK_C,
    c_rule: str = DEFAULT_C_RULE,
    inner_repeats: int = DEFAULT_C_REPEATS,
) -> ProbeScores | dict[str, ProbeScores]:
    """L2 logistic-regression probe on frozen features, one binary model per label.

    Each outer split fits ``StandardScaler`` (if ``standardize``) and ``LogisticRegression(C, max_iter=max_iter)``
    on its training rows and scores its test rows with ``predict_proba``. See the module docstring for splits and
    labels.

    With ``C="cv"`` (default) each outer split chooses its own C by :func:`select_C` on its training rows only:
    5 shuffled stratified partitions of ``inner_splits`` patient-grouped folds, the grid ``Cs`` (default
    ``np.logspace(-4, 2, 13)``), scaler fit on each inner training fold, mean validation ROC AUC, the smallest C
    within one standard error of the best (``c_rule``, ``inner_repeats``; :func:`select_C` says why this default);
    then refits on all its training rows with the chosen C. The test rows of the split never take part in the
    choice. The chosen values are in ``ProbeScores.chosen_C`` (one per outer split) and the inner AUC curves in
    ``ProbeScores.c_search``. A float C fixes it (``C=0.01`` is the old fixed behaviour with a stronger L2; ``C=1.0``
    the old default).

    Args:
        features: (N, F) frozen features.
        labels: (N,) array/Series for one label, or (N, L) array/DataFrame for several; values 1/0/-1/NaN.
        groups: (N,) patient ids for patient-grouped cross-validation (outer and inner) and a leak check of the
            other split modes.
        train_mask: (N,) bool rows to train on (one split); ``test_mask`` defaults to its complement.
        test_mask: (N,) bool rows to score, with ``train_mask``.
        folds: (N,) int test-fold id per row (rows with id < 0 are never used); overrides ``n_splits``.
        n_splits: folds of the patient-grouped cross-validation used when neither ``train_mask`` nor ``folds`` is set.
        C: ``"cv"`` to choose the inverse L2 strength per split by inner grouped cross-validation, or a float > 0.
        standardize: standardise features with statistics of the training rows of each split (and inner fold).
        max_iter: lbfgs iterations.
        uncertain: what -1 means: ``"drop"`` (default), ``"zero"`` or ``"one"``.
        seed: seed of the outer cross-validation splitter (the inner partitions have fixed seeds 0, 1, ...).
        Cs: grid searched with ``C="cv"``; None for :data:`DEFAULT_CS`.
        inner_splits: inner folds with ``C="cv"`` (fewer when the split has fewer training patients).
        fallback_C: C used, with a warning, when a split's training rows are too few to cross-validate.
        c_rule: how ``C="cv"`` picks C from the inner curve (:func:`select_C`'s ``rule``).
        inner_repeats: partitions of the inner cross-validation (:func:`select_C`'s ``repeats``).

    Returns:
        :class:`ProbeScores` for a 1-D ``labels``, else a dict label name -> :class:`ProbeScores`.
    """
    _check_C(C, fallback_C)
    if c_rule not in C_RULES:
        raise ValueError(f"c_rule must be one of {C_RULES}, got {c_rule!r}.")
    if C == "cv":
        grid = _check_grid(Cs)
        if int(inner_splits) < 2:
            raise ValueError(f"inner_splits must be >= 2, got {inner_splits}.")

    def pipeline(c: float) -> Any:
        clf = LogisticRegression(C=c, max_iter=max_iter)
        return make_pipeline(StandardScaler(), clf) if standardize else clf

    def fit_split(x: np.ndarray, y: np.ndarray, g: np.ndarray | None) -> tuple[Any, float, CSearch | None]:
        search = None
        c = C
        if C == "cv":
            search = select_C(x, y, g, grid, inner_splits, standardize, max_iter, fallback_C, what="linear_probe",
                              rule=c_rule, repeats=inner_repeats)
            c = search.C
        return pipeline(float(c)).fit(x, y), float(c), search

    return _run_binary_probe(
        fit_split, features, labels, groups, train_mask, test_mask, folds, n_splits, seed, uncertain, "linear_probe"
    )


def knn_probe(
    features: Any,
    labels: Any,
    groups: Any = None,
    train_mask: Any = None,
    test_mask: Any = None,
    folds: Any = None,
    n_splits: int = 5,
    k: int = 20,
    metric: str = "cosine",
    standardize: bool = False,
    uncertain: str = "drop",
    seed: int = 0,
) -> ProbeScores | dict[str, ProbeScores]:
    """k-nearest-neighbour probe: the score of a test row is the fraction of positives among its ``k`` nearest
    training rows (``KNeighborsClassifier(k, metric=metric, algorithm="brute")``, uniform weights).

    Arguments and return value as in :func:`linear_probe`; ``standardize`` is off by default (cosine distances are
    taken on the raw features).
    """
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}.")

    def fit_split(x: np.ndarray, y: np.ndarray, g: np.ndarray | None) -> tuple[Any, None, None]:
        knn = KNeighborsClassifier(n_neighbors=int(k), metric=metric, algorithm="brute")
        return (make_pipeline(StandardScaler(), knn) if standardize else knn).fit(x, y), None, None

    x = _check_features(features)
    if x.shape[0] <= k:
        raise ValueError(f"knn_probe: k={k} needs more than {k} rows, features have {x.shape[0]}.")
    return _run_binary_probe(
        fit_split, x, labels, groups, train_mask, test_mask, folds, n_splits, seed, uncertain, "knn_probe"
    )


# ---------------------------------------------------------------------------------------------------------------------
# ROC AUC with bootstrap CI
# ---------------------------------------------------------------------------------------------------------------------
def _bootstrap_resamples(n: int, groups: Any, n_bootstrap: int, seed: int) -> Iterable[np.ndarray]:
    """Row indices of ``n_bootstrap`` bootstrap resamples of ``n`` rows, drawn with ``np.random.default_rng(seed)``.

    Without ``groups``: ``rng.integers(0, n, size=n)`` per resample. With ``groups`` (N,) (cluster bootstrap):
    ``rng.integers(0, G, size=G)`` indices into the G unique patients (``np.unique`` order), and the resample holds
    all rows of each drawn patient, repeated as often as drawn.
    """
    rng = np.random.default_rng(seed)
    members: list[np.ndarray] | None = None
    if groups is not None:  # checked now, not at the first draw (n_bootstrap may be 0)
        g = _check_groups(groups, n)
        _, inverse = np.unique(g, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        members = np.split(order, np.cumsum(np.bincount(inverse))[:-1])

    def draws() -> Iterable[np.ndarray]:
        for _ in range(int(n_bootstrap)):
            if members is None:
                yield rng.integers(0, n, size=n)
            else:
                picked = rng.integers(0, len(members), size=len(members))
                yield np.concatenate([members[p] for p in picked])

    return draws()


def roc_auc_with_ci(
    y_true: Any,
    y_score: Any,
    n_bootstrap: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    groups: Any = None,
) -> tuple[float, float, float]:
    """ROC AUC (``sklearn.metrics.roc_auc_score``) with a percentile bootstrap confidence interval.

    Resampling, with ``rng = np.random.default_rng(seed)`` and one draw per resample:

    - without ``groups``: ``rng.integers(0, N, size=N)`` row indices;
    - with ``groups`` (cluster bootstrap): ``rng.integers(0, G, size=G)`` indices into the G unique patients (in
      ``np.unique`` order); the resample holds all rows of each drawn patient, repeated as often as drawn.

    Resamples holding a single class are skipped (not redrawn). The interval is the ``alpha / 2`` and
    ``1 - alpha / 2`` quantiles (``np.quantile``, linear) of the valid resamples' AUCs.

    Args:
        y_true: (N,) binary labels 0/1.
        y_score: (N,) scores, higher meaning positive.
        n_bootstrap: number of resamples; 0 returns NaN bounds.
        alpha: 1 - confidence level.
        seed: seed of the resampling.
        groups: (N,) patient ids, for resampling patients instead of rows.

    Returns:
        ``(auc, low, high)``; bounds are NaN when no resample holds both classes.
    """
    y = np.asarray(y_true, dtype=np.float64)
    s = np.asarray(y_score, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"y_true and y_score must both have shape (N,), got {y.shape} and {s.shape}.")
    if not np.isfinite(s).all() or not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("y_true must hold only 0/1 and y_score only finite values (drop NaN rows first).")
    if np.unique(y).size < 2:
        raise ValueError(f"ROC AUC needs both classes in y_true; got only class {y[0]:g} in {y.size} rows.")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}.")
    auc = float(roc_auc_score(y, s))
    aucs = []
    for idx in _bootstrap_resamples(y.size, groups, n_bootstrap, seed):
        yb = y[idx]
        if yb.min() == yb.max():
            continue
        aucs.append(roc_auc_score(yb, s[idx]))
    if not aucs:
        return auc, math.nan, math.nan
    if len(aucs) < 0.9 * n_bootstrap:
        warnings.warn(
            f"roc_auc_with_ci: {n_bootstrap - len(aucs)} of {n_bootstrap} resamples held a single class and were "
            "skipped; the interval may be too narrow.",
            stacklevel=2,
        )
    low, high = np.quantile(np.asarray(aucs), [alpha / 2, 1 - alpha / 2])
    return auc, float(low), float(high)


# ---------------------------------------------------------------------------------------------------------------------
# age regression and site leakage
# ---------------------------------------------------------------------------------------------------------------------
def _quantile_bins(values: np.ndarray, n_bins: int) -> np.ndarray:
    edges = np.unique(np.quantile(values, np.linspace(0, 1, n_bins + 1)[1:-1]))
    return np.searchsorted(edges, values, side="right")


def _check_alphas(alphas: Any, name: str = "alphas") -> np.ndarray:
    grid = DEFAULT_ALPHAS if alphas is None else np.asarray(alphas, dtype=np.float64).reshape(-1)
    if grid.size == 0 or not np.isfinite(grid).all() or (grid <= 0).any():
        raise ValueError(f"{name} must be a non-empty grid of finite values > 0, got {np.asarray(alphas).tolist()}.")
    return np.unique(grid)  # ascending: the last of tied alphas is the most regularised


def _check_target(target: Any, n: int, name: str = "target") -> np.ndarray:
    """(N,) float64 target, NaN for missing; a non-numeric or infinite value raises a ValueError naming ``name``."""
    col = _check_rows(target, n, name)
    try:
        y = pd.to_numeric(pd.Series(col), errors="raise").to_numpy(dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name} must be numeric (NaN for missing): {e}") from e
    inf = np.flatnonzero(np.isinf(y))
    if inf.size:
        raise ValueError(f"{name} holds inf in {inf.size} rows (first: row {inf[0]}); use NaN for missing.")
    if np.isnan(y).all():
        raise ValueError(f"{name} is missing (NaN) in every row.")
    return y


def _ridge(alpha: float, standardize: bool) -> Any:
    return make_pipeline(StandardScaler(), Ridge(alpha=alpha)) if standardize else Ridge(alpha=alpha)


def _inner_ridge_mae(
    x: np.ndarray, y: np.ndarray, g: np.ndarray, grid: np.ndarray, inner_splits: int, standardize: bool
) -> np.ndarray:
    """(S, K) validation MAE of ``Ridge(grid[j])`` on each of the S ``GroupKFold`` folds of the rows given."""
    k = min(int(inner_splits), len(pd.unique(g)))
    splits = list(GroupKFold(n_splits=k).split(x, y, groups=g))
    fold_mae = np.empty((len(splits), grid.size))
    for s, (tr, va) in enumerate(splits):
        xtr, xva = x[tr], x[va]
        if standardize:
            scaler = StandardScaler().fit(xtr)
            xtr, xva = scaler.transform(xtr), scaler.transform(xva)
        for j, a in enumerate(grid):
            fold_mae[s, j] = np.abs(Ridge(alpha=float(a)).fit(xtr, y[tr]).predict(xva) - y[va]).mean()
    return fold_mae


@dataclass
class RegressionScores:
    """Out-of-fold (or test-split) predictions of a ridge probe of a continuous target, and of its floor.

    Attributes:
        name: the target's name (the Series name, else ``"target"``).
        y_true: (N,) float target; NaN for rows dropped (missing target).
        y_pred: (N,) ridge prediction of the scored rows; NaN elsewhere.
        floor_pred: (N,) the floor's prediction, the mean target of the training rows of the split that scored the
            row; NaN elsewhere.
        groups: (N,) patient ids, or None; used by :meth:`mae_ci` for a patient-level bootstrap.
        alphas_chosen: (S,) the ridge alpha used by each of the S outer splits (split ``k`` scored ``folds == k``).
        folds: (N,) int id of the outer split that scored the row; -1 for rows never scored.
        alpha_grid: (K,) the ascending alpha grid searched (one value when alpha was fixed).
        inner_mae: (S, K) mean inner-validation MAE per outer split and alpha; NaN when not searched (one value).
    """

    name: str
    y_true: np.ndarray
    y_pred: np.ndarray
    floor_pred: np.ndarray
    groups: np.ndarray | None
    alphas_chosen: np.ndarray
    folds: np.ndarray
    alpha_grid: np.ndarray | None = None
    inner_mae: np.ndarray | None = None

    @property
    def scored(self) -> np.ndarray:
        """(N,) bool mask of the rows that have a prediction."""
        return self.folds >= 0

    @property
    def mae(self) -> float:
        """Mean absolute error of the ridge predictions over the scored rows."""
        m = self.scored
        return float(np.abs(self.y_pred[m] - self.y_true[m]).mean())

    @property
    def floor_mae(self) -> float:
        """Mean absolute error of the mean-target floor over the same rows."""
        m = self.scored
        return float(np.abs(self.floor_pred[m] - self.y_true[m]).mean())

    def mae_ci(
        self, n_bootstrap: int = 1000, seed: int = 0, floor: bool = False, level: float = 0.95
    ) -> tuple[float, float, float]:
        """``(mae, low, high)``: MAE of the scored rows (of the floor if ``floor``) with a percentile bootstrap CI.

        Resamples patients with replacement (rows when ``groups`` is None; draws as in :func:`roc_auc_with_ci`) and
        takes the MAE over all scored rows of the drawn patients; the bounds are the ``(1 - level) / 2`` and
        ``(1 + level) / 2`` quantiles. ``n_bootstrap=0`` gives NaN bounds.
        """
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {level}.")
        m = self.scored
        err = np.abs((self.floor_pred if floor else self.y_pred)[m] - self.y_true[m])
        point = float(err.mean())
        g = None if self.groups is None else self.groups[m]
        boot = [err[idx].mean() for idx in _bootstrap_resamples(err.size, g, n_bootstrap, seed)]
        if not boot:
            return point, math.nan, math.nan
        low, high = np.quantile(np.asarray(boot), [(1 - level) / 2, (1 + level) / 2])
        return point, float(low), float(high)


def regression_probe(
    features: Any,
    target: Any,
    groups: Any = None,
    train_mask: Any = None,
    test_mask: Any = None,
    folds: Any = None,
    n_splits: int = 5,
    alphas: Sequence[float] | np.ndarray | None = None,
    inner_splits: int = 5,
    standardize: bool = True,
    seed: int = 0,
) -> RegressionScores:
    """Ridge probe of a continuous target (e.g. age from brain MRI features), alpha chosen by inner grouped CV.

    Rows with a missing (NaN) target are dropped. Outer splits as in :func:`linear_probe` (``train_mask``/
    ``test_mask``, ``folds``, or ``n_splits``-fold ``StratifiedGroupKFold`` by patient, stratified by target
    quintile). In each outer split the alpha is chosen on the training rows only: ``GroupKFold(inner_splits)`` by
    patient (fewer folds with fewer patients; each row its own patient when ``groups`` is None), ``StandardScaler``
    (if ``standardize``) fit on each inner training fold, ``Ridge(alpha)`` for every alpha of the grid, the mean
    over inner folds of the validation MAE minimised; ties (within 1e-12 relative) go to the larger alpha. The split
    then refits scaler and ridge on all its training rows. A one-value grid fixes alpha (no inner CV). The floor
    predicts the training rows' mean target for every held-out row of the same split.

    Args:
        features: (N, F) frozen features.
        target: (N,) numeric target, NaN for missing.
        groups: (N,) patient ids (outer and inner CV, leak check, bootstrap).
        train_mask, test_mask, folds, n_splits, seed: outer splits as in :func:`linear_probe`.
        alphas: ridge grid; None for :data:`DEFAULT_ALPHAS`.
        inner_splits: inner folds (>= 2).
        standardize: standardise features with training-row statistics (inner and outer).

    Returns:
        A :class:`RegressionScores`.
    """
    grid = _check_alphas(alphas)
    if int(inner_splits) < 2:
        raise ValueError(f"inner_splits must be >= 2, got {inner_splits}.")
    x = _check_features(features)
    n = x.shape[0]
    y = _check_target(target, n)
    g = _check_groups(groups, n)
    rows = np.flatnonzero(~np.isnan(y))
    strata = _quantile_bins(y[rows], _AGE_BINS)
    pairs = _resolve_splits(rows, strata, g, train_mask, test_mask, folds, n_splits, seed, n, "regression_probe")
    y_pred, floor_pred = np.full(n, np.nan), np.full(n, np.nan)
    fold_of_row = np.full(n, -1, dtype=np.int64)
    chosen = np.empty(len(pairs))
    inner = np.full((len(pairs), grid.size), np.nan)
    for k, (tr, te) in enumerate(pairs):
        best = 0
        if grid.size > 1:
            g_tr = np.arange(tr.size) if g is None else g[tr]
            if len(pd.unique(g_tr)) < 2:
                raise ValueError(
                    f"regression_probe: the training rows of split {k} hold a single patient; cannot choose alpha "
                    "by inner cross-validation (pass one alpha, or use fewer folds)."
                )
            inner[k] = _inner_ridge_mae(x[tr], y[tr], g_tr, grid, inner_splits, standardize).mean(axis=0)
            best = int(np.flatnonzero(inner[k] <= inner[k].min() * (1 + 1e-12))[-1])
        chosen[k] = grid[best]
        y_pred[te] = _ridge(float(grid[best]), standardize).fit(x[tr], y[tr]).predict(x[te])
        floor_pred[te] = y[tr].mean()
        fold_of_row[te] = k
    name = str(target.name) if isinstance(target, pd.Series) and target.name is not None else "target"
    return RegressionScores(name, y, y_pred, floor_pred, g, chosen, fold_of_row, grid, inner)


def age_regression(
    features: Any,
    age: Any,
    groups: Any = None,
    train_mask: Any = None,
    test_mask: Any = None,
    folds: Any = None,
    n_splits: int = 5,
    alpha: float | None = 1.0,
    standardize: bool = True,
    seed: int = 0,
) -> float:
    """Mean absolute error of a ridge regression of age on frozen features (brain MRI's standard probe).

    A thin wrapper of :func:`regression_probe` returning its ``mae``: a number ``alpha`` fixes the ridge strength
    (the default, 1.0, is the old fixed behaviour); ``alpha=None`` chooses it per outer split by inner grouped CV
    over :data:`DEFAULT_ALPHAS`. Use :func:`regression_probe` for the floor, the chosen alphas and a CI.

    Args:
        features: (N, F) frozen features.
        age: (N,) ages in years, NaN for missing.
        groups: (N,) patient ids.
        train_mask, test_mask, folds, n_splits, seed: splits as in :func:`linear_probe`.
        alpha: ridge regularisation strength (> 0), or None to choose it by inner cross-validation.
        standardize: standardise features with training-row statistics.

    Returns:
        The MAE in the unit of ``age``.
    """
    if alpha is not None and not (isinstance(alpha, (int, float, np.number)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0 or None, got {alpha!r}.")
    x = _check_features(features)
    y = _check_target(age, x.shape[0], "age")  # errors name "age", not "target"
    alphas = None if alpha is None else [float(alpha)]
    return regression_probe(x, y, groups, train_mask, test_mask, folds, n_splits, alphas, standardize=standardize,
                            seed=seed).mae


@dataclass
class SiteLeakage:
    """Result of :func:`site_leakage`.

    Attributes:
        balanced_accuracy: balanced accuracy of predicting site from the features (out-of-fold).
        chance: chance level of balanced accuracy, ``1 / n_sites``.
        n_sites: number of distinct sites among the evaluated rows.
        n_samples: number of evaluated rows.
    """

    balanced_accuracy: float
    chance: float
    n_sites: int
    n_samples: int


def site_leakage(
    features: Any,
    site: Any,
    groups: Any = None,
    train_mask: Any = None,
    test_mask: Any = None,
    folds: Any = None,
    n_splits: int = 5,
    C: float = 1.0,
    standardize: bool = True,
    max_iter: int = 5000,
    seed: int = 0,
) -> SiteLeakage:
    """How well site can be predicted from frozen features: balanced accuracy of a (multinomial) logistic regression.

    Lower means the representation is less site-specific; ``chance`` (``1 / n_sites``) is the floor. Rows with a
    missing site are dropped. Folds are patient-grouped and stratified by site. A site absent from a split's
    training rows cannot be predicted for that split, which lowers the score: give each site at least ``n_splits``
    patients.

    Args:
        features: (N, F) frozen features.
        site: (N,) site labels (any hashable: str or int), NaN/None for missing.
        groups: (N,) patient ids.
        train_mask, test_mask, folds, n_splits, seed: splits as in :func:`linear_probe`.
        C: inverse L2 regularisation strength.
        standardize: standardise features with training-row statistics.
        max_iter: lbfgs iterations.

    Returns:
        :class:`SiteLeakage`.
    """
    if C <= 0:
        raise ValueError(f"C must be > 0, got {C}.")
    x = _check_features(features)
    n = x.shape[0]
    s = _check_rows(site, n, "site")
    g = _check_groups(groups, n)
    rows = np.flatnonzero(~pd.isna(s))
    n_sites = len(pd.unique(s[rows]))
    if n_sites < 2:
        raise ValueError(f"site_leakage needs at least 2 sites, got {n_sites}.")
    _, codes_kept = np.unique(s[rows].astype(str), return_inverse=True)
    codes = np.full(n, -1, dtype=np.int64)
    codes[rows] = codes_kept
    pairs = _resolve_splits(rows, codes[rows], g, train_mask, test_mask, folds, n_splits, seed, n, "site_leakage")
    true, pred = [], []
    for tr, te in pairs:
        clf = LogisticRegression(C=C, max_iter=max_iter)
        model = make_pipeline(StandardScaler(), clf) if standardize else clf
        if np.unique(codes[tr]).size < 2:
            raise ValueError("site_leakage: a split's training rows hold a single site.")
        model.fit(x[tr], codes[tr])
        true.append(codes[te])
        pred.append(model.predict(x[te]))
    true_all, pred_all = np.concatenate(true), np.concatenate(pred)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true", category=UserWarning)
        bacc = float(balanced_accuracy_score(true_all, pred_all))
    n_eval_sites = np.unique(true_all).size
    return SiteLeakage(bacc, 1.0 / n_eval_sites, int(n_eval_sites), int(true_all.size))


# ---------------------------------------------------------------------------------------------------------------------
# label efficiency
# ---------------------------------------------------------------------------------------------------------------------
def label_efficiency(
    features: Any,
    labels: Any,
    groups: Any,
    train_mask: Any,
    n_patients: Sequence[int | None] = (25, 50, 100, 200, None),
    n_draws: int = 5,
    seed: int = 0,
    C: float | str = "cv",
    *,
    Cs: Sequence[float] | np.ndarray | None = None,
    inner_splits: int = 5,
    fallback_C: float = FALLBACK_C,
    standardize: bool = True,
    max_iter: int = 5000,
    uncertain: str = "drop",
    max_redraws: int = 10,
) -> pd.DataFrame:
    """ROC AUC of the linear probe trained on a few labelled patients: how much a representation saves labels.

    For each size ``n`` in ``n_patients`` and each draw, ``n`` patients are drawn without replacement from the
    training patients (the patients of the ``train_mask`` rows whose label is kept); the probe (:func:`linear_probe`
    with ``C``, all images of the drawn patients) is fit on them and scored on the fixed held-out set, every
    labelled ``~train_mask`` row. A draw whose rows hold a single class is redrawn, up to ``max_redraws`` times, and
    then skipped with a warning. Sizes larger than the number of training patients are skipped with a warning;
    ``None`` means all training patients, and a size equal to all of them is fit once (every draw would be equal).

    The draws depend only on ``labels``, ``groups``, ``train_mask`` and ``seed`` (one
    ``np.random.default_rng(seed)``, patients in ``np.unique`` order), never on the features, so every method
    scored with the same arguments is trained on the same patients: the comparison is paired.

    Args:
        features: (N, F) frozen features.
        labels: (N,) one binary label, 1/0/-1/NaN (policy ``uncertain``; NaN rows are neither drawn nor scored).
        groups: (N,) patient ids (required: draws are of patients).
        train_mask: (N,) bool, True for rows of the patients that may be drawn; the others are the held-out set.
        n_patients: numbers of training patients to draw (or one number); ``None`` for all of them.
        n_draws: draws per size.
        seed: seed of the draws (and of nothing else: the inner partitions have fixed seeds).
        C, Cs, inner_splits, fallback_C, standardize, max_iter: the probe, as in :func:`linear_probe`.
        uncertain: what -1 means, as in :func:`linear_probe`.
        max_redraws: redraws allowed for a draw whose rows hold a single class.

    Returns:
        A DataFrame with one row per size and draw, in the order drawn: ``n_patients`` (int, the actual number),
        ``draw``, ``auc`` (held-out ROC AUC), ``chosen_C``, ``n_images`` (training rows), ``n_positive`` (positive
        training rows) and ``patients`` (tuple of the drawn patient ids, in ``np.unique`` order). ``df.attrs`` holds
        ``n_train_patients``, ``n_test_patients`` and ``n_test_images``.
    """
    if int(n_draws) < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}.")
    if int(max_redraws) < 0:
        raise ValueError(f"max_redraws must be >= 0, got {max_redraws}.")
    _check_C(C, fallback_C)
    x = _check_features(features)
    n = x.shape[0]
    columns = _label_columns(labels, n)
    if len(columns) != 1:
        raise ValueError(f"label_efficiency takes one label (N,), got {len(columns)} columns.")
    name, raw = columns[0]
    y = _apply_uncertain_policy(raw, uncertain, name)
    if groups is None:
        raise ValueError("label_efficiency needs groups (patient ids): it draws patients.")
    g = _check_groups(groups, n)
    train = _check_rows(train_mask, n, "train_mask").astype(bool)
    labelled = ~np.isnan(y)
    train_rows, test_rows = np.flatnonzero(train & labelled), np.flatnonzero(~train & labelled)
    shared = np.intersect1d(g[train_rows], g[test_rows])
    if shared.size:
        pid = shared[0].item() if isinstance(shared[0], np.generic) else shared[0]
        raise ValueError(f"label_efficiency: patient {pid!r} has rows both in and out of train_mask.")
    if np.unique(y[test_rows]).size < 2:
        raise ValueError(
            f"label_efficiency: the {test_rows.size} held-out (~train_mask) rows of label {name!r} need both classes."
        )
    patients, inverse = np.unique(g[train_rows], return_inverse=True)
    members = [train_rows[inverse == p] for p in range(patients.size)]
    n_avail = patients.size
    if n_patients is None or isinstance(n_patients, (int, np.integer)):
        n_patients = (n_patients,)
    sizes: list[int] = []
    too_large: list[int] = []
    for size in n_patients:
        size = n_avail if size is None else int(size)
        if size < 1:
            raise ValueError(f"n_patients must hold sizes >= 1 (or None), got {size}.")
        if size > n_avail:
            too_large.append(size)
        elif size not in sizes:
            sizes.append(size)
    if too_large:
        warnings.warn(
            f"label_efficiency: skipping n_patients {too_large}: only {n_avail} training patients are labelled "
            f"for {name!r}.",
            stacklevel=2,
        )
    test_mask = np.zeros(n, dtype=bool)
    test_mask[test_rows] = True
    rng = np.random.default_rng(seed)
    records = []
    for size in sizes:
        for draw in range(1 if size == n_avail else int(n_draws)):
            for _ in range(int(max_redraws) + 1):
                picked = np.sort(rng.choice(n_avail, size=size, replace=False))
                rows = np.concatenate([members[p] for p in picked])
                if np.unique(y[rows]).size == 2:
                    break
            else:
                warnings.warn(
                    f"label_efficiency: draw {draw} of {size} patients held a single class of {name!r} in "
                    f"{int(max_redraws) + 1} tries; skipped.",
                    stacklevel=2,
                )
                continue
            fit_mask = np.zeros(n, dtype=bool)
            fit_mask[rows] = True
            result = linear_probe(
                x,
                y,
                groups=g,
                train_mask=fit_mask,
                test_mask=test_mask,
                C=C,
                standardize=standardize,
                max_iter=max_iter,
                Cs=Cs,
                inner_splits=inner_splits,
                fallback_C=fallback_C,
            )
            records.append(
                {
                    "n_patients": size,
                    "draw": draw,
                    "auc": float(roc_auc_score(y[test_rows], result.scores[test_rows])),
                    "chosen_C": float(result.chosen_C[0]),
                    "n_images": int(rows.size),
                    "n_positive": int(y[rows].sum()),
                    "patients": tuple(p.item() if isinstance(p, np.generic) else p for p in patients[picked]),
                }
            )
    out = pd.DataFrame.from_records(
        records, columns=["n_patients", "draw", "auc", "chosen_C", "n_images", "n_positive", "patients"]
    )
    out.attrs.update(
        n_train_patients=int(n_avail),
        n_test_patients=int(np.unique(g[test_rows]).size),
        n_test_images=int(test_rows.size),
    )
    return out


def summarise_label_efficiency(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread of the held-out AUC over the draws of each size of :func:`label_efficiency`.

    Args:
        df: the output of :func:`label_efficiency` (columns ``n_patients`` and ``auc`` at least; NaN AUCs ignored).

    Returns:
        One row per ``n_patients`` (ascending): ``n_patients``, ``auc_mean``, ``auc_std`` (sample standard
        deviation over draws, ``ddof=1``; NaN for a single draw), ``n_draws`` and ``chosen_C_median`` (when
        ``df`` has ``chosen_C``).
    """
    missing = [c for c in ("n_patients", "auc") if c not in df.columns]
    if missing:
        raise ValueError(f"label-efficiency table lacks columns {missing}; columns are {list(df.columns)}.")
    valid = df[np.isfinite(df["auc"].to_numpy(dtype=np.float64))]
    grouped = valid.groupby("n_patients", sort=True)
    out = pd.DataFrame(
        {
            "auc_mean": grouped["auc"].mean(),
            "auc_std": grouped["auc"].std(ddof=1),
            "n_draws": grouped["auc"].count().astype(np.int64),
        }
    )
    if "chosen_C" in valid.columns:
        out["chosen_C_median"] = grouped["chosen_C"].median()
    return out.reset_index()


def _check_summaries(summaries: Mapping[str, pd.DataFrame]) -> None:
    if not summaries:
        raise ValueError("summaries is empty: pass {method name: summarise_label_efficiency(...)}.")
    for method, table in summaries.items():
        missing = [c for c in ("n_patients", "auc_mean", "auc_std") if c not in table.columns]
        if missing:
            raise ValueError(f"summary of {method!r} lacks columns {missing}; columns are {list(table.columns)}.")


def format_label_efficiency(summaries: Mapping[str, pd.DataFrame]) -> str:
    """Fixed-width text table of label efficiency: one row per method, one column per number of patients.

    Args:
        summaries: method name -> :func:`summarise_label_efficiency` output.

    Returns:
        Header (``n=<patients>`` columns, ascending), a rule and one line per method; cells ``"mean ± std"`` of
        the held-out AUC (just the mean for a single draw, ``-`` for a size the method lacks).
    """
    _check_summaries(summaries)
    sizes = sorted({int(v) for t in summaries.values() for v in t["n_patients"]})
    header = ["method"] + [f"n={s}" for s in sizes]
    body = []
    for method, table in summaries.items():
        by_size = {int(r.n_patients): r for r in table.itertuples(index=False)}
        cells = [str(method)]
        for s in sizes:
            r = by_size.get(s)
            if r is None or not math.isfinite(r.auc_mean):
                cells.append("-")
            else:
                cells.append(f"{r.auc_mean:.3f}" + (f" ± {r.auc_std:.3f}" if math.isfinite(r.auc_std) else ""))
        body.append(cells)
    widths = [max(len(line[j]) for line in [header] + body) for j in range(len(header))]

    def render(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([render(header), "  ".join("-" * w for w in widths)] + [render(b) for b in body])


def plot_label_efficiency(summaries: Mapping[str, pd.DataFrame], path: str | Path, title: str | None = None) -> Path:
    """Plot held-out AUC against the number of labelled training patients, one line per method.

    Draws with matplotlib's Agg canvas (no display, no change to pyplot's global state): log x-axis ticked at the
    patient counts, error bars of one standard deviation over draws (none for a single draw).

    Args:
        summaries: method name -> :func:`summarise_label_efficiency` output.
        path: image file to write (format from the suffix, e.g. ``.png``, ``.pdf``); parent folders are created.
        title: optional figure title.

    Returns:
        ``path`` as a ``Path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    _check_summaries(summaries)
    fig = Figure(figsize=(6.0, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    sizes: set[int] = set()
    for method, table in summaries.items():
        table = table.sort_values("n_patients")
        n = table["n_patients"].to_numpy(dtype=np.float64)
        sizes.update(int(v) for v in n)
        err = np.nan_to_num(table["auc_std"].to_numpy(dtype=np.float64), nan=0.0)
        ax.errorbar(n, table["auc_mean"].to_numpy(dtype=np.float64), yerr=err, marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    ticks = sorted(sizes)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("labelled training patients")
    ax.set_ylabel("ROC AUC on held-out patients")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# report rows and the printed table
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ProbeReport:
    """One row of the comparison table.

    Attributes:
        method: name of the pretraining method.
        auc, auc_low, auc_high: ROC AUC and its CI bounds (NaN if not measured).
        site_leakage: site balanced accuracy; ``site_chance`` its chance level.
        wall_time_s: wall time of the method (pretraining plus probing, as the caller measures it).
        ci_level: confidence level of the AUC interval.
        extra: further columns (name -> value), printed after the fixed ones in insertion order.
    """

    method: str
    auc: float = math.nan
    auc_low: float = math.nan
    auc_high: float = math.nan
    site_leakage: float = math.nan
    site_chance: float = math.nan
    wall_time_s: float = math.nan
    ci_level: float = 0.95
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Flat dict (the fixed fields, then ``extra``), e.g. for a CSV or JSON report."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "extra"}
        out.update(self.extra)
        return out


def probe_report(
    features: Any,
    metadata: pd.DataFrame,
    method: str,
    label: str,
    patient_column: str = "patient_id",
    site_column: str | None = "site",
    age_column: str | None = None,
    wall_time_s: float = math.nan,
    n_splits: int = 5,
    n_bootstrap: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    train_mask: Any = None,
    C: float | str = "cv",
) -> ProbeReport:
    """Linear probe of ``label`` with a patient-level bootstrap CI, site leakage and (optionally) age MAE in one row.

    Args:
        features: (N, F) frozen features.
        metadata: DataFrame with N rows aligned with ``features`` (e.g. from :func:`extract_features`).
        method: name printed in the table.
        label: label column to probe (1/0/-1/NaN; -1 dropped).
        patient_column: column of patient ids (grouped CV, cluster bootstrap).
        site_column: column of sites, or None to skip site leakage.
        age_column: column of ages, or None to skip age regression (extra column ``"age MAE"``: ridge with its L2
            strength chosen by inner patient-grouped CV, as ``monai-du compare --age``).
        wall_time_s: the method's wall time, passed through to the row.
        n_splits, seed, train_mask: splits as in :func:`linear_probe`.
        n_bootstrap, alpha: bootstrap of the AUC CI.
        C: the linear probe's C (``"cv"``: chosen per fold by inner grouped cross-validation; or a float).

    Returns:
        A :class:`ProbeReport`.
    """
    for col in [label, patient_column, site_column, age_column]:
        if col is not None and col not in metadata.columns:
            raise ValueError(f"metadata has no column {col!r}; columns are {list(metadata.columns)}.")
    groups = metadata[patient_column]
    split = {"train_mask": train_mask, "n_splits": n_splits, "seed": seed}
    scores = linear_probe(features, metadata[label], groups=groups, C=C, **split)
    auc, low, high = scores.roc_auc(n_bootstrap=n_bootstrap, alpha=alpha, seed=seed)
    report = ProbeReport(method, auc, low, high, wall_time_s=wall_time_s, ci_level=1 - alpha)
    if site_column is not None:
        leak = site_leakage(features, metadata[site_column], groups=groups, **split)
        report.site_leakage, report.site_chance = leak.balanced_accuracy, leak.chance
    if age_column is not None:
        report.extra["age MAE"] = age_regression(features, metadata[age_column], groups=groups, alpha=None, **split)
    return report


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(rows: Sequence[ProbeReport | Mapping[str, Any]]) -> str:
    """Fixed-width text table of report rows: method, AUC [CI], site leakage (chance), wall time, then extras.

    Args:
        rows: :class:`ProbeReport` objects or mappings with the same keys (``method``, ``auc``, ``auc_low``,
            ``auc_high``, ``site_leakage``, ``site_chance``, ``wall_time_s``, ``ci_level``); any other key of a
            mapping, or of a report's ``extra``, becomes an extra column. Missing values print as ``-``.

    Returns:
        The table as a string (header, a rule, one line per row), ready to ``print``.
    """
    fixed = ("method", "auc", "auc_low", "auc_high", "site_leakage", "site_chance", "wall_time_s", "ci_level")
    dicts = [r.as_dict() if isinstance(r, ProbeReport) else dict(r) for r in rows]
    extras: list[str] = []
    for d in dicts:
        extras += [k for k in d if k not in fixed and k not in extras]
    levels = {round(float(d.get("ci_level", 0.95)), 6) for d in dicts}
    ci_name = f"AUC [{100 * levels.pop():g}% CI]" if len(levels) == 1 else "AUC [CI]"
    header = ["method", ci_name, "site leakage (chance)", "wall time"] + extras
    body = []
    for d in dicts:
        auc = _fmt(d.get("auc"))
        if auc != "-" and _fmt(d.get("auc_low")) != "-":
            auc += f" [{_fmt(d.get('auc_low'))}, {_fmt(d.get('auc_high'))}]"
        leak = _fmt(d.get("site_leakage"))
        if leak != "-" and _fmt(d.get("site_chance")) != "-":
            leak += f" ({_fmt(d.get('site_chance'))})"
        wall = _fmt(d.get("wall_time_s"), 1)
        wall = wall if wall == "-" else f"{wall} s"
        body.append([str(d.get("method", "-")), auc, leak, wall] + [_fmt(d.get(k)) for k in extras])
    widths = [max(len(line[j]) for line in [header] + body) for j in range(len(header))]

    def render(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    lines = [render(header), "  ".join("-" * w for w in widths)] + [render(b) for b in body]
    return "\n".join(lines)
