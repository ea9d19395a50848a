"""``monai-du compare``: does a prior help on *your* data? Every method is a run of the pretrain bundle.

For every seed, :func:`run_compare` splits the manifest's patients (train / test), runs the pretrain bundle once per
method on the training patients (``configs/train.yaml`` plus the method's override file from
``configs/methods/``, one ``bundle_root`` per method and seed, same epochs and batch size), then probes each exported
encoder, frozen, on the label: a linear probe whose L2 strength is chosen by inner patient-grouped cross-validation,
a kNN probe, site leakage, and the label-efficiency curve (AUC against the number of labelled training patients).

Nothing here builds a trainer, loss, sampler, network or kernel: the bundle defines the run. A finished run leaves
``compare_done.json`` in its ``models/`` folder and ``probe.json`` in its ``eval/`` folder, so a killed comparison
resumes without redoing them, and an interrupted run resumes from its last checkpoint (the bundle's ``resume``).

Composite method ``kdu_bootstrap``: plain DU for the first half of the epochs, then kernel DU on the embeddings of
that first encoder (``methods/kdu_encoder.yaml``, started from its weights) for the second half: the same total
budget as every other method.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

__all__ = [
    "BUNDLES",
    "METHOD_NAMES",
    "DEFAULT_METHODS",
    "COMPOSITE_METHODS",
    "CompareConfig",
    "bundle_path",
    "method_files",
    "run_compare",
]

#: Pretrain bundles by modality (folders of the repository's ``bundles/``).
BUNDLES: dict[str, str] = {"cxr": "cxr_du_pretrain", "brain": "brain_mri_du_pretrain"}

#: Printed names of the shipped methods (``configs/methods/<key>.yaml``); a user's method file is named by its stem.
METHOD_NAMES: dict[str, str] = {
    "random": "random init",
    "du": "plain DU",
    "simclr": "SimCLR (InfoNCE)",
    "kdu_attr": "kernel DU (age x sex)",
    "kdu_gen": "kernel DU (generative prior)",
    "yaware": "y-Aware InfoNCE (age x sex)",
    "kdu_patient": "kernel DU (patient x time, PK batches)",
    "kdu_bootstrap": "kernel DU (bootstrap: DU encoder prior)",
    "kdu_encoder": "kernel DU (encoder prior)",
}

DEFAULT_METHODS: tuple[str, ...] = (
    "random", "du", "simclr", "kdu_attr", "kdu_gen", "yaware", "kdu_patient", "kdu_bootstrap",
)
"""The methods of a comparison, in table order."""

#: Methods made of stages: (method file, share of the epochs); a stage after the first starts from the previous
#: stage's weights and reads the prior table of its encoder.
COMPOSITE_METHODS: dict[str, tuple[tuple[str, float], ...]] = {"kdu_bootstrap": (("du", 0.5), ("kdu_encoder", 0.5))}

_DONE = "compare_done.json"
_PROBE = "probe.json"


def bundle_path(bundle: str | Path) -> Path:
    """The pretrain bundle folder: a modality key of :data:`BUNDLES` (the repository's ``bundles/``) or a path."""
    if str(bundle) in BUNDLES:
        path = Path(__file__).resolve().parents[1] / "bundles" / BUNDLES[str(bundle)]
    else:
        path = Path(bundle).expanduser()
    if not (path / "configs" / "train.yaml").is_file():
        raise ValueError(
            f"bundle {str(bundle)!r}: no configs/train.yaml under {path}. Pass --bundle with the folder of a pretrain "
            "bundle (the repository's bundles/cxr_du_pretrain when monai_du is installed from a clone)."
        )
    return path


def _check_method_file(path: Path) -> Path:
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"method file {path} does not parse: {first}") from None
    if content is not None and not isinstance(content, Mapping):
        raise ValueError(f"method file {path} must hold a mapping of bundle ids, got {type(content).__name__}.")
    return path


def method_files(bundle: Path, methods: Sequence[str], extra: Sequence[str | Path] = ()) -> dict[str, list[Path]]:
    """The override files of each method (the stages of a composite method are resolved later).

    Args:
        bundle: the pretrain bundle folder.
        methods: method keys (``configs/methods/<key>.yaml`` of the bundle, or :data:`COMPOSITE_METHODS`).
        extra: the user's own method files; each becomes a method named by its file stem.

    Returns:
        ``{method key: [override files]}`` in table order (a composite method maps to its stages' files).

    Raises:
        ValueError: an unknown method (naming the choices), or a method file that does not parse.
    """
    folder = bundle / "configs" / "methods"
    shipped = sorted(p.stem for p in folder.glob("*.yaml")) + sorted(COMPOSITE_METHODS)
    out: dict[str, list[Path]] = {}
    for key in methods:
        stages = [name for name, _ in COMPOSITE_METHODS.get(key, ((key, 1.0),))]
        paths = [folder / f"{name}.yaml" for name in stages]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise ValueError(f"unknown method {key!r}: choose from {shipped}, or pass your own with --method-config.")
        out[key] = [_check_method_file(p) for p in paths]
    for item in extra:
        path = Path(item).expanduser()
        if not path.is_file():
            raise ValueError(f"method file {path} does not exist.")
        out[path.stem] = [_check_method_file(path)]
    return out


@dataclass
class CompareConfig:
    """Settings of :func:`run_compare`.

    Attributes:
        manifest: the manifest file (``monai_du.data.manifest`` schema).
        label: the label to probe (``label_x`` or ``x``).
        dataset_dir: root of relative image paths (default: the manifest's folder).
        bundle: pretrain bundle, a key of :data:`BUNDLES` or a folder.
        methods: method keys, in table order.
        method_configs: the user's own method files (named by their stem).
        seeds: seeds; each draws a patient split, initial weights and augmentations.
        epochs, batch_size: the budget of every method (None: the bundle's).
        out: report folder; runs go to ``out/runs/seed<k>/<method>``.
        test_fraction: share of patients held out for the probes.
        label_sizes: labelled training patients of the label-efficiency curve (None: all).
        label_draws: draws per size.
        n_bootstrap: patient-level bootstrap resamples of the AUC CI.
        overrides: further bundle overrides for every run (e.g. ``{"num_workers": 0}``).
        plots: write PNG plots.
        audit: also audit the priors of the compared kernel methods (:func:`monai_du.audit.run_audit`, with the same
            bundle, batch size and overrides) and print each one's verdict next to its measured difference from
            plain DU; the audit goes to ``out/audit``.
    """

    manifest: str | Path
    label: str
    dataset_dir: str | Path | None = None
    bundle: str | Path = "cxr"
    methods: Sequence[str] = DEFAULT_METHODS
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


# ---------------------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------------------
def _label_column(df: pd.DataFrame, label: str, source: str) -> str:
    column = label if label in df.columns else f"label_{label}"
    if column not in df.columns:
        labels = [c for c in df.columns if c.startswith("label_")]
        raise ValueError(f"manifest {source} has no column {label!r} (nor 'label_{label}'); label columns: {labels}.")
    return column


def _split_overrides(seed: int, test_fraction: float) -> dict[str, Any]:
    """The bundle ids of one seed's patient split: pretraining reads its ``train`` part."""
    return {"split_fractions": {"train": 1.0 - test_fraction, "test": test_fraction}, "split_seed": int(seed),
            "pretrain_split": "train"}


def _split(df: pd.DataFrame, seed: int, test_fraction: float) -> np.ndarray:
    """Training-patient mask of one seed, as the bundle computes it (select_split with the same arguments)."""
    from monai_du.data.splits import select_split

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


# ---------------------------------------------------------------------------------------------------------------------
# running the bundle
# ---------------------------------------------------------------------------------------------------------------------
def _signature(files: Sequence[Path], overrides: Mapping[str, Any]) -> str:
    text = json.dumps({"files": [str(f) for f in files], "contents": [f.read_text(encoding="utf-8") for f in files],
                       "overrides": {k: str(v) for k, v in sorted(overrides.items())}}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def run_bundle(files: Sequence[Path], bundle_root: Path, overrides: Mapping[str, Any], bundle: Path) -> bool:
    """Run the pretrain bundle in-process (``monai.bundle.ConfigWorkflow``): ``configs/train.yaml`` plus ``files``.

    Returns False without running when ``bundle_root`` already holds a finished run of the same files and overrides.
    """
    from monai.bundle import ConfigWorkflow

    config_files = [bundle / "configs" / "train.yaml", *files]
    signature = _signature(config_files, overrides)
    done = bundle_root / "models" / _DONE
    if done.is_file() and json.loads(done.read_text(encoding="utf-8")).get("signature") == signature:
        return False
    workflow = ConfigWorkflow(
        config_file=[str(f) for f in config_files],
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type=None,
        bundle_root=str(bundle_root),
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    from monai_du.io import write_text_atomic

    write_text_atomic(done, json.dumps({"signature": signature}) + "\n")
    return True


def _training_losses(bundle_root: Path) -> list[float]:
    """The per-iteration ``train_loss`` of a run, read back from its TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = bundle_root / "eval" / "tensorboard"
    if not folder.is_dir():
        return []
    losses: dict[int, float] = {}
    for events in sorted(folder.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "train_loss" in acc.Tags().get("scalars", []):
            losses.update({e.step: e.value for e in acc.Scalars("train_loss")})
    return [losses[k] for k in sorted(losses)]


# ---------------------------------------------------------------------------------------------------------------------
# probing one run
# ---------------------------------------------------------------------------------------------------------------------
def _features(models_dir: Path, images: np.ndarray, device: str) -> np.ndarray:
    from monai.data import Dataset

    from monai_du.evaluation import extract_features
    from monai_du.priors import load_encoder

    encoder = load_encoder(models_dir)
    dataset = Dataset([{"image": torch.from_numpy(img)} for img in images])
    features, _ = extract_features(encoder, dataset, device=device, batch_size=64)
    return features


def _probe(features: np.ndarray, df: pd.DataFrame, column: str, train_mask: np.ndarray, seed: int,
           config: CompareConfig) -> dict[str, Any]:
    from threadpoolctl import threadpool_limits

    from monai_du.evaluation import knn_probe, label_efficiency, linear_probe, site_leakage

    notes: list[str] = []
    groups = df["patient_id"].astype(str).to_numpy()
    split = {"groups": groups, "train_mask": train_mask}
    y = df[column]
    # hundreds of small logistic-regression fits: one BLAS thread is ~10x faster than contended threads
    with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=1):
        warnings.simplefilter("always")
        scores = linear_probe(features, y, seed=seed, **split)
        auc, low, high = scores.roc_auc(n_bootstrap=config.n_bootstrap, seed=seed)
        k = max(1, min(20, int(train_mask.sum()) // 4))
        knn_auc = knn_probe(features, y, k=k, seed=seed, **split).roc_auc(n_bootstrap=0)[0]
        leak, chance = math.nan, math.nan
        if "site" in df.columns and df["site"].nunique() > 1:
            result = site_leakage(features, df["site"], seed=seed, **split)
            leak, chance = result.balanced_accuracy, result.chance
        curve = label_efficiency(features, y, groups, train_mask, n_patients=tuple(config.label_sizes),
                                 n_draws=config.label_draws, seed=seed)
    notes += list(dict.fromkeys(str(w.message).splitlines()[0] for w in caught if issubclass(w.category, UserWarning)))
    chosen = np.asarray(getattr(scores, "chosen_C", [math.nan]), dtype=float).ravel()
    return {"auc": auc, "auc_low": low, "auc_high": high, "knn_auc": knn_auc, "site_leakage": leak,
            "site_chance": chance, "chosen_C": float(np.nanmedian(chosen)) if np.isfinite(chosen).any() else math.nan,
            "label_efficiency": curve.to_dict("records"), "notes": "; ".join(notes)}


# ---------------------------------------------------------------------------------------------------------------------
# one method of one seed
# ---------------------------------------------------------------------------------------------------------------------
def _run_method(key: str, files: list[Path], root: Path, overrides: dict[str, Any], bundle: Path,
                df: pd.DataFrame, say: Callable[[str], None]) -> tuple[float, int]:
    """Pretrain one method (all its stages) into ``root``; returns (wall seconds, steps)."""
    started = time.perf_counter()
    stages = COMPOSITE_METHODS.get(key)
    if stages is None:
        run_bundle(files, root, overrides, bundle)
    else:
        from monai_du.priors import encoder_prior_table, write_prior_table

        epochs = int(overrides["max_epochs"])
        first = max(1, round(epochs * stages[0][1])) if epochs else 0
        stage_root = root / "stage1"
        run_bundle(files[:1], stage_root, {**overrides, "max_epochs": first}, bundle)
        table_path = stage_root / "eval" / "encoder_prior_table.csv"
        if not table_path.is_file():
            table = encoder_prior_table(
                overrides["manifest"], stage_root / "models", root=overrides["dataset_dir"], split="train",
                fractions=overrides["split_fractions"], split_seed=overrides["split_seed"],
            )
            write_prior_table(table, table_path)
        second = {**overrides, "max_epochs": epochs - first, "prior_table": str(table_path),
                  "init_checkpoint": str(stage_root / "models" / "model.pt")}
        run_bundle(files[1:], root, second, bundle)
    steps = len(_training_losses(root)) + (len(_training_losses(root / "stage1")) if stages else 0)
    return time.perf_counter() - started, steps


# ---------------------------------------------------------------------------------------------------------------------
# the comparison
# ---------------------------------------------------------------------------------------------------------------------
def run_compare(config: CompareConfig, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Run the comparison and write the report folder (tables, verdict, CSV/JSON, plots).

    Args:
        config: the settings.
        log: callable for progress lines and the final tables (None: silent).

    Returns:
        a dict with ``results`` (one row per method and seed), ``summary`` (one row per method), ``efficiency`` (the
        label-efficiency rows), ``table``, ``efficiency_table``, ``verdict`` (sentences), ``files``, ``wall_time_s``.

    Raises:
        ValueError: with one line naming the file, column or method, for bad input.
    """
    from monai_du import report
    from monai_du.data.manifest import read_manifest
    from monai_du.priors import load_images

    say = log or (lambda _: None)
    started = time.perf_counter()
    bundle = bundle_path(config.bundle)
    files = method_files(bundle, config.methods, config.method_configs)
    manifest = Path(config.manifest).expanduser()
    if not manifest.is_file():
        raise ValueError(f"manifest {manifest} does not exist.")
    dataset_dir = Path(config.dataset_dir).expanduser() if config.dataset_dir else manifest.parent
    df = read_manifest(manifest, root=dataset_dir).reset_index(drop=True)
    column = _label_column(df, config.label, str(manifest))
    if not 0 < config.test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {config.test_fraction}.")
    masks = {seed: _split(df, seed, config.test_fraction) for seed in config.seeds}
    for seed, mask in masks.items():
        _check_classes(df[column], mask, column, seed)

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.yaml"))
    spatial = list(parser["spatial_size"])
    epochs = int(config.epochs if config.epochs is not None else parser["max_epochs"])
    batch = int(config.batch_size if config.batch_size is not None else parser["batch_size"])
    modality = "2d" if len(spatial) == 2 else "3d"
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    say(f"monai-du compare: {len(df)} images of {df['patient_id'].nunique()} patients from {manifest}; label {column}; "
        f"methods {list(files)}; seeds {list(config.seeds)}; {epochs} epochs, batch {batch}; bundle {bundle}; "
        f"report -> {out}")
    t0 = time.perf_counter()
    images = load_images(df, modality=modality, image_size=int(spatial[0]))
    say(f"images for the probes: {tuple(images.shape)} ({time.perf_counter() - t0:.1f} s)")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    rows: list[dict[str, Any]] = []
    efficiency: list[dict[str, Any]] = []
    losses: dict[str, dict[int, list[float]]] = {key: {} for key in files}
    total = len(files) * len(config.seeds)
    for seed in config.seeds:
        train_mask = masks[seed]
        n_train = int(train_mask.sum())
        overrides = {
            "manifest": str(manifest), "dataset_dir": str(dataset_dir), "seed": int(seed),
            **_split_overrides(seed, config.test_fraction), "max_epochs": epochs, "batch_size": min(batch, n_train),
            **dict(config.overrides),
        }
        for key, method in files.items():
            name = METHOD_NAMES.get(key, key)
            root = out / "runs" / f"seed{seed}" / key
            probe_file = root / "eval" / _PROBE
            done = len(rows) + 1
            if probe_file.is_file():
                row = json.loads(probe_file.read_text(encoding="utf-8"))
                say(f"[{done}/{total}] seed {seed} {name}: done before, AUC {row['auc']:.3f}")
            else:
                say(f"[{done}/{total}] seed {seed} {name}: pretraining ({epochs} epochs) in {root}")
                wall, steps = _run_method(key, method, root, overrides, bundle, df, say)
                say(f"[{done}/{total}] seed {seed} {name}: probing the frozen encoder")
                probe = _probe(_features(root / "models", images, device), df, column, train_mask, seed, config)
                row = {"method_key": key, "method": name, "seed": int(seed), **probe, "wall_time_s": wall,
                       "steps": steps, "n_train_images": n_train,
                       "n_train_patients": int(df.loc[train_mask, "patient_id"].nunique())}
                from monai_du.io import write_text_atomic

                write_text_atomic(probe_file, json.dumps(report.json_safe(row), indent=2) + "\n")
                say(f"[{done}/{total}] seed {seed} {name}: AUC {row['auc']:.3f} (C {row['chosen_C']:.3g}), "
                    f"{steps} steps, {wall:.1f} s")
            efficiency += [{"method_key": key, "method": name, "seed": seed,
                            **{k: v for k, v in r.items() if k != "patients"}} for r in row.pop("label_efficiency")]
            rows.append(row)
            losses[key][seed] = _training_losses(root)

    results = pd.DataFrame(rows)
    curve = pd.DataFrame(efficiency)
    wall = time.perf_counter() - started
    header = (f"monai-du compare: {manifest.name}, {len(df)} images, {df['patient_id'].nunique()} patients; label "
              f"{column}; seeds {list(config.seeds)}; {epochs} epochs, batch {batch}; linear probe (C by inner "
              f"patient-grouped CV) on held-out patients ({config.test_fraction:.0%}); total wall time {wall:.0f} s")
    written = report.write_report(out, header, results, curve, losses, list(files), plots=config.plots,
                                  config=asdict(config) | {"manifest": str(manifest), "label": column, "epochs": epochs,
                                                          "batch": batch})
    for line in [""] + written["lines"]:
        say(line)
    say(f"report written to {out}: {', '.join(sorted(written['files']))}")
    audit_lines: list[str] = []
    if config.audit:
        audit_lines = _audit_next_to(config, bundle, manifest, dataset_dir, column, batch, list(files), results, out)
        for line in audit_lines:
            say(line)
    return {"results": results, "summary": written["summary"], "efficiency": curve, "table": written["table"],
            "efficiency_table": written["efficiency_table"], "verdict": written["verdict"],
            "files": written["files"], "audit": audit_lines, "wall_time_s": wall}


def _audit_next_to(config: CompareConfig, bundle: Path, manifest: Path, dataset_dir: Path, column: str, batch: int,
                   methods: list[str], results: pd.DataFrame, out: Path) -> list[str]:
    """Audit the compared kernel methods' priors; lines of the audit table and of each verdict beside the measured
    paired difference from plain DU."""
    from monai_du.audit import format_audit, run_audit
    from monai_du.bundle_priors import kernel_methods
    from monai_du.io import write_text_atomic

    audited = [key for key in methods if key in kernel_methods(bundle)]
    seed = int(config.seeds[0])
    tables = {}
    stage1 = out / "runs" / f"seed{seed}" / "kdu_bootstrap" / "stage1" / "models"
    if "kdu_bootstrap" in methods and (stage1 / "encoder.pt").is_file():
        # kdu_bootstrap's prior: the embeddings of its first seed's first-stage encoder, for every labelled row
        from monai_du.priors import encoder_prior_table, write_prior_table

        path = out / "audit" / "kdu_bootstrap_prior_table.csv"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_prior_table(encoder_prior_table(str(manifest), stage1, root=str(dataset_dir), split="all"), path)
        tables["kdu_bootstrap"] = path
    if not audited and not tables:
        return []
    try:
        # the kernels and batches of the first seed's runs: its split, its seed
        split = _split_overrides(seed, config.test_fraction)
        table = run_audit(manifest, [column], dataset_dir=dataset_dir, prior_tables=tables, out=out / "audit",
                          bundle=bundle, methods=audited, bundle_overrides={**split, **dict(config.overrides)},
                          batch_size=batch, seed=seed)
    except ValueError as err:
        return ["", f"audit skipped: {err}"]
    aucs = results.pivot(index="seed", columns="method_key", values="auc")
    lines = ["", "Audit of the compared priors, before pretraining (monai-du audit, written to "
             f"{out / 'audit'}):", "", format_audit(table), "", "audit verdict beside the measured paired difference:"]
    rows = table.set_index("prior")
    for key in audited + list(tables):
        if key not in rows.index:
            continue
        measured = ""
        if "du" in aucs.columns and key in aucs.columns:
            diff = (aucs[key] - aucs["du"]).dropna()
            measured = f"; measured {diff.mean():+.3f} AUC vs plain DU over {len(diff)} seeds"
        lines.append(f"- {METHOD_NAMES.get(key, key)}: audit rank {int(rows.loc[key, 'rank'])} of {len(rows)}, "
                     f"{rows.loc[key, 'verdict']}{measured}")
    write_text_atomic(out / "audit" / "audit_vs_compare.txt", "\n".join(lines[1:]) + "\n")
    return lines
