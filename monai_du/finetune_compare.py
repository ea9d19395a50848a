"""Fine-tuning in a comparison: every compared encoder trained end to end by the fine-tune bundle, on the probes'
patients.

A linear probe freezes the encoder; a hospital deploys a fine-tuned network, and a pretraining gain can shrink once
the whole network learns. :func:`finetune_plan` lays out, once per seed, the fine-tune runs that every method gets:
for each split of the probes (the cross-fitting folds with a pool, the one held-out split otherwise) and each label
size, the training patients (all of the split's, or one draw of ``n`` of them, the same draw for every method), a
fifth of them (at least one patient of each class) as the bundle's validation split, which picks its checkpoint by
validation AUC, and the split's held-out patients as ``test``. :func:`finetune_encoder` runs the fine-tune bundle's
``configs/train.yaml`` on each (``mode: finetune``, from the method's ``encoder.pt``; random init's is its random
weights, so "from scratch" is the same network) and its ``configs/inference.yaml`` on the ``test`` patients, then
pools each size's held-out scores over the splits into one ROC AUC with a patient-bootstrap CI. Every run is a
:func:`monai_du.runs.run_bundle` run in its own folder: reused when finished with the same inputs, resumed when killed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from monai_du.data.manifest import RESOLVED_IMAGE_COLUMN, write_manifest
from monai_du.evaluation import roc_auc_with_ci
from monai_du.runs import run_bundle, run_seconds

__all__ = ["VAL_FRACTION", "FineTuneSplit", "finetune_encoder", "finetune_plan", "prediction_column"]

#: Share of a fine-tune run's training patients that form its validation split (checkpoint choice).
VAL_FRACTION = 0.2
_MAX_REDRAWS = 10


@dataclass(frozen=True)
class FineTuneSplit:
    """One fine-tune run of a plan.

    Attributes:
        split: the probe split whose held-out patients it scores.
        size: the number of training patients asked for (None: all of the split's).
        roles: (N,) ``"train"``, ``"val"``, ``"test"`` or ``""`` (not used) for each row of the labelled manifest.
    """

    split: int
    size: int | None
    roles: np.ndarray

    @property
    def name(self) -> str:
        return f"split{self.split}_{'all' if self.size is None else f'n{self.size}'}"


def _patient_labels(y: np.ndarray, groups: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(patients, label)`` of the rows: a patient is positive when any of its rows is."""
    patients, inverse = np.unique(groups[rows], return_inverse=True)
    label = np.zeros(patients.size)
    np.maximum.at(label, inverse, y[rows])
    return patients, label


def finetune_plan(y: np.ndarray, groups: np.ndarray, splits: Sequence[tuple[np.ndarray, np.ndarray]],
                  sizes: Sequence[int | None], seed: int, val_fraction: float = VAL_FRACTION
                  ) -> tuple[list[FineTuneSplit], list[str]]:
    """The fine-tune runs of one seed, the same for every method (they depend on the labels, patients, splits, sizes
    and seed only).

    Args:
        y: (N,) labels 0/1; other values (NaN, -1) are never used.
        groups: (N,) patient ids.
        splits: the probe's splits, ``(fit_mask, test_mask)`` boolean (N,) pairs.
        sizes: training patients per run (None: all of the split's); a size at or above the split's patients is
            skipped, as the "all" run covers it.
        seed: seed of the draws and of the validation patients (with the split index).
        val_fraction: share of each class's drawn patients used as the validation split (at least one).

    Returns:
        ``(runs, notes)``: the runs, split by split, and a note for each size that could not be drawn.
    """
    labelled = np.isin(y, (0.0, 1.0))
    runs: list[FineTuneSplit] = []
    notes: list[str] = []
    for k, (fit_mask, test_mask) in enumerate(splits):
        rng = np.random.default_rng([int(seed), k])
        patients, label = _patient_labels(y, groups, np.flatnonzero(fit_mask & labelled))
        for size in sizes:
            if size is not None and size >= patients.size:
                continue
            picked = None
            for _ in range(_MAX_REDRAWS + 1):
                chosen = np.arange(patients.size) if size is None else rng.choice(patients.size, size, replace=False)
                if min((label[chosen] == 1).sum(), (label[chosen] == 0).sum()) >= 2:
                    picked = np.sort(chosen)
                    break
            if picked is None:
                notes.append(f"fine-tuning: split {k} has no draw of {size} patients with 2 of each class; skipped")
                continue
            val = [rng.choice(members, max(1, round(val_fraction * members.size)), replace=False)
                   for members in (picked[label[picked] == c] for c in (0.0, 1.0))]
            val_patients = patients[np.concatenate(val)]
            roles = np.full(len(y), "", dtype=object)
            train_rows = labelled & np.isin(groups, patients[picked])
            roles[train_rows] = "train"
            roles[train_rows & np.isin(groups, val_patients)] = "val"
            roles[test_mask & labelled] = "test"
            runs.append(FineTuneSplit(k, size, roles))
    return runs, notes


def prediction_column(label: str) -> str:
    """The fine-tune bundle's probability column for a label column (``label_x`` -> ``prob_x``)."""
    return "prob_" + (label[len("label_"):] if label.startswith("label_") else label)


def _encoder_settings(encoder_dir: Path) -> dict[str, Any]:
    """The network and loading ids of the fine-tune bundle that match a pretraining run (its ``encoder_info.json``)."""
    info = json.loads((encoder_dir / "encoder_info.json").read_text(encoding="utf-8"))
    settings = {"backbone": info["backbone"], "spatial_size": list(info["spatial_size"])}
    kwargs = info.get("backbone_kwargs") or {}
    if "widen_factor" in kwargs:
        settings["widen_factor"] = kwargs["widen_factor"]
    if "image_loading" in info:
        settings["image_loading"] = dict(info["image_loading"])
    return settings


def _write_run_manifest(df: pd.DataFrame, run: FineTuneSplit, path: Path) -> Path:
    """The labelled rows a run uses, with absolute image paths and its ``split`` column (equal rows, equal file)."""
    rows = df.loc[run.roles != ""].copy()
    rows["image"] = rows[RESOLVED_IMAGE_COLUMN]
    rows["split"] = run.roles[run.roles != ""]
    return write_manifest(rows.drop(columns=[RESOLVED_IMAGE_COLUMN]), path)


def finetune_encoder(plan: Sequence[FineTuneSplit], df: pd.DataFrame, y: np.ndarray, label: str, encoder_dir: Path,
                     root: Path, bundle: Path, manifests: Path, seed: int, epochs: int | None = None,
                     overrides: Mapping[str, Any] | None = None, n_bootstrap: int = 1000,
                     progress: Callable[[str], None] | None = None) -> tuple[pd.DataFrame, float]:
    """Fine-tune one pretrained encoder on every run of ``plan`` and score the held-out patients.

    Args:
        plan: the runs (:func:`finetune_plan`).
        df: the labelled manifest's rows as read (``read_manifest``), in the order the plan indexes; the runs'
            manifests are written from them, so the label keeps its written values (``M``/``F`` for sex).
        y: (N,) the label as 0/1 (the scored truth).
        label: the label column.
        encoder_dir: the pretraining run's ``models`` folder (``encoder.pt``, ``encoder_info.json``).
        root: the fine-tune runs go to ``root/<run name>`` (its predictions to ``root/<run name>/predict``).
        bundle: the fine-tune bundle folder.
        manifests: folder of the runs' manifests (shared by the methods of a seed).
        seed: the runs' seed.
        epochs: fine-tuning epochs (None: the bundle's).
        overrides: further ids of the fine-tune bundle for every run.
        n_bootstrap: patient-bootstrap resamples of each AUC's CI.
        progress: called with a line after each epoch of each run.

    Returns:
        ``(table, seconds)``: one row per size (``n_patients``: the patients it learned from, averaged over the
        splits; ``size``: as asked, None for all) with the pooled held-out ``auc``, ``auc_low``, ``auc_high`` and
        ``n_scored`` images; and the wall seconds of the runs.
    """
    settings = _encoder_settings(encoder_dir)
    y = np.asarray(y, dtype=np.float64)
    groups = df["patient_id"].astype(str).to_numpy()
    row_of = {path: i for i, path in enumerate(df[RESOLVED_IMAGE_COLUMN].astype(str))}
    scores: dict[int | None, np.ndarray] = {}
    patients: dict[int | None, list[int]] = {}
    seconds = 0.0
    for i, run in enumerate(plan):
        path = _write_run_manifest(df, run, manifests / f"{run.name}.csv")
        data = {"manifest": str(path), "dataset_dir": str(path.parent), "labels": [label], **settings}
        run_root = root / run.name
        train = {**data, "pretrained": str(encoder_dir / "encoder.pt"), "require_pretrained": True,
                 "mode": "finetune", "seed": int(seed), "cache_images": True, **dict(overrides or {})}
        if epochs is not None:
            train["train#trainer#max_epochs"] = int(epochs)
        prefix = f"fine-tune {i + 1}/{len(plan)} ({run.name}): "
        status = None if progress is None else (lambda line, prefix=prefix: progress(prefix + line))
        run_bundle([], run_root, train, bundle, progress=status)
        predict = {**data, "predict_split": "test", "ckpt_dir": str(run_root / "models")}
        run_bundle([], run_root / "predict", predict, bundle, config="inference.yaml")
        seconds += run_seconds(run_root) + run_seconds(run_root / "predict")
        table = pd.read_csv(run_root / "predict" / "eval" / "predictions.csv")
        rows = np.asarray([row_of[str(p)] for p in table["image"]], dtype=np.int64)
        pooled = scores.setdefault(run.size, np.full(len(df), np.nan))
        pooled[rows] = table[prediction_column(label)].to_numpy(dtype=np.float64)
        patients.setdefault(run.size, []).append(len(np.unique(groups[np.isin(run.roles, ("train", "val"))])))
    records = []
    for size, pooled in scores.items():
        scored = np.isfinite(pooled)
        auc, low, high = roc_auc_with_ci(y[scored], pooled[scored], n_bootstrap=n_bootstrap, seed=seed,
                                         groups=groups[scored])
        records.append({"size": size, "n_patients": int(round(np.mean(patients[size]))), "auc": auc,
                        "auc_low": low, "auc_high": high, "n_scored": int(scored.sum())})
    return pd.DataFrame(records), seconds if seconds else math.nan
