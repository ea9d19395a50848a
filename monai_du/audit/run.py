"""The audit itself: label handling, the batches of the audit's sampler, :func:`audit_priors` on a manifest table,
:func:`run_audit` on a manifest file (with the bundle's candidates) and :func:`write_audit`."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from monai_du.audit.candidates import (
    _SAMPLER,
    PriorCandidate,
    _as_candidate,
    _distinct,
    bundle_candidates,
    default_candidates,
    skipped_attributes,
)
from monai_du.audit.statistics import (
    CV_FOLDS,
    _auc_chance,
    _cv_splits,
    _nw_oof_scores,
    _patient_codes,
    _permutation_indices,
    _pvalue,
    _within_patient_only,
    batch_kernel_stats,
    centred_kta,
    hsic,
)
from monai_du.audit.verdicts import format_audit, rank_audit
from monai_du.bundles import check_overrides, pool_run_split
from monai_du.data.manifest import (
    RESOLVED_IMAGE_COLUMN,
    label_values,
    read_manifest,
    resolve_label_column,
    write_manifest,
)
from monai_du.data.samplers import AttributeBatchSampler, draw_batches
from monai_du.data.splits import pool_without_patients
from monai_du.io import write_text_atomic
from monai_du.kernels import PriorKernel
from monai_du.priors import load_prior_table

MAX_LABELLED_ROWS = 2000
"""At most this many labelled rows enter the label statistics (whole patients drawn at random beyond it): the label
statistics cost O(n^2) memory and O(n^2 * n_permutations) time."""


def _binary_label(df: pd.DataFrame, column: str, source: str) -> np.ndarray:
    """(N,) float labels: 0/1 (M/F: male = 1), NaN for unlabelled (NaN or -1 uncertain) rows."""
    values = label_values(df[column], column, source).astype(float)
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


def _check_settings(batch_size: Any = 64, n_batches: Any = 20, n_permutations: Any = 999, lam: Any = 0.01,
                    instance_weight: Any = 0.05, knn_k: Any = 5, seed: Any = 0, **_: Any) -> None:
    """The audit's numeric settings, checked before any work (one line naming the setting)."""
    for name, value, minimum in (("batch_size", batch_size, 2), ("n_batches", n_batches, 1),
                                 ("n_permutations", n_permutations, 1), ("knn_k", knn_k, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}.")
    if not (lam > 0 and math.isfinite(lam)) or not (instance_weight >= 0 and math.isfinite(instance_weight)):
        raise ValueError(f"need lam > 0 and instance_weight >= 0, got lam={lam}, instance_weight={instance_weight}.")


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
    pool_df: pd.DataFrame | None = None,
    pool_source: str = "pool",
) -> pd.DataFrame:
    """Audit candidate priors on a manifest against a few labels (see :mod:`monai_du.audit`).

    With ``pool_df`` the audit takes two inputs, as ``monai-du compare --pool`` does: each candidate's kernel is
    fitted on the pool's priors and its batch statistics (``eff_rank``, ``mean_offdiag``, ``centroid_dof``,
    ``pooled``) come from batches the sampler draws on the pool, while its label statistics (KTA, HSIC, p-value, CV
    AUC) come from ``manifest_df``'s labelled rows, their priors encoded by the encoder fitted on the pool and read by
    the same fitted kernel (:func:`~monai_du.audit.candidates.encode_labelled`: a labelled category unseen in the pool
    is a category of its own, said in ``attrs["notes"]``).

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
        pool_df: the rows pretraining reads (a pool less the labelled patients: :func:`run_audit` removes them as
            ``monai-du compare`` does); None: ``manifest_df`` serves both. The sampler's columns are the pool's. A
            candidate given in ``candidates`` then needs :attr:`~PriorCandidate.fit_prior` (the pool's vectors) or
            its own ``batches`` and an already fitted kernel.
        pool_source: name of the pool in messages and settings.

    Returns:
        one row per (prior, label), ranked within each label (column ``rank``, best first): ``prior``, ``label``,
        ``kernel``, ``batch_size``, ``sampler``, ``eff_rank``, ``eff_rank_fraction``, ``mean_offdiag``,
        ``centroid_dof``, ``pooled`` (``1 - centroid_dof / batch_size``: the share of the centroids that kernel DU
        replaces by pooling, 0 for plain DU), ``n_labelled``, ``n_positive``, ``n_patients``, ``kta``, ``hsic``,
        ``p_value``, ``null``
        (``"patient"`` or ``"image"`` permutations), ``cv_auc``, ``auc_chance``, ``verdict``.
        ``attrs["settings"]`` holds the settings, ``attrs["skipped"]`` the default candidates that could not be
        fitted (or built on one of the two inputs), with the reason, and ``attrs["notes"]`` remarks by candidate
        (labelled categories unseen in the pool).

    Raises:
        ValueError: for a missing label column, a label with one class, a missing sampler attribute, a batch size
            larger than the sampler allows, or a candidate whose prior does not match the manifest.
    """
    if not isinstance(manifest_df, pd.DataFrame):
        raise ValueError(f"audit_priors: manifest_df must be a pandas DataFrame, got {type(manifest_df).__name__}.")
    df = manifest_df.reset_index(drop=True)
    n = len(df)
    if pool_df is not None and not isinstance(pool_df, pd.DataFrame):
        raise ValueError(f"audit_priors: pool_df must be a pandas DataFrame, got {type(pool_df).__name__}.")
    # the rows of the kernels and batches: the pool's, or the manifest's own
    pool = df if pool_df is None else pool_df.reset_index(drop=True)
    n_pool, pool_name = len(pool), source if pool_df is None else pool_source
    if isinstance(labels, str):
        labels = [labels]
    if not labels:
        raise ValueError(f"{source}: give at least one label column to audit the priors against.")
    _check_settings(batch_size=batch_size, n_batches=n_batches, n_permutations=n_permutations, lam=lam,
                    instance_weight=instance_weight, knn_k=knn_k, seed=seed)
    batch_size = int(batch_size)
    if n_pool < batch_size:
        raise ValueError(f"{pool_name}: {n_pool} rows, fewer than the batch size {batch_size}; lower --batch-size.")
    label_columns = list(dict.fromkeys(resolve_label_column(df, str(name), source) for name in labels))
    label_values = {column: _binary_label(df, column, source) for column in label_columns}

    mode, attribute = _default_sampler(pool, sampler_mode, sampler_attribute)
    groups = None
    if attribute is not None:
        if attribute not in pool.columns:
            raise ValueError(
                f"{pool_name}: sampler attribute {attribute!r} is not a manifest column (columns: "
                f"{list(pool.columns)}); pass another sampler attribute or sampler mode 'random'."
            )
        groups = pool[attribute].to_numpy(dtype=object)
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
        if sampler_order not in pool.columns:
            raise ValueError(f"{pool_name}: sampler order column {sampler_order!r} is not a manifest column (columns: "
                             f"{list(pool.columns)}).")
        sampler_kwargs["block_order"] = pool[sampler_order].to_numpy()
        sampler_name += f" by {sampler_order}"
    patients = _patient_codes(df["patient_id"] if "patient_id" in df.columns else None, n)

    skipped: dict[str, str] = {}
    labelled = None if pool_df is None else df
    if candidates is None:
        raw = default_candidates(pool, batch_size=batch_size, prior_tables=prior_tables, knn_k=knn_k,
                                 combined=combined, labelled=labelled)
        skipped.update(skipped_attributes(pool, combined=combined, labelled=labelled))
        user = False
    else:
        raw = dict(candidates)
        if prior_tables:
            raw.update(default_candidates(pool, batch_size, prior_tables=prior_tables, knn_k=knn_k, attributes=(),
                                          labelled=labelled))
        user = True
    for name, value in (extra_candidates or {}).items():
        if name in raw:
            raise ValueError(f"candidate prior {name!r} is given twice; give it another name.")
        raw[name] = value
    if not raw:
        raise ValueError(f"{source}: no candidate prior (no age, sex, site or view with 2 values, and no prior table).")
    prepared = {name: _as_candidate(name, value, n, n_pool if pool_df is not None else None)
                for name, value in raw.items()}

    shared_batches = None
    if mode not in ("neighbourhood", "neighborhood"):
        try:
            sampler = _make_sampler(mode, batch_size, groups, np.zeros((n_pool, 1)), seed, sampler_kwargs)
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
    notes = {name: candidate.note for name, candidate in prepared.items() if candidate.note}
    for name, candidate in prepared.items():
        kernel, prior = candidate.kernel, candidate.prior
        # the rows the kernel is fitted on and the shared batches index: the pool's (two inputs) or the manifest's
        fit_prior = prior if candidate.fit_prior is None else candidate.fit_prior
        fit_groups = candidate.fit_groups
        if isinstance(fit_groups, str) and fit_groups == _SAMPLER:
            fit_groups = groups if mode == "within" else None
        if not kernel.is_fitted:
            try:
                kernel.fit(fit_prior, groups=fit_groups)
            except ValueError as err:
                if user and name in (candidates or {}):
                    raise ValueError(f"candidate prior {name!r}: fitting {candidate.description}: {err}") from None
                skipped[name] = str(err)
                continue
        own = candidate.batches is not None
        batches, batch_prior = (candidate.batches, candidate.batch_prior) if own else (shared_batches, fit_prior)
        if batches is None:
            sampler = _make_sampler(mode, batch_size, None, fit_prior, seed, sampler_kwargs)
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
    out = rank_audit(records, label_columns)
    out.attrs["settings"] = {
        "source": source, "n_rows": n, "labels": label_columns, "batch_size": batch_size, "sampler": sampler_name,
        "n_batches": int(n_batches), "n_permutations": int(n_permutations), "lam": float(lam),
        "instance_weight": float(instance_weight), "knn_k": int(knn_k), "seed": int(seed),
    }
    if pool_df is not None:
        out.attrs["settings"].update(pool=pool_source, n_pool_rows=n_pool)
    out.attrs["skipped"] = skipped
    out.attrs["notes"] = {name: note for name, note in notes.items() if name not in skipped}
    return out


def _pool_rows(pool: str | os.PathLike, pool_dataset_dir: str | os.PathLike | None, labelled: pd.DataFrame,
               keep_labelled_in_pool: bool) -> tuple[pd.DataFrame, str]:
    """The pool rows pretraining reads, by the rule of :func:`monai_du.data.splits.pool_without_patients` (its one
    home), and a line saying what the pool holds and what was removed from it."""
    try:
        every, kept = pool_without_patients(Path(pool), labelled, pool_dataset_dir, bool(keep_labelled_in_pool))
    except FileNotFoundError as err:
        raise ValueError(f"pool: {err}") from None
    shared = every["patient_id"].astype(str).isin(set(labelled["patient_id"].astype(str)))
    what = "kept (keep_labelled_in_pool)" if keep_labelled_in_pool else "removed"
    note = (f"pool {pool}: {len(every)} images of {every['patient_id'].nunique()} patients; {int(shared.sum())} "
            f"images of {every.loc[shared, 'patient_id'].nunique()} patients of the labelled manifest {what}; "
            f"kernels and batches from {len(kept)} images")
    return kept.reset_index(drop=True), note


def write_audit(df: pd.DataFrame, out: str | os.PathLike) -> dict[str, Path]:
    """Write the audit to the folder ``out``: ``audit.csv``, ``audit.json`` (settings, skipped, rows) and ``audit.txt``
    (:func:`format_audit`). Returns the paths by kind."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    rows = json.loads(df.to_json(orient="records"))  # NaN -> null
    payload = {"settings": df.attrs.get("settings", {}), "skipped": df.attrs.get("skipped", {}),
               "notes": df.attrs.get("notes", {}), "rows": rows}
    return {
        "csv": write_text_atomic(folder / "audit.csv", df.to_csv(index=False)),
        "json": write_text_atomic(folder / "audit.json", json.dumps(payload, indent=2) + "\n"),
        "txt": write_text_atomic(folder / "audit.txt", format_audit(df) + "\n"),
    }


def run_audit(
    manifest: str | os.PathLike,
    labels: Sequence[str],
    dataset_dir: str | os.PathLike | None = None,
    prior_tables: Mapping[str, str | os.PathLike] | None = None,
    out: str | os.PathLike | None = None,
    bundle: str | os.PathLike | None = "cxr",
    methods: Sequence[str] | None = None,
    bundle_overrides: Mapping[str, Any] | None = None,
    pool: str | os.PathLike | None = None,
    pool_dataset_dir: str | os.PathLike | None = None,
    keep_labelled_in_pool: bool = False,
    **kwargs: Any,
) -> pd.DataFrame:
    """Read a manifest file and its prior tables, audit the priors, and write the report to ``out`` (if given).

    With ``pool``, the two inputs of ``monai-du compare --pool``: kernels and batches from the pool (less the
    labelled manifest's patients, as :func:`monai_du.data.splits.pool_without_patients` removes them; every pool row
    is pretraining data, as compare's pool runs read it), label statistics from ``manifest``'s labelled rows
    (``audit_priors``'s ``pool_df``).

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
        pool: an unlabelled pool manifest that pretraining reads; None: ``manifest`` serves both.
        pool_dataset_dir: folder of the pool's relative image paths (default: the pool manifest's folder).
        keep_labelled_in_pool: keep the pool's rows of patients of ``manifest`` (default: removed, and counted in
            ``attrs["settings"]["pool_note"]``).
        kwargs: further arguments of :func:`audit_priors`.

    Returns:
        the audit table (:func:`audit_priors`).
    """
    _check_settings(**kwargs)
    if bundle is not None:
        bundle_overrides = check_overrides(bundle, dict(bundle_overrides or {}))
    try:
        df = read_manifest(manifest, root=dataset_dir)
    except FileNotFoundError as err:
        raise ValueError(str(err)) from None
    pool_df, pool_note = None, None
    if pool is not None:
        pool_df, pool_note = _pool_rows(pool, pool_dataset_dir, df, keep_labelled_in_pool)
    elif pool_dataset_dir is not None or keep_labelled_in_pool:
        raise ValueError("pool_dataset_dir and keep_labelled_in_pool go with pool: give the pool manifest too.")
    two = {} if pool_df is None else {"pool_df": pool_df, "pool_source": str(pool)}
    tables: dict[str, str] = {}
    for name, path in (prior_tables or {}).items():
        if not str(name).strip():
            raise ValueError(f"prior table {str(path)!r} needs a name (NAME=path).")
        load_prior_table(path)  # checked before any work; attach_prior_table names the file in its errors
        tables[str(name)] = str(path)
    try:
        if bundle is None:
            result = audit_priors(df, labels, prior_tables=tables, source=str(manifest), **two, **kwargs)
        else:
            seed = int(kwargs.get("seed", 0))
            # a pool run reads every pool row (compare's pool split), unless the overrides say otherwise
            split = {} if pool_df is None else pool_run_split(seed)
            overrides = {"batch_size": int(kwargs.get("batch_size", 64)), "seed": seed, **split,
                         **dict(bundle_overrides or {})}
            work_dir = None if out is None else Path(out) / "methods"
            with tempfile.TemporaryDirectory(prefix="monai_du_audit_pool_") as scratch:
                if pool_df is None:
                    runs_on, runs_dir, labelled = Path(manifest), dataset_dir, None
                else:  # the bundle reads a manifest file: the pool rows the runs pretrain on
                    runs_on = write_manifest(pool_df.drop(columns=[RESOLVED_IMAGE_COLUMN], errors="ignore"),
                                             Path(out if out is not None else scratch) / "pool_manifest.csv")
                    runs_dir = Path(pool_dataset_dir or Path(pool).parent)
                    labelled = df
                extra, skipped = bundle_candidates(
                    bundle, runs_on, methods=methods, prior_tables=tables, dataset_dir=runs_dir, overrides=overrides,
                    n_batches=int(kwargs.get("n_batches", 20)), work_dir=work_dir, labelled=labelled,
                )
            result = audit_priors(df, labels, source=str(manifest), extra_candidates=extra, combined=False, **two,
                                  **kwargs)
            result.attrs["skipped"] = {**result.attrs.get("skipped", {}), **skipped}
            result.attrs["settings"]["bundle"] = str(bundle)
    except ValueError as err:
        raise ValueError(str(err)) from None
    if pool_note is not None:
        result.attrs["settings"].update(pool_note=pool_note, keep_labelled_in_pool=bool(keep_labelled_in_pool))
    if out is not None:
        write_audit(result, out)
    return result
