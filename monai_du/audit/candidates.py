"""Candidate priors of the audit: :class:`PriorCandidate`, the generic candidates a manifest supports
(:func:`default_candidates`) and those the pretrain bundle's kernel methods build (:func:`bundle_candidates`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from monai_du.bundle_priors import MethodPrior, innermost_cause, method_parser, method_prior
from monai_du.bundle_priors import _build as _build_method_prior
from monai_du.bundles import (
    bundle_path,
    kernel_methods,
    method_files,
    prior_table_setting,
    stage_files,
)
from monai_du.kernels import CategoricalKernel, PriorKernel, RBFKernel, patient_time_kernel
from monai_du.prior_encoder import PriorEncoder
from monai_du.priors import attach_prior_table, generative_prior_kernel, prior_columns

TIME_COLUMNS: tuple[str, ...] = ("study_offset_days", "follow_up")
"""Manifest columns read as the time of an image for the patient x time prior, in order of preference."""

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
        fit_prior: a two-input audit (``audit_priors(..., pool_df=...)``): (N_pool, P) prior vectors of the pool's
            rows, which the kernel is fitted on and the audit's batches index (without own ``batches``), while
            ``prior`` holds the labelled rows', encoded the same way; None: ``prior`` serves both.
        note: a remark for the report, e.g. labelled categories unseen in the pool and how they are coded.
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
    fit_prior: np.ndarray | None = None
    note: str = ""


def _distinct(df: pd.DataFrame, column: str) -> int:
    return int(df[column].nunique(dropna=True)) if column in df.columns else 0


def _numeric(df: pd.DataFrame, column: str) -> pd.Series:
    return pd.to_numeric(df[column], errors="coerce").astype(float)


def _has_repeat_times(patients: np.ndarray, times: np.ndarray) -> bool:
    """Whether some patient has two different (non-missing) times."""
    frame = pd.DataFrame({"p": patients, "t": times}).dropna()
    return bool((frame.groupby("p")["t"].nunique() > 1).any())


def skipped_attributes(df: pd.DataFrame, attributes: Sequence[str] = ATTRIBUTE_COLUMNS,
                       combined: bool = True, labelled: pd.DataFrame | None = None) -> dict[str, str]:
    """Why each attribute candidate of :func:`default_candidates` is left out: ``{name: reason}`` (with
    ``labelled``, ``df`` is the pool and the labelled manifest must have the column too)."""
    skipped = {}
    where = "the manifest" if labelled is None else "the pool"
    for name in attributes:
        if name not in df.columns:
            skipped[name] = f"{where} has no {name!r} column"
        elif _distinct(df, name) < 2:
            skipped[name] = (f"column {name!r} has {_distinct(df, name)} distinct known value(s)"
                             f"{'' if labelled is None else ' in the pool'}; a prior needs 2")
        elif labelled is not None and name not in labelled.columns:
            skipped[name] = f"the labelled manifest has no {name!r} column"
    if combined and ("age" in skipped or "sex" in skipped) and {"age", "sex"} <= set(attributes):
        skipped["age x sex"] = "needs both age and sex (" + "; ".join(
            skipped[a] for a in ("age", "sex") if a in skipped) + ")"
    time_column = _time_column(df)
    if combined and labelled is not None and "patient_id" in df.columns and time_column is not None:
        missing = [c for c in ("patient_id", time_column) if c not in labelled.columns]
        if missing:
            skipped["patient x time"] = f"the labelled manifest has no {missing[0]!r} column"
    return skipped


def _time_column(df: pd.DataFrame) -> str | None:
    """The first column of :data:`TIME_COLUMNS` with a number, or None."""
    return next((c for c in TIME_COLUMNS if c in df.columns and _numeric(df, c).notna().any()), None)


def default_candidates(
    df: pd.DataFrame,
    batch_size: int = 64,
    prior_tables: Mapping[str, pd.DataFrame | str | os.PathLike] | None = None,
    knn_k: int = 5,
    attributes: Sequence[str] = ATTRIBUTE_COLUMNS,
    combined: bool = True,
    labelled: pd.DataFrame | None = None,
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
        labelled: a two-input audit: ``df`` is the pool, whose rows each encoder and kernel are fitted on
            (:attr:`PriorCandidate.fit_prior`), and ``labelled`` the labelled manifest, encoded by the pool's encoder
            (:attr:`PriorCandidate.prior`; a category unseen in the pool becomes a category of its own, said in
            :attr:`PriorCandidate.note`). A candidate needs its columns in both.

    Returns:
        candidates by name, kernels not yet fitted.
    """
    out: dict[str, PriorCandidate] = {}

    def make(kernel: PriorKernel, encoder: PriorEncoder, description: str, **kw: Any) -> PriorCandidate:
        own = encoder.fit(df).transform(df).astype(np.float64)
        if labelled is None:
            return PriorCandidate(kernel, own, description=description, **kw)
        prior, note = encode_labelled(encoder, labelled)
        return PriorCandidate(kernel, prior, description=description, fit_prior=own, note=note, **kw)

    present = [a for a in attributes
               if _distinct(df, a) >= 2 and (labelled is None or a in labelled.columns)]
    for name in present:
        if name == "age":
            kernel: PriorKernel = RBFKernel("knn", columns=[0], knn_k=knn_k, knn_batch_size=batch_size)
            out[name] = make(kernel, PriorEncoder(continuous=["age"]), "RBF(knn)[age]")
        else:
            out[name] = make(CategoricalKernel(columns=[0]), PriorEncoder(categorical=[name]), f"Cat[{name}]")
    if combined and "age" in present and "sex" in present:
        kernel = RBFKernel("knn", columns=[0], knn_k=knn_k, knn_batch_size=batch_size) * CategoricalKernel(columns=[1])
        out["age x sex"] = make(kernel, PriorEncoder(continuous=["age"], categorical=["sex"]),
                                "RBF(knn)[age] * Cat[sex]")
    time_column = _time_column(df)
    if combined and "patient_id" in df.columns and time_column is not None and (
            labelled is None or {"patient_id", time_column} <= set(labelled.columns)):
        # patient codes (float) and times: the encoder codes the patients, the time column is read as numbers
        encoder = PriorEncoder(categorical=["patient_id"]).fit(df)
        patients = encoder.transform(df)[:, 0].astype(np.float64)
        times = _numeric(df, time_column).to_numpy()
        bandwidth: float | str = "gap" if _has_repeat_times(patients, times) else 1.0
        own = np.stack([patients, times], 1)
        kernel = patient_time_kernel(0, 1, bandwidth=bandwidth)
        description = f"Cat[patient_id] * RBF({bandwidth})[{time_column}]"
        if labelled is None:
            out["patient x time"] = PriorCandidate(kernel, own, fit_groups=None, description=description)
        else:
            codes, note = encode_labelled(encoder, labelled)
            out["patient x time"] = PriorCandidate(
                kernel, np.stack([codes[:, 0], _numeric(labelled, time_column).to_numpy()], 1), fit_groups=None,
                description=description, fit_prior=own, note=note)
    for name, table in (prior_tables or {}).items():
        if name in out:
            raise ValueError(f"prior table name {name!r} is also an attribute candidate; give the table another name.")
        attached = attach_prior_table(df[["image"]] if "image" in df.columns else df, table)
        columns = prior_columns(attached)
        kernel = generative_prior_kernel(len(columns), knn_k=knn_k, knn_batch_size=batch_size)
        own = attached[columns].to_numpy(np.float64)
        description = f"RBF(knn)[{len(columns)}-d table]"
        if labelled is None:
            out[name] = PriorCandidate(kernel, own, description=description)
            continue
        try:
            rows = attach_prior_table(labelled[["image"]] if "image" in labelled.columns else labelled, table)
        except ValueError as err:
            raise ValueError(f"prior table {name!r} must cover the pool's and the labelled manifest's images; the "
                             f"labelled manifest: {err}") from None
        out[name] = PriorCandidate(kernel, rows[columns].to_numpy(np.float64), description=description, fit_prior=own)
    return out


def encode_labelled(encoder: PriorEncoder, labelled: pd.DataFrame) -> tuple[np.ndarray, str]:
    """The labelled rows' prior vectors by an encoder fitted on the pool, and a note on what the pool lacked.

    Continuous attributes keep the pool's statistics. A category of the labelled rows that the pool does not hold
    (``encoder.categories``) gets a code of its own (``PriorEncoder.with_unseen_categories``, as the bundles code
    rows outside their pretraining split): it is similar only to itself in a categorical kernel, never miscoded as a
    pool category nor read as *unknown*. The note names those values and counts their rows
    ("" when there are none).

    Raises:
        ValueError: when the labelled manifest lacks one of the encoder's columns (named).
    """
    try:
        extended = encoder.with_unseen_categories(labelled)
        prior = extended.transform(labelled).astype(np.float64)
    except (KeyError, ValueError) as err:
        raise ValueError(f"the labelled manifest: {str(err).strip(chr(39))}") from None
    parts = []
    for name in encoder.categorical:
        known = len(encoder.categories[name])
        new = extended.categories[name][known:]
        if not new:
            continue
        n_rows = int((prior[:, encoder.index(name)] >= known).sum())
        if name == "patient_id":
            parts.append(f"{len(new)} labelled patient(s) ({n_rows} rows) are not in the pool: each is a patient of "
                         "its own")
        else:
            shown = ", ".join(repr(v) for v in new[:5]) + (f" and {len(new) - 5} more" if len(new) > 5 else "")
            parts.append(f"labelled {name} value(s) unseen in the pool: {shown} ({n_rows} rows), each coded as a "
                         f"{name} of its own (similar only to itself)")
    return prior, "; ".join(parts)


def _as_candidate(name: str, value: Any, n: int, n_pool: int | None = None) -> PriorCandidate:
    """The candidate checked, its prior a float64 copy; ``n_pool``: the pool's rows of a two-input audit."""
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
    fit_prior = candidate.fit_prior
    if fit_prior is not None:
        if n_pool is None:
            raise ValueError(f"candidate {name!r}: fit_prior (the pool's prior vectors) needs a pool (pool_df).")
        fit_prior = np.array(fit_prior, dtype=np.float64)
        if fit_prior.ndim == 1:
            fit_prior = fit_prior[:, None]
        if fit_prior.shape != (n_pool, prior.shape[1]):
            raise ValueError(f"candidate {name!r}: fit_prior must have shape ({n_pool}, {prior.shape[1]}), one row "
                             f"per pool row, got {fit_prior.shape}.")
        if np.isinf(fit_prior).any():
            raise ValueError(f"candidate {name!r}: fit_prior holds infinite values; use NaN for a missing value.")
    elif n_pool is not None and (candidate.batches is None or not candidate.kernel.is_fitted):
        raise ValueError(f"candidate {name!r}: with a pool, give its fit_prior (the pool's prior vectors, encoded as "
                         "its prior) or its own batches and a fitted kernel.")
    description = candidate.description or type(candidate.kernel).__name__
    return dataclasses.replace(candidate, prior=prior, fit_prior=fit_prior, description=description)


def _root_message(err: BaseException) -> str:
    """The first line of the innermost cause: MONAI's config parser wraps an expression's error in a RuntimeError."""
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
    labelled: pd.DataFrame | None = None,
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
        labelled: a two-input audit: ``manifest`` is the pool the runs pretrain on (its kernel is fitted and its
            batches drawn there, as a run on the pool does) and ``labelled`` the labelled manifest, whose rows are
            encoded by the method's prior encoder fitted on the pool (:func:`encode_labelled`; a table must then
            cover the labelled images too, and ``kdu_gen``, whose VAE table covers the pool only, needs one).

    Returns:
        ``(candidates, skipped)``: candidates by name, and ``{name: reason}`` for the default methods that could
        not be built (a method needing a table that was not given, or a column the manifest lacks).
    """
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
        elif reads and labelled is not None:
            skipped[key] = (f"with a pool, the table it builds covers the pool's images only: --prior-table {key}=FILE "
                            "covering the pool's and the labelled manifest's images")
        else:
            jobs.append((key, key, {}))
    for name, table in tables.items():
        jobs.append((name, "kdu_encoder", {"prior_table": str(table)}))
    out: dict[str, PriorCandidate] = {}
    for name, method, extra in jobs:
        root = None if work_dir is None else Path(work_dir) / name
        note = ""
        try:
            if labelled is None:
                prior = method_prior(folder, method, manifest, dataset_dir=dataset_dir,
                                     overrides={**dict(overrides or {}), **extra}, n_batches=n_batches,
                                     bundle_root=root, name=name)
            else:
                prior, note = _pool_method_prior(folder, method, manifest, labelled, dataset_dir=dataset_dir,
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
            instance_weight=prior.instance_weight, note=note,
        )
    return out, skipped


def _pool_method_prior(
    folder: Path,
    method: str,
    pool_manifest: str | os.PathLike,
    labelled: pd.DataFrame,
    dataset_dir: str | os.PathLike | None,
    overrides: Mapping[str, Any],
    n_batches: int,
    bundle_root: str | os.PathLike | None,
    name: str,
) -> tuple[MethodPrior, str]:
    """A method's prior as a run on the pool builds it (:func:`~monai_du.bundle_priors.method_prior` on
    ``pool_manifest``: kernel, batches and ``batch_prior`` of the pool), with ``prior`` the labelled rows' vectors by
    the same fitted prior encoder (and the same prior table), and the note of :func:`encode_labelled`.

    The config is read as :func:`~monai_du.bundle_priors.method_prior` reads it; the fitted ``prior_encoder`` and
    the ``prior_table`` are taken from that parser before the bundle's prior is built from it, so the labelled rows
    are coded by the very encoder the kernel was fitted through."""
    files = stage_files(folder, method_files(folder, [str(method)])[str(method)])
    if len(files) != 1:
        raise ValueError(f"method {str(method)!r} is a composite of several runs; audit its stages instead.")
    with method_parser(folder, files, method, pool_manifest, dataset_dir, overrides, bundle_root) as parser:
        try:
            encoder = parser.get_parsed_content("prior_encoder")
            table = parser.get_parsed_content("prior_table") if "prior_table" in parser else None
            built = _build_method_prior(parser, name, int(n_batches))
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"method {str(method)!r}: {innermost_cause(err)}") from None
    rows = labelled
    if table is not None:
        try:
            rows = attach_prior_table(labelled, table)
        except ValueError as err:
            raise ValueError(f"the labelled manifest's images must be in its prior table too: {err}") from None
    prior, note = encode_labelled(encoder, rows)
    return dataclasses.replace(built, prior=prior), note
