"""The prior of a pretrain-bundle method, as the bundle builds it: its kernel, prior vectors and batches.

A method file of the bundle's ``configs/methods/`` that sets a kernel (``kdu_attr``, ``kdu_patient``, ``kdu_gen``,
``kdu_encoder``, ``yaware``, or a user's own file) defines the prior of a run: the prior vector
(``prior_continuous``, ``prior_categorical``), the kernel and its fitted bandwidth, the sampler (mode, attribute, K of
PK blocks and their order), ``lam`` and ``instance_weight``. :func:`method_prior` reads all of them through MONAI's
``ConfigParser`` from ``configs/train.yaml`` plus the method file, with the overrides a run takes, and draws batches
from the bundle's own sampler. The audit (:mod:`monai_du.audit`) then measures the kernel and the batches that the run
trains with: the settings live in the bundle alone.

Python::

    prior = method_prior("cxr", "kdu_patient", "manifest.csv")
    prior.batches[0]       # row indices of the first pretraining batch (into prior.batch_prior)
    prior.prior.shape      # (N, P): the prior vector of every manifest row
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from monai_du.bundles import bundle_path, check_overrides, method_files, stage_files
from monai_du.data.samplers import draw_batches
from monai_du.priors import attach_prior_table

__all__ = ["MethodPrior", "method_parser", "method_prior", "innermost_cause"]


@dataclass
class MethodPrior:
    """The prior of one bundle method.

    Attributes:
        name: the method key (or the name given to a prior table).
        kernel: the fitted prior kernel, as the run fits it on the pretraining rows.
        prior: (N, P) float64 prior vectors of every manifest row, in manifest order.
        batch_prior: (N_train, P) float64 prior vectors of the pretraining rows.
        batches: batches of the bundle's sampler, as lists of indices into ``batch_prior``.
        batch_size: the batch size the loss sees (``global_batch_size``).
        sampler: the sampler in words (mode, attribute, K, order).
        lam: the loss's ridge.
        instance_weight: the loss's identity term.
        description: the loss and kernel in words.
    """

    name: str
    kernel: Any
    prior: np.ndarray
    batch_prior: np.ndarray
    batches: list[list[int]]
    batch_size: int
    sampler: str
    lam: float
    instance_weight: float
    description: str


def _sampler_words(parser: Any) -> str:
    mode = parser.get_parsed_content("sampler_mode")
    words = str(mode)
    if mode in ("within", "balanced", "pk"):
        words += f":{parser.get_parsed_content('sampler_attribute')}"
    if mode == "pk":
        words += f" K={parser.get_parsed_content('images_per_group')}"
        order = parser.get_parsed_content("sampler_order")
        if order:
            words += f" by {order}"
    return words


@contextlib.contextmanager
def method_parser(
    folder: Path,
    files: Sequence[Path],
    method: str | os.PathLike,
    manifest: str | os.PathLike,
    dataset_dir: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    bundle_root: str | os.PathLike | None = None,
) -> Iterator[Any]:
    """The ``ConfigParser`` of a one-run method (``configs/train.yaml`` plus its file ``files[0]``) on ``manifest``,
    as a run of the bundle reads it; ``bundle_root`` defaults to a temporary folder, removed when the block ends.

    Raises:
        ValueError: for a method that sets no kernel, or an override the bundle does not know.
    """
    from monai.bundle import ConfigParser

    manifest = Path(manifest).expanduser()
    with tempfile.TemporaryDirectory(prefix="monai_du_audit_") as scratch:
        parser = ConfigParser()
        parser.read_config([str(folder / "configs" / "train.yaml"), str(files[0])])
        # paths as absolute paths and overrides as checked data: no value from a user reaches the parser as code
        overrides = {k: str(Path(v).expanduser().absolute()) if k == "prior_table" and isinstance(v, (str, Path)) else v
                     for k, v in (overrides or {}).items()}
        parser.update({
            "manifest": str(manifest.absolute()),
            "dataset_dir": str(Path(dataset_dir or manifest.parent).expanduser().absolute()),
            "bundle_root": str(Path(bundle_root if bundle_root is not None else scratch).absolute()),
            **check_overrides(folder, overrides, files),
        })
        if parser.get("kernel") is None:
            raise ValueError(f"method {str(method)!r} of {folder} sets no kernel: there is no prior to audit.")
        yield parser


def method_prior(
    bundle: str | os.PathLike,
    method: str | os.PathLike,
    manifest: str | os.PathLike,
    dataset_dir: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    n_batches: int = 20,
    bundle_root: str | os.PathLike | None = None,
    name: str | None = None,
) -> MethodPrior:
    """Build a method's prior from ``configs/train.yaml`` plus its method file, as a run of the bundle would.

    Args:
        bundle: the pretrain bundle: a modality key (``"cxr"``, ``"brain"``) or its folder.
        method: a method key of ``configs/methods/`` or the path of a method file.
        manifest: the manifest file (the bundle's ``manifest``).
        dataset_dir: folder of relative image paths (default: the manifest's folder).
        overrides: further bundle ids, e.g. ``{"batch_size": 128, "prior_table": "enc.csv", "seed": 1}``.
        n_batches: batches drawn from the bundle's sampler.
        bundle_root: the run folder (``eval/`` receives what the method builds, e.g. the generative prior table);
            default: a temporary folder, removed afterwards.
        name: the name of the result (default: the method key).

    Returns:
        the :class:`MethodPrior`.

    Raises:
        ValueError: an unknown method, a method without a kernel, or a prior table that lacks manifest images
            (naming them).
    """
    folder = bundle_path(bundle)
    path = Path(method).expanduser()
    if path.suffix in (".yaml", ".yml", ".json"):
        spec = method_files(folder, (), extra=[path])[path.stem]
    else:
        spec = method_files(folder, [str(method)])[str(method)]
    files = stage_files(folder, spec)
    if len(files) != 1:
        raise ValueError(f"method {str(method)!r} is a composite of several runs; audit its stages instead.")
    with method_parser(folder, files, method, manifest, dataset_dir, overrides, bundle_root) as parser:
        try:
            return _build(parser, name or Path(str(method)).stem, int(n_batches))
        except (RuntimeError, ValueError) as err:  # the config parser wraps an expression's error in a RuntimeError
            raise ValueError(f"method {str(method)!r}: {innermost_cause(err)}") from None


def innermost_cause(err: BaseException) -> BaseException:
    """The error at the end of ``err``'s ``__cause__`` chain (MONAI's ``ConfigParser`` wraps an expression's error in
    a ``RuntimeError``)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _build(parser: Any, name: str, n_batches: int) -> MethodPrior:
    """The :class:`MethodPrior` of a parsed bundle config (train.yaml plus a method file, overrides applied)."""
    train_df = parser.get_parsed_content("train#df").reset_index(drop=True)
    prior_encoder = parser.get_parsed_content("prior_encoder")
    kernel = parser.get_parsed_content("fitted_kernel")
    every_row = parser.get_parsed_content("train#manifest_df").reset_index(drop=True)
    table = parser.get_parsed_content("prior_table") if "prior_table" in parser else None
    if table is not None:
        try:
            every_row = attach_prior_table(every_row, table)
        except ValueError as err:
            raise ValueError(f"{err} The audit reads the prior of every labelled row: write the table for every "
                             "manifest image (monai-du prior --split all).") from None
    # the sampler reads the records of its dataset only: a stand-in holding them loads no image
    parser["train#dataset"] = types.SimpleNamespace(data=train_df.to_dict("records"))
    sampler = parser.get_parsed_content("train#sampler")
    loss = parser.get_parsed_content("loss")
    return MethodPrior(
        name=name,
        kernel=kernel,
        # rows outside the pretraining split: a patient (or site) unseen in training is a category of its own
        prior=np.asarray(prior_encoder.with_unseen_categories(every_row).transform(every_row), dtype=np.float64),
        batch_prior=np.asarray(prior_encoder.transform(train_df), dtype=np.float64),
        batches=draw_batches(sampler, n_batches),
        batch_size=int(parser.get_parsed_content("global_batch_size")),
        sampler=_sampler_words(parser),
        lam=float(parser.get_parsed_content("lam")),
        instance_weight=float(parser.get_parsed_content("instance_weight")),
        description=f"{type(loss).__name__}: {kernel!r}",
    )
