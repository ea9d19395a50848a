"""The prior autoencoder: a small MONAI :class:`~monai.networks.nets.VarAutoEncoder` whose latent mean is the
generative prior embedding of an image.

- :func:`build_prior_autoencoder` builds the network (2D or 3D): images ``(N, C, *spatial)`` ->
  ``(reconstruction, mu (N, k), logvar (N, k), z (N, k))``;
- :func:`train_prior_autoencoder` fits it on images in memory ``(N, C, *spatial)`` scaled to [0, 1];
- :func:`save_prior_autoencoder` / :func:`load_prior_autoencoder` write and read its config and weights;
- :func:`encode_images` maps images ``(N, C, *spatial)`` to their latent means ``(N, k)``.

:func:`monai_du.priors.build_prior_table` runs these on a manifest and writes the embeddings as a prior table.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.nets import VarAutoEncoder

from monai_du.io import atomic_write

__all__ = [
    "build_prior_autoencoder",
    "train_prior_autoencoder",
    "save_prior_autoencoder",
    "load_prior_autoencoder",
    "encode_images",
]

_CHECKPOINT_FORMAT = "monai_du.prior_autoencoder"


def build_prior_autoencoder(
    spatial_dims: int = 2,
    image_size: int | Sequence[int] = 32,
    in_channels: int = 1,
    latent_dim: int = 16,
    channels: Sequence[int] = (16, 32, 64),
    strides: Sequence[int] | None = None,
) -> torch.nn.Module:
    """A small MONAI :class:`~monai.networks.nets.VarAutoEncoder` whose latent mean is the prior embedding.

    Args:
        spatial_dims: 2 or 3.
        image_size: spatial size of the (resized) input, an int or one value per axis; each side must be divisible
            by the product of ``strides``.
        in_channels: image channels ``C``.
        latent_dim: embedding size ``k``.
        channels: channels of the encoder stages.
        strides: stride of each stage (default 2 for every stage).

    Returns:
        the network: ``(N, C, *image_size) -> (reconstruction, mu (N, k), logvar (N, k), z (N, k))``.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"build_prior_autoencoder: spatial_dims must be 2 or 3, got {spatial_dims!r}.")
    if isinstance(image_size, (int, np.integer)):
        size = (int(image_size),) * spatial_dims
    else:
        size = tuple(int(s) for s in image_size)
    strides = tuple(strides) if strides is not None else (2,) * len(channels)
    if len(size) != spatial_dims or len(strides) != len(channels) or not channels:
        raise ValueError(
            f"build_prior_autoencoder: image_size {size} must have {spatial_dims} values and strides {strides} one per "
            f"channel stage {tuple(channels)}."
        )
    factor = int(np.prod(strides))
    if any(s % factor for s in size):
        raise ValueError(f"build_prior_autoencoder: image_size {size} must be divisible by prod(strides) = {factor}.")
    if int(latent_dim) < 1:
        raise ValueError(f"build_prior_autoencoder: latent_dim must be >= 1, got {latent_dim!r}.")
    net = VarAutoEncoder(
        spatial_dims=spatial_dims,
        in_shape=(int(in_channels), *size),
        out_channels=int(in_channels),
        latent_size=int(latent_dim),
        channels=tuple(int(c) for c in channels),
        strides=strides,
        norm="BATCH",
        use_sigmoid=True,
    )
    net.prior_config = {  # what save_prior_autoencoder writes, to rebuild the same network
        "spatial_dims": int(spatial_dims),
        "image_size": list(size),
        "in_channels": int(in_channels),
        "latent_dim": int(latent_dim),
        "channels": [int(c) for c in channels],
        "strides": [int(s) for s in strides],
    }
    return net


def _as_image_tensor(images: Any, where: str) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images, dtype=np.float32)) if not isinstance(images, torch.Tensor) else images
    if x.ndim not in (4, 5):
        raise ValueError(f"{where}: images must have shape (N, C, H, W) or (N, C, H, W, D), got {tuple(x.shape)}.")
    if x.shape[0] < 1:
        raise ValueError(f"{where}: got no images (shape {tuple(x.shape)}).")
    if not torch.isfinite(x).all():
        raise ValueError(f"{where}: images of shape {tuple(x.shape)} hold NaN or inf values.")
    return x.float()


def train_prior_autoencoder(
    images: Any,
    latent_dim: int = 16,
    epochs: int = 5,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    kl_weight: float = 1e-3,
    channels: Sequence[int] = (16, 32, 64),
    seed: int = 0,
    device: str | torch.device = "cpu",
    model: torch.nn.Module | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[torch.nn.Module, list[float]]:
    """Train a variational autoencoder on images in memory (reconstruction MSE + ``kl_weight`` * KL).

    Inputs should be scaled to [0, 1] (the decoder ends with a sigmoid). Training is deterministic for a ``seed``
    on CPU (shuffling and the reparameterisation noise use a private generator).

    Args:
        images: (N, C, *spatial) array or tensor, every side divisible by ``2 ** len(channels)``.
        latent_dim: embedding size ``k`` (ignored when ``model`` is given).
        epochs: passes over the images (0 returns the untrained network).
        batch_size: images per step.
        learning_rate: Adam learning rate.
        kl_weight: weight of the KL term (small: the latent mean is used as a feature, not for sampling).
        channels: encoder channels (ignored when ``model`` is given).
        seed: seed of the initialisation, the shuffling and the noise.
        device: training device.
        model: a network from :func:`build_prior_autoencoder` to continue training.
        log: optional callable receiving one line per epoch.

    Returns:
        ``(model, losses)``: the trained network (eval mode, on ``device``) and the mean loss of each epoch.
    """
    x = _as_image_tensor(images, "train_prior_autoencoder")
    if int(epochs) < 0 or int(batch_size) < 1 or not learning_rate > 0 or kl_weight < 0:
        raise ValueError(
            f"train_prior_autoencoder: need epochs >= 0, batch_size >= 1, learning_rate > 0, kl_weight >= 0; got "
            f"{epochs}, {batch_size}, {learning_rate}, {kl_weight}."
        )
    spatial_dims = x.ndim - 2
    gen = torch.Generator().manual_seed(int(seed))
    if model is None:
        torch.manual_seed(int(seed))
        model = build_prior_autoencoder(spatial_dims, tuple(x.shape[2:]), x.shape[1], latent_dim, channels)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(learning_rate))
    n, losses = x.shape[0], []
    step_batch = max(2, min(int(batch_size), n)) if n > 1 else 1
    for epoch in range(int(epochs)):
        model.train()
        order = torch.randperm(n, generator=gen)
        total, count = 0.0, 0
        for start in range(0, n, step_batch):
            idx = order[start : start + step_batch]
            if len(idx) < 2 and n > 1:  # batch norm needs two samples; the remainder joins the next epoch
                continue
            batch = x[idx].to(device)
            mu, logvar = model.encode_forward(batch)
            noise = torch.randn(mu.shape, generator=gen).to(device)
            z = mu + noise * torch.exp(0.5 * logvar)
            recon = model.decode_forward(z, True)
            mse = torch.mean((recon - batch) ** 2)
            kl = -0.5 * torch.mean(torch.sum(1 + logvar - mu**2 - logvar.exp(), dim=1))
            loss = mse + kl_weight * kl
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        losses.append(total / max(count, 1))
        if log is not None:
            log(f"prior autoencoder epoch {epoch + 1}/{epochs}: loss {losses[-1]:.5f}")
    model.eval()
    return model, losses


def save_prior_autoencoder(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Save a network from :func:`build_prior_autoencoder` (its config and weights), written atomically."""
    config = getattr(model, "prior_config", None)
    if not isinstance(config, dict):
        raise ValueError(
            "save_prior_autoencoder: the model has no prior_config; build it with build_prior_autoencoder."
        )
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_write(path) as tmp:
        torch.save({"format": _CHECKPOINT_FORMAT, "config": config, "state_dict": state}, tmp)
    return path


def load_prior_autoencoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a network saved by :func:`save_prior_autoencoder` (eval mode)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"load_prior_autoencoder: no such checkpoint file {str(path)!r}.")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"load_prior_autoencoder: {str(path)!r} is not a prior autoencoder checkpoint.")
    model = build_prior_autoencoder(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval()


@torch.no_grad()
def encode_images(
    model: torch.nn.Module, images: Any, batch_size: int = 64, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Latent means of images: (N, C, *spatial) -> float32 array (N, k), in input order.

    Args:
        model: a network with ``encode_forward(x) -> (mu, logvar)`` (:func:`build_prior_autoencoder`).
        images: (N, C, *spatial) array or tensor of the size the network was built for.
        batch_size: images per forward pass.
        device: device of the forward passes.
    """
    x = _as_image_tensor(images, "encode_images")
    config = getattr(model, "prior_config", None)
    if isinstance(config, dict) and list(x.shape[1:]) != [config["in_channels"], *config["image_size"]]:
        raise ValueError(
            f"encode_images: the autoencoder takes images of shape (N, {config['in_channels']}, "
            f"{', '.join(map(str, config['image_size']))}), got {tuple(x.shape)}."
        )
    was_training = model.training
    model.eval().to(device)
    try:
        out = [
            model.encode_forward(x[i : i + batch_size].to(device))[0].float().cpu()
            for i in range(0, len(x), batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(out).numpy().astype(np.float32)
