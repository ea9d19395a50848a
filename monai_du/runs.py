"""Runs of the pretrain bundle, one folder each: keyed by what shaped them, resumable, and logged to their folder.

:func:`run_bundle` runs ``configs/train.yaml`` plus method files in-process (``monai.bundle.ConfigWorkflow``) into a
``bundle_root``. It records everything that shaped the run (config and method files' content, every override, the
manifest's content hash, the package versions) in ``models/compare_started.json`` before it starts and
``models/compare_done.json`` when it ends (:class:`monai_du.io.DoneMarker`): a finished run with the same inputs is
reused, an interrupted one resumes from its last checkpoint (the bundle's ``resume``), and a folder that holds a run of
other inputs is refused with what changed. MONAI's log lines of a run go to its ``logs/run.log``; a callback can
report each epoch (loss, images/s, ETA). :func:`run_method` runs every stage of a method (a composite method's stages
in turn, :mod:`monai_du.bundles`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from monai_du.bundles import MethodSpec, stage_files
from monai_du.io import DoneMarker, file_digest, package_version
from monai_du.priors import encoder_prior_table, write_prior_table

__all__ = ["DONE_MARKER", "encoder_table", "run_bundle", "run_inputs", "run_method", "run_seconds", "stage_roots",
           "training_losses"]

_STARTED = "compare_started.json"
DONE_MARKER = "compare_done.json"


# ---------------------------------------------------------------------------------------------------------------------
# running the bundle
# ---------------------------------------------------------------------------------------------------------------------
def run_inputs(config_files: Sequence[Path], overrides: Mapping[str, Any], manifest_sha256: str) -> dict[str, Any]:
    """Everything that shapes a run: config contents, overrides, the manifest's content, versions."""
    return {
        "config_files": {f.name: f.read_text(encoding="utf-8") for f in config_files},
        "overrides": dict(sorted(overrides.items())),
        "manifest_sha256": manifest_sha256,
        "versions": {"monai_du": package_version(), "monai": monai.__version__, "torch": torch.__version__},
    }


def _changed(changes: list[str], old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> str:
    """The changed inputs in words (override ids by name)."""
    words = []
    for key in changes:
        if key == "overrides" and old is not None:
            before, after = old.get("overrides", {}), new.get("overrides", {})
            ids = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            words += [f"{k} ({before.get(k, 'unset')!r} -> {after.get(k, 'unset')!r})" for k in ids]
        else:
            words.append(key)
    return ", ".join(words)


def run_bundle(files: Sequence[Path], bundle_root: Path, overrides: Mapping[str, Any], bundle: Path,
               manifest_sha256: str | None = None, progress: Callable[[str], None] | None = None,
               config: str = "train.yaml") -> bool:
    """Run a bundle in-process (``monai.bundle.ConfigWorkflow``): ``configs/<config>`` plus ``files``.

    Args:
        files: the method file(s) after ``configs/<config>``.
        bundle_root: the run folder.
        overrides: bundle ids (data values).
        bundle: the bundle folder (the pretrain bundle, or a fine-tune bundle).
        manifest_sha256: the manifest's content hash (default: computed from ``overrides["manifest"]``).
        progress: called after each training epoch with a line (epoch, mean loss, images/s, ETA); MONAI's own log
            lines of the run go to ``bundle_root/logs/run.log``.
        config: the bundle's entry config (``train.yaml``; ``inference.yaml`` for a fine-tune bundle's predictions).

    Returns:
        False without running when ``bundle_root`` holds a finished run of the same inputs, else True.

    Raises:
        ValueError: when ``bundle_root`` holds a run (finished or not) of other inputs, naming what changed.
    """
    config_files = [bundle / "configs" / config, *files]
    digest = manifest_sha256 or file_digest(overrides["manifest"])
    inputs = run_inputs(config_files, overrides, digest)
    done = DoneMarker(bundle_root / "models" / DONE_MARKER, inputs)
    if done.is_done():
        return False
    started = DoneMarker(bundle_root / "models" / _STARTED, inputs)
    changes = started.changes() or done.changes()
    if changes:
        old = (started.recorded() or done.recorded() or {}).get("inputs")
        raise ValueError(
            f"{bundle_root} holds a run of other inputs (changed: {_changed(changes, old, started.inputs)}). Use a new "
            "--out, or delete that folder to start the run afresh."
        )
    started.write()  # an interrupted run of these inputs resumes from its checkpoint; other inputs are refused
    clock = time.perf_counter()
    with _logs_to_file(bundle_root / "logs" / "run.log") as capture:
        workflow = ConfigWorkflow(
            config_file=[str(f) for f in config_files],
            meta_file=str(bundle / "configs" / "metadata.json"),
            logging_file=False,
            workflow_type=None,
            bundle_root=str(bundle_root),
            **overrides,
        )
        workflow.initialize()
        if "@train#trainer" in str(workflow.parser.get("run")).replace("::", "#"):  # the parser writes ids with ::
            # made now (run would), with its handlers and their console loggers, which capture() then moves
            trainer = workflow.parser.get_parsed_content("train#trainer")
            if progress is not None:
                _report_epochs(trainer, progress)
        capture()
        workflow.run()
        workflow.finalize()
    done.write(seconds=time.perf_counter() - clock)
    return True


def run_seconds(bundle_root: Path) -> float:
    """The wall time a finished run took, as its done marker records it (also when it is reused)."""
    try:
        return float(json.loads((bundle_root / "models" / DONE_MARKER).read_text(encoding="utf-8"))["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return math.nan


@contextmanager
def _logs_to_file(path: Path) -> Iterator[Callable[[], None]]:
    """While a run goes, the console handlers of MONAI's loggers (per-iteration losses, workflow notes) write to
    ``path`` instead; yields a callable that moves the handlers of loggers made since. Restored afterwards."""
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
    moved: list[tuple[logging.Logger, logging.Handler]] = []

    def capture() -> None:
        for name in list(logging.root.manager.loggerDict):
            logger = logging.getLogger(name)
            if not name.startswith("monai"):
                continue
            for handler in list(logger.handlers):
                if type(handler) is logging.StreamHandler:  # a console handler (a FileHandler is a subclass)
                    logger.removeHandler(handler)
                    moved.append((logger, handler))
                    if to_file not in logger.handlers:
                        logger.addHandler(to_file)

    capture()
    try:
        yield capture
    finally:
        for logger, handler in moved:
            logger.removeHandler(to_file)
            logger.addHandler(handler)
        to_file.close()


def _report_epochs(trainer: Any, progress: Callable[[str], None]) -> None:
    """Call ``progress`` after each epoch with the epoch, its mean loss, images/s and the run's ETA."""
    state = {"losses": [], "images": 0, "epoch_start": time.perf_counter()}

    def on_iteration(engine: Any) -> None:
        output = engine.state.output
        loss = output[0]["loss"] if isinstance(output, list) else output["loss"]
        state["losses"].append(float(loss.detach()) if torch.is_tensor(loss) else float(loss))
        batch = engine.state.batch
        state["images"] += len(batch[0]["image"] if isinstance(batch, list) else batch["image"])

    def on_epoch(engine: Any) -> None:
        now = time.perf_counter()
        seconds = now - state["epoch_start"]
        epoch, epochs = engine.state.epoch, engine.state.max_epochs
        mean = float(np.mean(state["losses"])) if state["losses"] else math.nan
        progress(f"epoch {epoch}/{epochs}, loss {mean:.4f}, {state['images'] / max(seconds, 1e-9):.0f} images/s, "
                 f"ETA {seconds * (epochs - epoch):.0f} s")
        state.update(losses=[], images=0, epoch_start=now)

    trainer.add_event_handler(Events.ITERATION_COMPLETED, on_iteration)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, on_epoch)


def training_losses(bundle_root: Path) -> list[float]:
    """The per-iteration ``train_loss`` of a run, read back from its TensorBoard events."""
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
# one method of one seed
# ---------------------------------------------------------------------------------------------------------------------
def stage_roots(root: Path, spec: MethodSpec) -> list[Path]:
    """The run folder of each stage: ``root/stage<i>`` for the stages before the last, ``root`` for the last."""
    n = max(1, len(spec.stages))
    return [root / f"stage{i + 1}" for i in range(n - 1)] + [root]


def _stage_epochs(epochs: int, spec: MethodSpec) -> list[int]:
    """Each stage's epochs: its share of ``epochs`` (at least 1), the last stage taking what is left."""
    if not spec.stages:
        return [epochs]
    out = [max(1, round(epochs * stage.share)) for stage in spec.stages[:-1]]
    return out + [max(0, epochs - sum(out))]


def run_method(spec: MethodSpec, root: Path, overrides: dict[str, Any], bundle: Path, manifest_sha256: str,
                progress: Callable[[str], None] | None = None) -> tuple[float, int]:
    """Pretrain one method (all its stages) into ``root``; returns (wall seconds of its runs, steps)."""
    files = stage_files(bundle, spec)
    roots = stage_roots(root, spec)
    epochs = _stage_epochs(int(overrides["max_epochs"]), spec)
    stages = spec.stages or (None,)
    for i, (stage, path, stage_root, n_epochs) in enumerate(zip(stages, files, roots, epochs)):
        stage_overrides = {**overrides, "max_epochs": n_epochs}
        if stage is not None and stage.init_from_previous:
            stage_overrides["init_checkpoint"] = str(roots[i - 1] / "models" / "model.pt")
        if stage is not None and stage.prior_from_previous:
            stage_overrides["prior_table"] = str(encoder_table(roots[i - 1], overrides))
        run_bundle([path], stage_root, stage_overrides, bundle, manifest_sha256, progress)
    steps = sum(len(training_losses(r)) for r in roots)
    return sum(run_seconds(r) for r in roots), steps


def encoder_table(stage_root: Path, overrides: Mapping[str, Any], split: str = "train") -> Path:
    """The prior table of a finished stage's encoder (written once into its ``eval/``): the embeddings of the
    pretraining rows (``split="train"``), or of every row (``"all"``)."""
    path = stage_root / "eval" / f"encoder_prior_table{'' if split == 'train' else '_' + split}.csv"
    marker = DoneMarker(path.with_suffix(".done.json"),
                        {"encoder": file_digest(stage_root / "models" / "encoder.pt"), "split": split,
                         **{k: overrides[k] for k in ("manifest", "dataset_dir", "split_fractions", "split_seed")}})
    if not marker.is_done():
        table = encoder_prior_table(overrides["manifest"], stage_root / "models", root=overrides["dataset_dir"],
                                    split=split, fractions=overrides["split_fractions"],
                                    split_seed=overrides["split_seed"])
        write_prior_table(table, path)
        marker.write()
    return path
