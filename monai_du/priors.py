"""Prior tables: encode a cohort with a MONAI autoencoder, or with any encoder, into a table keyed by image path.

The paper's first claim is that a generative model, viewed as a prior representation, improves a contrastive one.
This module provides that prior on any manifest:

1. :func:`monai_du.prior_autoencoder.train_prior_autoencoder` trains a small
   :class:`monai.networks.nets.VarAutoEncoder` (2D or 3D) on the cohort's images (loaded with
   :func:`monai_du.data.loading.load_images`), or :func:`monai_du.prior_autoencoder.load_prior_autoencoder` loads one
   saved by :func:`monai_du.prior_autoencoder.save_prior_autoencoder`;
2. :func:`monai_du.prior_autoencoder.encode_images` maps every image to its latent mean ``(N, k)``;
3. :func:`make_prior_table` / :func:`write_prior_table` store the embeddings as a table with one row per image:
   column ``image`` (the manifest's image path, the key) and ``gen_0 .. gen_{k-1}`` (CSV, or Parquet with pyarrow);
4. :func:`load_prior_table` reads it back (validated) and :func:`attach_prior_table` merges it into a manifest
   **by key**, never by row order, so shuffled, filtered or re-split manifests keep each image's own embedding.
   Duplicate or missing keys raise a ``ValueError`` naming them;
5. :func:`generative_prior_kernel` gives the kernel over the ``gen_*`` columns: an RBF with the neighbourhood-scale
   ``"knn"`` bandwidth (default; median-distance bandwidths over-smooth, see the README's "Choosing a prior") or the
   cosine kernel.
   With site-conditioned batches, fit the bandwidth on such batches: ``kernel.fit(prior, groups=site)``:
   an image embedding separates sites, and a bandwidth fitted on mixed batches makes a one-site batch's kernel
   nearly constant.

:func:`build_prior_table` runs 1 to 3 from a manifest file; it backs ``monai-du prior``::

    monai-du prior --manifest data/manifest.csv --out data/prior_table.csv --epochs 5 --latent-dim 16

The autoencoder is fitted on the **pretraining split** only (the training patients of
:func:`monai_du.data.splits.select_split` with the bundles' defaults: fractions 0.8 / 0.1 / 0.1, seed 0), and then
embeds every manifest image, held-out ones included (a frozen encoder's embedding of a held-out image is what a probe
needs). :func:`ensure_prior_table` caches the table for bundle configs, keyed by every setting that changes it (the
split included) and by the manifest's content.

A prior from **any encoder** trained elsewhere or earlier (an embedding that carries information the
augmentations cannot create) comes from :func:`encoder_prior_table`; :func:`monai_du.encoders.load_encoder` accepts a
TorchScript file, a monai_du export (``encoder.pt`` + ``encoder_info.json`` of
:class:`monai_du.handlers.PretrainedEncoderExporter`) or a MONAI bundle's network (config + network id + checkpoint)::

    monai-du prior --manifest data/manifest.csv --out prior.csv --encoder runs/du/models          # export folder
    monai-du prior --manifest data/manifest.csv --out prior.csv --encoder encoder.ts --image-size 64
    monai-du prior --manifest data/manifest.csv --out prior.csv \
        --bundle-config bundle/configs/train.yaml --network-id network_def --checkpoint bundle/models/ckpt.pt

In Python::

    table = load_prior_table("data/prior_table.csv")
    df = attach_prior_table(manifest_df, table)              # adds gen_0 .. gen_{k-1}, matched on "image"
    encoder = PriorEncoder(continuous=prior_columns(table)).fit(df)
    kernel = generative_prior_kernel(len(prior_columns(table)), knn_batch_size=64).fit(encoder.transform(df))
"""

from __future__ import annotations

import hashlib
import inspect
import os
import posixpath
import re
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.data import DataLoader

from monai_du.data.loading import load_image_transforms, load_images, manifest_to_dataset
from monai_du.data.manifest import read_manifest
from monai_du.data.splits import DEFAULT_FRACTIONS, select_split
from monai_du.encoders import resolve_encoder
from monai_du.io import DoneMarker, atomic_write, file_digest, package_version
from monai_du.kernels import CosineKernel, PriorKernel, RBFKernel
from monai_du.networks import to_device
from monai_du.prior_autoencoder import (
    encode_images,
    load_prior_autoencoder,
    save_prior_autoencoder,
    train_prior_autoencoder,
)

__all__ = [
    "PRIOR_PREFIX",
    "PRIOR_KEY_COLUMN",
    "prior_columns",
    "make_prior_table",
    "write_prior_table",
    "load_prior_table",
    "attach_prior_table",
    "generative_prior_kernel",
    "build_prior_table",
    "ensure_prior_table",
    "encoder_prior_table",
    "build_encoder_prior_table",
]

PRIOR_PREFIX = "gen_"
"""Prefix of the embedding columns of a prior table: ``gen_0 .. gen_{k-1}``."""

PRIOR_KEY_COLUMN = "image"
"""Key column of a prior table: the image path as written in the manifest."""

_GEN_COLUMN = re.compile(r"^gen_(\d+)$")

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
    columns = {PRIOR_KEY_COLUMN: norm.to_numpy()}
    columns.update({f"{PRIOR_PREFIX}{j}": emb[:, j] for j in range(emb.shape[1])})
    return pd.DataFrame(columns)


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
    out = {PRIOR_KEY_COLUMN: keys.to_numpy()}
    for name in columns:
        try:
            values = pd.to_numeric(table[name], errors="raise").to_numpy(dtype=np.float32)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{source}: column {name!r} must be numeric: {err}") from None
        if np.isinf(values).any():
            rows = np.flatnonzero(np.isinf(values))[:5].tolist()
            raise ValueError(f"{source}: column {name!r} holds inf at row(s) {rows}.")
        out[name] = values
    return pd.DataFrame(out)  # built at once: a column at a time fragments a wide table


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
            batch; ``"median"`` is the broad density-estimation choice, which over-smooths).
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
# the pretraining split
# ---------------------------------------------------------------------------------------------------------------------
ALL_ROWS = "all"
"""The ``split`` value that selects every manifest row."""


def _split_mask(
    df: pd.DataFrame,
    split: str | Sequence[str] | None,
    fractions: dict[str, float] | None,
    split_seed: int,
    where: str,
) -> np.ndarray:
    """Positional mask of the rows in the patient-level split ``split`` (``"all"`` or None: every row).

    A manifest ``split`` column is used as it is; otherwise :func:`monai_du.data.splits.select_split` splits the
    patients with ``fractions`` and ``split_seed``, as the bundles do.
    """
    if split is None or (isinstance(split, str) and split == ALL_ROWS):
        return np.ones(len(df), dtype=bool)
    names = [split] if isinstance(split, str) else [str(s) for s in split]
    if not names:
        raise ValueError(f"{where}: give a split name ('train', 'val', 'test') or {ALL_ROWS!r}, got {split!r}.")
    what = f"== {names[0]!r}" if len(names) == 1 else f"in {names}"
    if "split" in df.columns and df["split"].notna().any():
        mask = df["split"].isin(names).to_numpy()
        if not mask.any():
            counts = df["split"].value_counts(dropna=False).to_dict()
            raise ValueError(f"{where}: no row has split {what}; the manifest's 'split' column counts {counts}.")
        return mask
    try:
        selected = select_split(df.reset_index(drop=True), names, fractions=fractions, seed=int(split_seed))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    mask = np.zeros(len(df), dtype=bool)
    mask[selected.index.to_numpy()] = True
    return mask


def _read_manifest_frame(
    manifest: str | os.PathLike | pd.DataFrame, root: str | os.PathLike | None
) -> tuple[pd.DataFrame, str]:
    """The manifest as a DataFrame, and its name for error messages."""
    if isinstance(manifest, pd.DataFrame):
        return manifest, "manifest DataFrame"
    try:
        return read_manifest(manifest, root=root), str(manifest)
    except FileNotFoundError as err:
        raise ValueError(str(err)) from None


# ---------------------------------------------------------------------------------------------------------------------
# from a manifest to a table: the autoencoder
# ---------------------------------------------------------------------------------------------------------------------
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
    split: str | Sequence[str] | None = "train",
    fractions: dict[str, float] | None = None,
    split_seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    save_checkpoint: str | os.PathLike | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = print,
) -> Path:
    """Train (or load) the prior autoencoder on the pretraining split, encode every manifest image, write the table.

    The autoencoder sees the images of the pretraining split only (by default the training patients, chosen as the
    pretraining and fine-tuning bundles choose them), so that nothing fitted on held-out patients reaches the
    pretrained encoder through its prior. The frozen autoencoder then embeds **every** manifest image: the table
    covers the held-out images too, as probing and fine-tuning need.

    Args:
        manifest: the manifest file (read with :func:`monai_du.data.manifest.read_manifest`).
        out: the table to write (``.csv``, ``.csv.gz`` or ``.parquet``).
        root: folder of relative image paths (default: the manifest's folder).
        modality: "2d" / "cxr" or "3d" / "brain".
        image_size: side of the images the autoencoder sees (divisible by 8 with the default channels).
        latent_dim, epochs, batch_size, learning_rate, kl_weight, seed, device: see
            :func:`monai_du.prior_autoencoder.train_prior_autoencoder`.
        split: the split(s) whose rows train the autoencoder: "train" (default), "val", "test", a list of these,
            or "all" (every row, held-out patients included). A manifest ``split`` column is used as it is;
            without one, patients are split with ``fractions`` and ``split_seed``
            (:func:`monai_du.data.splits.select_split`).
        fractions: fractions of patients per split (default 0.8 / 0.1 / 0.1, as in the bundles).
        split_seed: seed of the patient split (default 0, as in the bundles).
        checkpoint: load this autoencoder (:func:`monai_du.prior_autoencoder.save_prior_autoencoder`) instead of
            training one (then ``split`` plays no part).
        save_checkpoint: where to save the trained autoencoder.
        log: callable for progress lines, or None.

    Returns:
        the path of the table.

    Raises:
        ValueError: for a missing manifest, or a split with no row (named).
    """
    started = time.perf_counter()
    df, source = _read_manifest_frame(manifest, root)
    if checkpoint is not None:
        model = load_prior_autoencoder(checkpoint, device=device)
        image_size = int(model.prior_config["image_size"][0])
    else:
        mask = _split_mask(df, split, fractions, split_seed, source)
    images = load_images(df, modality=modality, image_size=image_size)
    if log:
        log(f"loaded {len(images)} images of shape {tuple(images.shape[1:])} from {manifest}")
    if checkpoint is None:
        if log:
            log(f"training the prior autoencoder on {int(mask.sum())} image(s) of split {split!r}")
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


# ---------------------------------------------------------------------------------------------------------------------
# from a manifest to a table: any encoder
# ---------------------------------------------------------------------------------------------------------------------
def _pooled_features(module: torch.nn.Module, x: torch.Tensor, pool: str, where: str) -> torch.Tensor:
    """Encoder output ``(N, D)``; ``(N, D, ...)`` is averaged over its trailing axes (``"mean"``) or flattened."""
    out = module(x)
    if not isinstance(out, torch.Tensor):
        raise ValueError(
            f"{where}: the encoder returned a {type(out).__name__}, not a tensor (N, D); pass submodule= to pick a "
            "part of the network that returns one."
        )
    if out.ndim < 2 or out.shape[0] != x.shape[0]:
        raise ValueError(
            f"{where}: the encoder mapped images {tuple(x.shape)} to {tuple(out.shape)}; expected (N={x.shape[0]}, D) "
            "or (N, D, ...)."
        )
    if out.ndim > 2:
        out = out.mean(dim=tuple(range(2, out.ndim))) if pool == "mean" else out.flatten(1)
    return out.detach().float().cpu()


def encoder_prior_table(
    manifest: str | os.PathLike | pd.DataFrame,
    encoder: Any,
    *,
    root: str | os.PathLike | None = None,
    split: str | Sequence[str] | None = "train",
    image_size: int | Sequence[int] | None = None,
    modality: str | None = None,
    intensity: str | None = "auto",
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    fractions: dict[str, float] | None = None,
    split_seed: int = 0,
    pool: str = "mean",
    num_workers: int = 0,
) -> pd.DataFrame:
    """A prior table from any encoder: the features of the pretraining split's images, keyed by image path.

    Only the rows of ``split`` are encoded, by default the training patients chosen exactly as the pretraining
    bundles choose them (:func:`monai_du.data.splits.select_split` with fractions 0.8 / 0.1 / 0.1 and seed 0, or the
    manifest's own ``split`` column). A prior computed on held-out patients leaks nothing about their labels (the
    encoder never sees a label), but the pretraining run reads only its training rows, and keeping the table to them
    is the safe default that matches the bundles: nothing about a held-out patient enters pretraining. Pass
    ``split="all"`` to encode every row (e.g. to attach the table to the whole manifest).

    Images are loaded with the package's MONAI pipeline (:func:`monai_du.data.loading.load_image_transforms`:
    readers by file type, channel first, intensity scaling, resizing) at the encoder's input size, and encoded in
    eval mode without gradients, ``batch_size`` at a time.

    Args:
        manifest: the manifest file (relative paths resolved against ``root`` or its folder) or DataFrame.
        encoder: what :func:`monai_du.encoders.load_encoder` accepts: a TorchScript file, a monai_du export folder
            (or its ``encoder.pt``), a mapping ``{"bundle_config", "network_id", "checkpoint", "submodule"}`` for a
            MONAI bundle's network, or a ``torch.nn.Module`` (put in eval mode for the pass, and moved to ``device``).
        root: folder of relative image paths.
        split: the split(s) to encode ("train", "val", "test" or a list of them), or "all".
        image_size: input size: a side or one value per axis. Default: the export's ``spatial_size``
            (``encoder_info.json``) or the bundle config's ``spatial_size``; required for TorchScript files and
            modules.
        modality: "2d" / "cxr" or "3d" / "brain"; default from the encoder's record, its spatial dims or
            ``image_size``.
        intensity: intensity scaling, as in the pipeline the encoder was trained with ("minmax", the 2D bundles;
            "percentile", the brain MRI bundle; or None). ``"auto"``: the loading the encoder records (a monai_du
            export's ``image_loading``: intensity and size mode, or a bundle config's ``image_loading`` id), else
            "minmax".
        batch_size: images per forward pass.
        device: device of the forward passes.
        fractions: fractions of patients per split (default 0.8 / 0.1 / 0.1, as in the bundles).
        split_seed: seed of the patient split (default 0, as in the bundles).
        pool: for outputs ``(N, D, ...)``: ``"mean"`` (global average over the trailing axes) or ``"flatten"``.
        num_workers: ``DataLoader`` workers that load the images.

    Returns:
        the prior table (:func:`make_prior_table`): ``image`` (the manifest's path of each selected row, in
        manifest order) and ``gen_0 .. gen_{D-1}``.

    Raises:
        ValueError: for a missing encoder file, an unknown network id, an unknown input size, an output that is not
            ``(N, D, ...)``, a split with no row, or non-finite features (naming the images).
    """
    if pool not in ("mean", "flatten"):
        raise ValueError(f"encoder_prior_table: pool must be 'mean' or 'flatten', got {pool!r}.")
    if int(batch_size) < 1:
        raise ValueError(f"encoder_prior_table: batch_size must be >= 1, got {batch_size!r}.")
    resolved = resolve_encoder(encoder)
    df, source = _read_manifest_frame(manifest, root)
    rows = df.iloc[np.flatnonzero(_split_mask(df, split, fractions, split_seed, source))]
    if image_size is not None:
        size: int | list[int] = (
            int(image_size) if isinstance(image_size, (int, np.integer)) else [int(s) for s in image_size]
        )
    elif resolved.spatial_size:
        size = list(resolved.spatial_size)
    else:
        raise ValueError(
            f"encoder_prior_table: {resolved.source} does not record its input size; give image_size (a side, or one "
            "value per axis)."
        )
    recorded: dict[str, Any] = {}
    if intensity == "auto":
        recorded = dict(resolved.image_loading or {})
        intensity = recorded.get("intensity", "minmax")
    if modality is None:
        dims = len(size) if isinstance(size, list) else (resolved.spatial_dims or 2)
        modality = recorded.get("modality", "3d" if dims == 3 else "2d")
    extra = {"size_mode": recorded["size_mode"]} if "size_mode" in recorded else {}
    transform = load_image_transforms(keys="image", modality=modality, spatial_size=size, intensity=intensity,
                                      **extra)
    dataset = manifest_to_dataset(
        rows, root=root if isinstance(manifest, pd.DataFrame) else None, transform=transform, columns=[],
        source=source if not isinstance(manifest, pd.DataFrame) else None,
    )
    loader = DataLoader(dataset, batch_size=int(batch_size), shuffle=False, num_workers=int(num_workers))
    where = f"encoder_prior_table({resolved.source})"
    module = resolved.module
    was_training = module.training
    to_device(module.eval(), device)
    chunks = []
    try:
        with torch.no_grad():
            for batch in loader:
                x = batch["image"]
                x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
                chunks.append(_pooled_features(module, x.float().to(device), pool, where))
    finally:
        module.train(was_training)
    features = torch.cat(chunks).numpy().astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if len(bad):
        raise ValueError(
            f"{where}: non-finite features for {len(bad)} image(s): {_describe(rows['image'].iloc[bad].tolist())}."
        )
    return make_prior_table(rows["image"], features)


def build_encoder_prior_table(
    manifest: str | os.PathLike | pd.DataFrame,
    out: str | os.PathLike,
    encoder: Any,
    log: Callable[[str], None] | None = print,
    **kwargs: Any,
) -> Path:
    """Write :func:`encoder_prior_table` to ``out`` (``.csv``, ``.csv.gz`` or ``.parquet``); it backs
    ``monai-du prior --encoder`` and ``--bundle-config``.

    Args:
        manifest: the manifest file or DataFrame.
        out: the table to write.
        encoder: see :func:`monai_du.encoders.load_encoder`.
        log: callable for progress lines, or None.
        kwargs: the keyword arguments of :func:`encoder_prior_table` (``root``, ``split``, ``image_size``, ...).

    Returns:
        the path of the table.
    """
    started = time.perf_counter()
    table = encoder_prior_table(manifest, encoder, **kwargs)
    path = write_prior_table(table, out)
    if log:
        log(f"wrote the prior table {path} ({len(table)} images of split {kwargs.get('split', 'train')!r} x "
            f"{len(prior_columns(table))} columns) in {time.perf_counter() - started:.1f} s")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# the cached table of a bundle
# ---------------------------------------------------------------------------------------------------------------------
# arguments that do not change the table's content
_UNKEYED = ("out", "log", "device", "save_checkpoint", "num_workers")


def _file_input(path: str | os.PathLike) -> dict[str, str]:
    """A file as an input of a table: its absolute path and the SHA-256 of its content."""
    return {"path": os.path.abspath(path), "sha256": file_digest(path)}


def _module_input(module: torch.nn.Module) -> dict[str, str]:
    """A module given as the encoder, as an input of a table: its class and the SHA-256 of its state dict."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"module": type(module).__qualname__, "sha256": digest.hexdigest()}


def _table_inputs(manifest: Any, encoder: Any, kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """What determines a table (the inputs of its :class:`~monai_du.io.DoneMarker`), and the encoder resolved once
    for the build."""
    if not isinstance(manifest, (str, os.PathLike)) or not Path(manifest).is_file():
        raise ValueError(f"ensure_prior_table: no such manifest file {manifest!r}.")
    if encoder is None:
        bound = inspect.signature(build_prior_table).bind(manifest, "<table>", **kwargs)
        kind = "autoencoder"
    else:
        bound = inspect.signature(encoder_prior_table).bind(manifest, encoder, **kwargs)
        kind = "encoder"
    bound.apply_defaults()
    args = {k: v for k, v in bound.arguments.items() if k not in _UNKEYED}
    args["manifest"] = _file_input(manifest)
    args["root"] = None if args.get("root") is None else os.path.abspath(args["root"])
    split = args.get("split")
    args["split"] = ALL_ROWS if split is None else split if isinstance(split, str) else [str(s) for s in split]
    fractions = DEFAULT_FRACTIONS if args.get("fractions") is None else args["fractions"]
    args["fractions"] = {str(k): float(v) for k, v in dict(fractions).items()}
    if kind == "autoencoder":
        args["checkpoint"] = None if args.get("checkpoint") is None else _file_input(args["checkpoint"])
    else:
        args.pop("batch_size", None)  # eval-mode features do not depend on the batching
        encoder = resolve_encoder(encoder)
        args["encoder"] = {
            "source": encoder.source,
            "files": [_file_input(f) for f in encoder.files] if encoder.files else [_module_input(encoder.module)],
        }
    for name in ("image_size",):
        if isinstance(args.get(name), (tuple, list)):
            args[name] = [int(s) for s in args[name]]
    return {"kind": kind, **args, "monai_du_version": package_version()}, encoder


def ensure_prior_table(
    manifest: str | os.PathLike,
    path: str | os.PathLike,
    rebuild: bool = False,
    encoder: Any = None,
    **kwargs: Any,
) -> str:
    """The prior table at ``path``, built from ``manifest`` when it is missing or was built with other settings.

    For bundle configs::

        # the generative prior: a VAE fitted on the pretraining split, embedding every manifest image
        prior_table: "$monai_du.priors.ensure_prior_table(@manifest, 'prior_table.csv', root=@dataset_dir,
                      split=@pretrain_split, fractions=@split_fractions, split_seed=@split_seed)"
        # any encoder's features of the pretraining split
        prior_table: "$monai_du.priors.ensure_prior_table(@manifest, 'prior_table.csv', encoder=@prior_encoder_path,
                      root=@dataset_dir, split=@pretrain_split, fractions=@split_fractions, split_seed=@split_seed)"

    With ``encoder=None`` the table comes from :func:`build_prior_table` (the autoencoder), otherwise from
    :func:`encoder_prior_table` (see there for ``encoder``). Next to the table, the done marker
    ``<path>.settings.json`` (:class:`monai_du.io.DoneMarker`, written after the table) records what built it: every
    argument that changes the table (the split, its fractions and seed included), a SHA-256 of the manifest file and
    of the encoder's or checkpoint's files, and the monai_du version. A table whose record differs (or cannot be
    read) is rebuilt, with a warning naming the changed settings, so that a changed split is never served stale. A
    table without a record (written by ``monai-du prior`` or by hand) is kept, with a warning that it could not be
    checked; pass ``rebuild=True`` or delete it to rebuild. An existing table is validated (:func:`load_prior_table`);
    :func:`attach_prior_table` names any image it lacks. In a multi-process run, build the table once beforehand
    (``monai-du prior``): concurrent builds would each write it.

    Args:
        manifest: the manifest file.
        path: the table file.
        rebuild: build even when an up-to-date table exists.
        encoder: None (the autoencoder), or an encoder for :func:`encoder_prior_table`.
        kwargs: arguments of :func:`build_prior_table` (``root``, ``modality``, ``image_size``, ``epochs``,
            ``split``, ``fractions``, ``split_seed``, ...) or of :func:`encoder_prior_table`.

    Returns:
        ``path`` as a string.
    """
    path = Path(path)
    inputs, resolved = _table_inputs(manifest, encoder, kwargs)
    marker = DoneMarker(path.with_name(path.name + ".settings.json"), inputs)
    if path.is_file() and not rebuild:
        if not marker.path.is_file():
            load_prior_table(path)
            warnings.warn(
                f"ensure_prior_table: kept {path}, which has no settings record {marker.path.name}: it was not built "
                "by ensure_prior_table, so its split and settings could not be checked. Pass rebuild=True or delete "
                "it to rebuild it.",
                stacklevel=2,
            )
            return str(path)
        changed = marker.changes()
        if changed == []:
            load_prior_table(path)
            return str(path)
        if changed is None:  # a record that cannot be read says nothing about the build: every setting changed
            changed = sorted(marker.inputs)
        warnings.warn(f"ensure_prior_table: rebuilding {path}; changed settings: {changed}.", stacklevel=2)
    marker.clear()  # never leave the record of an older build beside a newer table
    kwargs.setdefault("log", None)
    if encoder is None:
        build_prior_table(manifest, path, **kwargs)
    else:
        build_encoder_prior_table(manifest, path, resolved, **kwargs)
    marker.write()
    return str(path)
