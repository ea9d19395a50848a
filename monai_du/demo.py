"""The one-command demo (``monai-du demo``): does prior knowledge help on the demo cohort, at an equal budget?

:func:`run_demo` generates the embedded demo cohort (chest X-rays, or brain MRIs with ``modality="brain"``), splits it
by patient, and for every seed pretrains and probes these methods with the same encoder, initial weights, epochs,
batch size, optimiser and augmentations:

========== ==================================================================================================
key        method
========== ==================================================================================================
random     the randomly initialised encoder (no pretraining): the floor
du         plain decoupled uniformity (DU), random batches
kdu_attr   kernel DU with the age x sex prior (RBF on age, ``"knn"`` bandwidth, times a sex kernel, plus an
           instance term), on site-conditioned batches (every batch from one site)
kdu_gen    kernel DU with the generative prior: a MONAI VarAutoEncoder trained on the training images, its latent
           means stored in a prior table keyed by image path (:mod:`monai_du.priors`), RBF (``"knn"``) kernel,
           site-conditioned batches. Its wall time includes training the autoencoder.
yaware     y-Aware InfoNCE with the kernel of ``kdu_attr``, site-conditioned batches
========== ==================================================================================================

Pretraining sees the training patients only (no labels). Evaluation encodes every image with the frozen backbone
and fits a linear probe (logistic regression) on the training patients' labels, scored on the held-out patients:
ROC AUC with a patient-level bootstrap CI, site leakage (balanced accuracy of predicting site, with its chance
level), age MAE for brain MRI, and wall time. Results are averaged over seeds (mean ± std); each seed draws a new
patient split, new initial weights and new augmentations, on the same cohort.

The report folder holds ``results.csv`` (one row per method and seed), ``summary.csv``, ``results.json``,
``report.txt`` (the printed tables and verdict) and PNG plots: ``loss_curves.png``, ``prior_kernel_batch.png``,
``embeddings_pca.png`` and ``summary.png``. ``sweep=True`` adds ``sweep.csv``: the effect of the instance weight,
the bandwidth rule and the sampler on kernel DU, measured on the first seed.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

__all__ = ["DemoConfig", "MethodSpec", "METHODS", "SWEEP_VARIANTS", "run_demo", "format_summary", "verdict"]

_MODALITY_DEFAULTS: dict[str, dict[str, Any]] = {
    # cxr crops keep >= 85 % of each side: the package recipe's 60 % often cuts off the costophrenic angles where
    # effusion shows, and then pretraining learns to ignore it (measured: plain DU 0.72 vs 0.82 AUC at 8 epochs)
    "cxr": {"n": 640, "image_size": 64, "epochs": 20, "batch_size": 64, "label": "effusion", "ae_image_size": 32,
            "crop_scale": (0.85, 1.0)},
    "brain": {"n": 240, "image_size": 32, "epochs": 15, "batch_size": 32, "label": "lesion", "ae_image_size": 32,
              "crop_scale": (0.8, 1.0)},
}


@dataclass(frozen=True)
class MethodSpec:
    """One pretraining method of the comparison.

    Attributes:
        name: printed name.
        loss: "none" (no pretraining), "du", "kdu" or "yaware".
        prior: "attr" (age x sex), "gen" (generative prior table) or None.
        sampler: AttributeBatchSampler mode: "random" or "within" (batches from one site).
        instance_weight: kernel DU instance term; None uses the config's.
        bandwidth: RBF bandwidth rule or value; None uses the config's.
        gen_kernel: kernel on the generative prior ("rbf" or "cosine"); None uses the config's.
        knn_within_sites: False fits the ``"knn"`` bandwidth on random batches even with site batches.
    """

    name: str
    loss: str
    prior: str | None = None
    sampler: str = "random"
    instance_weight: float | None = None
    bandwidth: float | str | None = None
    gen_kernel: str | None = None
    knn_within_sites: bool | None = None


METHODS: dict[str, MethodSpec] = {
    "random": MethodSpec("random-init", "none"),
    "du": MethodSpec("plain DU", "du"),
    "kdu_attr": MethodSpec("kernel DU (age x sex, site batches)", "kdu", "attr", "within"),
    "kdu_gen": MethodSpec("kernel DU (generative prior, site batches)", "kdu", "gen", "within"),
    "yaware": MethodSpec("y-Aware InfoNCE (age x sex, site batches)", "yaware", "attr", "within"),
}
"""The five methods of the comparison, in table order."""


def _sweep_variants(lam: float, instance_weight: float) -> dict[str, MethodSpec]:
    return {
        "du_within": MethodSpec("plain DU, site batches", "du", None, "within"),
        "kdu_attr_eta0": MethodSpec("kernel DU age x sex, eta=0", "kdu", "attr", "within", instance_weight=0.0),
        "kdu_attr_eta_lam": MethodSpec(
            f"kernel DU age x sex, eta={lam:g}", "kdu", "attr", "within", instance_weight=lam
        ),
        "kdu_attr_eta_20lam": MethodSpec(
            f"kernel DU age x sex, eta={20 * lam:g}", "kdu", "attr", "within", instance_weight=20 * lam
        ),
        "kdu_attr_median": MethodSpec(
            "kernel DU age x sex, median bandwidth", "kdu", "attr", "within", bandwidth="median"
        ),
        "kdu_attr_random": MethodSpec("kernel DU age x sex, random batches", "kdu", "attr", "random"),
        "kdu_gen_cosine": MethodSpec(
            "kernel DU generative, cosine kernel", "kdu", "gen", "within", gen_kernel="cosine"
        ),
        "kdu_gen_median": MethodSpec(
            "kernel DU generative, median bandwidth", "kdu", "gen", "within", bandwidth="median"
        ),
        "kdu_gen_knn_mixed": MethodSpec(
            "kernel DU generative, knn fitted on random batches", "kdu", "gen", "within", knn_within_sites=False
        ),
    }


SWEEP_VARIANTS = tuple(_sweep_variants(0.01, 0.05))
"""Keys of the extra runs of ``sweep=True`` (first seed only)."""


@dataclass
class DemoConfig:
    """Settings of :func:`run_demo`. ``None`` fields take the modality's default (see :meth:`resolved`).

    Attributes:
        modality: "cxr" (2D chest X-rays) or "brain" (3D brain MRI).
        n: number of images in the demo cohort.
        image_size: image side in pixels (voxels) for the encoder.
        epochs: pretraining epochs of every method.
        batch_size: pretraining batch size of every method (lowered to the number of training images if larger).
        seeds: seeds; each gives a patient split, initial weights and augmentations.
        out: report folder (the cohort is written to ``out/cohort``).
        cohort_seed: seed of the cohort itself (the same cohort for every seed).
        label: primary label (without ``label_``) for the AUC column; every label is probed.
        methods: method keys from :data:`METHODS`, in table order.
        lam, instance_weight, bandwidth, knn_k: kernel DU settings (the instance weight keeps a share
            ``eta / (eta + lam)`` of the within-group differences).
        knn_within_sites: with site-conditioned batches, fit the ``"knn"`` bandwidth on batches drawn within one
            site (``RBFKernel.fit(prior, groups=site)``), as the sampler draws them.
        gen_kernel, gen_latent_dim, gen_epochs, ae_image_size: generative prior settings.
        backbone, widen_factor, projection_dim, num_views, learning_rate, weight_decay, temperature: training.
        test_fraction: share of patients held out for the probes.
        n_bootstrap: bootstrap resamples of the AUC CI.
        sweep: also measure the effect of the instance weight, bandwidth and sampler on the first seed.
        plots: write the PNG plots.
        threads: torch CPU threads (None leaves torch's default).
        device: training device ("cpu", "cuda", ...).
    """

    modality: str = "cxr"
    n: int | None = None
    image_size: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    seeds: Sequence[int] = (0, 1, 2)
    out: str = "monai_du_demo"
    cohort_seed: int = 0
    label: str | None = None
    methods: Sequence[str] = tuple(METHODS)
    lam: float = 0.01
    instance_weight: float = 0.05
    bandwidth: float | str = "knn"
    knn_k: int = 5
    knn_within_sites: bool = True
    gen_kernel: str = "rbf"
    gen_latent_dim: int = 16
    gen_epochs: int = 5
    ae_image_size: int | None = None
    backbone: str = "resnet10"
    widen_factor: float = 0.125
    projection_dim: int = 64
    num_views: int = 2
    crop_scale: Sequence[float] | None = None
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    temperature: float = 0.1
    test_fraction: float = 0.3
    n_bootstrap: int = 1000
    sweep: bool = False
    plots: bool = True
    threads: int | None = None
    device: str = "cpu"

    def resolved(self) -> DemoConfig:
        """A copy with the modality's defaults filled in, validated."""
        if self.modality not in _MODALITY_DEFAULTS:
            raise ValueError(f"modality must be one of {sorted(_MODALITY_DEFAULTS)}, got {self.modality!r}.")
        defaults = _MODALITY_DEFAULTS[self.modality]
        filled = replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})
        filled.seeds = tuple(int(s) for s in filled.seeds)
        filled.methods = tuple(filled.methods)
        unknown = [m for m in filled.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}.")
        checks = {
            "n >= 8": filled.n >= 8,
            "image_size >= 16": filled.image_size >= 16,
            "epochs >= 0": filled.epochs >= 0,
            "batch_size >= 4": filled.batch_size >= 4,
            "at least one seed": len(filled.seeds) >= 1,
            "at least one method": len(filled.methods) >= 1,
            "lam > 0": filled.lam > 0,
            "instance_weight >= 0": filled.instance_weight >= 0,
            "0 < test_fraction < 1": 0 < filled.test_fraction < 1,
            "gen_kernel in (rbf, cosine)": filled.gen_kernel in ("rbf", "cosine"),
            "ae_image_size divisible by 8": filled.ae_image_size % 8 == 0 and filled.ae_image_size >= 8,
            "num_views >= 2": filled.num_views >= 2,
        }
        failed = [k for k, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid demo settings: need {', '.join(failed)} (got {self})")
        return filled


# ---------------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------------
def _prepare_cohort(config: DemoConfig, log: Callable[[str], None]) -> tuple[pd.DataFrame, np.ndarray]:
    from monai_du.data.cohorts import ensure_demo_cohort
    from monai_du.data.manifest import read_manifest
    from monai_du.priors import load_images

    started = time.perf_counter()
    cohort_dir = Path(config.out) / "cohort"
    manifest = ensure_demo_cohort(
        cohort_dir, config.modality, n=config.n, seed=config.cohort_seed, size=config.image_size
    )
    df = read_manifest(manifest).reset_index(drop=True)
    images = load_images(df, modality="2d" if config.modality == "cxr" else "3d", image_size=config.image_size)
    log(
        f"cohort: {len(df)} {config.modality} images of {df['patient_id'].nunique()} patients at "
        f"{df['site'].nunique()} sites, shape {tuple(images.shape[1:])}, in {manifest.parent} "
        f"({time.perf_counter() - started:.1f} s)"
    )
    return df, images


def _augmentations(config: DemoConfig):
    from monai_du.transforms import brain_augmentations, cxr_augmentations

    if config.modality == "cxr":
        return cxr_augmentations((config.image_size,) * 2, crop_scale=tuple(config.crop_scale))
    return brain_augmentations((config.image_size,) * 3, crop_scale=tuple(config.crop_scale))


def _resize(images: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(images)
    if tuple(x.shape[2:]) == (size,) * (x.ndim - 2):
        return x
    mode = "area"
    return torch.nn.functional.interpolate(x, size=(size,) * (x.ndim - 2), mode=mode)


# ---------------------------------------------------------------------------------------------------------------------
# one pretraining run
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class _Run:
    features: np.ndarray
    losses: list[float]
    epoch_metrics: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    network: Any = None


def _make_network(config: DemoConfig, seed: int):
    from monai_du.networks import ContrastiveEncoder

    torch.manual_seed(seed)  # the same initial weights for every method of a seed
    return ContrastiveEncoder(
        config.backbone,
        spatial_dims=2 if config.modality == "cxr" else 3,
        projection_dim=config.projection_dim,
        backbone_kwargs={"widen_factor": config.widen_factor},
    )


def _make_loss(spec: MethodSpec, kernel, config: DemoConfig):
    from monai_du.losses import DecoupledUniformityLoss, YAwareInfoNCELoss

    if spec.loss == "du":
        return DecoupledUniformityLoss(kernel=None, gather=False)
    if spec.loss == "kdu":
        eta = config.instance_weight if spec.instance_weight is None else spec.instance_weight
        return DecoupledUniformityLoss(kernel=kernel, lam=config.lam, instance_weight=eta, gather=False)
    if spec.loss == "yaware":
        return YAwareInfoNCELoss(kernel=kernel, temperature=config.temperature, gather=False)
    raise ValueError(f"unknown loss {spec.loss!r}")


def _extract(network, images: np.ndarray, config: DemoConfig) -> np.ndarray:
    from monai.data import Dataset

    from monai_du.evaluation import extract_features

    dataset = Dataset([{"image": torch.from_numpy(img)} for img in images])
    features, _ = extract_features(network.encoder, dataset, device=config.device, batch_size=64)
    return features


def _pretrain(
    spec: MethodSpec,
    kernel,
    images: np.ndarray,
    prior: np.ndarray,
    sites: np.ndarray,
    config: DemoConfig,
    seed: int,
    batch_size: int,
) -> _Run:
    """Pretrain on the training images with MONAI's SupervisedTrainer; returns losses and the network."""
    from ignite.engine import Events
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedTrainer

    from monai_du.data.samplers import AttributeBatchSampler
    from monai_du.engines import MultiViewPrepareBatch
    from monai_du.handlers import ContrastiveMetricsHandler, SamplerEpochHandler
    from monai_du.transforms import MultiViewd

    network = _make_network(config, seed).to(config.device)
    if spec.loss == "none" or config.epochs == 0:
        return _Run(np.empty((0, 0)), [], network=network)
    records = [{"image": img, "prior": torch.from_numpy(p)} for img, p in zip(images, prior)]
    views = MultiViewd(keys="image", transform=_augmentations(config), num_views=config.num_views)
    dataset = Dataset(records, transform=views)
    if spec.sampler == "within":
        sampler = AttributeBatchSampler(batch_size, mode="within", groups=list(sites), drop_last=True, seed=seed)
    else:
        sampler = AttributeBatchSampler(batch_size, mode="random", num_samples=len(records), drop_last=True, seed=seed)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=0)
    loss = _make_loss(spec, kernel, config)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    metrics = ContrastiveMetricsHandler(loss_function=loss)
    trainer = SupervisedTrainer(
        device=torch.device(config.device),
        max_epochs=config.epochs,
        train_data_loader=loader,
        network=network,
        optimizer=optimizer,
        loss_function=loss,
        prepare_batch=MultiViewPrepareBatch(image_key="image", prior_key="prior"),
        train_handlers=[SamplerEpochHandler(data_loader=loader, seed=seed), metrics],
        decollate=False,
    )
    losses: list[float] = []
    epoch_metrics: list[dict[str, float]] = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"].detach()))
    )
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: epoch_metrics.append({k: float(v) for k, v in e.state.metrics.items()})
    )
    started = time.perf_counter()
    trainer.run()
    return _Run(np.empty((0, 0)), losses, epoch_metrics, time.perf_counter() - started, network)


# ---------------------------------------------------------------------------------------------------------------------
# evaluation of one run
# ---------------------------------------------------------------------------------------------------------------------
def _safe(fn: Callable[[], Any], what: str, notes: list[str]) -> Any:
    try:
        return fn()
    except ValueError as err:  # e.g. a tiny test split holding one class
        notes.append(f"{what}: {err}")
        return None


def _evaluate(
    features: np.ndarray, meta: pd.DataFrame, train_mask: np.ndarray, config: DemoConfig, seed: int, labels: list[str]
) -> dict[str, Any]:
    """Probes of one run; problems (a class missing from a tiny split, a narrow bootstrap) go to ``notes``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _probe_all(features, meta, train_mask, config, seed, labels)
    messages = [str(w.message).splitlines()[0] for w in caught if issubclass(w.category, UserWarning)]
    out["notes"] = "; ".join(filter(None, [out["notes"], *dict.fromkeys(messages)]))
    return out


def _probe_all(
    features: np.ndarray, meta: pd.DataFrame, train_mask: np.ndarray, config: DemoConfig, seed: int, labels: list[str]
) -> dict[str, Any]:
    from monai_du.evaluation import (
        age_regression,
        knn_probe,
        linear_probe,
        site_leakage,
    )

    notes: list[str] = []
    groups = meta["patient_id"].to_numpy()
    split = {"groups": groups, "train_mask": train_mask}
    out: dict[str, Any] = {}
    for label in labels:
        column = f"label_{label}"
        scores = _safe(lambda: linear_probe(features, meta[column], seed=seed, **split), f"linear probe {label}", notes)
        auc = None
        if scores is not None:
            auc = _safe(lambda: scores.roc_auc(n_bootstrap=config.n_bootstrap, seed=seed), f"AUC {label}", notes)
        out[f"auc_{label}"], out[f"auc_low_{label}"], out[f"auc_high_{label}"] = auc if auc else (math.nan,) * 3
        k = max(1, min(20, int(train_mask.sum()) // 4))
        knn = _safe(lambda: knn_probe(features, meta[column], k=k, seed=seed, **split), f"kNN probe {label}", notes)
        knn_auc = _safe(lambda: knn.roc_auc(n_bootstrap=0), f"kNN AUC {label}", notes) if knn else None
        out[f"knn_auc_{label}"] = knn_auc[0] if knn_auc else math.nan
    leak = _safe(lambda: site_leakage(features, meta["site"], seed=seed, **split), "site leakage", notes)
    out["site_leakage"] = leak.balanced_accuracy if leak else math.nan
    out["site_chance"] = leak.chance if leak else math.nan
    if config.modality == "brain":
        mae = _safe(lambda: age_regression(features, meta["age"], seed=seed, **split), "age MAE", notes)
        out["age_mae"] = mae if mae is not None else math.nan
    out["notes"] = "; ".join(notes)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# priors of one seed
# ---------------------------------------------------------------------------------------------------------------------
def _attribute_prior(df: pd.DataFrame, train_mask: np.ndarray) -> np.ndarray:
    from monai_du.prior_encoder import PriorEncoder

    encoder = PriorEncoder(continuous=["age"], categorical=["sex"]).fit(df[train_mask])
    return encoder.transform(df)


def _bandwidth(config: DemoConfig, spec: MethodSpec, prior_train: np.ndarray, sites_train: np.ndarray,
               batch_size: int) -> float | str:
    """The RBF bandwidth of a method: a rule for :class:`RBFKernel`, or (for the ``"knn"`` rule with site-conditioned
    batches) a number fitted on batches drawn within one site, as the sampler draws them."""
    from monai_du.kernels import RBFKernel

    bandwidth = config.bandwidth if spec.bandwidth is None else spec.bandwidth
    within = spec.sampler == "within" and config.knn_within_sites and spec.knn_within_sites is not False
    if bandwidth == "knn" and within:
        rule = RBFKernel("knn", knn_k=min(config.knn_k, batch_size - 1), knn_batch_size=batch_size)
        return rule.fit(prior_train, groups=sites_train).bandwidth[0]
    return bandwidth


def _attribute_kernel(config: DemoConfig, spec: MethodSpec, prior_train: np.ndarray, sites_train: np.ndarray,
                      batch_size: int):
    from monai_du.kernels import CategoricalKernel, RBFKernel

    bandwidth = _bandwidth(config, spec, prior_train[:, :1], sites_train, batch_size)
    knn_k = min(config.knn_k, batch_size - 1)
    kernel = RBFKernel(bandwidth, columns=[0], knn_k=knn_k, knn_batch_size=batch_size) * CategoricalKernel(columns=[1])
    return kernel.fit(prior_train)


def _generative_prior(
    df: pd.DataFrame,
    images: np.ndarray,
    train_mask: np.ndarray,
    config: DemoConfig,
    seed: int,
    log: Callable[[str], None],
) -> tuple[np.ndarray, float, Path, list[float]]:
    """Train the prior autoencoder on the training images, write the prior table, attach it back by image key."""
    from monai_du.priors import (
        attach_prior_table,
        encode_images,
        load_prior_table,
        make_prior_table,
        prior_columns,
        train_prior_autoencoder,
        write_prior_table,
    )

    started = time.perf_counter()
    small = _resize(images, config.ae_image_size)
    channels = (16, 32, 64) if config.modality == "cxr" else (8, 16, 32)
    model, losses = train_prior_autoencoder(
        small[torch.as_tensor(np.flatnonzero(train_mask))], latent_dim=config.gen_latent_dim, epochs=config.gen_epochs,
        channels=channels, seed=seed, device=config.device,
    )
    embeddings = encode_images(model, small, device=config.device)
    table_path = Path(config.out) / "priors" / f"prior_table_seed{seed}.csv"
    path = write_prior_table(make_prior_table(df["image"], embeddings), table_path)
    # read it back and join by image path, as a user would: the row order of df plays no part
    table = load_prior_table(path)
    attached = attach_prior_table(df.sample(frac=1.0, random_state=seed), table).loc[df.index]
    prior = attached[prior_columns(table)].to_numpy(dtype=np.float32)
    seconds = time.perf_counter() - started
    log(f"  generative prior: VarAutoEncoder {tuple(small.shape[1:])} -> {prior.shape[1]} dims, "
        f"{config.gen_epochs} epochs, final loss {losses[-1] if losses else float('nan'):.4f}, table {path} "
        f"({seconds:.1f} s)")
    return prior, seconds, path, losses


def _generative_kernel(config: DemoConfig, spec: MethodSpec, prior_train: np.ndarray, sites_train: np.ndarray,
                       batch_size: int):
    from monai_du.priors import generative_prior_kernel

    kind = config.gen_kernel if spec.gen_kernel is None else spec.gen_kernel
    kernel = generative_prior_kernel(
        prior_train.shape[1], kind=kind, bandwidth=_bandwidth(config, spec, prior_train, sites_train, batch_size),
        knn_k=min(config.knn_k, batch_size - 1), knn_batch_size=batch_size,
    )
    return kernel.fit(prior_train)


# ---------------------------------------------------------------------------------------------------------------------
# aggregation, verdict and printing
# ---------------------------------------------------------------------------------------------------------------------
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan


def _summarise(results: pd.DataFrame, label: str, labels: list[str], methods: Sequence[str]) -> pd.DataFrame:
    rows = []
    for key in methods:
        part = results[results["method_key"] == key]
        if part.empty:
            continue
        row: dict[str, Any] = {"method_key": key, "method": part["method"].iloc[0], "n_seeds": len(part)}
        for name in labels:
            row[f"auc_{name}_mean"], row[f"auc_{name}_std"] = _mean_std(part[f"auc_{name}"])
            row[f"auc_low_{name}_mean"] = _mean_std(part[f"auc_low_{name}"])[0]
            row[f"auc_high_{name}_mean"] = _mean_std(part[f"auc_high_{name}"])[0]
            row[f"knn_auc_{name}_mean"], row[f"knn_auc_{name}_std"] = _mean_std(part[f"knn_auc_{name}"])
        row["site_leakage_mean"], row["site_leakage_std"] = _mean_std(part["site_leakage"])
        row["site_chance"] = _mean_std(part["site_chance"])[0]
        if "age_mae" in part:
            row["age_mae_mean"], row["age_mae_std"] = _mean_std(part["age_mae"])
        row["wall_time_s_mean"], row["wall_time_s_std"] = _mean_std(part["wall_time_s"])
        row["steps_mean"] = _mean_std(part["steps"])[0] if "steps" in part else math.nan
        for extra in ("kernel_effective_rank", "kernel_mean_offdiag", "alignment"):
            if extra in part:
                row[f"{extra}_mean"] = _mean_std(part[extra])[0]
        rows.append(row)
    return pd.DataFrame(rows)


def _pm(mean: float, std: float, digits: int = 3) -> str:
    if not np.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if np.isfinite(std) else f"{mean:.{digits}f}"


def format_summary(summary: pd.DataFrame, label: str, labels: list[str], n_seeds: int) -> str:
    """The seed-averaged table: AUC (mean ± std over seeds) and the mean of the per-seed 95% CI bounds, site leakage
    (balanced accuracy, mean ± std, chance in brackets), age MAE (brain), other labels' AUC, optimiser steps (equal
    epochs give fewer steps to site-conditioned batches, which drop each site's last partial batch) and wall time."""
    header = ["method", f"AUC {label} (mean ± std, {n_seeds} seed{'s' if n_seeds > 1 else ''})", "mean 95% CI",
              "site leakage (chance)"]
    others = [x for x in labels if x != label]
    brain = "age_mae_mean" in summary
    if brain:
        header.append("age MAE (y)")
    header += [f"AUC {x}" for x in others] + ["steps", "wall time"]
    body = []
    for _, r in summary.iterrows():
        ci = "-"
        if np.isfinite(r[f"auc_low_{label}_mean"]):
            ci = f"[{r[f'auc_low_{label}_mean']:.3f}, {r[f'auc_high_{label}_mean']:.3f}]"
        leak = _pm(r["site_leakage_mean"], r["site_leakage_std"])
        if leak != "-" and np.isfinite(r["site_chance"]):
            leak += f" ({r['site_chance']:.3f})"
        line = [r["method"], _pm(r[f"auc_{label}_mean"], r[f"auc_{label}_std"]), ci, leak]
        if brain:
            line.append(_pm(r["age_mae_mean"], r["age_mae_std"], 2))
        line += [_pm(r[f"auc_{x}_mean"], r[f"auc_{x}_std"]) for x in others]
        line.append(f"{r['steps_mean']:.0f}" if np.isfinite(r.get("steps_mean", math.nan)) else "-")
        line.append(f"{r['wall_time_s_mean']:.1f} s")
        body.append(line)
    widths = [max(len(row[j]) for row in [header] + body) for j in range(len(header))]
    render = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([render(header), "  ".join("-" * w for w in widths)] + [render(b) for b in body])


def _paired(results: pd.DataFrame, a: str, b: str, column: str) -> tuple[float, float, int]:
    """Mean and std over seeds of ``column(a) - column(b)``, paired by seed."""
    pa = results[results["method_key"] == a].set_index("seed")[column]
    pb = results[results["method_key"] == b].set_index("seed")[column]
    diff = (pa - pb).dropna()
    if diff.empty:
        return math.nan, math.nan, 0
    return float(diff.mean()), float(diff.std(ddof=1)) if len(diff) > 1 else math.nan, len(diff)


def _judge(mean: float, std: float, n: int) -> str:
    """'clearly' when the paired mean difference exceeds twice its standard error, else 'within noise'."""
    if n < 2 or not np.isfinite(std):
        return "single seed, no spread to judge by"
    se = std / math.sqrt(n)
    if abs(mean) > 2 * se and se > 0:
        return "larger than twice its standard error over seeds"
    if se == 0 and mean != 0:
        return "identical on every seed"
    return "within the seed-to-seed noise"


def verdict(results: pd.DataFrame, summary: pd.DataFrame, label: str) -> list[str]:
    """Plain sentences saying which method wins on the demo cohort, computed from the numbers."""
    lines: list[str] = []
    column = f"auc_{label}"
    ranked = summary.dropna(subset=[f"{column}_mean"]).sort_values(f"{column}_mean", ascending=False)
    if ranked.empty:
        return [f"No method could be scored on label {label!r} (see the notes column of results.csv)."]
    best = ranked.iloc[0]
    lines.append(
        f"Winner on the demo cohort (mean linear-probe AUC for {label}): {best['method']} "
        f"({_pm(best[f'{column}_mean'], best[f'{column}_std'])})."
    )
    if len(ranked) > 1:
        second = ranked.iloc[1]
        d, s, n = _paired(results, best["method_key"], second["method_key"], column)
        if d == 0:
            lines[-1] = lines[-1][:-1] + f", tied with {second['method']}."
        judged = _judge(d, s, n)
        lines.append(
            f"Its lead over the runner-up, {second['method']}, is {d:+.3f} AUC (paired over {n} seed(s), std "
            f"{s:.3f}): {judged}."
        )
        if judged == "within the seed-to-seed noise":
            lines.append("So no method wins clearly on this cohort at this budget: the top two are within the noise.")
    keys = set(summary["method_key"])
    for key in ("kdu_attr", "kdu_gen", "yaware"):
        if key in keys and "du" in keys:
            d, s, n = _paired(results, key, "du", column)
            if not np.isfinite(d):
                continue
            verb = "ties with" if abs(d) < 5e-4 else "beats" if d > 0 else "does not beat"
            name = summary.set_index("method_key").loc[key, "method"]
            lines.append(f"{name} {verb} plain DU: {d:+.3f} AUC (paired std {s:.3f}; {_judge(d, s, n)}).")
    if "random" in keys:
        for key in ("du", "kdu_attr"):
            if key in keys:
                d, s, n = _paired(results, key, "random", column)
                if np.isfinite(d):
                    name = summary.set_index("method_key").loc[key, "method"]
                    lines.append(
                        f"{name} vs the random-init encoder: {d:+.3f} AUC (paired std {s:.3f}; {_judge(d, s, n)})."
                    )
    leak = summary.dropna(subset=["site_leakage_mean"]).sort_values("site_leakage_mean")
    if not leak.empty:
        low = leak.iloc[0]
        lines.append(
            f"Lowest site leakage: {low['method']} (balanced accuracy "
            f"{_pm(low['site_leakage_mean'], low['site_leakage_std'])}, "
            f"chance {low['site_chance']:.3f})."
        )
        if float(low["site_leakage_mean"]) >= 0.9:
            lines.append(
                "Site stays almost perfectly predictable from every encoder's features (balanced accuracy >= 0.9 for "
                "all): site-conditioned batches stop site from separating the negatives of a batch, but do not remove "
                "the acquisition signature from the features."
            )
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _plot_losses(histories: dict[str, dict[int, list[float]]], names: dict[str, str], path: Path) -> Path:
    plt = _pyplot()
    keys = [k for k, h in histories.items() if any(len(v) for v in h.values())]
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4.2 * max(len(keys), 1), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for seed, losses in sorted(histories[key].items()):
            ax.plot(np.arange(1, len(losses) + 1), losses, lw=1, label=f"seed {seed}")
        ax.set_title(names[key], fontsize=9)
        ax.set_xlabel("iteration")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
    if not keys:
        axes[0][0].text(0.5, 0.5, "no pretraining run", ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_kernels(matrices: list[tuple[str, np.ndarray]], path: Path, caption: str) -> Path:
    from monai_du.kernels import kernel_summary

    plt = _pyplot()
    fig, axes = plt.subplots(1, max(len(matrices), 1), figsize=(4.6 * max(len(matrices), 1), 4.2), squeeze=False)
    for ax, (title, gram) in zip(axes[0], matrices):
        stats = kernel_summary(torch.as_tensor(gram))
        im = ax.imshow(gram, cmap="viridis", vmin=0.0, vmax=max(1.0, float(np.max(gram))))
        ax.set_title(
            f"{title}\nmean off-diag {stats['kernel_mean_offdiag']:.3f}, eff. rank "
            f"{stats['kernel_effective_rank']:.1f} / {gram.shape[0]}",
            fontsize=8,
        )
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(caption, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_pca(
    embeddings: dict[str, np.ndarray], names: dict[str, str], meta: pd.DataFrame, label: str, path: Path
) -> Path:
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    plt = _pyplot()
    keys = list(embeddings)
    fig, axes = plt.subplots(len(keys), 3, figsize=(11, 3.1 * len(keys)), squeeze=False)
    sites = sorted(meta["site"].astype(str).unique())
    site_codes = meta["site"].astype(str).map({s: i for i, s in enumerate(sites)}).to_numpy()
    y = meta[f"label_{label}"].to_numpy(dtype=float)
    for row, key in zip(axes, keys):
        feats = embeddings[key]
        xy = PCA(n_components=2, random_state=0).fit_transform(StandardScaler().fit_transform(feats))
        for ax, values, title, cmap in (
            (row[0], y, f"label {label}", "coolwarm"),
            (row[1], meta["age"].to_numpy(dtype=float), "age", "viridis"),
            (row[2], site_codes, "site", "tab10"),
        ):
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=values, cmap=cmap, s=6, alpha=0.8,
                            vmin=0 if title == "site" else None, vmax=9 if title == "site" else None)
            ax.set_title(f"{names[key]}: {title}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if title == "age":
                fig.colorbar(sc, ax=ax, fraction=0.046)
        for i, s in enumerate(sites):
            row[2].scatter([], [], c=[plt.get_cmap("tab10")(i)], s=10, label=s)
        row[2].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_summary(summary: pd.DataFrame, label: str, path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    x = np.arange(len(summary))
    auc, auc_std = summary[f"auc_{label}_mean"], summary[f"auc_{label}_std"].fillna(0)
    axes[0].bar(x, auc, yerr=auc_std, color="tab:blue", capsize=3)
    axes[0].set_ylabel(f"AUC {label} (mean ± std)")
    lo = np.nanmin(summary[f"auc_{label}_mean"] - summary[f"auc_{label}_std"].fillna(0)) if len(summary) else 0.5
    axes[0].set_ylim(max(0.0, min(0.5, lo - 0.05)), 1.0)
    leak, leak_std = summary["site_leakage_mean"], summary["site_leakage_std"].fillna(0)
    axes[1].bar(x, leak, yerr=leak_std, color="tab:orange", capsize=3)
    if np.isfinite(summary["site_chance"]).any():
        axes[1].axhline(float(np.nanmean(summary["site_chance"])), color="k", ls="--", lw=1, label="chance")
        axes[1].legend(fontsize=7)
    axes[1].set_ylabel("site balanced accuracy")
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels([textwrap.fill(m, 18) for m in summary["method"]], fontsize=6, rotation=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# the demo
# ---------------------------------------------------------------------------------------------------------------------
def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _batch_matrices(
    df: pd.DataFrame,
    train_idx: np.ndarray,
    attr_prior: np.ndarray,
    gen_prior: np.ndarray | None,
    kernels: dict[str, Any],
    batch_size: int,
    seed: int,
    config: DemoConfig,
) -> tuple[list[tuple[str, np.ndarray]], str]:
    """The first site-conditioned batch of the first epoch, ordered by (sex, age), and its prior kernel matrices."""
    from monai_du.data.samplers import AttributeBatchSampler

    sites = df["site"].to_numpy()[train_idx]
    sampler = AttributeBatchSampler(batch_size, mode="within", groups=list(sites), drop_last=True, seed=seed)
    batch = train_idx[np.asarray(next(iter(sampler)))]
    order = np.lexsort((df["age"].to_numpy()[batch], df["sex"].astype(str).to_numpy()[batch]))
    batch = batch[order]
    mats = []
    if "attr" in kernels:
        gram = kernels["attr"](torch.from_numpy(attr_prior[batch]).double()).numpy()
        bandwidth = kernels["attr"].k1.bandwidth[0]
        mats.append((f"age x sex prior: RBF(age, bandwidth {bandwidth:.2g} y) x sex", gram))
    if "gen" in kernels and gen_prior is not None:
        gram = kernels["gen"](torch.from_numpy(gen_prior[batch]).double()).numpy()
        gen = kernels["gen"]
        what = f"RBF, bandwidth {gen.bandwidth[0]:.2g}" if hasattr(gen, "bandwidth_") else "cosine"
        mats.append((f"generative prior: {what}", gram))
    site = df["site"].iloc[batch[0]]
    caption = (f"one training batch (seed {seed}, site {site}, {len(batch)} images) sorted by sex then age; "
               f"the loss adds instance_weight={config.instance_weight:g} to the diagonal, lam={config.lam:g}")
    return mats, caption


def run_demo(config: DemoConfig | None = None, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Run the comparison and write the report folder.

    Args:
        config: the settings (defaults: :class:`DemoConfig`).
        log: callable for progress lines and the final tables (None: silent).

    Returns:
        a dict with ``results`` (DataFrame, one row per method and seed), ``summary`` (DataFrame, one row per
        method), ``table`` (the printed table), ``verdict`` (list of sentences), ``sweep`` (DataFrame or None),
        ``files`` (paths written) and ``wall_time_s``.
    """
    config = (config or DemoConfig()).resolved()
    say = log or (lambda _: None)
    started = time.perf_counter()
    if config.threads:
        torch.set_num_threads(int(config.threads))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    say(f"monai_du demo: modality={config.modality}, n={config.n}, image_size={config.image_size}, "
        f"epochs={config.epochs}, batch_size={config.batch_size}, seeds={list(config.seeds)}, "
        f"torch threads={torch.get_num_threads()}, report -> {out}")
    df, images = _prepare_cohort(config, say)
    labels = sorted(c[len("label_"):] for c in df.columns if c.startswith("label_"))
    if config.label not in labels:
        raise ValueError(f"label {config.label!r} is not in the cohort; labels are {labels}.")
    meta = df[["patient_id", "site", "age", "sex"] + [f"label_{x}" for x in labels]]

    from monai_du.data.splits import patient_split

    specs = {k: METHODS[k] for k in config.methods}
    runs: list[dict[str, Any]] = []
    sweep_rows: list[dict[str, Any]] = []
    histories: dict[str, dict[int, list[float]]] = {k: {} for k in specs}
    first_embeddings: dict[str, np.ndarray] = {}
    kernel_plot: tuple[list, str] | None = None
    for seed_index, seed in enumerate(config.seeds):
        fractions = {"train": 1.0 - config.test_fraction, "test": config.test_fraction}
        split = patient_split(df, fractions, seed=seed, stratify="site")
        train_mask = (split["split"] == "train").to_numpy()
        train_idx = np.flatnonzero(train_mask)
        batch_size = min(config.batch_size, len(train_idx))
        say(f"seed {seed}: {len(train_idx)} training images ({split[train_mask]['patient_id'].nunique()} patients), "
            f"{int((~train_mask).sum())} held-out images ({split[~train_mask]['patient_id'].nunique()} patients), "
            f"batch size {batch_size}")
        attr_prior = _attribute_prior(df, train_mask)
        need_gen = any(s.prior == "gen" for s in specs.values()) or config.sweep and seed_index == 0
        gen_prior, gen_seconds = None, 0.0
        if need_gen:
            gen_prior, gen_seconds, _, _ = _generative_prior(df, images, train_mask, config, seed, say)
        sites_train = df["site"].to_numpy()[train_idx]
        label_name = config.label

        def run_one(key: str, spec: MethodSpec) -> dict[str, Any]:
            t0 = time.perf_counter()
            kernel, prior = None, attr_prior
            if spec.prior == "attr":
                kernel = _attribute_kernel(config, spec, attr_prior[train_idx], sites_train, batch_size)
            elif spec.prior == "gen":
                prior = gen_prior
                kernel = _generative_kernel(config, spec, gen_prior[train_idx], sites_train, batch_size)
            run = _pretrain(spec, kernel, images[train_idx], prior[train_idx], sites_train, config, seed, batch_size)
            features = _extract(run.network, images, config)
            scores = _evaluate(features, meta, train_mask, config, seed, labels)
            wall = time.perf_counter() - t0 + (gen_seconds if spec.prior == "gen" else 0.0)
            row: dict[str, Any] = {"method_key": key, "method": spec.name, "seed": seed, **scores,
                                   "wall_time_s": wall, "train_time_s": run.train_seconds,
                                   "final_loss": run.losses[-1] if run.losses else math.nan,
                                   "steps": len(run.losses),
                                   "kernel": repr(kernel) if kernel is not None else ""}
            if run.epoch_metrics:
                for name in ("kernel_effective_rank", "kernel_mean_offdiag", "alignment"):
                    values = [m[name] for m in run.epoch_metrics if name in m]
                    if values:
                        row[name] = float(np.mean(values))
            say(f"  {spec.name:<45s} AUC {label_name} {row[f'auc_{label_name}']:.3f}  site leakage "
                f"{row['site_leakage']:.3f}  ({wall:.1f} s)")
            return {"row": row, "run": run, "features": features, "kernel": kernel}

        kernels_for_plot: dict[str, Any] = {}
        for key, spec in specs.items():
            result = run_one(key, spec)
            runs.append(result["row"])
            histories[key][seed] = result["run"].losses
            if seed_index == 0:
                first_embeddings[key] = result["features"]
                if result["kernel"] is not None and spec.prior and spec.prior not in kernels_for_plot:
                    kernels_for_plot[spec.prior] = result["kernel"]
        if seed_index == 0 and config.plots and kernels_for_plot:
            kernel_plot = _batch_matrices(
                df, train_idx, attr_prior, gen_prior, kernels_for_plot, batch_size, seed, config
            )
        if config.sweep and seed_index == 0:
            say(f"sweep on seed {seed}: instance weight, bandwidth and sampler")
            for key, spec in _sweep_variants(config.lam, config.instance_weight).items():
                sweep_rows.append(run_one(key, spec)["row"])

    results = pd.DataFrame(runs)
    summary = _summarise(results, config.label, labels, list(specs))
    table = format_summary(summary, config.label, labels, len(config.seeds))
    lines = verdict(results, summary, config.label)

    from monai_du.evaluation import ProbeReport, format_table

    per_seed = format_table(
        [
            ProbeReport(f"{r['method']} [seed {r['seed']}]", r[f"auc_{config.label}"], r[f"auc_low_{config.label}"],
                        r[f"auc_high_{config.label}"], r["site_leakage"], r["site_chance"], r["wall_time_s"])
            for r in runs
        ]
    )
    sweep_df = None
    sweep_table = ""
    if sweep_rows:
        base = [r for r in runs if r["seed"] == config.seeds[0]]
        sweep_df = pd.DataFrame(base + sweep_rows)
        sweep_table = format_table(
            [
                ProbeReport(r["method"], r[f"auc_{config.label}"], r[f"auc_low_{config.label}"],
                            r[f"auc_high_{config.label}"],
                            r["site_leakage"], r["site_chance"], r["wall_time_s"],
                            extra={"kernel eff. rank": r.get("kernel_effective_rank", math.nan),
                                   "kernel off-diag": r.get("kernel_mean_offdiag", math.nan)})
                for r in sweep_df.to_dict("records")
            ]
        )
    wall = time.perf_counter() - started

    files: dict[str, str] = {}
    results.to_csv(out / "results.csv", index=False)
    files["results.csv"] = str(out / "results.csv")
    summary.to_csv(out / "summary.csv", index=False)
    files["summary.csv"] = str(out / "summary.csv")
    if sweep_df is not None:
        sweep_df.to_csv(out / "sweep.csv", index=False)
        files["sweep.csv"] = str(out / "sweep.csv")
    if config.plots:
        names = {k: s.name for k, s in specs.items()}
        files["loss_curves.png"] = str(_plot_losses(histories, names, out / "loss_curves.png"))
        if kernel_plot is not None:
            path = _plot_kernels(kernel_plot[0], out / "prior_kernel_batch.png", kernel_plot[1])
            files["prior_kernel_batch.png"] = str(path)
        path = _plot_pca(first_embeddings, names, meta, config.label, out / "embeddings_pca.png")
        files["embeddings_pca.png"] = str(path)
        files["summary.png"] = str(_plot_summary(summary, config.label, out / "summary.png"))
    header = (f"monai_du demo ({config.modality}): {len(df)} images, {df['patient_id'].nunique()} patients, "
              f"{df['site'].nunique()} sites; seeds {list(config.seeds)}; {config.epochs} epochs, "
              f"batch {config.batch_size}, "
              f"{config.backbone} x{config.widen_factor}, {config.image_size}px; linear probe on held-out patients "
              f"({config.test_fraction:.0%}); total wall time {wall:.0f} s")
    report = "\n".join([header, "", table, "", *lines, "", "per seed:", per_seed]
                       + (["", f"sweep (seed {config.seeds[0]}):", sweep_table] if sweep_table else []))
    (out / "report.txt").write_text(report + "\n", encoding="utf-8")
    files["report.txt"] = str(out / "report.txt")
    payload = {
        "config": _json_safe(asdict(config)),
        "labels": labels,
        "summary": _json_safe(summary.to_dict("records")),
        "results": _json_safe(results.to_dict("records")),
        "sweep": _json_safe(sweep_df.to_dict("records")) if sweep_df is not None else None,
        "verdict": lines,
        "table": table,
        "wall_time_s": wall,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    files["results.json"] = str(out / "results.json")
    say("")
    say(header)
    say("")
    say(table)
    say("")
    for line in lines:
        say(line)
    if sweep_table:
        say("")
        say(f"sweep (seed {config.seeds[0]}; instance weight eta, bandwidth and sampler of kernel DU):")
        say(sweep_table)
    say("")
    say(f"report written to {out}: {', '.join(sorted(files))}")
    return {"results": results, "summary": summary, "table": table, "verdict": lines, "sweep": sweep_df,
            "files": files, "wall_time_s": wall}
