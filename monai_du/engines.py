"""Glue between the contrastive pretraining pieces and MONAI's ignite engines, and the helpers bundle configs call.

A pretraining run is a :class:`monai.engines.SupervisedTrainer` whose ``prepare_batch`` is
:class:`MultiViewPrepareBatch`: the network receives the views ``(B, V, C, *spatial)`` and returns ``(B, V, D)``, and
the loss receives those embeddings and the ``(B, P)`` prior vectors as its target, so the trainer computes
``loss(network(views), prior)`` with no change to MONAI's training step. The handlers live in
:mod:`monai_du.handlers`.

Helpers for bundle configs: :func:`fit_prior_kernel` and :func:`default_bundle_root`.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from monai.engines.utils import PrepareBatch

__all__ = ["MultiViewPrepareBatch", "fit_prior_kernel", "default_bundle_root"]


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


def fit_prior_kernel(kernel: Any, prior_encoder: Any, manifest: pd.DataFrame, group_by: str | None = None) -> Any:
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

    Returns:
        the fitted ``kernel``.
    """
    if kernel is None:
        return None
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
    return str(folder.parent if folder.name == "configs" else folder)
