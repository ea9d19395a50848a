"""Generative-model priors: encode a cohort with a MONAI autoencoder into a prior table keyed by image path.

The paper's first claim is that a generative model, viewed as a prior representation, improves a contrastive one.
This module provides that prior on any manifest:

1. :func:`train_prior_autoencoder` trains a small :class:`monai.networks.nets.VarAutoEncoder` (2D or 3D) on the
   cohort's images, or :func:`load_prior_autoencoder` loads one saved by :func:`save_prior_autoencoder`;
2. :func:`encode_images` maps every image to its latent mean ``(N, k)``;
3. :func:`make_prior_table` / :func:`write_prior_table` store the embeddings as a table with one row per image:
   column ``image`` (the manifest's image path, the key) and ``gen_0 .. gen_{k-1}`` (CSV, or Parquet with pyarrow);
4. :func:`load_prior_table` reads it back (validated) and :func:`attach_prior_table` merges it into a manifest
   **by key**, never by row order, so shuffled, filtered or re-split manifests keep each image's own embedding.
   Duplicate or missing keys raise a ``ValueError`` naming them;
5. :func:`generative_prior_kernel` gives the kernel over the ``gen_*`` columns: an RBF with the neighbourhood-scale
   ``"knn"`` bandwidth (default; see DESIGN §1 on why median-distance bandwidths over-smooth) or the cosine kernel.
   With site-conditioned batches, fit the bandwidth on such batches: ``kernel.fit(prior, groups=site)``:
   an image embedding separates sites, and a bandwidth fitted on mixed batches makes a one-site batch's kernel
   nearly constant.

:func:`build_prior_table` runs 1 to 3 from a manifest file; it backs ``monai-du prior``::

    monai-du prior --manifest data/manifest.csv --out data/prior_table.csv --epochs 5 --latent-dim 16

In Python::

    table = load_prior_table("data/prior_table.csv")
    df = attach_prior_table(manifest_df, table)              # adds gen_0 .. gen_{k-1}, matched on "image"
    encoder = PriorEncoder(continuous=prior_columns(table)).fit(df)
    kernel = generative_prior_kernel(len(prior_columns(table)), knn_batch_size=64).fit(encoder.transform(df))
"""

from __future__ import annotations

import os
import posixpath
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from monai_du.io import atomic_write
from monai_du.kernels import CosineKernel, PriorKernel, RBFKernel

__all__ = [
    "PRIOR_PREFIX",
    "PRIOR_KEY_COLUMN",
    "prior_columns",
    "build_prior_autoencoder",
    "train_prior_autoencoder",
    "save_prior_autoencoder",
    "load_prior_autoencoder",
    "encode_images",
    "load_images",
    "make_prior_table",
    "write_prior_table",
    "load_prior_table",
    "attach_prior_table",
    "generative_prior_kernel",
    "build_prior_table",
    "ensure_prior_table",
]

PRIOR_PREFIX = "gen_"
"""Prefix of the embedding columns of a prior table: ``gen_0 .. gen_{k-1}``."""

PRIOR_KEY_COLUMN = "image"
"""Key column of a prior table: the image path as written in the manifest."""

_GEN_COLUMN = re.compile(r"^gen_(\d+)$")
_CHECKPOINT_FORMAT = "monai_du.prior_autoencoder"


# ---------------------------------------------------------------------------------------------------------------------
# columns and keys
# ---------------------------------------------------------------------------------------------------------------------
def prior_columns(table: pd.DataFrame | Sequence[str] | str | os.PathLike | None) -> list[str]:
    """The embedding columns ``gen_0 .. gen_{k-1}`` of a prior table, in index order.

    Args:
        table: a prior table (or a manifest with attached priors), its column names, or the path of a table file.
            ``None`` gives an empty list (no generative prior), which lets a bundle config write
            ``$monai_du.priors.prior_columns(@prior_table)`` whether or not a table is set.

    Returns:
        the column names sorted by their index.

    Raises:
        ValueError: when the indices are not exactly ``0 .. k-1`` (a gap or a duplicate).
    """
    if table is None:
        return []
    if isinstance(table, (str, os.PathLike)):
        table = load_prior_table(table)
    names = list(table.columns) if isinstance(table, pd.DataFrame) else [str(c) for c in table]
    found = sorted((int(m.group(1)), name) for name in names if (m := _GEN_COLUMN.match(str(name))))
    indices = [i for i, _ in found]
    if indices != list(range(len(indices))):
        raise ValueError(
            f"prior columns must be {PRIOR_PREFIX}0 .. {PRIOR_PREFIX}{{k-1}} with no gap or repeat; "
            f"found {[n for _, n in found]}."
        )
    return [name for _, name in found]


def _normalise_keys(values: pd.Series | Sequence[Any]) -> pd.Series:
    """Image paths as comparable keys: text, ``/`` separators, ``posixpath.normpath`` (``a/./b`` == ``a/b``)."""
    series = pd.Series(values).astype(str).str.strip().str.replace("\\", "/", regex=False)
    return series.map(posixpath.normpath)


def _describe(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in list(keys)[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{shown}{more}"


def _check_unique(keys: pd.Series, where: str) -> None:
    duplicated = keys[keys.duplicated(keep=False)]
    if len(duplicated):
        names = list(dict.fromkeys(duplicated.tolist()))
        raise ValueError(
            f"{where}: {len(names)} image key(s) appear more than once: {_describe(names)}; a prior table needs one "
            "row per image."
        )


# ---------------------------------------------------------------------------------------------------------------------
# the autoencoder
# ---------------------------------------------------------------------------------------------------------------------
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
    from monai.networks.nets import VarAutoEncoder

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


# ---------------------------------------------------------------------------------------------------------------------
# the prior table
# ---------------------------------------------------------------------------------------------------------------------
def make_prior_table(keys: Sequence[Any] | pd.Series, embeddings: Any) -> pd.DataFrame:
    """A prior table: column ``image`` (the keys) and ``gen_0 .. gen_{k-1}`` (float32).

    Args:
        keys: (N,) image paths as written in the manifest.
        embeddings: (N, k) array.

    Raises:
        ValueError: for a shape mismatch, empty or duplicated keys (named), or infinite values.
    """
    emb = np.asarray(embeddings, dtype=np.float32)
    key_list = list(keys)
    if emb.ndim != 2 or emb.shape[0] != len(key_list) or emb.shape[1] < 1:
        raise ValueError(f"make_prior_table: embeddings must have shape (N={len(key_list)}, k >= 1), got {emb.shape}.")
    if np.isinf(emb).any():
        rows = np.flatnonzero(np.isinf(emb).any(1))[:5].tolist()
        raise ValueError(f"make_prior_table: embeddings hold inf in row(s) {rows}.")
    norm = _normalise_keys(key_list)
    blank = norm[(norm == "") | (norm == ".") | pd.Series(key_list).isna().to_numpy()]
    if len(blank):
        raise ValueError(f"make_prior_table: empty image key(s) at row(s) {blank.index[:5].tolist()}.")
    _check_unique(norm, "make_prior_table")
    table = pd.DataFrame({PRIOR_KEY_COLUMN: norm.to_numpy()})
    for j in range(emb.shape[1]):
        table[f"{PRIOR_PREFIX}{j}"] = emb[:, j]
    return table


def _table_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".csv", ".csv.gz")):
        return "csv"
    raise ValueError(f"{path}: unknown prior table format; use .csv, .csv.gz or .parquet.")


def _require_pyarrow(path: Path) -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ImportError(
            f"{path}: Parquet prior tables need pyarrow (pip install pyarrow); or use a .csv table."
        ) from None


def write_prior_table(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a prior table (validated as :func:`load_prior_table` would) to CSV or Parquet, atomically.

    CSV values are written with 9 significant digits, which round-trips float32 exactly.
    """
    path = Path(path)
    kind = _table_kind(path)
    table = _validate_table(table, f"write_prior_table({path})")
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "parquet":
        _require_pyarrow(path)
    with atomic_write(path) as tmp:
        if kind == "parquet":
            table.to_parquet(tmp, index=False)
        else:
            compression = "gzip" if path.name.lower().endswith(".gz") else None
            table.to_csv(tmp, index=False, float_format="%.9g", lineterminator="\n", compression=compression)
    return path


def _validate_table(table: pd.DataFrame, source: str) -> pd.DataFrame:
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"{source}: a prior table must be a DataFrame, got {type(table).__name__}.")
    if PRIOR_KEY_COLUMN not in table.columns:
        raise ValueError(f"{source}: no {PRIOR_KEY_COLUMN!r} key column; columns are {list(table.columns)}.")
    try:
        columns = prior_columns(table)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    if not columns:
        raise ValueError(f"{source}: no {PRIOR_PREFIX}* embedding columns; columns are {list(table.columns)}.")
    missing_key = table[PRIOR_KEY_COLUMN].isna().to_numpy()
    if missing_key.any():
        rows = np.flatnonzero(missing_key)[:5].tolist()
        raise ValueError(f"{source}: empty {PRIOR_KEY_COLUMN!r} key at row(s) {rows}.")
    keys = _normalise_keys(table[PRIOR_KEY_COLUMN])
    _check_unique(keys, source)
    out = pd.DataFrame({PRIOR_KEY_COLUMN: keys.to_numpy()})
    for name in columns:
        try:
            values = pd.to_numeric(table[name], errors="raise").to_numpy(dtype=np.float32)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{source}: column {name!r} must be numeric: {err}") from None
        if np.isinf(values).any():
            rows = np.flatnonzero(np.isinf(values))[:5].tolist()
            raise ValueError(f"{source}: column {name!r} holds inf at row(s) {rows}.")
        out[name] = values
    return out


def load_prior_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate a prior table written by :func:`write_prior_table` (or by hand).

    Returns:
        a DataFrame with ``image`` (normalised keys: ``/`` separators, ``normpath``) and the ``gen_*`` columns as
        float32, in index order; other columns are dropped.

    Raises:
        ValueError: when the file is missing, has no ``image`` or ``gen_*`` column, has a gap in the ``gen_*``
            indices, a non-numeric or infinite value, or a duplicated key (all named).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"load_prior_table: no such file {str(path)!r}.")
    kind = _table_kind(path)
    if kind == "parquet":
        _require_pyarrow(path)
        raw = pd.read_parquet(path)
    else:
        raw = pd.read_csv(path, dtype={PRIOR_KEY_COLUMN: str}, keep_default_na=False, na_values=[""])
    return _validate_table(raw, str(path))


def attach_prior_table(
    df: pd.DataFrame,
    table: pd.DataFrame | str | os.PathLike | None,
    key: str = PRIOR_KEY_COLUMN,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Add a prior table's ``gen_*`` columns to a manifest, matched on the image path (never on row order).

    Args:
        df: the manifest; its rows keep their order and index.
        table: a prior table (:func:`load_prior_table`), the path of one, or None (``df`` is returned unchanged, so
            that a bundle config can always call this).
        key: the manifest column holding the image path as written in the table (default ``image``).
        overwrite: replace ``gen_*`` columns already in ``df`` (otherwise that is an error).

    Returns:
        a copy of ``df`` with the columns ``gen_0 .. gen_{k-1}`` (float32).

    Raises:
        ValueError: when ``df`` lacks ``key``, a manifest key has no row in the table (the keys are named), the table
            has duplicated keys, or ``df`` already has ``gen_*`` columns and ``overwrite`` is False.
    """
    if table is None:
        return df
    if isinstance(table, (str, os.PathLike)):
        source = str(table)
        table = load_prior_table(table)
    else:
        source = "prior table"
        table = _validate_table(table, source)
    if key not in df.columns:
        raise ValueError(f"attach_prior_table: the manifest has no {key!r} column; columns are {list(df.columns)}.")
    existing = [c for c in df.columns if _GEN_COLUMN.match(str(c))]
    if existing and not overwrite:
        raise ValueError(
            f"attach_prior_table: the manifest already has prior columns {existing[:5]}; pass overwrite=True."
        )
    columns = prior_columns(table)
    lookup = pd.Series(np.arange(len(table)), index=table[PRIOR_KEY_COLUMN].to_numpy())
    keys = _normalise_keys(df[key].to_numpy())
    position = keys.map(lookup)
    missing = keys[position.isna()]
    if len(missing):
        names = list(dict.fromkeys(missing.tolist()))
        raise ValueError(
            f"attach_prior_table: {len(names)} manifest image(s) have no row in the {source} "
            f"(matched on {key!r}): {_describe(names)}. Build the table from this manifest (monai-du prior), and "
            "keep its image paths as they are written in the manifest."
        )
    rows = position.to_numpy(dtype=np.int64)
    out = df.drop(columns=existing) if existing else df.copy()
    values = table[columns].to_numpy(dtype=np.float32)[rows]
    gen = pd.DataFrame(values, columns=columns, index=out.index)
    return pd.concat([out, gen], axis=1)


def generative_prior_kernel(
    columns: int | Sequence[int],
    kind: str = "rbf",
    bandwidth: float | str = "knn",
    knn_k: int = 5,
    knn_batch_size: int = 256,
) -> PriorKernel:
    """The kernel over a generative prior's columns of the prior vector (fit it on the training priors).

    Args:
        columns: the prior-vector indices of the ``gen_*`` columns, or their number ``k`` (indices ``0 .. k-1``, as
            when the prior vector is only the embedding).
        kind: ``"rbf"`` (Gaussian on the embedding, one bandwidth for all columns) or ``"cosine"``.
        bandwidth: RBF bandwidth: a number or a rule (``"knn"`` by default: a handful of effective neighbours per
            batch; ``"median"`` is the broad density-estimation choice that DESIGN §1 warns about).
        knn_k: neighbour rank of the ``"knn"`` rule.
        knn_batch_size: batch size the ``"knn"`` rule is fitted for (the training batch size).
    """
    cols = list(range(int(columns))) if isinstance(columns, (int, np.integer)) else [int(c) for c in columns]
    if not cols:
        raise ValueError("generative_prior_kernel: no prior columns given.")
    if kind == "rbf":
        return RBFKernel(bandwidth, columns=cols, knn_k=knn_k, knn_batch_size=knn_batch_size)
    if kind == "cosine":
        return CosineKernel(columns=cols)
    raise ValueError(f"generative_prior_kernel: kind must be 'rbf' or 'cosine', got {kind!r}.")


# ---------------------------------------------------------------------------------------------------------------------
# from a manifest to a table
# ---------------------------------------------------------------------------------------------------------------------
def load_images(
    df: pd.DataFrame,
    modality: str = "2d",
    image_size: int = 32,
    root: str | os.PathLike | None = None,
) -> np.ndarray:
    """Load every manifest image with :func:`monai_du.data.loading.load_image_transforms`, resized, in row order.

    Args:
        df: manifest rows (``image``, resolved against ``root``, or the ``image_path`` column of ``read_manifest``).
        modality: "2d" / "cxr" or "3d" / "brain" (see ``load_image_transforms``).
        image_size: side of the resized images.
        root: folder of relative image paths.

    Returns:
        float32 array (N, 1, *spatial) scaled to [0, 1] per image.
    """
    from monai_du.data.loading import load_image_transforms, manifest_to_dataset

    transform = load_image_transforms(keys="image", modality=modality, spatial_size=int(image_size))
    dataset = manifest_to_dataset(df, root=root, transform=transform, columns=[])
    images = [np.asarray(item["image"], dtype=np.float32) for item in dataset]
    return np.stack(images)


def build_prior_table(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    root: str | os.PathLike | None = None,
    modality: str = "2d",
    image_size: int = 32,
    latent_dim: int = 16,
    epochs: int = 5,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    kl_weight: float = 1e-3,
    train_split: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    save_checkpoint: str | os.PathLike | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = print,
) -> Path:
    """Train (or load) the prior autoencoder on a manifest's images, encode them all, and write the prior table.

    Args:
        manifest: the manifest file (read with :func:`monai_du.data.manifest.read_manifest`).
        out: the table to write (``.csv``, ``.csv.gz`` or ``.parquet``).
        root: folder of relative image paths (default: the manifest's folder).
        modality: "2d" / "cxr" or "3d" / "brain".
        image_size: side of the images the autoencoder sees (divisible by 8 with the default channels).
        latent_dim, epochs, batch_size, learning_rate, kl_weight, seed, device: see :func:`train_prior_autoencoder`.
        train_split: train the autoencoder on the rows whose ``split`` column equals this value only (all rows are
            encoded); None trains on every row.
        checkpoint: load this autoencoder (:func:`save_prior_autoencoder`) instead of training one.
        save_checkpoint: where to save the trained autoencoder.
        log: callable for progress lines, or None.

    Returns:
        the path of the table.
    """
    from monai_du.data.manifest import read_manifest

    started = time.perf_counter()
    df = read_manifest(manifest, root=root)
    if checkpoint is not None:
        model = load_prior_autoencoder(checkpoint, device=device)
        image_size = int(model.prior_config["image_size"][0])
    images = load_images(df, modality=modality, image_size=image_size)
    if log:
        log(f"loaded {len(images)} images of shape {tuple(images.shape[1:])} from {manifest}")
    if checkpoint is None:
        if train_split is not None:
            if "split" not in df.columns:
                raise ValueError(f"{manifest}: train_split={train_split!r} but the manifest has no 'split' column.")
            mask = (df["split"] == train_split).to_numpy()
            if not mask.any():
                raise ValueError(f"{manifest}: no row has split == {train_split!r}.")
        else:
            mask = np.ones(len(df), dtype=bool)
        model, _ = train_prior_autoencoder(
            images[mask], latent_dim, epochs, batch_size, learning_rate, kl_weight, seed=seed, device=device, log=log
        )
        if save_checkpoint is not None:
            save_prior_autoencoder(model, save_checkpoint)
    embeddings = encode_images(model, images, device=device)
    path = write_prior_table(make_prior_table(df["image"], embeddings), out)
    if log:
        log(f"wrote the prior table {path} ({len(df)} images x {embeddings.shape[1]} columns) in "
            f"{time.perf_counter() - started:.1f} s")
    return path


def ensure_prior_table(
    manifest: str | os.PathLike, path: str | os.PathLike, rebuild: bool = False, **kwargs: Any
) -> str:
    """The prior table at ``path``, built from ``manifest`` with :func:`build_prior_table` when it does not exist.

    For bundle configs: ``prior_table: $monai_du.priors.ensure_prior_table(@manifest, 'prior_table.csv')``. An
    existing table is validated (:func:`load_prior_table`) but not compared with the manifest;
    :func:`attach_prior_table` names any image it lacks. In a multi-process run, build the table once beforehand
    (``monai-du prior``): concurrent builds would each write it.

    Args:
        manifest: the manifest file.
        path: the table file.
        rebuild: build even when the table exists.
        kwargs: arguments of :func:`build_prior_table` (``root``, ``modality``, ``image_size``, ``epochs``, ...).

    Returns:
        ``path`` as a string.
    """
    path = Path(path)
    if path.is_file() and not rebuild:
        load_prior_table(path)
        return str(path)
    kwargs.setdefault("log", None)
    return str(build_prior_table(manifest, path, **kwargs))
