"""Glue between the contrastive pretraining pieces and MONAI's ignite engines, and the helpers bundle configs call.

A pretraining run is a :class:`monai.engines.SupervisedTrainer` whose ``prepare_batch`` is
:class:`MultiViewPrepareBatch`: the network receives the views ``(B, V, C, *spatial)`` and returns ``(B, V, D)``, and
the loss receives those embeddings and the ``(B, P)`` prior vectors as its target, so the trainer computes
``loss(network(views), prior)`` with no change to MONAI's training step. The handlers live in
:mod:`monai_du.handlers`.

Data-loader glue: :class:`EpochSeededDataset` and :class:`EpochBatchSampler` make the augmentations of item ``i`` in
epoch ``e`` a function of ``(seed, e, i)`` alone, so that the views do not depend on the number of worker processes,
on persistent workers, on the rank that draws the item, or on whether the run was resumed.

Helpers for bundle configs: :func:`fit_prior_kernel`, :func:`default_num_workers`, :func:`default_num_threads`,
:func:`default_bundle_root`, and the targets of a fine-tune run (:func:`supervised_rows`, :func:`target_scaling`,
:func:`write_target_info`, :func:`read_target_info`). Loading weights into a bundle's network is
:mod:`monai_du.encoders`' job.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.engines.utils import PrepareBatch
from monai.transforms import Compose, Randomizable
from monai.utils import MAX_SEED

from monai_du.data.manifest import label_values
from monai_du.transforms import MultiViewd

__all__ = [
    "MultiViewPrepareBatch",
    "EpochSeededDataset",
    "EpochBatchSampler",
    "fit_prior_kernel",
    "cpus_per_process",
    "default_num_workers",
    "default_num_threads",
    "default_bundle_root",
    "TASKS",
    "target_column_names",
    "supervised_rows",
    "target_scaling",
    "write_target_info",
    "read_target_info",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------------
# prepare_batch
# --------------------------------------------------------------------------------------------------------------------


class MultiViewPrepareBatch(PrepareBatch):
    """``prepare_batch`` for :class:`monai.engines.SupervisedTrainer`: views as the network input, priors as the target.

    The trainer then computes ``loss_function(network(views), prior)``: a :class:`~monai_du.networks.ContrastiveEncoder`
    maps the views ``(B, V, C, *spatial)`` to ``(B, V, D)``; a contrastive loss takes those and the ``(B, P)`` priors.

    Args:
        image_key: batch key of the stacked views ``(B, V, C, *spatial)`` (written by
            :class:`~monai_du.transforms.MultiViewd`).
        prior_key: batch key of the prior vectors ``(B, P)`` (written by :class:`~monai_du.transforms.AssemblePriord`);
            ``None`` passes no target (plain decoupled uniformity, InfoNCE).
        min_spatial_dims: smallest number of spatial dimensions accepted (views need at least ``3 + this`` dims).
    """

    def __init__(self, image_key: str = "image", prior_key: str | None = "prior", min_spatial_dims: int = 2) -> None:
        self.image_key = image_key
        self.prior_key = prior_key
        self.min_spatial_dims = int(min_spatial_dims)

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            batchdata: collated batch (a dict) holding ``image_key`` and, unless ``prior_key`` is None, ``prior_key``.
            device: device to move the tensors to.
            non_blocking: asynchronous host-to-device copy.
            kwargs: further arguments of ``Tensor.to`` for the views (the trainer's ``to_kwargs``).

        Returns:
            ``(views (B, V, C, *spatial), prior (B, P) float or None)``.
        """
        if not isinstance(batchdata, Mapping):
            raise ValueError(f"MultiViewPrepareBatch expects a dict batch, got {type(batchdata).__name__}.")
        if self.image_key not in batchdata:
            raise ValueError(f"batch has no key {self.image_key!r} (the views); keys present: {list(batchdata)}.")
        views = batchdata[self.image_key]
        if not isinstance(views, torch.Tensor):
            raise ValueError(f"batch[{self.image_key!r}] must be a tensor, got {type(views).__name__}.")
        if hasattr(views, "as_tensor"):  # MetaTensor: drop the metadata, the views have no single affine
            views = views.as_tensor()
        if views.ndim < 3 + self.min_spatial_dims:
            raise ValueError(
                f"batch[{self.image_key!r}] must have shape (B, V, C, *spatial) with at least {self.min_spatial_dims} "
                f"spatial dims, got {tuple(views.shape)}; put MultiViewd(keys={self.image_key!r}) in the transforms."
            )
        views = views.to(device=device, non_blocking=non_blocking, **kwargs)
        if self.prior_key is None:
            return views, None
        if self.prior_key not in batchdata:
            raise ValueError(
                f"batch has no key {self.prior_key!r} (the prior); keys present: {list(batchdata)}. "
                "Put AssemblePriord in the transforms, or use prior_key=None for a loss without prior."
            )
        prior = torch.as_tensor(batchdata[self.prior_key])
        if hasattr(prior, "as_tensor"):
            prior = prior.as_tensor()
        if prior.ndim != 2 or prior.shape[0] != views.shape[0]:
            raise ValueError(
                f"batch[{self.prior_key!r}] must have shape (B={views.shape[0]}, P), got {tuple(prior.shape)}."
            )
        if not torch.is_floating_point(prior):
            prior = prior.float()
        return views, prior.to(device=device, non_blocking=non_blocking)


# --------------------------------------------------------------------------------------------------------------------
# config helpers: prior kernel, bundle root
# --------------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------------
# data loader: augmentations seeded per (epoch, item)
# --------------------------------------------------------------------------------------------------------------------


# the set_random_state methods that only seed a transform's own R and its children's
_PLAIN_SEEDING = (Randomizable.set_random_state, Compose.set_random_state, MultiViewd.set_random_state)


def _random_sources(obj: Any, found: list, seen: set) -> None:
    """Append to ``found``, depth first, ``(transform, reseed_in_place)`` for each transform inside a transform tree
    that draws random numbers.

    A transform whose ``set_random_state`` is MONAI's plain one (``Randomizable``'s, ``Compose``'s, or
    :class:`~monai_du.transforms.MultiViewd`'s, which only seed the transform and its children) is reseeded in place
    through its own ``np.random.RandomState`` (``R.seed(s)``, about 3 us), and its children are searched too. Any
    other ``set_random_state`` is called as it is (a new ``RandomState``, about 170 us), and seeds its children itself.
    """
    if isinstance(obj, (list, tuple)):
        for item in obj:
            _random_sources(item, found, seen)
        return
    if not hasattr(obj, "__dict__") or isinstance(obj, (torch.Tensor, np.ndarray, pd.DataFrame)) or id(obj) in seen:
        return
    seen.add(id(obj))
    if hasattr(obj, "set_random_state"):
        if type(obj).set_random_state not in _PLAIN_SEEDING:
            found.append((obj, False))
            return
        if not isinstance(vars(obj).get("R"), np.random.RandomState):  # MONAI's default R is shared by the class
            Randomizable.set_random_state(obj, seed=0)
        found.append((obj, True))
    for key, value in vars(obj).items():
        if not key.startswith("__") and key != "data":
            _random_sources(value, found, seen)


class EpochSeededDataset(torch.utils.data.Dataset):
    """A dataset whose item ``(epoch, i)`` is transformed with its random transforms seeded from ``(seed, epoch, i)``.

    Indexed with the ``(epoch, i)`` pairs of :class:`EpochBatchSampler` (a plain ``i`` means epoch 0). The views of an
    item are then the same with 0, 1 or 8 workers, persistent or not, on any rank, in a resumed run or not.

    Each random transform of the wrapped dataset's ``transform`` gets its own seed from
    ``np.random.SeedSequence([seed, epoch, i])``; MONAI's plain random transforms are reseeded in place (see
    :func:`_random_sources`), which keeps the seeding to a few microseconds an item.

    Args:
        dataset: the MONAI dataset (its ``transform`` holds the random transforms, e.g. ``MultiViewd``).
        seed: base seed of the run.
    """

    def __init__(self, dataset: Any, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self._random: list[tuple[Any, bool]] = []
        _random_sources(getattr(dataset, "transform", None), self._random, set())

    @property
    def data(self) -> Any:
        """The records of the wrapped dataset (what the samplers read)."""
        return getattr(self.dataset, "data", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> Any:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        state = np.random.SeedSequence([self.seed, int(epoch), int(index)]).generate_state(len(self._random) or 1)
        for (transform, in_place), seed in zip(self._random, state):
            if in_place:
                transform.R.seed(int(seed) % MAX_SEED)
            else:
                transform.set_random_state(seed=int(seed) % MAX_SEED)
        return self.dataset[int(index)]


class EpochBatchSampler:
    """Wraps a batch sampler so that it yields ``(epoch, i)`` pairs for :class:`EpochSeededDataset`.

    ``set_epoch`` is forwarded to the wrapped sampler (:class:`~monai_du.handlers.SamplerEpochHandler` calls it).
    """

    def __init__(self, batch_sampler: Any) -> None:
        self.batch_sampler = batch_sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if callable(getattr(self.batch_sampler, "set_epoch", None)):
            self.batch_sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batch_sampler:
            yield [(self.epoch, int(i)) for i in batch]

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __getattr__(self, name: str) -> Any:  # global_batch_size, num_replicas, ... of the wrapped sampler
        if name == "batch_sampler":
            raise AttributeError(name)
        return getattr(self.batch_sampler, name)


def cpus_per_process() -> int:
    """CPUs this process may use, shared with the other training processes of its node (torchrun's
    ``LOCAL_WORLD_SIZE``)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def default_num_workers(max_workers: int = 8) -> int:
    """Data-loader worker processes: half of this process's share of the CPUs, at least 1 and at most
    ``max_workers``, so that decoding and augmentation run beside the training step, not on its thread."""
    return max(1, min(int(max_workers), cpus_per_process() // 2))


def default_num_threads(num_workers: int) -> int:
    """Torch intra-op threads of the training process: its share of the CPUs less ``num_workers`` loader workers
    (at least 1). More threads than free cores make OpenMP threads spin against each other (measured: a CXR step
    about 10x slower with 2 threads beside busy processes on 2 cores than with 1 thread)."""
    return max(1, cpus_per_process() - int(num_workers))


# --------------------------------------------------------------------------------------------------------------------
# prior kernel of a pretraining run
# --------------------------------------------------------------------------------------------------------------------


def fit_prior_kernel(
    kernel: Any,
    prior_encoder: Any,
    manifest: pd.DataFrame,
    group_by: str | None = None,
    sampler_mode: str | None = None,
) -> Any:
    """Fit a prior kernel on the training manifest's prior vectors, in one expression for bundle configs.

    ``prior_encoder`` is fitted on ``manifest`` first when it is not fitted yet; then
    ``kernel.fit(prior_encoder.transform(manifest))`` fits the bandwidth rules, category frequencies and column
    statistics on the ``(N, P)`` priors.

    Args:
        kernel: a :class:`~monai_du.kernels.PriorKernel` whose ``columns`` index the encoder's prior vector.
        prior_encoder: a :class:`~monai_du.prior_encoder.PriorEncoder`.
        manifest: the training manifest (one column per attribute).
        group_by: the manifest column that batches are drawn within (the sampler attribute of a ``"within"``
            sampler), so that the ``"knn"`` bandwidth rule sees batches like the training ones; None for mixed batches.
        sampler_mode: the bundle's sampler mode; ``group_by`` is used only when it is ``"within"`` (None: always).

    Returns:
        the fitted ``kernel``.
    """
    if kernel is None:
        return None
    if sampler_mode is not None and sampler_mode != "within":
        group_by = None
    if not getattr(prior_encoder, "is_fitted", False):
        prior_encoder.fit(manifest)
    prior = prior_encoder.transform(manifest)
    if group_by is not None and group_by not in manifest.columns:
        raise ValueError(f"group_by column {group_by!r} is not in the training manifest {list(manifest.columns)}.")
    groups = None if group_by is None else manifest[group_by].astype(str).to_numpy()
    try:
        return kernel.fit(prior, groups=groups)
    except ValueError as err:
        raise ValueError(
            f"fitting the prior kernel {kernel!r} on the training priors {prior_encoder.attributes} "
            f"(shape {prior.shape}) failed: {err}"
        ) from None


def default_bundle_root(fallback: str = ".") -> str:
    """The bundle folder of the config file named on the command line, else ``fallback``.

    ``python -m monai.bundle run --config_file bundles/X/configs/train.yaml`` gives ``bundles/X`` (the parent of the
    ``configs`` folder; the folder of the file itself when it is not called ``configs``), so that ``models/``,
    ``eval/`` and the demo data land in the bundle whatever the working directory, as MONAI does for ``sys.path``.
    A bundle inside the installed package (``monai-du bundle path NAME``) is never written to: its runs go to
    ``./<bundle name>`` in the working directory.
    A list of config files (``"['a.yaml','b.yaml']"``) uses the first. Called another way (``monai.bundle.run(...)``
    from Python), it returns ``fallback``; ``--bundle_root`` always overrides it.
    """
    argv = list(sys.argv)
    value = None
    for i, arg in enumerate(argv):
        if arg == "--config_file" and i + 1 < len(argv):
            value = argv[i + 1]
            break
        if arg.startswith("--config_file="):
            value = arg.split("=", 1)[1]
            break
    if not value:
        return fallback
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    if isinstance(parsed, (list, tuple)) and parsed:
        parsed = parsed[0]
    if not isinstance(parsed, str):
        return fallback
    folder = Path(parsed).expanduser().resolve().parent
    folder = folder.parent if folder.name == "configs" else folder
    if folder.is_relative_to(Path(__file__).resolve().parent):
        # a bundle run straight from the installed package writes into the working directory, never site-packages
        return str(Path.cwd() / folder.name)
    return str(folder)


# --------------------------------------------------------------------------------------------------------------------
# targets of a fine-tune run (classification labels, or one regression target such as age)
# --------------------------------------------------------------------------------------------------------------------

TASKS = ("classification", "regression")
TARGET_PREFIX = "target_"


def target_column_names(targets: list[str] | tuple[str, ...]) -> list[str]:
    """The manifest columns that :func:`supervised_rows` adds, one per target: ``target_<column>``."""
    return [TARGET_PREFIX + str(t) for t in targets]


def supervised_rows(
    df: pd.DataFrame, targets: list[str] | tuple[str, ...], task: str = "classification", source: object = "manifest"
) -> pd.DataFrame:
    """The rows of a fine-tune split with their targets as numbers, in added columns ``target_<column>``
    (:func:`target_column_names`); the manifest's own columns stay as they are, so the rows still validate.

    ``classification``: each label column through :func:`monai_du.data.manifest.label_values` (1, 0, -1 and blank as
    they are; ``M``/``F`` as male = 1, female = 0). ``regression``: the target column as a number (age in years, say);
    rows without a value are left out (logged), since a regression target has no "negative" to stand in for it.

    Apply it after the patient split, so that leaving rows out cannot change which patients are in which split.

    Raises:
        ValueError: an unknown task, a target column the manifest lacks, or values that are not labels / numbers,
            naming ``source`` and the column.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}.")
    missing = [c for c in targets if c not in df.columns]
    if missing:
        raise ValueError(f"{source}: target column(s) {missing} not in the manifest (columns: {list(df.columns)}).")
    out = df.copy()
    for column, name in zip(targets, target_column_names(targets)):
        if task == "classification":
            out[name] = label_values(df[column], column, str(source)).astype(float)
            continue
        value = pd.to_numeric(df[column], errors="coerce").astype(float)
        text = df[column].notna() & value.isna() & (df[column].astype(str).str.strip() != "")
        if text.any():
            examples = sorted(df[column][text].astype(str).unique())[:5]
            raise ValueError(f"{source}: regression target {column!r} holds {examples}: it must be a number.")
        out[name] = value
    if task == "regression":
        names = target_column_names(targets)
        keep = out[names].notna().all(axis=1) & np.isfinite(out[names].to_numpy()).all(axis=1)
        if not keep.all():
            logger.warning("%s: %d of %d rows have no %s value and are left out", source, int((~keep).sum()), len(out),
                           "/".join(map(str, targets)))
        out = out[keep]
    return out


def target_scaling(df: pd.DataFrame, column: str) -> dict[str, Any]:
    """Mean and standard deviation (``ddof=1``) of a regression target over the training rows, to standardise it.

    Returns:
        ``{"column", "mean", "std", "n"}``; ``std`` is 1.0 when the rows do not vary.

    Raises:
        ValueError: fewer than two rows with a value.
    """
    values = pd.to_numeric(df[column], errors="coerce").dropna().to_numpy(dtype=np.float64)
    if len(values) < 2:
        raise ValueError(f"regression target {column!r}: {len(values)} training row(s) with a value; need at least 2.")
    std = float(values.std(ddof=1))
    return {"column": str(column), "mean": float(values.mean()), "std": std if std > 0 else 1.0, "n": int(len(values))}


def write_target_info(
    path: str | os.PathLike, task: str, targets: list[str], scaling: Mapping[str, Any] | None = None
) -> Path:
    """Write what a fine-tuned model predicts (``models/target_info.json``): the task, its target columns and, for
    regression, the standardisation of the target, which inference undoes. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scaling = None if scaling is None else dict(scaling)
    info = {"task": str(task), "targets": [str(t) for t in targets], "scaling": scaling}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_target_info(path: str | os.PathLike, task: str, targets: list[str]) -> dict[str, Any] | None:
    """The ``target_info.json`` of a trained model, checked against the inference settings.

    Returns:
        the recorded info (``scaling`` holds the regression target's ``mean`` and ``std``); None for a
        classification model trained before the file existed.

    Raises:
        FileNotFoundError: in regression, when the file is missing (the target's scale is unknown).
        ValueError: the file records another task or other targets than ``task`` and ``targets``.
    """
    path = Path(path)
    if not path.is_file():
        if task == "regression":
            raise FileNotFoundError(f"{path} not found: a regression model's inference needs the target's mean and "
                                    "std that training wrote there (train with --task regression first).")
        return None
    info = json.loads(path.read_text())
    if info.get("task") != task or list(info.get("targets", [])) != [str(t) for t in targets]:
        raise ValueError(f"{path}: the model was trained for task {info.get('task')!r} on {info.get('targets')}, but "
                         f"inference is set to task {task!r} on {list(targets)}; use the training run's --task, "
                         "--labels and --regression_target.")
    if task == "regression" and not info.get("scaling"):
        raise ValueError(f"{path}: a regression model without the target's scaling.")
    return info
