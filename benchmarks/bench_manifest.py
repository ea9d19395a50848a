"""Benchmark: build the CheXpert manifest from the real 223k-row table (target: under 5 s on 2 cores).

Run alone with ``python benchmarks/bench_manifest.py [path/to/chexpert_train.csv.gz] [--repeats N]``, or import
:func:`bench_chexpert_manifest` (``benchmarks/bench_data.py`` does).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEFAULT_TABLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "chexpert_train.csv.gz"
TARGET_SECONDS = 5.0


def bench_chexpert_manifest(path: str | Path | None = None, repeats: int = 1) -> float | None:
    """Seconds to build (read, map, validate) the CheXpert manifest; the best of ``repeats`` runs.

    Args:
        path: the CheXpert ``train.csv(.gz)``; default ``../shared/data/chexpert_train.csv.gz`` beside the repo.
        repeats: number of timed builds.

    Returns:
        the best time in seconds, or None when the table is absent (a message says so).
    """
    from monai_du.data.tables import manifest_from_table

    table = Path(path) if path is not None else DEFAULT_TABLE
    if not table.is_file():
        print(f"bench_chexpert_manifest: skipped, {table} not found")
        return None
    best = float("inf")
    rows = 0
    for _ in range(max(1, int(repeats))):
        start = time.perf_counter()
        manifest, report = manifest_from_table(table, "chexpert")
        best = min(best, time.perf_counter() - start)
        rows = len(manifest)
    print(
        f"CheXpert manifest: {rows} rows, {manifest['patient_id'].nunique()} patients, {len(report)} report rows, "
        f"{best:.2f} s (target < {TARGET_SECONDS:g} s)"
    )
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default=None, help="chexpert train.csv(.gz)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    bench_chexpert_manifest(args.path, repeats=args.repeats)


if __name__ == "__main__":
    main()
