"""The one-command demo (``monai-du demo``): :func:`monai_du.compare.run_compare` on an embedded cohort.

- ``cxr`` (default): the real embedded cohort, 498 NIH ChestX-ray14 radiographs of 140 patients
  (:mod:`monai_du.data.real_cohort`), label ``No Finding`` (normal vs abnormal), through ``bundles/cxr_du_pretrain``.
- ``brain``: the shipped real brain MRI cohort, 136 IXI T1 volumes of Hammersmith Hospital at 6 mm
  (:func:`monai_du.data.real_cohort.ixi_t1_dev_manifest`), label ``sex`` (AUC) and age regressed (MAE in years),
  through ``bundles/brain_mri_du_pretrain``, with age (not sex) as the prior of the kernel methods.

Everything else (methods, runs, probes, report) is the comparison's; see :mod:`monai_du.compare`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from monai_du.compare import CompareConfig, run_compare
from monai_du.data.real_cohort import ixi_t1_dev_manifest, nih_cxr_dev_manifest

__all__ = ["BRAIN_DEMO_METHODS", "DEMO_DEFAULTS", "DEMO_METHODS", "demo_config", "run_demo"]

#: Methods of the demo: the floor, the two baselines, and one metadata and one patient prior, so that three seeds fit
#: in about 10 minutes on 2 CPU cores. ``--methods`` (or ``methods=``) runs any others, e.g. all of
#: the bundle's default methods (:func:`monai_du.bundles.default_methods`).
DEMO_METHODS: tuple[str, ...] = ("random", "du", "simclr", "kdu_attr", "kdu_patient")
#: Methods of the brain demo: one image per subject (no patient prior), and the prior is age alone, so that the sex
#: probe never reads its own prior.
BRAIN_DEMO_METHODS: tuple[str, ...] = ("random", "du", "simclr", "kdu_age", "yaware_age")

#: Label, budget and label-efficiency sizes of the demo, per modality.
DEMO_DEFAULTS: dict[str, dict[str, Any]] = {
    "cxr": {"label": "label_no_finding", "epochs": 10, "batch_size": 64, "label_sizes": (10, 25, 50, None),
            "label_draws": 3},
    "brain": {"label": "sex", "age": "age", "epochs": 15, "batch_size": 32, "label_sizes": (10, 25, 50, None),
              "label_draws": 3},
}


def demo_config(
    modality: str = "cxr",
    out: str | Path = "monai_du_demo",
    seeds: Sequence[int] = (0, 1, 2),
    methods: Sequence[str] | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    **kwargs: Any,
) -> CompareConfig:
    """The comparison the demo runs (``methods`` None: :data:`DEMO_METHODS`, or :data:`BRAIN_DEMO_METHODS` for
    ``brain``)."""
    if modality not in DEMO_DEFAULTS:
        raise ValueError(f"modality must be one of {sorted(DEMO_DEFAULTS)}, got {modality!r}.")
    defaults = DEMO_DEFAULTS[modality]
    if modality == "cxr":
        manifest = nih_cxr_dev_manifest()
        methods = DEMO_METHODS if methods is None else methods
    else:
        manifest = ixi_t1_dev_manifest()
        methods = BRAIN_DEMO_METHODS if methods is None else methods
        kwargs = {"age": defaults["age"], **kwargs}
    return CompareConfig(
        manifest=manifest, label=defaults["label"], bundle=modality, methods=tuple(methods), seeds=tuple(seeds),
        epochs=defaults["epochs"] if epochs is None else epochs,
        batch_size=defaults["batch_size"] if batch_size is None else batch_size,
        out=out, **{"label_sizes": defaults["label_sizes"], "label_draws": defaults["label_draws"], **kwargs},
    )


def run_demo(log: Callable[[str], None] | None = print, progress: Callable[[str], None] | None = None,
             **kwargs: Any) -> dict[str, Any]:
    """Run the demo comparison; ``kwargs`` go to :func:`demo_config`. Returns :func:`run_compare`'s result."""
    return run_compare(demo_config(**kwargs), log=log, progress=progress)
