"""Ignite handlers for contrastive pretraining with MONAI engines.

- :class:`SamplerEpochHandler`: calls ``set_epoch`` on a batch sampler (MONAI only does it for a
  ``DistributedSampler``) and reseeds the augmentations from ``(seed, epoch, rank)``, so that epoch ``e`` draws the
  same batches and views whether or not the run was resumed.
- :class:`ContrastiveMetricsHandler`: reads ``loss_function.last_alignment``, ``last_uniformity`` and
  ``last_kernel_stats`` after every iteration, records them (and the local and global batch size) in
  ``engine.state.contrastive``, writes their epoch means into ``engine.state.metrics`` (where MONAI's ``StatsHandler``
  and ``TensorBoardStatsHandler`` find them) and, optionally, every iteration to TensorBoard.
- :class:`AtomicCheckpointSaver`: MONAI's ``CheckpointSaver`` whose files are written to a temporary file, flushed
  to disk and renamed (MONAI's own saver sets ignite's ``atomic=False``); files left by an earlier run count towards
  ``n_saved``.
- :class:`LatestCheckpointLoader`: at ``STARTED``, loads the newest ``checkpoint_epoch=N.pt`` of a folder with MONAI's
  ``CheckpointLoader`` (network, optimizer, scheduler and trainer state), or starts fresh when there is none.
- :class:`ViewPicturesSaver`: after the first iteration, saves mid-slice pictures of a few augmented views
  (:mod:`monai_du.view_pictures`), so a person can see what the model sees.
- :class:`PretrainedEncoderExporter`: at ``COMPLETED``, writes ``encoder.pt`` (the backbone's state dict alone),
  ``model.pt`` (the whole network), ``prior_encoder.json``, ``kernel.json`` and ``encoder_info.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.data.utils import set_rnd
from monai.handlers import CheckpointLoader, CheckpointSaver
from torch.utils.data import DistributedSampler

from monai_du.io import atomic_write, remove_stale_temporaries, write_text_atomic
from monai_du.view_pictures import save_view_pictures

__all__ = [
    "SamplerEpochHandler",
    "ContrastiveMetricsHandler",
    "AtomicCheckpointSaver",
    "LatestCheckpointLoader",
    "PretrainedEncoderExporter",
    "ViewPicturesSaver",
    "latest_checkpoint",
    "atomic_torch_save",
]

logger = logging.getLogger(__name__)


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers."""
    while isinstance(network, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        network = network.module
    return network


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# --------------------------------------------------------------------------------------------------------------------
# epoch handler: sampler epoch and augmentation seeds
# --------------------------------------------------------------------------------------------------------------------


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A 31-bit seed derived from ``(seed, epoch, rank)`` (independent streams for different triples)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(rank)]).generate_state(1, dtype=np.uint32)[0] >> 1)


class SamplerEpochHandler:
    """At every ``EPOCH_STARTED``: ``sampler.set_epoch(epoch - 1)``, and reseed the augmentations for this epoch.

    MONAI's workflows call ``set_epoch`` on a ``DistributedSampler`` only; a batch sampler such as
    :class:`~monai_du.data.samplers.AttributeBatchSampler` would repeat the batches of its first epoch every epoch.
    The sampler gets the zero-based epoch index (``engine.state.epoch - 1``).

    With ``seed`` set, the random transforms are reseeded from ``(seed, epoch, rank)`` at the start of every epoch, so
    an epoch's views do not depend on what ran before it and a resumed run draws the same views as an uninterrupted one:

    - ``num_workers == 0``: the dataset's transforms are reseeded directly (``monai.data.utils.set_rnd``);
    - ``num_workers > 0``: the data loader's ``generator`` is reseeded; the workers derive their transform seeds from
      it (``monai.data.DataLoader``'s ``worker_init_fn``). Give the loader ``generator=torch.Generator()``; without
      one the workers' seeds come from the global torch RNG and a warning says that resumed runs differ.

    Args:
        data_loader: the training data loader; its ``batch_sampler`` (or ``sampler``) is used when ``sampler`` is None.
        sampler: the object whose ``set_epoch`` to call; found on ``data_loader`` when None.
        seed: base seed of the per-epoch augmentation seeds; None leaves the augmentation RNGs alone.
    """

    def __init__(self, data_loader: Any = None, sampler: Any = None, seed: int | None = None) -> None:
        if data_loader is None and sampler is None:
            raise ValueError("SamplerEpochHandler: give data_loader= or sampler=.")
        if sampler is None:
            for candidate in (getattr(data_loader, "batch_sampler", None), getattr(data_loader, "sampler", None)):
                if hasattr(candidate, "set_epoch") and not isinstance(candidate, DistributedSampler):
                    sampler = candidate  # MONAI already handles a DistributedSampler
                    break
        if sampler is not None and not callable(getattr(sampler, "set_epoch", None)):
            raise ValueError(f"SamplerEpochHandler: sampler {type(sampler).__name__} has no set_epoch(epoch) method.")
        if seed is not None and data_loader is None:
            raise ValueError("SamplerEpochHandler: reseeding augmentations (seed=) needs data_loader=.")
        self.data_loader = data_loader
        self.sampler = sampler
        self.seed = None if seed is None else int(seed)
        self._warned = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        epoch = int(engine.state.epoch) - 1
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        if self.seed is None:
            return
        seed = _epoch_seed(self.seed, epoch, _rank())
        if int(getattr(self.data_loader, "num_workers", 0)) == 0:
            set_rnd(self.data_loader.dataset, seed)
        elif getattr(self.data_loader, "generator", None) is not None:
            self.data_loader.generator.manual_seed(seed)
        elif not self._warned:
            self._warned = True
            warnings.warn(
                "SamplerEpochHandler: the data loader has worker processes but no generator=, so the augmentation "
                "seeds come from the global torch RNG and a resumed run draws different views; pass "
                "generator=torch.Generator() to the DataLoader.",
                stacklevel=2,
            )


# --------------------------------------------------------------------------------------------------------------------
# metrics handler
# --------------------------------------------------------------------------------------------------------------------


class ContrastiveMetricsHandler:
    """Record the loss's alignment, uniformity and batch-kernel statistics after every iteration.

    After each iteration ``engine.state.contrastive`` holds the latest values:

    - ``alignment`` (``-mean ||mu_i||^2``, -1 when all views agree) and ``uniformity`` (the loss value), from
      ``loss_function.last_alignment`` / ``last_uniformity``;
    - the numeric entries of ``loss_function.last_kernel_stats`` (``kernel_mean_offdiag``, ``kernel_effective_rank``);
    - ``batch_size`` (this rank's) and ``global_batch_size`` (summed over the ranks of a process group; this is the
      batch a gathering loss sees).

    At ``EPOCH_COMPLETED`` their means over the epoch go into ``engine.state.metrics`` (keys prefixed
    ``metric_prefix``), where MONAI's ``StatsHandler`` prints them and ``TensorBoardStatsHandler`` plots them per
    epoch. With ``log_dir`` or ``summary_writer`` the values are also written every iteration to TensorBoard as
    ``{tag_prefix}{name}``.

    Inside a process group every rank must attach this handler (the global batch size is an all-reduce); give the TB
    writer to rank 0 only (e.g. ``log_dir: "$@tb_dir if @main_process else None"``).

    Args:
        loss_function: the loss; default ``engine.loss_function``.
        log_dir: TensorBoard folder of a ``SummaryWriter`` created at attach time.
        summary_writer: an existing ``SummaryWriter`` (takes precedence over ``log_dir``).
        tag_prefix: TensorBoard tag prefix of the per-iteration values.
        metric_prefix: prefix of the epoch means in ``engine.state.metrics``.
        iteration_log: write the per-iteration values to TensorBoard (every ``iteration_log`` iterations if an int).
    """

    def __init__(
        self,
        loss_function: Any = None,
        log_dir: str | os.PathLike | None = None,
        summary_writer: Any = None,
        tag_prefix: str = "train/",
        metric_prefix: str = "",
        iteration_log: bool | int = True,
    ) -> None:
        self.loss_function = loss_function
        self.log_dir = log_dir
        self.writer = summary_writer
        self.tag_prefix = tag_prefix
        self.metric_prefix = metric_prefix
        every = int(iteration_log)
        if every < 0:
            raise ValueError(f"iteration_log must be a bool or a positive int, got {iteration_log!r}.")
        self.every = every
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def attach(self, engine: Engine) -> None:
        if self.writer is None and self.log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=os.fspath(self.log_dir))
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        if self.writer is not None:
            engine.add_event_handler(Events.COMPLETED, self.close)

    def epoch_started(self, engine: Engine) -> None:
        self._sums, self._counts = {}, {}

    def _values(self, engine: Engine) -> dict[str, float]:
        loss = self.loss_function if self.loss_function is not None else getattr(engine, "loss_function", None)
        values: dict[str, float] = {}
        for name in ("alignment", "uniformity"):
            value = getattr(loss, f"last_{name}", None)
            if isinstance(value, (int, float)):
                values[name] = float(value)
        stats = getattr(loss, "last_kernel_stats", None) or {}
        for key, value in stats.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values[key] = float(value)
        output = engine.state.output
        pred = output.get("pred") if isinstance(output, Mapping) else None
        if isinstance(pred, torch.Tensor) and pred.ndim >= 1:
            local = pred.shape[0]
            values["batch_size"] = float(local)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                size = torch.tensor([local], dtype=torch.long, device=pred.device)
                dist.all_reduce(size)
                values["global_batch_size"] = float(size.item())
            else:
                values["global_batch_size"] = float(local)
        return values

    def iteration_completed(self, engine: Engine) -> None:
        values = self._values(engine)
        engine.state.contrastive = values
        for key, value in values.items():
            if math.isfinite(value):
                self._sums[key] = self._sums.get(key, 0.0) + value
                self._counts[key] = self._counts.get(key, 0) + 1
        if self.writer is not None and self.every and engine.state.iteration % self.every == 0:
            for key, value in values.items():
                self.writer.add_scalar(f"{self.tag_prefix}{key}", value, engine.state.iteration)

    def epoch_completed(self, engine: Engine) -> None:
        for key, total in self._sums.items():
            engine.state.metrics[f"{self.metric_prefix}{key}"] = total / self._counts[key]

    def close(self, engine: Engine | None = None) -> None:
        if self.writer is not None:
            self.writer.flush()


# --------------------------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------------------------


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the destination folder, flushed to disk, then renamed over ``path``.

    A reader (or a run killed mid-write) sees either the previous file or the complete new one, never a truncated
    file. The file gets the permissions of a normal new file (``0o666`` minus the umask).
    """
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


class _AtomicDiskSaver(DiskSaver):
    """ignite's ``DiskSaver`` writing through :func:`atomic_torch_save`, with MONAI's optional fixed filename."""

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, atomic=True, create_dir=True, require_empty=False)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        super().__call__(checkpoint, self.filename or filename, metadata)

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        atomic_torch_save(checkpoint, path)

    def remove(self, filename: str) -> None:
        if self.save_on_rank == _rank():
            (self.dirname / (self.filename or filename)).unlink(missing_ok=True)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's :class:`~monai.handlers.CheckpointSaver` with atomic writes.

    Every file (interval, final and key-metric checkpoints) is written to a temporary file in ``save_dir``, flushed to
    disk and renamed (:func:`atomic_torch_save`), so a run killed while saving never leaves a truncated checkpoint
    behind for :class:`LatestCheckpointLoader` to pick up. (MONAI's saver passes ``atomic=False`` to ignite.)

    With ``engine_key`` (default ``"trainer"``) the engine it is attached to is saved too, under that key, so that its
    epoch and iteration counters are restored on resume; a config cannot name the trainer inside the trainer's own
    handler list (a circular reference), so the handler adds it at attach time.

    Interval checkpoints already in ``save_dir`` from an earlier run (``{file_prefix}_checkpoint_epoch=N.pt``, or
    ``checkpoint_epoch=N.pt`` without prefix) count towards ``n_saved``, so a resumed run keeps at most ``n_saved`` of
    them in all. Takes the arguments of :class:`~monai.handlers.CheckpointSaver`; the defaults here save every epoch and
    keep the last two.

    In a process group, attach it on rank 0 only, and call ``ignite.distributed.sync()`` on every rank first (as
    ``multi_gpu_train.yaml`` does): ignite's first distributed query, made when the saver is built, is a collective.

    Example (a resumable checkpoint every epoch, the last two kept; the trainer's state is added at attach time)::

        AtomicCheckpointSaver(save_dir="models", save_dict={"model": net, "optimizer": opt, "lr_scheduler": sched},
                              save_interval=1, n_saved=2).attach(trainer)
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        name: str | None = None,
        file_prefix: str = "",
        save_final: bool = False,
        final_filename: str | None = None,
        save_key_metric: bool = False,
        key_metric_name: str | None = None,
        key_metric_n_saved: int = 1,
        key_metric_filename: str | None = None,
        key_metric_save_state: bool = False,
        key_metric_greater_or_equal: bool = False,
        key_metric_negative_sign: bool = False,
        epoch_level: bool = True,
        save_interval: int = 1,
        n_saved: int | None = 2,
        engine_key: str | None = "trainer",
    ) -> None:
        self.engine_key = engine_key
        if engine_key is not None and engine_key in save_dict:
            raise ValueError(f"AtomicCheckpointSaver: save_dict already has the key {engine_key!r} of engine_key.")
        super().__init__(
            save_dir=save_dir,
            save_dict=save_dict,
            name=name,
            file_prefix=file_prefix,
            save_final=save_final,
            final_filename=final_filename,
            save_key_metric=save_key_metric,
            key_metric_name=key_metric_name,
            key_metric_n_saved=key_metric_n_saved,
            key_metric_filename=key_metric_filename,
            key_metric_save_state=key_metric_save_state,
            key_metric_greater_or_equal=key_metric_greater_or_equal,
            key_metric_negative_sign=key_metric_negative_sign,
            epoch_level=epoch_level,
            save_interval=save_interval,
            n_saved=n_saved,
        )
        if self._final_checkpoint is not None:
            self._final_checkpoint.save_handler = _AtomicDiskSaver(save_dir, final_filename)
        if self._key_metric_checkpoint is not None:
            self._key_metric_checkpoint.save_handler = _AtomicDiskSaver(save_dir, key_metric_filename)
        if self._interval_checkpoint is not None:
            self._interval_checkpoint.save_handler = _AtomicDiskSaver(save_dir)
            score_name = "epoch" if epoch_level else "iteration"
            name = "checkpoint" if len(save_dict) + (engine_key is not None) > 1 else next(iter(save_dict))
            prefix = f"{file_prefix}_" if file_prefix else ""
            for priority, path in _numbered_files(save_dir, f"{prefix}{name}_{score_name}="):
                self._interval_checkpoint._saved.append(type(self._interval_checkpoint).Item(priority, path.name))

    def attach(self, engine: Engine) -> None:
        if self.engine_key is not None:
            self.save_dict[self.engine_key] = engine  # the Checkpoint objects share this dict
        for path in remove_stale_temporaries(self.save_dir):  # a run killed mid-save left a partial file
            logger.warning(f"removed the partial checkpoint {path} of an interrupted save")
        super().attach(engine)


def _numbered_files(folder: str | os.PathLike, stem: str, suffix: str = ".pt") -> list[tuple[int, Path]]:
    """``(N, path)`` for the files ``{stem}N{suffix}`` in ``folder``, sorted by N."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = re.compile(re.escape(stem) + r"(\d+)" + re.escape(suffix) + "$")
    found = []
    for path in folder.iterdir():
        match = pattern.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(
    checkpoint_dir: str | os.PathLike, file_prefix: str = "", name: str = "checkpoint", score_name: str = "epoch"
) -> Path | None:
    """The interval checkpoint with the highest number in ``checkpoint_dir`` (as named by ``CheckpointSaver``:
    ``[{file_prefix}_]{name}_{score_name}=N.pt``), or None when there is none."""
    prefix = f"{file_prefix}_" if file_prefix else ""
    found = _numbered_files(checkpoint_dir, f"{prefix}{name}_{score_name}=")
    return found[-1][1] if found else None


class LatestCheckpointLoader:
    """Resume from the newest interval checkpoint of a folder, or start fresh when there is none.

    At ``STARTED`` it looks for :func:`latest_checkpoint` in ``checkpoint_dir`` and hands it to MONAI's
    :class:`~monai.handlers.CheckpointLoader`, which restores every object of ``load_dict`` (network, optimizer,
    lr scheduler and the trainer's epoch and iteration counters), so ignite carries on with the next epoch. A checkpoint
    whose epoch is larger than the trainer's ``max_epochs`` is an error (from MONAI's loader).

    Args:
        checkpoint_dir: folder of the checkpoints (the ``save_dir`` of the saver).
        load_dict: the saver's ``save_dict`` (same keys).
        file_prefix: the saver's ``file_prefix``.
        map_location: ``torch.load`` map location (e.g. this rank's device).
        strict: strict state-dict loading.
        name: logger name; default the engine's logger.
        engine_key: key under which the checkpoint holds the engine's state (see :class:`AtomicCheckpointSaver`);
            the engine this handler is attached to is restored from it. None restores no engine state.
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike,
        load_dict: dict,
        file_prefix: str = "",
        map_location: Any = None,
        strict: bool = True,
        name: str | None = None,
        engine_key: str | None = "trainer",
    ) -> None:
        if not load_dict:
            raise ValueError("LatestCheckpointLoader: load_dict must name at least one object to restore.")
        if engine_key is not None and engine_key in load_dict:
            raise ValueError(f"LatestCheckpointLoader: load_dict already has the key {engine_key!r} of engine_key.")
        self.engine_key = engine_key
        self.checkpoint_dir = Path(checkpoint_dir)
        self.load_dict = load_dict
        self.file_prefix = file_prefix
        self.map_location = map_location
        self.strict = strict
        self._name = name
        self.logger = logging.getLogger(name)
        self.loaded_path: Path | None = None

    def attach(self, engine: Engine) -> None:
        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        load_dict = dict(self.load_dict)
        if self.engine_key is not None:
            load_dict[self.engine_key] = engine
        name = "checkpoint" if len(load_dict) > 1 else next(iter(load_dict))
        path = latest_checkpoint(self.checkpoint_dir, self.file_prefix, name=name)
        if path is None:
            self.logger.info(f"No checkpoint in {self.checkpoint_dir}: starting from scratch.")
            return
        loader = CheckpointLoader(
            load_path=str(path), load_dict=load_dict, map_location=self.map_location, strict=self.strict
        )
        loader.logger = self.logger
        loader(engine)
        self.loaded_path = path
        self.logger.info(
            f"Resumed from {path} at epoch {engine.state.epoch}, iteration {engine.state.iteration} "
            f"(max_epochs {engine.state.max_epochs})."
        )


# --------------------------------------------------------------------------------------------------------------------
# export of the pretrained encoder
# --------------------------------------------------------------------------------------------------------------------


class PretrainedEncoderExporter:
    """At the end of training, write what a fine-tuning run needs into ``output_dir`` (atomically, rank 0 only).

    Files:

    - ``encoder.pt``: ``network.encoder.state_dict()``, the backbone alone (keys without prefix, e.g.
      ``conv1.weight``, ``layer1.0.bn1.running_mean``); load with ``encoder.load_state_dict(torch.load(...))`` or
      :func:`monai_du.networks.encoder_state_dict`.
    - ``model.pt``: the whole network's state dict (keys ``encoder.*`` and ``projector.*``); loads into a
      :class:`~monai_du.networks.ProbeClassifier` with ``CheckpointLoader(..., strict=False)``.
    - ``prior_encoder.json`` (:meth:`PriorEncoder.save`) and ``kernel.json`` (``kernel.to_dict()``, fitted values
      included, :func:`monai_du.kernels.kernel_from_dict` rebuilds it), when given.
    - ``encoder_info.json``: feature size, spatial dims, input channels, projection size, epoch and iteration, plus
      ``info``.

    Args:
        output_dir: destination folder (the bundle's ``models/``).
        network: the trained :class:`~monai_du.networks.ContrastiveEncoder` (DDP wrappers are removed).
        prior_encoder: the fitted :class:`~monai_du.prior_encoder.PriorEncoder`, or None.
        kernel: the fitted prior kernel, or None.
        info: extra JSON-serialisable entries for ``encoder_info.json`` (e.g. the backbone name and arguments).
        event: ignite event to export on (default ``COMPLETED``).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        network: torch.nn.Module,
        prior_encoder: Any = None,
        kernel: Any = None,
        info: Mapping[str, Any] | None = None,
        encoder_filename: str = "encoder.pt",
        model_filename: str = "model.pt",
        event: Any = Events.COMPLETED,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.network = network
        self.prior_encoder = prior_encoder
        self.kernel = kernel
        self.info = dict(info or {})
        self.encoder_filename = encoder_filename
        self.model_filename = model_filename
        self.event = event
        if not hasattr(_unwrap(network), "encoder"):
            raise ValueError(
                f"PretrainedEncoderExporter: network {type(_unwrap(network)).__name__} has no .encoder attribute."
            )

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(self.event, self)

    def __call__(self, engine: Engine | None = None) -> dict[str, Path]:
        if _rank() != 0:
            return {}
        net = _unwrap(self.network)
        written = {
            "encoder": atomic_torch_save(net.encoder.state_dict(), self.output_dir / self.encoder_filename),
            "model": atomic_torch_save(net.state_dict(), self.output_dir / self.model_filename),
        }
        if self.prior_encoder is not None:
            written["prior_encoder"] = self.prior_encoder.save(self.output_dir / "prior_encoder.json")
        if self.kernel is not None:
            text = json.dumps(self.kernel.to_dict(), indent=2, allow_nan=False) + "\n"
            written["kernel"] = write_text_atomic(self.output_dir / "kernel.json", text)
        info: dict[str, Any] = {
            "encoder_file": self.encoder_filename,
            "model_file": self.model_filename,
            "encoder_class": f"{type(net.encoder).__module__}.{type(net.encoder).__qualname__}",
            "encoder_key_prefix_in_model": "encoder.",
        }
        for attr in ("feature_dim", "spatial_dims", "in_channels", "projection_dim"):
            if hasattr(net, attr):
                info[attr] = getattr(net, attr)
        if engine is not None:
            info["epoch"], info["iteration"] = int(engine.state.epoch), int(engine.state.iteration)
        info.update(self.info)
        text = json.dumps(info, indent=2, default=str) + "\n"
        written["info"] = write_text_atomic(self.output_dir / "encoder_info.json", text)
        logging.getLogger(__name__).info(f"Saved the pretrained encoder to {written['encoder']}.")
        return written


class ViewPicturesSaver:
    """After the run's first iteration, save pictures of the augmented views of a few images of that batch.

    The views are the batch's ``image_key`` entry ``(B, V, C, *spatial)``: ``views_axial.png``, ``views_coronal.png``
    and ``views_sagittal.png`` (3D, middle slices) or ``views.png`` (2D) in ``output_dir``, one row per image and one
    column per view (:func:`monai_du.view_pictures.save_view_pictures`). A resumed run does not redraw them.

    Args:
        output_dir: folder of the pictures.
        image_key: batch key of the views.
        max_images: images shown.
    """

    def __init__(self, output_dir: str | os.PathLike, image_key: str = "image", max_images: int = 4) -> None:
        self.output_dir = Path(output_dir)
        self.image_key = image_key
        self.max_images = int(max_images)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.iteration != 1:  # a resumed run starts past its first iteration
            return
        batch = engine.state.batch
        views = batch.get(self.image_key) if isinstance(batch, Mapping) else None
        if views is None or len(getattr(views, "shape", ())) not in (5, 6):
            warnings.warn(f"ViewPicturesSaver: no (B, V, C, *spatial) views under {self.image_key!r}; no pictures.",
                          stacklevel=2)
            return
        written = save_view_pictures(views, self.output_dir, max_images=self.max_images)
        logger.info(f"Saved pictures of the augmented views: {', '.join(str(p) for p in written)}.")
