"""``monai-du compare``: does a prior help on *your* data? Every method is a run of the pretrain bundle.

For every seed, :func:`run_compare` splits the manifest's patients (train / test), runs the pretrain bundle once per
method on the training patients (``configs/train.yaml`` plus the method's file from ``configs/methods/``, one
``bundle_root`` per method and seed, same epochs and batch size), then probes each exported encoder, frozen, on the
label: a linear probe whose L2 strength is chosen by inner patient-grouped cross-validation, a kNN probe, site
leakage, and the label-efficiency curve (AUC against the number of labelled training patients).

Nothing here builds a trainer, loss, sampler, network or kernel: the bundle defines the run, and each method file
declares its printed name, its place in the table and, for a composite method, its stages (:mod:`monai_du.bundles`).

With ``pool``, every method pretrains on an unlabelled pool (less the labelled patients) and the probes are
cross-fitted over every labelled patient.

Reruns never serve stale numbers: a run is keyed by everything that shaped it (:mod:`monai_du.runs`: reused when
finished with the same inputs, resumed when interrupted, refused with what changed when its folder holds a run of
other inputs), and a probe (``eval/probe.json``) is reused only for the same run, label and probe settings.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from joblib import parallel_config
from joblib.externals.loky import get_reusable_executor
from monai.bundle import ConfigParser
from monai.data import Dataset
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from monai_du import report
from monai_du.audit import format_audit, run_audit
from monai_du.bundle_priors import innermost_cause
from monai_du.bundles import (
    MethodSpec,
    bundle_path,
    check_overrides,
    default_methods,
    finetune_bundle_for,
    kernel_methods,
    method_files,
    pool_run_split,
    stage_files,
)
from monai_du.data.loading import load_images
from monai_du.data.manifest import (
    RESOLVED_IMAGE_COLUMN,
    label_values,
    read_manifest,
    resolve_label_column,
    write_manifest,
)
from monai_du.data.splits import pool_without_patients, select_split
from monai_du.encoders import load_encoder
from monai_du.engines import cpus_per_process
from monai_du.evaluation import (
    extract_features,
    knn_probe,
    label_efficiency,
    linear_probe,
    patient_grouped_splits,
    regression_probe,
    site_leakage,
)
from monai_du.finetune_compare import VAL_FRACTION, finetune_encoder, finetune_plan
from monai_du.io import DoneMarker, file_digest, write_text_atomic
from monai_du.runs import DONE_MARKER, encoder_table, run_inputs, run_method, stage_roots, training_losses

__all__ = ["CompareConfig", "pool_rows", "run_compare"]

_PROBE = "probe.json"

#: Bundle ids that compare sets for every run from its own options; ``overrides`` may not set them.
_OWN_IDS: dict[str, str] = {
    "manifest": "manifest", "dataset_dir": "dataset_dir", "seed": "seeds", "split_seed": "seeds",
    "split_fractions": "test_fraction", "pretrain_split": "test_fraction", "max_epochs": "epochs",
    "batch_size": "batch_size", "bundle_root": "out",
}


def _whole(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}.")
    return int(value)

#: Ids of the fine-tune bundle that compare sets for every fine-tune run (data, encoder, mode, seed, epochs).
_FINETUNE_IDS = ("manifest", "dataset_dir", "labels", "pretrained", "require_pretrained", "mode", "seed",
                 "backbone", "widen_factor", "spatial_size", "image_loading", "bundle_root", "predict_split",
                 "ckpt_dir", "train#trainer#max_epochs")


@dataclass
class CompareConfig:
    """Settings of :func:`run_compare`, checked when the config is made (the same messages in Python and from
    ``monai-du compare``, before any work starts).

    Attributes:
        manifest: the manifest file (``monai_du.data.manifest`` schema).
        label: the label to probe (``label_x``, ``x`` or a finding name).
        dataset_dir: root of relative image paths (default: the manifest's folder).
        bundle: pretrain bundle, a modality key (``cxr``, ``brain``) or a folder.
        methods: method keys, in table order (None: the bundle's default methods, by their ``method_order``).
        method_configs: the user's own method files (named by their stem).
        seeds: distinct seeds >= 0; each draws a patient split, initial weights and augmentations.
        epochs, batch_size: the budget of every method (None: the bundle's).
        out: report folder; runs go to ``out/runs/seed<k>/<method>``.
        test_fraction: share of patients held out for the probes.
        label_sizes: labelled training patients of the label-efficiency curve (None: all).
        label_draws: draws per size.
        n_bootstrap: patient-level bootstrap resamples of the AUC CI.
        overrides: further bundle overrides for every run (e.g. ``{"num_workers": 0}``): ids of the bundle, values as
            data (no ``$`` expressions); epochs, batch size, split and paths have their own settings.
        plots: write PNG plots.
        audit: also audit the priors of the compared kernel methods (:func:`monai_du.audit.run_audit`, with the same
            bundle, batch size and overrides) and print each one's verdict next to its measured difference from
            plain DU; the audit goes to ``out/audit``.
        pool: an unlabelled pool manifest to pretrain on (any sites, no label needed). ``manifest`` is then only
            the labelled cohort of the probes, which are cross-fitted over all its patients (``folds``
            stratified patient-grouped folds, each patient scored once); ``test_fraction`` is not used. None:
            pretrain on ``manifest``'s training patients and probe its held-out ones.
        pool_dataset_dir: root of the pool's relative image paths (default: the pool manifest's folder).
        keep_labelled_in_pool: keep pool rows of patients of the labelled manifest (default False: they are
            removed, so no probe scores a patient the encoder saw; the report says how many).
        folds: cross-fitting folds of the probes with a pool.
        age: a column of ages (years) to regress from the frozen features too (None: no age probe): ridge regression
            with its L2 strength chosen by inner patient-grouped CV, on the same patients as the label's probe, its
            MAE with a patient-bootstrap CI, and the mean-age predictor on the same splits as the floor.
        finetune: also fine-tune every compared encoder end to end through the fine-tune bundle, on the probes'
            splits and label sizes (:mod:`monai_du.finetune_compare`), and report that table beside the probes'.
            Off by default: it is methods x seeds x splits x sizes more training runs.
        finetune_sizes: labelled training patients of the fine-tune runs (None: ``label_sizes``; None in it: all).
        finetune_epochs: epochs of each fine-tune run (None: the fine-tune bundle's).
        finetune_bundle: the fine-tune bundle (None: the shipped one that fits ``bundle``).
        finetune_overrides: further ids of the fine-tune bundle for every fine-tune run (values as data).

    Raises:
        ValueError: naming the setting, for a bad value.
    """

    manifest: str | Path
    label: str
    dataset_dir: str | Path | None = None
    bundle: str | Path = "cxr"
    methods: Sequence[str] | None = None
    method_configs: Sequence[str | Path] = ()
    seeds: Sequence[int] = (0, 1, 2)
    epochs: int | None = None
    batch_size: int | None = None
    out: str | Path = "monai_du_compare"
    test_fraction: float = 0.3
    label_sizes: Sequence[int | None] = (25, 50, 100, 200, None)
    label_draws: int = 5
    n_bootstrap: int = 1000
    overrides: Mapping[str, Any] = field(default_factory=dict)
    plots: bool = True
    audit: bool = True
    pool: str | Path | None = None
    pool_dataset_dir: str | Path | None = None
    keep_labelled_in_pool: bool = False
    folds: int = 5
    age: str | None = None
    finetune: bool = False
    finetune_sizes: Sequence[int | None] | None = None
    finetune_epochs: int | None = None
    finetune_bundle: str | Path | None = None
    finetune_overrides: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # paths become absolute: a value that starts with '$' is a file name here, never a config expression
        self.manifest = Path(self.manifest).expanduser().absolute()
        if not self.manifest.is_file():
            raise ValueError(f"manifest {self.manifest} does not exist.")
        self.dataset_dir = Path(self.dataset_dir or self.manifest.parent).expanduser().absolute()
        if not self.dataset_dir.is_dir():
            raise ValueError(f"dataset_dir {self.dataset_dir} is not a folder.")
        self.out = Path(self.out).expanduser().absolute()
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"out {self.out} is a file, not a folder.")
        writable = next(folder for folder in (self.out, *self.out.parents) if folder.exists())
        if not os.access(writable, os.W_OK | os.X_OK):
            raise ValueError(f"out {self.out}: {writable} is not writable; choose another report folder.")
        if not str(self.label).strip():
            raise ValueError("label must name a label column, got an empty string.")
        if self.age is not None and not str(self.age).strip():
            raise ValueError("age must name a column of ages, got an empty string.")
        self.bundle = bundle_path(self.bundle)
        if self.methods is None:
            self.methods = default_methods(self.bundle)
        self.methods = tuple(str(m) for m in self.methods)
        self.method_configs = tuple(self.method_configs)
        if not self.methods and not self.method_configs:
            raise ValueError("methods is empty: name at least one method.")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods lists a method twice: {list(self.methods)}.")
        method_files(self.bundle, self.methods, self.method_configs)  # unknown methods, unreadable files
        self.seeds = tuple(_whole(seed, "each seed", 0) for seed in self.seeds)
        if not self.seeds:
            raise ValueError("seeds is empty: give at least one seed.")
        repeated = sorted({seed for seed in self.seeds if self.seeds.count(seed) > 1})
        if repeated:
            raise ValueError(f"seeds {repeated} are given twice: a repeated seed is the same run again, not another "
                             "replicate.")
        if self.epochs is not None:
            self.epochs = _whole(self.epochs, "epochs", 1)
        if self.batch_size is not None:
            self.batch_size = _whole(self.batch_size, "batch_size", 2)
        if not isinstance(self.test_fraction, (int, float)) or not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must lie in (0, 1), got {self.test_fraction!r}.")
        self.label_sizes = tuple(None if n is None else _whole(n, "each label size", 1) for n in self.label_sizes)
        self.label_draws = _whole(self.label_draws, "label_draws", 1)
        self.n_bootstrap = _whole(self.n_bootstrap, "n_bootstrap", 0)
        self.folds = _whole(self.folds, "folds", 2)
        if self.pool is not None:
            self.pool = Path(self.pool).expanduser().absolute()
            if not self.pool.is_file():
                raise ValueError(f"pool {self.pool} does not exist.")
            self.pool_dataset_dir = Path(self.pool_dataset_dir or self.pool.parent).expanduser().absolute()
            if not self.pool_dataset_dir.is_dir():
                raise ValueError(f"pool_dataset_dir {self.pool_dataset_dir} is not a folder.")
        elif self.pool_dataset_dir is not None:
            raise ValueError("pool_dataset_dir goes with pool: give the pool manifest too.")
        for key in self.overrides:
            if key in _OWN_IDS:
                raise ValueError(f"override {key!r}: compare sets it for every run; use its {_OWN_IDS[key]} setting "
                                 f"(--{_OWN_IDS[key].replace('_', '-')}).")
        self.overrides = check_overrides(self.bundle, self.overrides, self.method_configs)
        self.finetune = bool(self.finetune)
        sizes = self.label_sizes if self.finetune_sizes is None else self.finetune_sizes
        self.finetune_sizes = tuple(None if n is None else _whole(n, "each fine-tune size", 2) for n in sizes)
        if not self.finetune_sizes:
            raise ValueError("finetune_sizes is empty: give at least one size (or None for all patients).")
        if self.finetune_epochs is not None:
            self.finetune_epochs = _whole(self.finetune_epochs, "finetune_epochs", 1)
        self.finetune_bundle = (finetune_bundle_for(self.bundle) if self.finetune_bundle is None
                                else bundle_path(self.finetune_bundle))
        for key in self.finetune_overrides:
            if key in _FINETUNE_IDS:
                raise ValueError(f"finetune override {key!r}: compare sets it for every fine-tune run.")
        self.finetune_overrides = check_overrides(self.finetune_bundle, self.finetune_overrides)


# ---------------------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------------------
def _split_overrides(seed: int, test_fraction: float) -> dict[str, Any]:
    """The bundle ids of one seed's patient split: pretraining reads its ``train`` part."""
    return {"split_fractions": {"train": 1.0 - test_fraction, "test": test_fraction}, "split_seed": int(seed),
            "pretrain_split": "train"}


def _ages(df: pd.DataFrame, column: str, source: str) -> pd.Series:
    """The age column as numbers (blank: missing).

    Raises:
        ValueError: naming the column, when it is not in the manifest or holds text.
    """
    if column not in df.columns:
        raise ValueError(f"{source}: age column {column!r} is not in the manifest (columns: {list(df.columns)}).")
    ages = pd.to_numeric(df[column], errors="coerce")
    bad = df[column].notna() & ages.isna()
    if bad.any():
        raise ValueError(f"{source}: age column {column!r} holds text in row(s) {list(df.index[bad][:5])} "
                         f"({list(df.loc[bad, column][:3])}): ages are numbers of years, blank when unknown.")
    if ages.notna().sum() < 10:
        raise ValueError(f"{source}: age column {column!r} has {int(ages.notna().sum())} known ages: the age probe "
                         "needs at least 10.")
    return ages


def _split(df: pd.DataFrame, seed: int, test_fraction: float) -> np.ndarray:
    """Training-patient mask of one seed, as the bundle computes it (select_split with the same arguments)."""
    split = _split_overrides(seed, test_fraction)
    train = select_split(df, split["pretrain_split"], fractions=split["split_fractions"], seed=split["split_seed"])
    return df.index.isin(train.index)


def _check_classes(y: pd.Series, train_mask: np.ndarray, column: str, seed: int) -> None:
    for name, mask in (("train", train_mask), ("test", ~train_mask)):
        values = set(y[mask].dropna().loc[lambda v: v >= 0].unique())
        if len(values) < 2:
            raise ValueError(
                f"label {column!r} has one class ({sorted(values)}) in the {name} split of seed {seed}: the probe "
                "needs both classes; choose another label, more data, or another test fraction."
            )


def pool_rows(config: CompareConfig, labelled: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(every pool row, the rows pretraining reads)``: the pool less the patients of the labelled manifest (unless
    ``keep_labelled_in_pool``; :func:`monai_du.data.splits.pool_without_patients`).

    Raises:
        ValueError: when no pool row is left.
    """
    return pool_without_patients(Path(config.pool), labelled, config.pool_dataset_dir, config.keep_labelled_in_pool)


def _pool_manifest(config: CompareConfig, labelled: pd.DataFrame, out: Path) -> tuple[Path, pd.DataFrame, str]:
    """The pool rows a run pretrains on (:func:`pool_rows`), written to ``out/pool_manifest.csv``; returns the file,
    its rows and a line saying what the pool holds and what was removed from it."""
    pool, kept = pool_rows(config, labelled)
    shared = pool["patient_id"].astype(str).isin(set(labelled["patient_id"].astype(str)))
    what = ("kept (keep_labelled_in_pool)" if config.keep_labelled_in_pool else "removed, so no probe scores a "
            "patient the encoder saw")
    sites = f" from {pool['site'].nunique()} sites" if "site" in pool.columns else ""
    note = (f"pool {config.pool}: {len(pool)} images of {pool['patient_id'].nunique()} patients{sites}; "
            f"{int(shared.sum())} images of {pool.loc[shared, 'patient_id'].nunique()} patients of the labelled "
            f"manifest {what}; pretraining on {len(kept)} images")
    # the runs are keyed on this file's content: rewriting equal rows changes nothing
    path = write_manifest(kept.drop(columns=[RESOLVED_IMAGE_COLUMN], errors="ignore"), out / "pool_manifest.csv")
    return path, kept, note


#: Pool images per site on which an encoder's site leakage is measured (``compare --pool``).
POOL_LEAKAGE_PER_SITE = 200


def _pool_leakage_rows(kept: pd.DataFrame) -> pd.DataFrame:
    """The pool images of the site-leakage check: up to :data:`POOL_LEAKAGE_PER_SITE` of each site, drawn once
    (seed 0) and the same for every method and seed; empty when the pool has fewer than 2 sites."""
    if "site" not in kept.columns or kept["site"].nunique() < 2:
        return kept.iloc[:0]
    shuffled = kept.sample(frac=1.0, random_state=0)
    return shuffled.groupby("site", sort=True).head(POOL_LEAKAGE_PER_SITE).reset_index(drop=True)


def _check_folds(df: pd.DataFrame, column: str, folds: int) -> None:
    """Cross-fitting needs at least ``folds`` labelled patients of each class."""
    y = pd.to_numeric(df[column], errors="coerce")
    for value, name in ((1.0, "positive"), (0.0, "negative")):
        n = int(df.loc[(y == value).to_numpy(), "patient_id"].nunique())
        if n < folds:
            raise ValueError(f"label {column!r} has {n} {name} patients: cross-fitting over {folds} folds needs at "
                             f"least {folds}; lower folds or label more patients.")


#: Fewer labelled patients of a class than this in a test split: its confidence interval means little.
MIN_TEST_PATIENTS_PER_CLASS = 5


def _label_notes(df: pd.DataFrame, column: str, masks: Mapping[int, np.ndarray]) -> list[str]:
    """What the probes read of the label: rows left out per reason, and a warning for each seed whose test split
    holds too few patients of a class for its confidence interval to mean much."""
    y = pd.to_numeric(df[column], errors="coerce")
    blank, uncertain = int(y.isna().sum()), int((y == -1).sum())
    labelled = y.isin([0.0, 1.0])
    other = int(len(y) - labelled.sum() - blank - uncertain)
    lines = [f"label {column}: {int(labelled.sum())} labelled images ({int((y == 1).sum())} positive); left out of "
             f"the probes: {blank} blank, {uncertain} uncertain (-1)" + (f", {other} other values" if other else "")]
    for seed, mask in masks.items():
        test = labelled.to_numpy() & ~mask
        counts = {value: int(df.loc[test & (y == value).to_numpy(), "patient_id"].nunique()) for value in (0.0, 1.0)}
        if min(counts.values()) < MIN_TEST_PATIENTS_PER_CLASS:
            lines.append(f"warning: the test split of seed {seed} holds {counts[1.0]} positive and {counts[0.0]} "
                         f"negative patients: fewer than {MIN_TEST_PATIENTS_PER_CLASS} of a class, so its AUC and "
                         "95 % CI mean little; use more labelled patients or a larger test fraction.")
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# probing one run
# ---------------------------------------------------------------------------------------------------------------------
def _features(models_dir: Path, images: np.ndarray, device: str) -> np.ndarray:
    encoder = load_encoder(models_dir)
    dataset = Dataset([{"image": torch.from_numpy(img)} for img in images])
    features, _ = extract_features(encoder, dataset, device=device, batch_size=64)
    return features


def _image_cache(config: CompareConfig) -> Path:
    """The decode-once cache (:mod:`monai_du.data.cache`) shared by every run of a comparison: the first run's first
    epoch decodes each image once, the others read it back (``--set image_cache=DIR`` chooses another folder)."""
    return Path(config.out) / "image_cache"


def _probe_folds(y: pd.Series, groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(N,) the cross-fitting fold of each labelled (0/1) row, -1 for the others: ``folds`` stratified
    patient-grouped folds drawn with ``seed`` (:func:`~monai_du.evaluation.patient_grouped_splits`), the same for
    every method, its probes and its fine-tune runs."""
    values = y.to_numpy(dtype=np.float64)
    rows = np.flatnonzero(np.isin(values, (0.0, 1.0)))
    out = np.full(len(values), -1, dtype=np.int64)
    for k, (_, test) in enumerate(patient_grouped_splits(values[rows], groups[rows], folds, seed)):
        out[rows[test]] = k
    return out


def _probe_splits(train_mask: np.ndarray | None, folds: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """The probe's ``(fit_mask, test_mask)`` pairs: the one split, or one per cross-fitting fold."""
    if train_mask is not None:
        return [(train_mask, ~train_mask)]
    return [((folds >= 0) & (folds != k), folds == k) for k in np.unique(folds[folds >= 0])]


#: Labelled rows from which compare's probes run their inner cross-validation in worker processes.
PARALLEL_PROBE_ROWS = 300


def _probe(features: np.ndarray, df: pd.DataFrame, column: str, train_mask: np.ndarray | None,
           folds: np.ndarray | None, seed: int, config: CompareConfig) -> dict[str, Any]:
    """Probe frozen features on the label: trained on ``train_mask`` and scored on the other rows, or, with
    ``train_mask=None``, cross-fitted over the ``folds`` (:func:`_probe_folds`: each patient scored once, by a probe
    that never saw it; the AUC pools the out-of-fold scores)."""
    notes: list[str] = []
    groups = df["patient_id"].astype(str).to_numpy()
    y = df[column]
    # hundreds of small logistic-regression fits: one BLAS thread is ~10x faster than contended threads; the inner
    # folds of select_C spread over this process's CPUs (the same values: each fold's fits are deterministic) when
    # the cohort is large enough to repay the workers' start (about 6 s: each imports torch)
    jobs = cpus_per_process() if len(features) >= PARALLEL_PROBE_ROWS else 1
    with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=1), \
            parallel_config(backend="loky", n_jobs=jobs):
        warnings.simplefilter("always")
        if train_mask is None:
            scores = linear_probe(features, y, groups=groups, folds=folds, seed=seed)
            split: dict[str, Any] = {"groups": groups, "folds": scores.folds}
            n_train = int(scores.evaluated.sum() * (config.folds - 1) / config.folds)
        else:
            split = {"groups": groups, "train_mask": train_mask}
            scores = linear_probe(features, y, seed=seed, **split)
            n_train = int(train_mask.sum())
        auc, low, high = scores.roc_auc(n_bootstrap=config.n_bootstrap, seed=seed)
        k = max(1, min(20, n_train // 4))
        knn_auc = knn_probe(features, y, k=k, seed=seed, **split).roc_auc(n_bootstrap=0)[0]
        leak, chance = math.nan, math.nan
        if "site" in df.columns and df["site"].nunique() > 1:
            result = site_leakage(features, df["site"], seed=seed, **split)
            leak, chance = result.balanced_accuracy, result.chance
        curve = _label_efficiency(features, y, groups, train_mask, scores, seed, config)
        age = _age_probe(features, df, groups, train_mask, seed, config) if config.age is not None else {}
    notes += list(dict.fromkeys(str(w.message).splitlines()[0] for w in caught if issubclass(w.category, UserWarning)))
    chosen = np.asarray(getattr(scores, "chosen_C", [math.nan]), dtype=float).ravel()
    return {"auc": auc, "auc_low": low, "auc_high": high, "knn_auc": knn_auc, "site_leakage": leak,
            "site_chance": chance, "chosen_C": float(np.nanmedian(chosen)) if np.isfinite(chosen).any() else math.nan,
            "label_efficiency": curve.to_dict("records"), **age, "notes": "; ".join(notes)}


def _pool_leakage(features: np.ndarray, rows: pd.DataFrame, seed: int) -> dict[str, float]:
    """Site leakage on the pool's images (:func:`_pool_leakage_rows`): balanced accuracy of predicting the site from
    the features, patient-grouped 5-fold CV stratified by site, and its chance level."""
    with threadpool_limits(limits=1):
        result = site_leakage(features, rows["site"].astype(str).to_numpy(),
                              groups=rows["patient_id"].astype(str).to_numpy(), n_splits=5, seed=seed)
    return {"site_leakage": result.balanced_accuracy, "site_chance": result.chance}


def _age_probe(features: np.ndarray, df: pd.DataFrame, groups: np.ndarray, train_mask: np.ndarray | None, seed: int,
               config: CompareConfig) -> dict[str, Any]:
    """Ridge regression of age on the frozen features (L2 strength by inner patient-grouped CV): its MAE with a
    patient-bootstrap CI, and the MAE of the mean-age predictor on the same splits (the floor)."""
    ages = df[config.age].to_numpy(dtype=np.float64)
    if train_mask is None:
        scores = regression_probe(features, ages, groups=groups, n_splits=config.folds, seed=seed)
    else:
        scores = regression_probe(features, ages, groups=groups, train_mask=train_mask, seed=seed)
    mae, low, high = scores.mae_ci(n_bootstrap=config.n_bootstrap, seed=seed)
    return {"age_mae": mae, "age_mae_low": low, "age_mae_high": high, "age_floor_mae": scores.floor_mae,
            "age_alpha": float(np.median(scores.alphas_chosen))}


def _label_efficiency(features: np.ndarray, y: pd.Series, groups: np.ndarray, train_mask: np.ndarray | None,
                      scores: Any, seed: int, config: CompareConfig) -> pd.DataFrame:
    """The label-efficiency draws: on the one split (the "all patients" size recorded as ``labelled patients * (1 -
    test_fraction)``, so every seed fills the same column), or spread over the cross-fitting folds (``label_draws
    / folds`` draws in each, rounded up: draws from the fold's training patients, scored on its held-out
    patients, so the cost stays that of one split; the "all patients" size is recorded as ``labelled patients *
    (folds - 1) / folds`` whatever the fold sizes, so every seed fills the same column). The "all patients" rows
    are the main probe's own fits (``scores``, a :class:`~monai_du.evaluation.ProbeScores`), scored on each
    split's held-out rows: the same rows, C rule and fit, so they are not fitted twice."""
    labelled = y.isin((0, 1)).to_numpy()  # the rows the main probe fitted (uncertain -1 and blank are dropped)
    if train_mask is not None:
        parts = [(train_mask, 0, config.label_draws, seed)]
    else:
        folds = scores.folds
        draws = -(-config.label_draws // config.folds)
        parts = [((folds >= 0) & (folds != k), int(k), draws, seed * 1000 + int(k))
                 for k in np.unique(folds[folds >= 0])]
    nominal = _all_patients_size(config, y, pd.Series(groups))
    sizes = tuple(s for s in config.label_sizes if s is not None)
    frames = []
    for fit_mask, k, draws, part_seed in parts:
        part = (label_efficiency(features, y, groups, fit_mask, n_patients=sizes, n_draws=draws, seed=part_seed)
                if sizes else pd.DataFrame(columns=["n_patients", "draw", "auc", "chosen_C", "n_images", "n_positive",
                                                    "patients"]))
        if None in config.label_sizes:
            part = pd.concat([part, pd.DataFrame([_all_patients_row(scores, fit_mask & labelled, k, y, groups)])],
                             ignore_index=True).assign(n_patients=lambda d: d["n_patients"].astype(int))
            part.loc[part.index[-1], "n_patients"] = nominal  # one column for every seed
        frames.append(part if train_mask is not None else part.assign(fold=k))
    return pd.concat(frames, ignore_index=True)


def _all_patients_size(config: CompareConfig, y: pd.Series, patients: pd.Series) -> int:
    """The "all patients" size of a label-efficiency or fine-tune table, the same for every seed: the labelled
    patients times the training share (``1 - test_fraction``, or ``(folds - 1) / folds`` when cross-fitted)."""
    n = patients[y.isin((0, 1)).to_numpy()].nunique()
    return int(round(n * (1 - config.test_fraction))) if config.pool is None else int(n * (config.folds - 1)
                                                                                      / config.folds)


def _all_patients_row(scores: Any, fit_rows: np.ndarray, split: int, y: pd.Series, groups: np.ndarray
                      ) -> dict[str, Any]:
    """The label-efficiency record of the main probe's split ``split``: fit on ``fit_rows``, scored on the rows it
    held out (``scores.folds == split``)."""
    held_out = scores.folds == split
    values = y.to_numpy(dtype=np.float64)
    patients = np.unique(groups[fit_rows])
    return {"n_patients": len(patients), "draw": 0,
            "auc": float(roc_auc_score(values[held_out], scores.scores[held_out])),
            "chosen_C": float(scores.chosen_C[split]), "n_images": int(fit_rows.sum()),
            "n_positive": int(values[fit_rows].sum()), "patients": tuple(patients.tolist())}


# ---------------------------------------------------------------------------------------------------------------------
# the comparison
# ---------------------------------------------------------------------------------------------------------------------
def run_compare(config: CompareConfig, log: Callable[[str], None] | None = print,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the comparison and write the report folder (tables, verdict, CSV/JSON, plots).

    Args:
        config: the settings.
        log: callable for a few lines per run and the final tables (None: silent). MONAI's per-iteration log of
            each run goes to its ``logs/run.log``.
        progress: called after every training epoch with a line (run, epoch, loss, images/s, ETA), e.g. to redraw
            one status line on a terminal (None: no per-epoch lines).

    Returns:
        a dict with ``results`` (one row per method and seed), ``summary`` (one row per method), ``efficiency`` (the
        label-efficiency rows), ``table``, ``efficiency_table``, ``verdict`` (sentences), ``files``, ``wall_time_s``.

    Raises:
        ValueError: with one line naming the file, column or method, for bad input.
    """
    try:
        return _run_compare(config, log, progress)
    finally:  # the probes' worker processes (joblib's reusable loky executor) stop with the comparison
        get_reusable_executor().shutdown(wait=True)


def _run_compare(config: CompareConfig, log: Callable[[str], None] | None,
                 progress: Callable[[str], None] | None) -> dict[str, Any]:
    say = log or (lambda _: None)
    started = time.perf_counter()
    bundle, manifest, dataset_dir, out = Path(config.bundle), Path(config.manifest), Path(config.dataset_dir), \
        Path(config.out)
    specs = method_files(bundle, config.methods, config.method_configs)
    rows_read = read_manifest(manifest, root=dataset_dir).reset_index(drop=True)
    column = resolve_label_column(rows_read, config.label, f"manifest {manifest}")
    df = rows_read.assign(**{column: label_values(rows_read[column], column, f"manifest {manifest}")})
    if config.age is not None:
        df[config.age] = _ages(df, config.age, f"manifest {manifest}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"out {out}: cannot create the report folder ({err.strerror}).") from None
    if config.pool is None:
        masks: dict[int, np.ndarray | None] = {seed: _split(df, seed, config.test_fraction) for seed in config.seeds}
        for seed, mask in masks.items():
            _check_classes(df[column], mask, column, seed)
        pretrain, pretrain_dir = manifest, dataset_dir
        n_train = {seed: int(mask.sum()) for seed, mask in masks.items()}
        leakage_rows = df.iloc[:0]
        notes = _label_notes(df, column, masks)
    else:
        _check_folds(df, column, config.folds)
        masks = {seed: None for seed in config.seeds}
        pretrain, kept, pool_note = _pool_manifest(config, df, out)
        pretrain_dir = Path(config.pool_dataset_dir)
        n_train = {seed: len(kept) for seed in config.seeds}
        leakage_rows = _pool_leakage_rows(kept)
        notes = [pool_note, *_label_notes(df, column, {})]
        if len(leakage_rows):
            counts = ", ".join(f"{n} of {site}" for site, n in leakage_rows["site"].value_counts(sort=False).items())
            notes.append(f"site leakage: measured on {len(leakage_rows)} pool images ({counts}; patient-grouped "
                         "5-fold CV), the encoders' own pretraining data")
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.yaml"))
    parser.update(dict(config.overrides))  # e.g. spatial_size: the probes see the images at the size runs train at
    spatial = list(parser["spatial_size"])
    # the probes see the images as the runs load them (the bundle's image_loading; a bundle copy without it: defaults)
    loading = dict(parser.get_parsed_content("image_loading")) if "image_loading" in parser else {}
    epochs = int(config.epochs if config.epochs is not None else parser["max_epochs"])
    batch = int(config.batch_size if config.batch_size is not None else parser["batch_size"])
    modality = loading.pop("modality", "2d" if len(spatial) == 2 else "3d")
    manifest_sha256, labelled_sha256 = file_digest(pretrain), file_digest(manifest)
    # a batch larger than a seed's training images is clamped to them: say so, and audit with what training used
    batches = {seed: min(batch, n) for seed, n in n_train.items()}
    if min(batches.values()) < batch:
        batch_words = f"batch {batch} (clamped to the training images: {sorted(set(batches.values()))})"
    else:
        batch_words = f"batch {batch}"
    say(f"monai-du compare: {len(df)} images of {df['patient_id'].nunique()} patients from {manifest}; label {column}; "
        f"methods {list(specs)}; seeds {list(config.seeds)}; {epochs} epochs, {batch_words}; bundle {bundle}; "
        f"report -> {out}")
    for line in notes:
        say(line)
    t0 = time.perf_counter()
    images = load_images(rows_read, modality=modality, image_size=[int(s) for s in spatial], **loading)
    leakage_images = load_images(leakage_rows, modality=modality, image_size=[int(s) for s in spatial],
                                 **loading) if len(leakage_rows) else None
    say(f"images for the probes: {tuple(images.shape)} ({time.perf_counter() - t0:.1f} s)")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    rows: list[dict[str, Any]] = []
    efficiency: list[dict[str, Any]] = []
    tuned: list[dict[str, Any]] = []
    losses: dict[str, dict[int, list[float]]] = {key: {} for key in specs}
    total = len(specs) * len(config.seeds)
    groups = df["patient_id"].astype(str).to_numpy()
    for seed in config.seeds:
        train_mask = masks[seed]
        folds = None if config.pool is None else _probe_folds(df[column], groups, config.folds, seed)
        if config.finetune:
            plan, plan_notes = finetune_plan(df[column].to_numpy(dtype=np.float64), groups,
                                             _probe_splits(train_mask, folds), config.finetune_sizes, seed)
            for line in plan_notes:
                say(f"seed {seed}: {line}")
        split = _split_overrides(seed, config.test_fraction) if config.pool is None else pool_run_split(seed)
        overrides = {
            "manifest": str(pretrain), "dataset_dir": str(pretrain_dir), "seed": int(seed), **split,
            "max_epochs": epochs, "batch_size": batches[seed], "image_cache": str(_image_cache(config)),
            **dict(config.overrides),
        }
        for key, spec in specs.items():
            root = out / "runs" / f"seed{seed}" / key
            probe_marker = DoneMarker(root / "eval" / "probe_done.json", {
                "run": run_inputs([bundle / "configs" / "train.yaml", *stage_files(bundle, spec)], overrides,
                                   manifest_sha256),
                "label": column, "age": config.age, "labelled": labelled_sha256, "test_fraction": config.test_fraction,
                "folds": config.folds if config.pool is not None else None, "label_sizes": list(config.label_sizes),
                "label_draws": config.label_draws, "n_bootstrap": config.n_bootstrap,
                "pool_leakage_images": sorted(leakage_rows[RESOLVED_IMAGE_COLUMN].astype(str))})
            probe_file = root / "eval" / _PROBE
            done = len(rows) + 1
            if probe_marker.is_done() and probe_file.is_file():
                row = json.loads(probe_file.read_text(encoding="utf-8"))
                say(f"[{done}/{total}] seed {seed} {spec.name}: done before, AUC {row['auc']:.3f}")
            else:
                say(f"[{done}/{total}] seed {seed} {spec.name}: pretraining ({epochs} epochs) in {root}")
                status = None if progress is None else (
                    lambda line, prefix=f"[{done}/{total}] seed {seed} {spec.name}: ": progress(prefix + line))
                try:
                    wall, steps = run_method(spec, root, overrides, bundle, manifest_sha256, status)
                except RuntimeError as err:  # MONAI's config parser wraps what failed in the method's config
                    raise ValueError(
                        f"method {key!r} (seed {seed}) could not run on {pretrain}: {innermost_cause(err)}. The runs "
                        f"finished so far are kept in {out / 'runs'}; leave the method out (--methods) or fix the data."
                    ) from None
                say(f"[{done}/{total}] seed {seed} {spec.name}: probing the frozen encoder")
                probe = _probe(_features(root / "models", images, device), df, column, train_mask, folds, seed,
                               config)
                if leakage_images is not None:  # with a pool: how well the pool's sites show in the features
                    probe.update(_pool_leakage(_features(root / "models", leakage_images, device), leakage_rows,
                                               seed))
                row = {"method_key": key, "method": spec.name, "seed": int(seed), **probe, "wall_time_s": wall,
                       "steps": steps, "images_per_s": steps * batches[seed] / wall if steps else math.nan,
                       "n_train_images": n_train[seed],
                       "n_train_patients": int(df.loc[train_mask, "patient_id"].nunique())
                       if train_mask is not None else int(df["patient_id"].nunique() * (1 - 1 / config.folds))}
                write_text_atomic(probe_file, json.dumps(report.json_safe(row), indent=2) + "\n")
                probe_marker.write()
                speed = f", {row['images_per_s']:.0f} images/s" if steps else ""
                age = f", age MAE {row['age_mae']:.2f}" if config.age is not None else ""
                say(f"[{done}/{total}] seed {seed} {spec.name}: AUC {row['auc']:.3f} (C {row['chosen_C']:.3g}){age}, "
                    f"{steps} steps, {wall:.1f} s{speed} (log: {root / 'logs'})")
            efficiency += [{"method_key": key, "method": spec.name, "seed": seed,
                            **{k: v for k, v in r.items() if k != "patients"}} for r in row.pop("label_efficiency")]
            rows.append(row)
            losses[key][seed] = training_losses(root)
            if config.finetune:
                tuned += _finetune(config, plan, rows_read, df, column, root, seed, spec.name, key,
                                   f"[{done}/{total}]", say, progress)

    results = pd.DataFrame(rows)
    curve = pd.DataFrame(efficiency)
    wall = time.perf_counter() - started
    probes = (f"on held-out patients ({config.test_fraction:.0%})" if config.pool is None else
              f"cross-fitted over {config.folds} patient-grouped folds of every labelled patient")
    header = (f"monai-du compare: {manifest.name}, {len(df)} images, {df['patient_id'].nunique()} patients; label "
              f"{column}; seeds {list(config.seeds)}; {epochs} epochs, {batch_words}; linear probe (C by inner "
              f"patient-grouped CV) {probes}; total wall time {wall:.0f} s"
              + (f"; overrides {dict(config.overrides)}" if config.overrides else "")
              + (f"; age {config.age} regressed by ridge (L2 by inner patient-grouped CV), same patients"
                 if config.age is not None else "")
              + "".join(f"\n{n}" for n in notes))
    finetuned = pd.DataFrame(tuned)
    if config.finetune:
        tune_epochs = config.finetune_epochs or "the bundle's"
        header += (f"\nfine-tuning: every encoder trained end to end by {Path(config.finetune_bundle).name} "
                   f"(mode finetune) on the probes' splits, {tune_epochs} epochs, "
                   f"{VAL_FRACTION:.0%} of each run's training patients as its validation split (checkpoint choice)")
    written = report.write_report(out, header, results, curve, losses, list(specs), plots=config.plots,
                                  config=asdict(config) | {"manifest": str(manifest), "label": column, "epochs": epochs,
                                                          "batch": batch}, finetune=finetuned)
    for line in [""] + written["lines"]:
        say(line)
    say(f"report written to {out}: {', '.join(sorted(written['files']))}")
    audit_lines: list[str] = []
    if config.audit:
        audit_lines = _audit_next_to(config, specs, column, batches[config.seeds[0]], results)
        for line in audit_lines:
            say(line)
    return {"results": results, "summary": written["summary"], "efficiency": curve, "finetune": finetuned,
            "table": written["table"],
            "efficiency_table": written["efficiency_table"], "verdict": written["verdict"],
            "files": written["files"], "audit": audit_lines, "wall_time_s": wall}


def _finetune(config: CompareConfig, plan: list, rows_read: pd.DataFrame, df: pd.DataFrame, column: str, root: Path,
              seed: int, name: str, key: str, tag: str, say: Callable[[str], None],
              progress: Callable[[str], None] | None) -> list[dict[str, Any]]:
    """Fine-tune one method's encoder on the seed's plan (:func:`monai_du.finetune_compare.finetune_encoder`; the
    runs' manifests keep the rows as read, ``df`` holds the label as 0/1): one row per size, the "all patients" size
    recorded at its nominal number (as the probes' label-efficiency)."""
    say(f"{tag} seed {seed} {name}: fine-tuning ({len(plan)} runs) in {root / 'finetune'}")
    status = None if progress is None else (lambda line: progress(f"{tag} seed {seed} {name}: {line}"))
    table, seconds = finetune_encoder(
        plan, rows_read, df[column].to_numpy(dtype=np.float64), column, root / "models", root / "finetune",
        Path(config.finetune_bundle), root.parent / "finetune_manifests", seed, epochs=config.finetune_epochs,
        overrides=config.finetune_overrides, n_bootstrap=config.n_bootstrap, progress=status)
    if table.empty:
        return []
    table.loc[table["size"].isna(), "n_patients"] = _all_patients_size(config, df[column], df["patient_id"])
    words = ", ".join(f"{'all' if pd.isna(r.size) else f'n={int(r.size)}'} {r.auc:.3f}" for r in table.itertuples())
    say(f"{tag} seed {seed} {name}: fine-tuned AUC {words}, {seconds:.0f} s")
    return [{"method_key": key, "method": name, "seed": int(seed), **r, "wall_time_s": seconds}
            for r in table.to_dict("records")]


def _audit_next_to(config: CompareConfig, specs: Mapping[str, MethodSpec], column: str, batch: int,
                   results: pd.DataFrame) -> list[str]:
    """Audit the compared kernel methods' priors; lines of the audit table and of each verdict beside the measured
    paired difference from plain DU.

    A composite method whose last stage takes its prior from the stage before is audited on the first seed's
    previous-stage encoder: its embeddings of every row are the prior table of that last stage's method.

    With a pool, the audit takes the two inputs the runs and probes took (``run_audit(..., pool=...)``): kernels and
    batches from the pool rows pretraining read (less the labelled patients, unless ``keep_labelled_in_pool``), label
    statistics from the labelled manifest's rows; a composite's table then holds the previous-stage encoder's
    embeddings of the pool's rows and of the labelled rows."""
    bundle, manifest, dataset_dir, out = Path(config.bundle), Path(config.manifest), Path(config.dataset_dir), \
        Path(config.out)
    kernels = kernel_methods(bundle)
    audited = [key for key in specs if key in kernels]
    seed = int(config.seeds[0])
    pooled = config.pool is not None
    split = pool_run_split(seed) if pooled else _split_overrides(seed, config.test_fraction)
    two = {"pool": config.pool, "pool_dataset_dir": config.pool_dataset_dir,
           "keep_labelled_in_pool": config.keep_labelled_in_pool} if pooled else {}
    tables, notes = {}, []
    for key, spec in specs.items():
        if spec.stages and spec.stages[-1].prior_from_previous:
            previous = stage_roots(out / "runs" / f"seed{seed}" / key, spec)[-2]
            if not (previous / "models" / DONE_MARKER).is_file():
                continue
            if not pooled:
                tables[key] = encoder_table(previous, {"manifest": str(manifest), "dataset_dir": str(dataset_dir),
                                                        **split}, split="all")
                continue
            from monai_du.priors import encoder_prior_table, load_prior_table, write_prior_table

            # the previous stage's embeddings of the pool rows it trained on, and of the labelled rows
            pool_part = load_prior_table(encoder_table(previous, {
                "manifest": str(out / "pool_manifest.csv"), "dataset_dir": str(config.pool_dataset_dir), **split},
                split="all"))
            labelled_part = encoder_prior_table(manifest, previous / "models", root=dataset_dir, split="all")
            both = pd.concat([pool_part, labelled_part], ignore_index=True)
            by_image = both.groupby("image")[[c for c in both.columns if str(c).startswith("gen_")]]
            if ((by_image.max() - by_image.min()).to_numpy() > 1e-4).any():  # one key, two images
                notes.append(f"- {spec.name}: not audited (an image path of the labelled manifest names another "
                             "image in the pool: its prior table is keyed by the path as written)")
                continue
            tables[key] = str(write_prior_table(both.drop_duplicates("image"),
                                                out / "audit" / f"{key}_prior_table.csv"))
    if not audited and not tables:
        return notes and ["", *notes]
    try:
        # the kernels and batches of the first seed's runs: its split (with a pool: every pool row), its seed
        table = run_audit(manifest, [column], dataset_dir=dataset_dir, prior_tables=tables, out=out / "audit",
                          bundle=bundle, methods=audited, bundle_overrides={**split, **dict(config.overrides)},
                          batch_size=batch, seed=seed, **two)
    except ValueError as err:
        return ["", f"audit skipped: {err}"]
    aucs = results.pivot(index="seed", columns="method_key", values="auc")
    inputs = (" --pool: kernels and batches from the pool rows pretraining read, label statistics from the labelled "
              "rows" if pooled else "")
    lines = ["", f"Audit of the compared priors, before pretraining (monai-du audit{inputs}, written to "
             f"{out / 'audit'}):", "", format_audit(table), *notes, "",
             "audit verdict beside the measured paired difference:"]
    rows = table.set_index("prior")
    for key in audited + list(tables):
        if key not in rows.index:
            continue
        measured = ""
        if "du" in aucs.columns and key in aucs.columns:
            diff = (aucs[key] - aucs["du"]).dropna()
            measured = f"; measured {diff.mean():+.3f} AUC vs plain DU over {len(diff)} seeds"
        lines.append(f"- {specs[key].name}: audit rank {int(rows.loc[key, 'rank'])} of {len(rows)}, "
                     f"{rows.loc[key, 'verdict']}{measured}")
    write_text_atomic(out / "audit" / "audit_vs_compare.txt", "\n".join(lines[1:]) + "\n")
    return lines
