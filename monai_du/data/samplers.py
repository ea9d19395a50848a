"""Attribute-conditioned batch samplers.

Kernel DU only learns something from the prior when a batch holds samples whose priors are related, and a nuisance
attribute (site, scanner, view) only stops being a shortcut when the negatives of a batch share it. This module forms
batches of dataset indices with both goals in mind. :class:`AttributeBatchSampler` is a
``torch.utils.data.Sampler`` that yields lists of indices; pass it as ``batch_sampler=`` to
``torch.utils.data.DataLoader`` or ``monai.data.DataLoader``.

Indices are positions ``0 .. N-1`` in the table the groups and features came from. Build the ``Dataset`` from the same
rows in the same order.

A multi-GPU run is the single-GPU method at the global batch size: the sampler plans the batches of ``R x batch_size``
that the loss sees after gathering across ``R`` ranks, and splits each one across the ranks.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["AttributeBatchSampler", "attribute_batch_sampler", "draw_batches", "SAMPLER_MODES", "SMALL_GROUP_POLICIES"]

logger = logging.getLogger(__name__)

SAMPLER_MODES = ("within", "balanced", "neighbourhood", "random", "pk")
SMALL_GROUP_POLICIES = ("merge", "drop", "keep")
_MODE_ALIASES = {"neighborhood": "neighbourhood"}
# Neighbourhood partitions work in at most this many dimensions (leading principal components beyond it).
_MAX_PARTITION_DIMS = 8
# Default neighbourhood size: each sample gets this many prior-space neighbours in its batch.
_DEFAULT_NEIGHBOURS = 7
# Tags that keep the random streams of different purposes apart.
_TAG_EPOCH, _TAG_GROUP_CYCLE, _TAG_GROUP_INTERIOR, _TAG_ROTATION = 0, 1, 2, 3


class AttributeBatchSampler(Sampler[list[int]]):
    """Batch sampler whose batches are conditioned on a group attribute or on prior features.

    The sampler plans *global* batches of ``global_batch_size = num_replicas * batch_size`` indices, the batches that
    a loss gathering across ranks sees, and gives each rank its part of every global batch (see "Distributed
    training" below). With one process the global batch is the batch. The modes describe global batches.

    Modes:

    - ``"within"``: every batch draws from one group only (for example one site), so the negatives of a batch share
      the nuisance attribute and it cannot be used to tell samples apart. Each epoch shuffles the members of every
      group, cuts each group into batches of ``global_batch_size`` and shuffles the order of all batches. The last,
      shorter batch of a group is kept (still pure) unless ``drop_last``. Every kept index appears exactly once per
      epoch.
    - ``"balanced"``: every batch holds ``global_batch_size // G`` members of each of the ``G`` groups; the
      ``global_batch_size % G`` remaining slots go to the groups in a fixed round-robin order that carries on from
      batch to batch and from epoch to epoch, so counts within a batch differ by at most one. An epoch has as many
      batches as one pass over the kept samples would (``ceil(N / global_batch_size)``, or the floor with
      ``drop_last``), and every batch is full. Each group is read from its own endless stream of fresh permutations,
      and epoch ``e`` continues the stream where epoch ``e - 1`` stopped: large groups are traversed without
      replacement across consecutive epochs, small groups are over-sampled (cycled) with no repeat inside one pass
      over the group.
    - ``"neighbourhood"``: every batch is made of ``global_batch_size // (n_neighbours + 1)`` neighbourhoods of
      ``n_neighbours + 1`` samples that are close in (standardised) prior space, stored one after another in the
      batch, so that each sample meets ``n_neighbours`` close neighbours in its batch and the batch kernel matrix is
      not nearly the identity. Neighbourhoods are the leaves of a balanced k-d partition of the prior space, rebuilt
      each epoch with a random rotation, random tie-breaking and random odd splits: every index appears exactly once
      per epoch, and one epoch costs a few vectorised sorts (O(N log N)), with no neighbour graph to store. The
      ``N % (n_neighbours + 1)`` samples left over are chosen at random and go last. When ``n_neighbours + 1`` does
      not divide ``global_batch_size``, neighbourhoods straddle two batches.
    - ``"random"``: plain shuffled batches, the baseline. ``groups`` and ``features`` only give ``N``.
    - ``"pk"``: P groups x K images (``groups`` are patient ids, ``images_per_group=K``): every batch holds
      ``P = global_batch_size // K`` blocks of K images, each block one patient, stored one after another, so that a
      patient x time kernel sees same-patient pairs. A patient with ``n >= K`` images gives ``ceil(n / K)`` blocks
      per epoch, cut from a fresh permutation of its images and, when K does not divide ``n``, completing its last
      block with the first images of that permutation: every image is seen each epoch, and no image twice in one
      block. With ``block_order`` (e.g. the study time) the blocks are K consecutive images of the patient in that
      order instead, read from a random cyclic offset that changes every epoch, so that a kernel on time meets
      close pairs. Blocks are laid out over the batches so that the blocks of one patient land in different batches (a
      batch holds P distinct patients) unless a patient has more blocks than the epoch has batches (minus one
      without ``drop_last``). Missing patient ids (None/NaN) each count as a patient of their own. With
      ``drop_last=False`` the last batch may hold fewer blocks; with ``drop_last=True`` the blocks that do not
      fill a batch are left out (random ones, changing every epoch).

    Prior features (``neighbourhood`` mode) are standardised column-wise with the mean and standard deviation of the
    observed values (a constant column is only centred); a missing value (NaN) is then imputed at the column mean (0
    after standardisation), so a row missing a column is placed mid-way along it, not at either end. When there are
    more than 8 columns, the partition runs on the 8 leading principal components of the standardised features.

    Small groups (``small_groups``):

    - ``"within"`` mode calls a group small when it has fewer than ``global_batch_size`` members.
      ``"merge"`` (default) pools all small groups and cuts the pool into batches; the pool is laid out group after
      group (random group order) so each merged batch spans as few groups as it can. Merged batches are the only
      impure ones; ``merged_groups`` lists their labels. ``"drop"`` leaves small groups out of every epoch (with a
      warning; ``dropped_groups`` lists them). ``"keep"`` gives each small group one short batch of its own; it
      contradicts ``drop_last=True`` and is refused with it.
    - ``"balanced"`` mode calls a group small when it has fewer members than its share of a batch,
      ``ceil(global_batch_size / G)``, which would force a repeat inside a batch. ``"merge"`` pools the small groups
      into one group that takes one share; ``"drop"`` leaves them out; ``"keep"`` keeps them, cycling their members
      (repeats inside a batch). A pool still smaller than its share is cycled in the same way; a very small pool then
      fills its share with many repeats, so prefer ``"drop"`` when the small groups are few and tiny.
    - ``"pk"`` mode calls a patient small when it has fewer than K images. ``"merge"`` pools the images of all small
      patients, laid out patient after patient (random order), and cuts the pool into blocks of K like one more
      patient: every image is still seen, but a pooled block mixes patients (``merged_groups`` lists the small
      patients). ``"keep"`` samples with replacement: a small patient gets one block that cycles its images (an image
      repeats inside the block), so every block is one patient. ``"drop"`` leaves small patients out (with a
      warning; ``dropped_groups`` lists them).
    - ``"neighbourhood"`` and ``"random"`` have no groups; the policy does nothing.

    Distributed training: every rank computes the same global batches for ``(seed, epoch)`` (pass the same ``seed``
    on every rank) and takes its part of each, so that the batch that a cross-rank ``all_gather`` puts together in
    rank order has the composition one process would give at ``global_batch_size``: one group (``"within"``),
    balanced over the groups (``"balanced"``), whole neighbourhoods and whole patient blocks (``"neighbourhood"``,
    ``"pk"``). Rank ``r`` takes the ``r``-th of ``num_replicas`` consecutive slices of a global batch (of whole
    blocks in ``"pk"`` mode), except in ``"balanced"`` mode, where it takes every ``num_replicas``-th index
    starting at ``r`` of the group-sorted batch, so that every rank's part is itself close to balanced (a per-rank
    BatchNorm then sees no single-group batch). Ranks get disjoint indices at every step, and every rank has one
    step per global batch, so the step counts are equal. With ``drop_last=True`` every global batch has
    ``global_batch_size`` indices and every rank part ``batch_size``. With ``drop_last=False`` a short global batch
    is split as evenly as possible (parts differ by at most one index, one block in ``"pk"`` mode); when it has
    fewer indices (blocks) than ranks, it is completed with indices from the start of the same group (``"within"``),
    of the epoch (``"random"``, ``"neighbourhood"``) or with blocks of other patients from the epoch's first batch
    (``"pk"``), so that no rank gets an empty part.

    Call ``set_epoch(epoch)`` at the start of every epoch (MONAI's workflows only do this for a
    ``DistributedSampler``, not for a batch sampler): without it every epoch repeats the same batches.

    Args:
        batch_size: number of indices per batch on this rank; at least 2, since a contrastive batch needs pairs.
        mode: ``"within"``, ``"balanced"``, ``"neighbourhood"`` (``"neighborhood"`` also accepted), ``"random"`` or
            ``"pk"``.
        groups: length-N sequence of group labels (site, view, patient id, ...); required by ``"within"``,
            ``"balanced"`` and ``"pk"``. Missing labels (None/NaN) form a group of their own (in ``"pk"`` mode: one
            patient each).
        features: (N, P) array of prior features, NaN for missing; required by ``"neighbourhood"``.
        num_samples: N, needed only when neither ``groups`` nor ``features`` is given; must agree with them otherwise.
        n_neighbours: neighbours per sample in ``"neighbourhood"`` mode, in ``[1, global_batch_size - 1]``.
            Default ``min(7, global_batch_size - 1)``. ``global_batch_size - 1`` makes every batch one neighbourhood.
        drop_last: drop global batches shorter than ``global_batch_size`` (see the modes).
        small_groups: ``"merge"``, ``"drop"`` or ``"keep"``: policy for small groups (see above).
        seed: base seed; batches are a deterministic function of ``(seed, epoch)`` and the inputs.
        num_replicas: number of ranks R; default the world size of an initialised ``torch.distributed`` group, else 1.
        rank: this rank; default the rank of an initialised ``torch.distributed`` group, else 0.
        images_per_group: K, the images of one patient per block in ``"pk"`` mode (required there, and only there);
            ``batch_size`` must be a multiple of K.
        block_order: length-N numbers (e.g. days since the patient's first study), ``"pk"`` mode only: a block takes
            K images of its patient that are consecutive in this order (NaN sorts last). None: random images.

    Raises:
        ValueError: on an unknown mode or policy, ``batch_size < 2``, inputs of inconsistent length, ``features`` not
            of shape (N, P) or holding infinities, a missing required input, ``images_per_group`` out of place or not
            dividing ``batch_size``, or settings that leave no global batch.

    Example::

        sampler = AttributeBatchSampler(64, mode="within", groups=manifest["site"], drop_last=True)
        loader = monai.data.DataLoader(dataset, batch_sampler=sampler, num_workers=4)
        for epoch in range(max_epochs):
            sampler.set_epoch(epoch)
            for batch in loader:
                ...

        pk = AttributeBatchSampler(64, mode="pk", groups=manifest["patient_id"], images_per_group=4, drop_last=True)
    """

    def __init__(
        self,
        batch_size: int,
        mode: str = "random",
        groups: Sequence[Any] | np.ndarray | pd.Series | None = None,
        features: Any = None,
        num_samples: int | None = None,
        n_neighbours: int | None = None,
        drop_last: bool = False,
        small_groups: str = "merge",
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        images_per_group: int | None = None,
        block_order: Any = None,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 2:
            raise ValueError(
                f"batch_size must be an integer >= 2 (a contrastive batch needs pairs); got {batch_size!r}."
            )
        mode = _MODE_ALIASES.get(mode, mode) if isinstance(mode, str) else mode
        if mode not in SAMPLER_MODES:
            raise ValueError(f"mode must be one of {SAMPLER_MODES}; got {mode!r}.")
        if small_groups not in SMALL_GROUP_POLICIES:
            raise ValueError(f"small_groups must be one of {SMALL_GROUP_POLICIES}; got {small_groups!r}.")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer; got {seed!r}.")
        self.batch_size = int(batch_size)
        self.mode: str = mode
        self.drop_last = bool(drop_last)
        self.small_groups = small_groups
        self.seed = int(seed)
        self.epoch = 0
        self.merged_groups: list[Any] = []
        self.dropped_groups: list[Any] = []
        self.num_replicas, self.rank = _resolve_replicas(num_replicas, rank)
        self.images_per_group = self._check_images_per_group(images_per_group)

        group_codes, self.group_labels = _encode_groups(groups)
        if mode == "pk" and group_codes is not None:
            group_codes, self.group_labels = _missing_apart(group_codes, self.group_labels)
        # Only neighbourhood mode uses the features themselves; the other modes only read N from them.
        prior = _standardise_features(features, reduce=mode == "neighbourhood") if features is not None else None
        self.num_samples = _resolve_num_samples(num_samples, group_codes, prior)

        if mode in ("within", "balanced", "pk") and group_codes is None:
            what = "patient ids (the patient_id column)" if mode == "pk" else "group labels (e.g. the site column)"
            raise ValueError(f"mode={mode!r} needs groups: a length-N sequence of {what}.")
        if mode == "neighbourhood":
            if prior is None:
                raise ValueError("mode='neighbourhood' needs features: an (N, P) array of prior features.")
            if group_codes is not None:
                raise ValueError("mode='neighbourhood' does not use groups; pass groups=None (or use mode='within').")
        self.n_neighbours = self._check_n_neighbours(n_neighbours) if mode == "neighbourhood" else None
        self._group_codes = group_codes
        self._prior = prior if mode == "neighbourhood" else None
        self._block_order = self._check_block_order(block_order)

        size = self.global_batch_size
        if mode == "within":
            self._num_batches_total = self._prepare_within(group_codes)
        elif mode == "balanced":
            self._num_batches_total = self._prepare_balanced(group_codes)
        elif mode == "pk":
            self._num_batches_total = self._prepare_pk(group_codes)
        else:
            n = self.num_samples
            self._num_batches_total = n // size if self.drop_last else math.ceil(n / size)
        if self._num_batches_total == 0:
            raise ValueError(
                f"mode={mode!r} with batch_size={self.batch_size} on each of num_replicas={self.num_replicas} ranks "
                f"(global batch {size}) and drop_last={self.drop_last} forms no batch from {self.num_samples} "
                "samples; lower batch_size or set drop_last=False."
            )

    @property
    def global_batch_size(self) -> int:
        """Indices per global batch, ``num_replicas * batch_size``: the batch the loss sees after gathering."""
        return self.batch_size * self.num_replicas

    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def from_manifest(
        cls,
        manifest: pd.DataFrame,
        batch_size: int,
        mode: str = "random",
        attribute: str | None = None,
        feature_columns: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> AttributeBatchSampler:
        """Build a sampler from the columns of a manifest.

        Args:
            manifest: the manifest DataFrame; batch indices are its row positions ``0 .. len - 1``.
            batch_size: see the class.
            mode: see the class.
            attribute: column whose values are the groups (e.g. ``"site"``); missing values form their own group.
            feature_columns: columns that make the (N, P) prior features. Numeric and boolean columns are used as
                floats; other columns (e.g. ``sex`` "M"/"F") become integer codes of their sorted values, stored as
                floats, with NaN for missing, as in the shared prior-vector convention.
            kwargs: the other arguments of the class (``drop_last``, ``seed``, ``small_groups``, ...).

        Raises:
            ValueError: when ``manifest`` is not a DataFrame or a named column is absent.
        """
        if not isinstance(manifest, pd.DataFrame):
            raise ValueError(f"manifest must be a pandas DataFrame; got {type(manifest).__name__}.")
        if isinstance(feature_columns, str):
            feature_columns = [feature_columns]
        named = ([attribute] if attribute is not None else []) + list(feature_columns or [])
        missing = [c for c in named if c not in manifest.columns]
        if missing:
            raise ValueError(f"manifest has no column {missing}; its columns are {list(manifest.columns)}.")
        groups = manifest[attribute].to_numpy(dtype=object) if attribute is not None else None
        features = _encode_feature_columns(manifest, feature_columns) if feature_columns else None
        kwargs.setdefault("num_samples", len(manifest))
        return cls(batch_size, mode=mode, groups=groups, features=features, **kwargs)


    def _check_n_neighbours(self, n_neighbours: int | None) -> int:
        size = self.global_batch_size
        if n_neighbours is None:
            return min(_DEFAULT_NEIGHBOURS, size - 1)
        if isinstance(n_neighbours, bool) or not isinstance(n_neighbours, numbers.Integral):
            raise ValueError(f"n_neighbours must be an integer; got {n_neighbours!r}.")
        if not 1 <= n_neighbours <= size - 1:
            raise ValueError(
                f"n_neighbours must be in [1, global_batch_size - 1] = [1, {size - 1}] so that a neighbourhood "
                f"fits in a batch; got {n_neighbours}."
            )
        return int(n_neighbours)

    def _check_block_order(self, block_order: Any) -> np.ndarray | None:
        if block_order is None:
            return None
        if self.mode != "pk":
            raise ValueError(f"block_order is only used by mode='pk'; got mode={self.mode!r}.")
        try:
            order = np.asarray(pd.to_numeric(pd.Series(np.asarray(block_order, dtype=object)), errors="raise"),
                               dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"block_order must hold numbers (NaN for unknown): {err}") from None
        if order.shape != (self.num_samples,):
            raise ValueError(f"block_order has {order.size} values for {self.num_samples} samples.")
        return order

    def _check_images_per_group(self, images_per_group: int | None) -> int | None:
        if self.mode != "pk":
            if images_per_group is not None:
                raise ValueError(
                    f"images_per_group={images_per_group!r} is only used by mode='pk'; got mode={self.mode!r}."
                )
            return None
        if images_per_group is None:
            raise ValueError("mode='pk' needs images_per_group=K, the images of one patient per block.")
        k = images_per_group
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"images_per_group must be a positive integer; got {k!r}.")
        if self.batch_size % k:
            raise ValueError(
                f"batch_size={self.batch_size} must be a multiple of images_per_group={k} (P patients x K images "
                "per batch)."
            )
        return int(k)

    def _prepare_within(self, codes: np.ndarray) -> int:
        """Split the groups into batch-able segments and a pool of small groups; return the number of batches."""
        bs = self.global_batch_size
        sizes = np.bincount(codes, minlength=len(self.group_labels))
        small = sizes < bs
        if self.small_groups == "keep" and self.drop_last and small.any():
            raise ValueError(
                f"small_groups='keep' gives groups {self._labels(small)} (fewer than global_batch_size={bs} members) "
                "a short batch each, which drop_last=True forbids; use small_groups='merge' or 'drop'."
            )
        segment_groups = np.flatnonzero(~small | (self.small_groups == "keep"))
        pool_groups = np.flatnonzero(small) if self.small_groups == "merge" else np.empty(0, dtype=np.int64)
        if self.small_groups == "drop" and small.any():
            self.dropped_groups = self._labels(small)
            warnings.warn(
                f"AttributeBatchSampler(mode='within') drops groups {self.dropped_groups} "
                f"({int(sizes[small].sum())} samples): each has fewer than global_batch_size={bs} members.",
                stacklevel=3,
            )
        if self.small_groups == "merge" and small.any():
            self.merged_groups = self._labels(small)
            logger.info("AttributeBatchSampler(mode='within') merges small groups %s.", self.merged_groups)

        order = np.argsort(codes, kind="stable")
        starts = np.concatenate([[0], np.cumsum(sizes)])
        self._segment_members = [order[starts[g] : starts[g + 1]] for g in segment_groups]
        self._pool_members = [order[starts[g] : starts[g + 1]] for g in pool_groups]
        seg_sizes = sizes[segment_groups]
        if self.drop_last:
            n_batches = int((seg_sizes // bs).sum())
        else:
            n_batches = int(np.ceil(seg_sizes / bs).sum())
        pool = int(sizes[pool_groups].sum())
        n_batches += pool // bs if self.drop_last else math.ceil(pool / bs)
        return n_batches

    def _prepare_balanced(self, codes: np.ndarray) -> int:
        """Form the groups that share each batch (after the small-group policy); return the number of batches."""
        bs = self.global_batch_size
        sizes = np.bincount(codes, minlength=len(self.group_labels))
        share = math.ceil(bs / len(sizes))
        small = sizes < share
        order = np.argsort(codes, kind="stable")
        starts = np.concatenate([[0], np.cumsum(sizes)])
        members = [order[starts[g] : starts[g + 1]] for g in range(len(sizes))]
        kept = [members[g] for g in range(len(sizes)) if not small[g] or self.small_groups == "keep"]
        if small.any() and self.small_groups == "merge":
            self.merged_groups = self._labels(small)
            kept.append(np.sort(np.concatenate([members[g] for g in np.flatnonzero(small)])))
            logger.info("AttributeBatchSampler(mode='balanced') pools small groups %s.", self.merged_groups)
        if small.any() and self.small_groups == "drop":
            self.dropped_groups = self._labels(small)
            warnings.warn(
                f"AttributeBatchSampler(mode='balanced') drops groups {self.dropped_groups} "
                f"({int(sizes[small].sum())} samples): each has fewer than its share ceil({bs}/{len(sizes)}) = "
                f"{share} of a batch.",
                stacklevel=3,
            )
        if not kept:
            raise ValueError(f"small_groups='drop' leaves no group for mode='balanced' (group sizes {sizes.tolist()}).")
        self._balanced_members = kept
        # Round-robin order of the leftover slots: fixed for the seed so that it carries on across epochs.
        self._slot_order = np.random.default_rng([self.seed, _TAG_ROTATION]).permutation(len(kept))
        n_kept = int(sum(len(m) for m in kept))
        return n_kept // bs if self.drop_last else math.ceil(n_kept / bs)

    def _prepare_pk(self, codes: np.ndarray) -> int:
        """Form the block units (patients, and the pool of small patients); return the number of batches.

        A unit of ``n`` images gives ``ceil(n / K)`` blocks per epoch. Rows are stored unit after unit in
        ``_pk_rows``, with their unit (``_pk_unit_of_row``) and patient (``_pk_patient_of_row``).
        """
        k = self.images_per_group
        sizes = np.bincount(codes, minlength=len(self.group_labels))
        small = (sizes < k) & (sizes > 0)
        n_small, small_images = int(small.sum()), int(sizes[small].sum())
        if small.any() and self.small_groups == "drop":
            self.dropped_groups = self._labels(small)
            warnings.warn(
                f"AttributeBatchSampler(mode='pk') drops {n_small} patients ({small_images} images) with fewer "
                f"than images_per_group={k} images, e.g. {self.dropped_groups[:5]}.",
                stacklevel=3,
            )
        if small.any() and self.small_groups == "merge":
            self.merged_groups = self._labels(small)
            logger.info("AttributeBatchSampler(mode='pk') pools %d patients with fewer than %d images (%d images).",
                        n_small, k, small_images)
        kept = sizes > 0 if self.small_groups == "keep" else (sizes >= k)
        # Unit of each patient: its own for kept patients, one shared pool unit for merged small patients.
        unit_of_patient = np.full(len(sizes), -1, dtype=np.int64)
        unit_of_patient[kept] = np.arange(int(kept.sum()))
        if small.any() and self.small_groups == "merge":
            unit_of_patient[small] = int(kept.sum())
        rows = np.flatnonzero(unit_of_patient[codes] >= 0)
        unit_of_row = unit_of_patient[codes[rows]]
        order = np.argsort(unit_of_row, kind="stable")
        self._pk_rows, self._pk_unit_of_row = rows[order], unit_of_row[order]
        self._pk_patient_of_row = codes[self._pk_rows]
        # rank of each stored row inside its unit by block_order (NaN last, ties by index); pooled units stay random
        self._pk_time_rank = None
        if self._block_order is not None:
            by_time = np.lexsort((self._pk_rows, np.nan_to_num(self._block_order[self._pk_rows], nan=np.inf),
                                  self._pk_unit_of_row))
            starts = np.searchsorted(self._pk_unit_of_row[by_time], self._pk_unit_of_row[by_time])
            self._pk_time_rank = np.empty(len(by_time), dtype=np.int64)
            self._pk_time_rank[by_time] = np.arange(len(by_time)) - starts
            self._pk_pool_unit = int(kept.sum()) if small.any() and self.small_groups == "merge" else -1
        self._pk_unit_sizes = np.bincount(self._pk_unit_of_row, minlength=int(unit_of_patient.max()) + 1)
        self._pk_unit_blocks = -(-self._pk_unit_sizes // k)
        n_blocks, per_batch = int(self._pk_unit_blocks.sum()), self.global_batch_size // k
        return n_blocks // per_batch if self.drop_last else math.ceil(n_blocks / per_batch)

    def _labels(self, mask: np.ndarray) -> list[Any]:
        return [self.group_labels[g] for g in np.flatnonzero(mask)]

    def __repr__(self) -> str:
        extra = f", groups={len(self.group_labels)}" if self._group_codes is not None else ""
        if self.n_neighbours is not None:
            extra += f", n_neighbours={self.n_neighbours}"
        if self.images_per_group is not None:
            extra += f", images_per_group={self.images_per_group}"
        return (
            f"{type(self).__name__}(batch_size={self.batch_size}, mode={self.mode!r}, num_samples={self.num_samples}"
            f"{extra}, drop_last={self.drop_last}, small_groups={self.small_groups!r}, seed={self.seed}, "
            f"num_replicas={self.num_replicas}, rank={self.rank})"
        )

    # ------------------------------------------------------------------ sampler protocol

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that the next iteration forms batches for (call it at the start of every epoch)."""
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer; got {epoch!r}.")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Number of batches (steps) this rank yields per epoch: one per global batch, the same on every rank."""
        return self._num_batches_total

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._global_batches(self.epoch):
            yield self._rank_part(batch).tolist()

    def _rank_part(self, batch: np.ndarray) -> np.ndarray:
        """This rank's part of a global batch (see "Distributed training" in the class docstring)."""
        replicas, rank = self.num_replicas, self.rank
        if replicas == 1:
            return batch
        if self.mode == "balanced":  # full batches, group after group: a strided part is close to balanced
            return batch[rank::replicas]
        unit = self.images_per_group or 1  # split at block boundaries in "pk" mode
        q, r = divmod(len(batch) // unit, replicas)
        start = rank * q + min(rank, r)
        return batch[start * unit : (start + q + (rank < r)) * unit]

    # ------------------------------------------------------------------ one epoch, all ranks

    def _global_batches(self, epoch: int) -> list[np.ndarray]:
        """All global batches of an epoch, in step order; a short one holds at least ``num_replicas`` units."""
        rng = np.random.default_rng([self.seed, _TAG_EPOCH, epoch])
        if self.mode == "random":
            return self._cut(rng.permutation(self.num_samples))
        if self.mode == "neighbourhood":
            return self._cut(self._neighbourhood_order(rng))
        if self.mode == "balanced":
            return list(self._balanced_order(epoch).reshape(self._num_batches_total, self.global_batch_size))
        if self.mode == "pk":
            return self._pk_batches(rng)
        return self._within_batches(rng)

    def _cut(self, segment: np.ndarray) -> list[np.ndarray]:
        """Cut ``segment`` into global batches; a last, short one (kept unless ``drop_last``) that has fewer indices
        than ranks is completed cyclically from the start of ``segment``."""
        n, size, replicas = len(segment), self.global_batch_size, self.num_replicas
        n_full = n // size
        batches = [segment[i * size : (i + 1) * size] for i in range(n_full)]
        rest = n - n_full * size
        if rest and not self.drop_last:
            tail = segment[n_full * size :]
            if rest < replicas:
                tail = np.concatenate([tail, segment[np.arange(replicas - rest) % n]])
            batches.append(tail)
        return batches

    def _within_batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        parts = [rng.permutation(members) for members in self._segment_members]  # one pure segment per group
        if self._pool_members:  # small groups, one after another in random group order
            pool_order = rng.permutation(len(self._pool_members))
            parts.append(np.concatenate([rng.permutation(self._pool_members[g]) for g in pool_order]))
        batches = [batch for segment in parts for batch in self._cut(segment)]
        return [batches[b] for b in rng.permutation(len(batches))]  # interleave the groups over the epoch

    def _balanced_order(self, epoch: int) -> np.ndarray:
        """Indices of all global batches of the epoch, batch after batch, each ``global_batch_size`` long and sorted by
        group."""
        members = self._balanced_members
        n_groups, bs, n_batches = len(members), self.global_batch_size, self._num_batches_total
        base, extra = divmod(bs, n_groups)
        slot_rank = np.empty(n_groups, dtype=np.int64)
        slot_rank[self._slot_order] = np.arange(n_groups)
        first_slot = epoch * n_batches * extra  # round-robin slots used by all earlier epochs
        slots = np.arange(first_slot, first_slot + n_batches * extra)
        slot_group = self._slot_order[slots % n_groups]
        slot_batch = slots // extra - epoch * n_batches if extra else slots
        draws, batch_ids = [], []
        for g in range(n_groups):
            earlier = first_slot // n_groups + int(slot_rank[g] < first_slot % n_groups)
            start = epoch * n_batches * base + earlier
            extra_batches = slot_batch[slot_group == g]
            ids = np.sort(np.concatenate([np.repeat(np.arange(n_batches), base), extra_batches]))
            draws.append(self._group_stream(g, members[g], start, len(ids), epoch))
            batch_ids.append(ids)
        draws_all, ids_all = np.concatenate(draws), np.concatenate(batch_ids)
        return draws_all[np.argsort(ids_all, kind="stable")]

    def _group_stream(self, g: int, members: np.ndarray, start: int, count: int, epoch: int) -> np.ndarray:
        """Positions ``[start, start + count)`` of group ``g``'s endless stream of permutations of its members.

        Cycle ``k`` of the stream is a permutation seeded by ``(seed, g, k)``, so epochs that share a cycle agree on it.
        Cycles lying wholly inside this epoch are drawn in one vectorised call from an epoch seed instead.
        """
        if count == 0:
            return np.empty(0, dtype=np.int64)
        n = len(members)
        k0, k1 = start // n, (start + count - 1) // n
        pieces = [members[np.random.default_rng([self.seed, _TAG_GROUP_CYCLE, g, k0]).permutation(n)]]
        if k1 - k0 > 1:
            rng = np.random.default_rng([self.seed, _TAG_GROUP_INTERIOR, epoch, g])
            pieces.append(rng.permuted(np.tile(members, (k1 - k0 - 1, 1)), axis=1).ravel())
        if k1 > k0:
            pieces.append(members[np.random.default_rng([self.seed, _TAG_GROUP_CYCLE, g, k1]).permutation(n)])
        stream = np.concatenate(pieces)
        offset = start - k0 * n
        return stream[offset : offset + count]

    def _neighbourhood_order(self, rng: np.random.Generator) -> np.ndarray:
        """All indices, neighbourhood after neighbourhood (random neighbourhood order), leftovers last."""
        prior = self._prior
        n, size = self.num_samples, self.n_neighbours + 1  # type: ignore[operator]
        n_cliques = n // size
        perm = rng.permutation(n)  # random tie-breaking, and random leftovers
        leftover, active = perm[: n - n_cliques * size], perm[n - n_cliques * size :]
        if n_cliques == 0:
            return leftover
        points = prior[active]  # type: ignore[index]
        if points.shape[1] > 1:
            points = points @ _random_rotation(points.shape[1], rng)
        leaf_order = _balanced_kd_order(points, size, n_cliques, rng)
        cliques = active[leaf_order].reshape(n_cliques, size)[rng.permutation(n_cliques)]
        return np.concatenate([cliques.ravel(), leftover])


    def _pk_batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        """Global batches of whole patient blocks: blocks of one unit go to different batches where they can."""
        k, per_batch, n_batches = self.images_per_group, self.global_batch_size // self.images_per_group, len(self)
        sizes, n_blocks = self._pk_unit_sizes, self._pk_unit_blocks
        n_units = len(sizes)
        # Units in random order; rows of a unit shuffled, the pool laid out patient after patient.
        unit_rank = rng.permutation(n_units)
        patient_rank = rng.permutation(len(self.group_labels))
        within = rng.random(len(self._pk_rows))
        if self._pk_time_rank is not None:  # consecutive in block_order, from a random cyclic offset per unit
            offset = rng.integers(0, sizes)[self._pk_unit_of_row]
            timed = self._pk_unit_of_row != self._pk_pool_unit
            within = np.where(timed, (self._pk_time_rank - offset) % sizes[self._pk_unit_of_row], within)
        order = np.lexsort((within, patient_rank[self._pk_patient_of_row], unit_rank[self._pk_unit_of_row]))
        rows = self._pk_rows[order]
        units = np.argsort(unit_rank)  # the unit at each list position
        size_o, blocks_o = sizes[units], n_blocks[units]
        first_row = np.cumsum(size_o) - size_o
        # Slot j of a unit's blocks reads its row j mod n: the last block wraps to the unit's first rows.
        slot_unit = np.repeat(np.arange(n_units), blocks_o * k)
        slot_j = np.arange(len(slot_unit)) - np.repeat(np.cumsum(blocks_o * k) - blocks_o * k, blocks_o * k)
        blocks = rows[first_row[slot_unit] + slot_j % size_o[slot_unit]].reshape(-1, k)
        block_unit = np.repeat(units, blocks_o)
        # Lay the blocks out column after column over a (batches, per_batch) grid, so that consecutive blocks (those
        # of one unit) fall in consecutive, hence different, batches. Without drop_last the last batch is the short
        # one: columns past its length skip it.
        total = len(blocks)
        short = 0 if self.drop_last else total - (n_batches - 1) * per_batch  # blocks in the last batch
        short = 0 if short == per_batch else short
        lengths = np.full(per_batch, n_batches)
        if short:
            lengths[short:] -= 1
        used = int(lengths.sum())
        col = np.repeat(np.arange(per_batch), lengths)
        row = np.arange(used) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        grid = np.full((n_batches, per_batch), -1, dtype=np.int64)
        grid[row, col] = np.arange(used)
        n_full = n_batches - (short > 0)
        full = rng.permuted(grid[:n_full][rng.permutation(n_full)], axis=1)
        batches = [blocks[ids].ravel() for ids in full]
        if short:
            ids = grid[-1, :short][rng.permutation(short)]
            if short < self.num_replicas:  # complete it with blocks of other units, so every rank gets one
                source = full[0] if n_full else ids
                other = source[~np.isin(block_unit[source], block_unit[ids])]
                ids = np.concatenate([ids, np.resize(np.concatenate([other, source]), self.num_replicas - short)])
            batches.append(blocks[ids].ravel())
        return batches


# ---------------------------------------------------------------------- module helpers


def _encode_groups(groups: Any) -> tuple[np.ndarray | None, list[Any]]:
    """Integer codes (N,) and the label of each code; missing labels form a group of their own."""
    if groups is None:
        return None, []
    if isinstance(groups, (str, bytes)):
        raise ValueError("groups must be a length-N sequence of labels, not a single string.")
    if hasattr(groups, "detach"):  # a torch tensor of codes: compare values, not tensor objects
        groups = groups.detach().cpu().numpy()
    values = np.asarray(groups.to_numpy(dtype=object) if isinstance(groups, pd.Series) else groups, dtype=object)
    if values.ndim != 1:
        raise ValueError(f"groups must be one-dimensional (N,); got shape {values.shape}.")
    try:
        codes, labels = pd.factorize(values, sort=True, use_na_sentinel=False)
    except TypeError:  # labels of mixed, unorderable types
        codes, labels = pd.factorize(values, sort=False, use_na_sentinel=False)
    return codes.astype(np.int64), list(labels)


def _missing_apart(codes: np.ndarray, labels: list[Any]) -> tuple[np.ndarray, list[Any]]:
    """Give every row with a missing label (None/NaN) a code of its own (unknown patients are taken as distinct)."""
    missing = [c for c, label in enumerate(labels) if pd.api.types.is_scalar(label) and pd.isna(label)]
    if not missing:
        return codes, labels
    rows = np.flatnonzero(np.isin(codes, missing))
    keep = np.setdiff1d(np.arange(len(labels)), missing)
    recode = np.full(len(labels), -1, dtype=np.int64)
    recode[keep] = np.arange(len(keep))
    out = recode[codes]
    out[rows] = len(keep) + np.arange(len(rows))
    return out, [labels[c] for c in keep] + [labels[codes[r]] for r in rows]


def _standardise_features(features: Any, reduce: bool = True) -> np.ndarray:
    """Column-wise standardised features with NaN set to 0 (the column mean), at most 8 principal components.

    With ``reduce=False`` only the checks run and the (N, P) float array comes back as it is.
    """
    try:
        raw = np.asarray(features.detach().cpu() if hasattr(features, "detach") else features, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"features must be a numeric (N, P) array; could not convert it to float: {e}") from e
    if raw.ndim != 2 or raw.shape[1] == 0:
        raise ValueError(f"features must have shape (N, P) with P >= 1; got shape {raw.shape}.")
    infinite = np.flatnonzero(np.isinf(raw).any(axis=0))
    if infinite.size:
        raise ValueError(f"features hold infinite values in column(s) {infinite.tolist()}; use NaN for missing values.")
    if not reduce:
        return raw
    observed = ~np.isnan(raw)
    count = observed.sum(axis=0)
    filled = np.where(observed, raw, 0.0)
    mean = filled.sum(axis=0) / np.maximum(count, 1)
    centred = np.where(observed, raw - mean, 0.0)
    std = np.sqrt((centred**2).sum(axis=0) / np.maximum(count, 1))
    prior = centred / np.where(std > 0, std, 1.0)
    if prior.shape[1] > _MAX_PARTITION_DIMS:
        _, eigvecs = np.linalg.eigh(prior.T @ prior)
        prior = prior @ eigvecs[:, ::-1][:, :_MAX_PARTITION_DIMS]
    return np.ascontiguousarray(prior, dtype=np.float32)


def _encode_feature_columns(manifest: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """(N, P) float array: numeric columns as they are, other columns as codes of their sorted values (NaN missing)."""
    out = np.empty((len(manifest), len(columns)), dtype=np.float64)
    for j, name in enumerate(columns):
        col = manifest[name]
        if pd.api.types.is_bool_dtype(col) or pd.api.types.is_numeric_dtype(col):
            out[:, j] = col.to_numpy(dtype=np.float64, na_value=np.nan)
            continue
        try:
            codes, _ = pd.factorize(col, sort=True)
        except TypeError:
            codes, _ = pd.factorize(col, sort=False)
        out[:, j] = np.where(codes < 0, np.nan, codes)
    return out


def _resolve_num_samples(num_samples: int | None, codes: np.ndarray | None, prior: np.ndarray | None) -> int:
    lengths = {}
    if num_samples is not None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer; got {num_samples!r}.")
        lengths["num_samples"] = int(num_samples)
    if codes is not None:
        lengths["groups"] = len(codes)
    if prior is not None:
        lengths["features"] = prior.shape[0]
    if not lengths:
        raise ValueError("give num_samples, groups or features, so that the sampler knows the dataset size N.")
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs disagree on the number of samples N: {lengths}.")
    n = next(iter(lengths.values()))
    if n < 1:
        raise ValueError(f"the sampler needs at least one sample; got N = 0 from {list(lengths)}.")
    return n


def _resolve_replicas(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    initialised = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    for name, value in (("num_replicas", num_replicas), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an integer; got {value!r}.")
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(
            f"need num_replicas >= 1 and 0 <= rank < num_replicas; got num_replicas={num_replicas}, rank={rank}."
        )
    return int(num_replicas), int(rank)


def _random_rotation(dim: int, rng: np.random.Generator) -> np.ndarray:
    """A (dim, dim) orthogonal matrix drawn uniformly (Haar) from ``rng``."""
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


def _balanced_kd_order(points: np.ndarray, size: int, n_cliques: int, rng: np.random.Generator) -> np.ndarray:
    """Order of ``points`` (n_cliques * size, q) such that consecutive blocks of ``size`` are k-d tree leaves.

    Every node is split at a multiple of ``size`` along the longest side of its bounding box, into halves of
    ``floor`` / ``ceil`` of its leaf count (which side gets the extra leaf is random), until every node is one leaf.
    Boxes are tracked per node (the parent's box, cut at the values on either side of the split), so a level costs
    one stable sort of (node id + position along the node's axis scaled to [0, 0.5]) and no pass over all columns.
    The initial order of ``points`` breaks ties.
    """
    n, q = points.shape
    lower, upper = points.min(axis=0), points.max(axis=0)
    extent = (upper - lower).astype(np.float64)
    scaled = (points - lower) * np.where(extent > 0, 0.5 / np.where(extent > 0, extent, 1.0), 0.0)  # in [0, 0.5]
    order = np.arange(n)
    node_start = np.zeros(1, dtype=np.int64)
    node_leaves = np.array([n_cliques], dtype=np.int64)
    box_low, box_high = lower[None, :].astype(np.float64), upper[None, :].astype(np.float64)
    while node_leaves.max() > 1:
        n_nodes = len(node_start)
        split = node_leaves > 1
        axis = (box_high - box_low).argmax(axis=1)
        node_of_row = np.repeat(np.arange(n_nodes), node_leaves * size)
        key = node_of_row + scaled[order, axis[node_of_row]]
        order = order[np.argsort(key, kind="stable")]
        left = node_leaves // 2 + ((node_leaves % 2 == 1) & (rng.random(n_nodes) < 0.5))
        cut = node_start + left * size  # first row of the right child
        rows = np.flatnonzero(split)
        left_high, right_low = box_high.copy(), box_low.copy()
        left_high[rows, axis[rows]] = points[order[cut[rows] - 1], axis[rows]]
        right_low[rows, axis[rows]] = points[order[cut[rows]], axis[rows]]
        # Children replace each split node in place: (left, right); unsplit nodes stay as they are.
        keep = np.stack([np.ones(n_nodes, dtype=bool), split], axis=1)
        node_start = np.stack([node_start, cut], axis=1)[keep]
        node_leaves = np.stack([np.where(split, left, node_leaves), node_leaves - left], axis=1)[keep]
        box_low = np.stack([box_low, right_low], axis=1)[keep]
        box_high = np.stack([np.where(split[:, None], left_high, box_high), box_high], axis=1)[keep]
    return order




def _record_values(records: Sequence[Any], key: str, what: str, advice: str) -> list[Any]:
    """``record[key]`` of every record; a ValueError naming the first record without it and that record's keys."""
    missing = next((i for i, r in enumerate(records) if key not in r), None)
    if missing is not None:
        present = sorted(records[missing]) if isinstance(records[missing], Mapping) else []
        raise ValueError(f"{what} {key!r} is not in the manifest (record {missing} has keys {present}); {advice}.")
    return [r[key] for r in records]


def attribute_batch_sampler(
    dataset: Any,
    batch_size: int,
    mode: str = "within",
    attribute: str | None = "site",
    prior_encoder: Any = None,
    drop_last: bool = True,
    seed: int = 0,
    num_replicas: int | None = None,
    rank: int | None = None,
    images_per_group: int | None = None,
    order_attribute: str | None = None,
    **kwargs: Any,
) -> Any:
    """An :class:`~monai_du.data.samplers.AttributeBatchSampler` for a dataset of manifest records.

    Groups (``"within"``, ``"balanced"``, and the patient ids of ``"pk"``) are read from the records the dataset
    actually holds (``dataset.data``), so rows skipped for unreadable images cannot shift the sampler's indices.
    ``"neighbourhood"`` batches use the records' prior vectors (``prior_encoder.transform_row``); ``"random"`` needs
    neither. The sampler's ``global_batch_size`` (``batch_size`` x ranks) is the batch size the loss sees.

    Args:
        dataset: a MONAI dataset whose ``data`` is the list of record dicts (:func:`manifest_to_dataset`).
        batch_size: samples per batch on this rank.
        mode: "within", "balanced", "neighbourhood", "random" or "pk".
        attribute: record key of the group (e.g. "site") for "within" / "balanced", of the patient id (e.g.
            "patient_id") for "pk".
        prior_encoder: fitted :class:`~monai_du.prior_encoder.PriorEncoder`, for "neighbourhood".
        drop_last: drop short batches (keeps every rank's batch the same size).
        seed: sampler seed (the same on every rank).
        num_replicas: number of ranks (default: the process group's world size, else 1).
        rank: this rank (default: the process group's rank, else 0).
        images_per_group: K images per patient block, for "pk" (ignored by the other modes, so that a bundle can
            always pass it).
        order_attribute: record key of a number (e.g. "follow_up", "study_offset_days") whose order the K images of
            a "pk" block follow (``block_order``); None (and every other mode) ignores it.
        kwargs: further arguments of ``AttributeBatchSampler`` (``small_groups``, ``n_neighbours``).
    """
    records = getattr(dataset, "data", None)
    if records is None:
        raise ValueError(f"attribute_batch_sampler: dataset {type(dataset).__name__} has no .data list of records.")
    common = dict(batch_size=int(batch_size), mode=mode, drop_last=drop_last, seed=int(seed),
                  num_replicas=num_replicas, rank=rank, **kwargs)
    if mode in ("within", "balanced", "pk"):
        if not attribute:
            example = "'patient_id'" if mode == "pk" else "'site'"
            raise ValueError(f"sampler mode {mode!r} needs an attribute (a manifest column such as {example}).")
        groups = _record_values(records, attribute, "sampler attribute",
                                "override sampler_attribute or use sampler_mode 'random'")
        if mode == "pk":
            common["images_per_group"] = images_per_group
            if order_attribute:
                common["block_order"] = _record_values(records, order_attribute, "sampler order attribute",
                                                       "override sampler_order or set it to null")
        return AttributeBatchSampler(groups=groups, **common)
    if mode in ("neighbourhood", "neighborhood"):
        if prior_encoder is None:
            raise ValueError("sampler mode 'neighbourhood' needs prior_encoder= (the fitted PriorEncoder).")
        features = np.stack([prior_encoder.transform_row(r, allow_missing_keys=True) for r in records])
        return AttributeBatchSampler(features=features, **common)
    return AttributeBatchSampler(num_samples=len(records), **common)


def draw_batches(sampler: Any, n_batches: int) -> list[list[int]]:
    """The first ``n_batches`` batches of a batch sampler, over as many epochs as it takes (``set_epoch`` per epoch)."""
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < n_batches:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        before = len(batches)
        for batch in sampler:
            batches.append([int(i) for i in batch])
            if len(batches) == n_batches:
                break
        if len(batches) == before:
            raise ValueError("the batch sampler yields no batch: fewer rows than one batch.")
        epoch += 1
    return batches
