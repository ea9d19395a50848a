"""Benchmark of the data side on the real CheXpert table (223,414 rows): manifest build and sampler epochs.

Run: ``python benchmarks/bench_data.py [--csv PATH] [--batch-size 256] [--repeats 5]``

1. Builds the CheXpert manifest with ``bench_chexpert_manifest`` from ``benchmarks/bench_manifest.py`` (target < 5 s).
2. Forms one epoch of batches in every ``AttributeBatchSampler`` mode at batch size 256 on all rows and prints the
   median seconds over a few epochs (target < 1 s per epoch), the construction time, and each time as a ratio to the
   random baseline measured in the same run. The samplers read ``Sex``, ``Age``, ``Frontal/Lateral`` and ``AP/PA``
   straight from the CSV, so this part does not depend on the manifest builder.

Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CSV = REPO.parent / "shared" / "data" / "chexpert_train.csv.gz"
EPOCH_TARGET_S = 1.0

sys.path.insert(0, str(REPO))
from monai_du.data.samplers import AttributeBatchSampler  # noqa: E402

try:  # written by another helper; the sampler part runs without it
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_manifest import bench_chexpert_manifest  # type: ignore[import-not-found]
except ImportError:
    bench_chexpert_manifest = None


def run_manifest_benchmark(csv: Path) -> None:
    print("== 1. CheXpert manifest ==")
    if bench_chexpert_manifest is None:
        print("manifest benchmark not available (benchmarks/bench_manifest.py or bench_chexpert_manifest missing)")
        return
    required = [
        p for p in inspect.signature(bench_chexpert_manifest).parameters.values()
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    start = time.perf_counter()
    result = bench_chexpert_manifest(csv) if required else bench_chexpert_manifest()
    elapsed = time.perf_counter() - start
    if isinstance(result, pd.DataFrame):
        result = f"DataFrame with {len(result)} rows"
    print(f"bench_chexpert_manifest: {elapsed:.2f} s wall (target < 5 s); returned: {result}")


def load_attributes(csv: Path) -> pd.DataFrame:
    table = pd.read_csv(csv, usecols=["Sex", "Age", "Frontal/Lateral", "AP/PA"])
    return table


def _time_epochs(sampler: AttributeBatchSampler, repeats: int) -> tuple[float, int]:
    times, n_batches = [], 0
    for epoch in range(repeats):
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        batches = list(sampler)
        times.append(time.perf_counter() - start)
        n_batches = len(batches)
    return float(np.median(times)), n_batches


def _batch_distances(sampler: AttributeBatchSampler, prior: np.ndarray, k: int = 7, n_batches: int = 40):
    """Over the first ``n_batches`` batches of epoch 0: the mean pairwise Euclidean distance inside a batch, and the
    mean distance from a sample to its ``k`` nearest other samples in its batch."""
    sampler.set_epoch(0)
    pairwise, nearest = [], []
    for i, batch in enumerate(sampler):
        if i == n_batches:
            break
        x = prior[batch].astype(np.float64)
        sq = (x**2).sum(1)
        dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0))
        n = len(batch)
        pairwise.append(dist.sum() / (n * (n - 1)))
        np.fill_diagonal(dist, np.inf)
        nearest.append(np.sort(dist, axis=1)[:, :k].mean())
    return float(np.mean(pairwise)), float(np.mean(nearest))


def run_sampler_benchmark(table: pd.DataFrame, batch_size: int, repeats: int) -> None:
    n = len(table)
    print(f"\n== 2. One epoch of AttributeBatchSampler on {n} CheXpert rows, batch size {batch_size} ==")
    features = ["Sex", "Age", "Frontal/Lateral"]
    rng = np.random.default_rng(0)
    embedding = rng.normal(size=(n, 64)).astype(np.float32)  # stands in for an image-embedding prior
    cases = [
        ("random", "-", lambda: AttributeBatchSampler.from_manifest(table, batch_size, "random")),
        ("within", "AP/PA (5 values)", lambda: AttributeBatchSampler.from_manifest(
            table, batch_size, "within", attribute="AP/PA")),
        ("within", "Frontal/Lateral", lambda: AttributeBatchSampler.from_manifest(
            table, batch_size, "within", attribute="Frontal/Lateral")),
        ("balanced", "Frontal/Lateral", lambda: AttributeBatchSampler.from_manifest(
            table, batch_size, "balanced", attribute="Frontal/Lateral")),
        ("balanced", "AP/PA, small dropped", lambda: AttributeBatchSampler.from_manifest(
            table, batch_size, "balanced", attribute="AP/PA", small_groups="drop")),
        ("neighbourhood", "sex,age,view k=7", lambda: AttributeBatchSampler.from_manifest(
            table, batch_size, "neighbourhood", feature_columns=features)),
        ("neighbourhood", f"sex,age,view k={batch_size - 1}", lambda: AttributeBatchSampler.from_manifest(
            table, batch_size, "neighbourhood", feature_columns=features, n_neighbours=batch_size - 1)),
        ("neighbourhood", "synthetic 64-d k=7", lambda: AttributeBatchSampler(
            batch_size, "neighbourhood", features=embedding)),
    ]
    rows = []
    for mode, condition, build in cases:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the "drops groups" notice is expected here
            sampler = build()
        init_s = time.perf_counter() - start
        epoch_s, n_batches = _time_epochs(sampler, repeats)
        rows.append((mode, condition, init_s, epoch_s, n_batches, sampler))
    baseline = rows[0][3]
    header = f"{'mode':<14}{'groups / prior':<24}{'init s':>8}{'epoch s':>9}{'x random':>10}{'batches':>9}  target<1s"
    print(header)
    print("-" * len(header))
    for mode, condition, init_s, epoch_s, n_batches, _ in rows:
        ok = "yes" if epoch_s < EPOCH_TARGET_S else "NO"
        ratio = epoch_s / baseline if baseline > 0 else math.nan
        print(f"{mode:<14}{condition:<24}{init_s:>8.3f}{epoch_s:>9.3f}{ratio:>10.1f}{n_batches:>9}  {ok}")
    print(f"(epoch s: median over {repeats} epochs; list(sampler) including .tolist(); init s: construction)")

    # Side-by-side quality: how close are batch-mates in the standardised (sex, age, view) prior?
    prior = AttributeBatchSampler.from_manifest(table, batch_size, "neighbourhood", feature_columns=features)._prior
    by_label = {(m, c): s for m, c, *_, s in rows}
    print("\nbatch-mates in the standardised (sex, age, view) prior, first 40 batches of epoch 0:")
    print(f"{'sampler':<34}{'mean pairwise':>14}{'mean to 7 nearest':>19}")
    for label in [("random", "-"), ("within", "Frontal/Lateral"), ("neighbourhood", "sex,age,view k=7"),
                  ("neighbourhood", f"sex,age,view k={batch_size - 1}")]:
        pairwise, nearest = _batch_distances(by_label[label], prior)
        print(f"{label[0] + ' ' + label[1]:<34}{pairwise:>14.3f}{nearest:>19.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not args.csv.is_file():
        print(f"CheXpert table not found at {args.csv}; nothing to benchmark.")
        return
    run_manifest_benchmark(args.csv)
    start = time.perf_counter()
    table = load_attributes(args.csv)
    print(f"\n(read {len(table)} rows of Sex/Age/Frontal/Lateral/AP/PA in {time.perf_counter() - start:.2f} s)")
    run_sampler_benchmark(table, args.batch_size, args.repeats)


if __name__ == "__main__":
    main()
