"""How much unlabelled data pays: the comparison at growing pool sizes (``monai-du compare --pool-sizes``).

:func:`run_pool_curve` draws nested subsets of the pool by patient (one shuffle of the pool's patients, with the
labelled patients removed first; each size takes whole patients in that order until it holds at least that many
images, so a smaller pool is a subset of every larger one), runs :func:`~monai_du.compare.run_compare` on each (same
methods, seeds, epochs and labelled cohort; ``out/pool_<n>/``), and writes the linear-probe AUC against pool size as a
table (``pool_curve.csv``, ``pool_curve.txt``) and a plot (``pool_curve.png``), random init as the floor.

The budget is the same number of epochs at every size, so a larger pool also trains more steps; the table states it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from monai_du.compare import CompareConfig, pool_rows, run_compare
from monai_du.data.manifest import RESOLVED_IMAGE_COLUMN, read_manifest, write_manifest
from monai_du.io import write_text_atomic

__all__ = ["nested_pool_subsets", "run_pool_curve"]


def nested_pool_subsets(pool: pd.DataFrame, sizes: Sequence[int], seed: int = 0) -> dict[int, pd.DataFrame]:
    """Nested subsets of ``pool`` by patient: ``{size: rows}``, each holding whole patients and at least ``size``
    images (all of the pool when it has fewer), every smaller subset inside every larger one.

    Raises:
        ValueError: for a size below 1.
    """
    if any(int(n) < 1 for n in sizes):
        raise ValueError(f"pool sizes must be >= 1, got {list(sizes)}.")
    patients = pool["patient_id"].astype(str)
    order = np.random.default_rng(seed).permutation(patients.unique())
    counts = patients.value_counts().reindex(order).to_numpy()
    cumulative = np.cumsum(counts)
    out = {}
    for size in sorted({int(n) for n in sizes}):
        take = min(int(np.searchsorted(cumulative, size)) + 1, len(order))
        out[size] = pool[patients.isin(set(order[:take])).to_numpy()]
    return out


def run_pool_curve(config: CompareConfig, sizes: Sequence[int], log: Callable[[str], None] | None = print,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the comparison of ``config`` (which must have a ``pool``) at each pool size; see the module docstring.

    Returns:
        ``curve`` (one row per method and size: mean and std of the AUC over seeds, images and patients of the
        subset), ``table`` (text), ``files`` and ``results`` (each size's :func:`run_compare` result).
    """
    if config.pool is None:
        raise ValueError("pool sizes need a pool: give --pool.")
    say = log or (lambda _: None)
    out = Path(config.out)
    labelled = read_manifest(Path(config.manifest), root=config.dataset_dir)
    _, pool = pool_rows(config, labelled)
    subsets = nested_pool_subsets(pool, sizes)
    results, rows = {}, []
    for size, subset in subsets.items():
        path = write_manifest(subset.drop(columns=[RESOLVED_IMAGE_COLUMN], errors="ignore"),
                              out / "pool_subsets" / f"pool_{size}.csv")
        say(f"pool size {size}: {len(subset)} images of {subset['patient_id'].nunique()} patients")
        # one decode-once cache for every size: the smaller pools are subsets of the larger
        sized = dataclasses.replace(config, pool=path, out=out / f"pool_{size}", keep_labelled_in_pool=True,
                                    overrides={"image_cache": str(out / "image_cache"), **config.overrides})
        result = run_compare(sized, log=log, progress=progress)
        results[size] = result
        for key, part in result["results"].groupby("method_key", sort=False):
            rows.append({"pool_size": size, "n_images": len(subset), "n_patients": subset["patient_id"].nunique(),
                         "method_key": key, "method": part["method"].iloc[0], "auc_mean": part["auc"].mean(),
                         "auc_std": part["auc"].std(ddof=1), "n_seeds": len(part)})
    curve = pd.DataFrame(rows)
    table = _format(curve, config)
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": out / "pool_curve.csv", "txt": write_text_atomic(out / "pool_curve.txt", table + "\n")}
    curve.to_csv(files["csv"], index=False)
    if config.plots:
        files["png"] = _plot(curve, out / "pool_curve.png")
    say("")
    say(table)
    return {"curve": curve, "table": table, "files": files, "results": results}


def _format(curve: pd.DataFrame, config: CompareConfig) -> str:
    sizes = sorted(curve["pool_size"].unique())
    images = curve.drop_duplicates("pool_size").set_index("pool_size")["n_images"]
    header = ["method"] + [f"{int(images[s])} images" for s in sizes]
    body = []
    for _, part in curve.groupby("method_key", sort=False):
        part = part.set_index("pool_size")
        body.append([part["method"].iloc[0]] + [f"{part.loc[s, 'auc_mean']:.3f} ± {part.loc[s, 'auc_std']:.3f}"
                                                if s in part.index else "-" for s in sizes])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    seeds = int(curve["n_seeds"].max())
    return (f"linear-probe AUC against pool size (mean ± std over {seeds} seeds; the same epochs at every size, so "
            f"a larger pool trains more steps; nested subsets by patient):\n" + "\n".join(lines))


def _plot(curve: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, part in curve.groupby("method_key", sort=False):
        part = part.sort_values("n_images")
        ax.errorbar(part["n_images"], part["auc_mean"], yerr=part["auc_std"], marker="o", capsize=3,
                    label=part["method"].iloc[0], linestyle="--" if key == "random" else "-")
    ax.set_xscale("log")
    ax.set_xlabel("unlabelled pool (images)")
    ax.set_ylabel("linear-probe AUC")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
