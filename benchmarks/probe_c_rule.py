"""Which rule should choose the linear probe's L2 strength C? A table to decide the default of ``select_C``.

Each candidate rule picks C from an inner patient-grouped cross-validation of the training rows (or fixes it):

- ``best, 1 partition``: the highest mean inner AUC over one ``GroupKFold(5)`` partition (the default before
  this benchmark);
- ``one_se, 1 partition``: the smallest C within one standard error of that maximum;
- ``best, R partitions`` / ``one_se, R partitions``: the same on R shuffled stratified patient-grouped partitions
  (``select_C(repeats=R)``), R = 3 and 5 (``one_se, 5 partitions`` is the shipped default, marked *);
- ``step-down, 5 partitions``: from the best C, one grid step to a stronger L2 at a time while the step's paired
  inner AUC gain is within noise (the test of the "within noise" count below, on the rule's own folds);
- ``fixed C``: :data:`monai_du.evaluation.FALLBACK_C`, no search.

Two kinds of evidence, printed as two tables:

1. Synthetic cases (``--draws`` independent draws each; every draw trains on a small patient-grouped training set and
   scores 1,000 held-out patients): ``strong_l2``, 300 noisy features of 20 latent factors, 40 training patients
   (a heavy L2 wins), and ``weak_l2``, a label carried by a low-variance direction under large nuisance factors
   with suppressor features, 150 training patients (a light L2 wins); ``weak_l2_small`` (not in the criterion, a
   harder case): the label's factor has half the loadings of 9 others, 500 features, 30 training patients (a light
   L2 wins, and the inner CV is very noisy). Reported: the median held-out AUC of each rule; ``short``, the median
   AUC of the best fixed C of the grid (the one grid value with the highest median held-out AUC, chosen with
   hindsight) minus the rule's median AUC; ``paired``, the mean over draws of that difference within each draw.
   Criterion: short <= 0.02 on ``strong_l2`` and ``weak_l2``.
2. Real frozen features (``--features`` folders written by ``extract``): per encoder, cross-fitted out-of-fold AUC
   (``--folds`` stratified patient-grouped outer folds, as ``monai-du compare`` probes a pool), the best fixed C of
   the grid in hindsight (same folds, one C for all outer folds), and how often the rule's pick is *not clearly
   preferred*. Definition: for each outer training set a reference inner cross-validation that no rule used
   (``--ref-partitions`` shuffled stratified ``GroupKFold(5)`` partitions, seeds 100, 101, ...) gives the fold-wise
   paired AUC difference d between the picked grid value C_k and its more regularised neighbour C_{k-1} (one grid
   step, half a decade); the pick is within noise when k > 0 and mean(d) < SE(d), with the Nadeau-Bengio corrected
   standard error of repeated cross-validation, SE^2 = var(d) * (1/J + n_val/n_train), J folds. The column gives the
   share of the (encoder, outer fold) picks within noise.

Usage (extract once, then the table)::

    python benchmarks/probe_c_rule.py extract --runs /tmp/demo_after/runs --label label_no_finding \\
        --out /tmp/c_rule/embedded
    python benchmarks/probe_c_rule.py extract --runs /tmp/pool_exp/out/runs --manifest /tmp/pool_exp/nih_labelled.csv \\
        --root /work/shared/data/cxr_pool/images --label label_no_finding --out /tmp/c_rule/pool
    python benchmarks/probe_c_rule.py table --features /tmp/c_rule/embedded /tmp/c_rule/pool

``extract`` reads ``<runs>/seed*/<method>/models`` (the encoders ``monai-du compare`` wrote), the manifest (default:
the embedded NIH cohort), and writes ``<seed>_<method>.npy`` features, ``labels.npy`` and ``groups.npy``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from monai_du.evaluation import (
    DEFAULT_C_REPEATS,
    DEFAULT_C_RULE,
    DEFAULT_CS,
    FALLBACK_C,
    CSearch,
    patient_grouped_splits,
    select_C,
)

GRID = np.asarray(DEFAULT_CS, dtype=np.float64)
INNER_SPLITS = 5
REF_SEED = 100  # the reference inner CV of the "within noise" count uses partitions no rule sees (seeds 100, ...)


# ------------------------------------------------------------------------------------------------------------ rules
def _mean(search: CSearch) -> np.ndarray:
    return search.mean_auc


def _best(search: CSearch) -> int:
    return int(np.argmax(_mean(search)))  # the first maximum: the most regularised of tied values


def _one_se(search: CSearch) -> int:
    mean = _mean(search)
    return int(np.flatnonzero(mean >= mean[_best(search)] - search.se_auc[_best(search)])[0])


def _step_down(search: CSearch) -> int:
    """From the best C, step to the next stronger L2 while the step's paired fold-wise AUC gain is below its
    Nadeau-Bengio corrected standard error (the same test as the "within noise" count, on the rule's own folds)."""
    k, scored = _best(search), search.fold_auc[search.scored]
    while k > 0:
        d = scored[:, k] - scored[:, k - 1]
        if d.mean() >= math.sqrt(d.var(ddof=1) * (1.0 / len(d) + 1.0 / (INNER_SPLITS - 1))):
            break
        k -= 1
    return k


def _fixed(c: float):
    j = int(np.flatnonzero(np.isclose(GRID, c))[0])
    return lambda searches: j


# name -> picks a grid index from the inner searches {R: CSearch} (R = 1: one GroupKFold partition, as select_C
# with repeats=1; R = 3, 5: shuffled stratified partitions, as select_C(repeats=R))
RULES: dict[str, object] = {
    "best, 1 partition": lambda s: _best(s[1]),
    "one_se, 1 partition": lambda s: _one_se(s[1]),
    "best, 3 partitions": lambda s: _best(s[3]),
    "one_se, 3 partitions": lambda s: _one_se(s[3]),
    "best, 5 partitions": lambda s: _best(s[5]),
    "one_se, 5 partitions": lambda s: _one_se(s[5]),
    "step-down, 5 partitions": lambda s: _step_down(s[5]),
    f"fixed C={FALLBACK_C:g}": _fixed(FALLBACK_C),
}
TODAY = "best, 1 partition"  # the default before this benchmark
SHIPPED = f"{DEFAULT_C_RULE}, {DEFAULT_C_REPEATS} partitions"  # the default it chose


def inner_searches(x: np.ndarray, y: np.ndarray, g: np.ndarray) -> dict[int, np.ndarray]:
    """Inner fold AUCs (folds, grid) of one training set: one GroupKFold partition (``select_C``), and 5 shuffled
    partitions (``select_C(repeats=5)``), whose first 3 are exactly ``select_C(repeats=3)``'s (seeds 0, 1, ...)."""
    one = select_C(x, y, g, GRID, INNER_SPLITS, repeats=1)
    five = select_C(x, y, g, GRID, INNER_SPLITS, repeats=5)
    return {1: one.fold_auc, 5: five.fold_auc}


def as_searches(fold_auc: dict[int, np.ndarray]) -> dict[int, CSearch]:
    k = len(fold_auc[5]) // 5
    return {1: CSearch(math.nan, GRID, fold_auc[1], []), 3: CSearch(math.nan, GRID, fold_auc[5][: 3 * k], []),
            5: CSearch(math.nan, GRID, fold_auc[5], [])}


def pick_all(fold_auc: dict[int, np.ndarray]) -> dict[str, int]:
    searches = as_searches(fold_auc)
    return {name: int(rule(searches)) for name, rule in RULES.items()}


def _fit_score(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, c: float) -> np.ndarray:
    model = make_pipeline(StandardScaler(), LogisticRegression(C=float(c), max_iter=5000)).fit(xtr, ytr.astype(int))
    return model.decision_function(xte)


def _cached(path: Path | None, compute):
    """``compute()`` (a dict of arrays), kept in ``path`` (.npz) when given."""
    if path is not None and path.exists():
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    out = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **out)
    return out


# -------------------------------------------------------------------------------------------------- synthetic cases
def strong_l2_case(seed: int, n_train: int = 40, n_test: int = 1000, n_features: int = 300, rows: int = 2):
    """Many noisy features that mix 20 patient-level latent factors; the label follows factor 0 (as the test
    ``_factor_cohort``, with more factors and features): 40 training patients, F >> N, so a heavy L2 wins."""
    rng = np.random.default_rng(seed)
    n_pat = n_train + n_test
    n = n_pat * rows
    patients = np.repeat(np.arange(n_pat), rows)
    z = rng.normal(size=(n_pat, 20))[patients] + 0.5 * rng.normal(size=(n, 20))
    y = (z[:, 0] + 0.8 * rng.normal(size=n) > 0).astype(float)
    x = z @ rng.normal(size=(20, n_features)) + rng.normal(size=(n, n_features))
    return x, y, patients, patients < n_train


def weak_l2_case(seed: int, n_train: int = 150, n_test: int = 1000, n_features: int = 30, rows: int = 2):
    """The label follows a small-variance signal s; every feature carries s plus large nuisance factors, so the
    direction of the raw covariance with the label (where a heavy L2 points) is swamped by nuisance, and only a
    lightly regularised fit that cancels the nuisance (suppressor weights) finds s."""
    rng = np.random.default_rng(seed)
    n_pat = n_train + n_test
    n = n_pat * rows
    patients = np.repeat(np.arange(n_pat), rows)
    s = rng.normal(size=n_pat)[patients] + 0.3 * rng.normal(size=n)
    y = (s + 0.5 * rng.normal(size=n) > 0).astype(float)
    nuisance = 5.0 * rng.normal(size=(n_pat, 5))[patients] + rng.normal(size=(n, 5))
    x = nuisance @ rng.normal(size=(5, n_features)) + 0.3 * s[:, None] * rng.normal(1.0, 0.5, size=n_features)
    x += 0.1 * rng.normal(size=(n, n_features))
    return x, y, patients, patients < n_train


def weak_l2_small_case(seed: int, n_train: int = 30, n_test: int = 1000, n_features: int = 500, rows: int = 2):
    """The label follows one of 10 latent factors whose loadings are half the others': a heavy L2 keeps the
    high-variance factors and loses the label's; 30 training patients, so the inner CV is noisy too."""
    rng = np.random.default_rng(seed)
    n_pat = n_train + n_test
    n = n_pat * rows
    patients = np.repeat(np.arange(n_pat), rows)
    z = rng.normal(size=(n_pat, 10))[patients] + 0.5 * rng.normal(size=(n, 10))
    y = (z[:, 0] + 0.8 * rng.normal(size=n) > 0).astype(float)
    w = rng.normal(size=(10, n_features))
    w[0] *= 0.5
    x = z @ w + 2.0 * rng.normal(size=(n, n_features))
    return x, y, patients, patients < n_train


CASES = {"strong_l2": strong_l2_case, "weak_l2": weak_l2_case, "weak_l2_small": weak_l2_small_case}
CRITERION_CASES = ("strong_l2", "weak_l2")


def synthetic_draw(case: str, seed: int, cache: Path | None = None) -> dict[str, np.ndarray]:
    """Inner fold AUCs of the training set and the held-out AUC of every fixed C of the grid, for one draw."""
    def compute():
        x, y, g, train = CASES[case](seed)
        xtr, ytr, gtr, xte, yte = x[train], y[train], g[train], x[~train], y[~train]
        inner = inner_searches(xtr, ytr, gtr)
        held_out = np.array([roc_auc_score(yte, _fit_score(xtr, ytr, xte, c)) for c in GRID])
        return {"inner1": inner[1], "inner5": inner[5], "held_out": held_out}
    return _cached(None if cache is None else cache / f"synthetic_{case}_{seed}.npz", compute)


def synthetic_table(draws: int, cache: Path | None = None) -> dict[str, dict[str, float]]:
    """Per case: the median held-out AUC of each rule and of the best fixed C (highest median held-out AUC), the
    shortfall (the difference of the two medians, the criterion) and the mean over draws of the paired shortfall
    (best fixed C's AUC - the rule's AUC in the same draw)."""
    table: dict[str, dict[str, float]] = {}
    for case in CASES:
        records = [synthetic_draw(case, seed, cache) for seed in range(draws)]
        held = np.asarray([r["held_out"] for r in records])  # (draws, grid)
        j = int(np.argmax(np.median(held, axis=0)))
        table[case] = {"best fixed C": float(GRID[j]), "best fixed AUC": float(np.median(held[:, j]))}
        picks = [pick_all({1: r["inner1"], 5: r["inner5"]}) for r in records]
        for name in RULES:
            auc = np.asarray([held[d, p[name]] for d, p in enumerate(picks)])
            table[case][name] = float(np.median(auc))
            table[case][name + " shortfall"] = float(np.median(held[:, j]) - np.median(auc))
            table[case][name + " paired"] = float(np.mean(held[:, j] - auc))
    return table


# ------------------------------------------------------------------------------------------------------ real features
def _reference_splits(y: np.ndarray, g: np.ndarray, partitions: int) -> list[tuple[np.ndarray, np.ndarray]]:
    splits = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for r in range(partitions):
            splitter = StratifiedGroupKFold(n_splits=INNER_SPLITS, shuffle=True, random_state=REF_SEED + r)
            splits += list(splitter.split(np.zeros((len(y), 1)), y, groups=g))
    return splits


def within_noise(ref_auc: np.ndarray, ratio: float, k: int) -> bool:
    """Whether grid value k's inner-CV advantage over its more regularised neighbour k-1 is within noise: the mean
    fold-wise paired AUC difference on the reference partitions is below its Nadeau-Bengio corrected standard
    error, sqrt(var(d) * (1/J + n_val/n_train)). k = 0 (the most regularised value) is never within noise."""
    if k <= 0:
        return False
    d = ref_auc[:, k] - ref_auc[:, k - 1]
    return bool(d.mean() < math.sqrt(d.var(ddof=1) * (1.0 / len(d) + ratio)))


def real_encoder_record(x: np.ndarray, y: np.ndarray, g: np.ndarray, folds: int, seed: int, partitions: int,
                        cache: Path | None = None) -> dict[str, np.ndarray]:
    """Per outer fold: the inner fold AUCs, the reference fold AUCs, and the out-of-fold decision scores of every
    fixed C of the grid."""
    def compute():
        pairs = patient_grouped_splits(y, g, folds, seed)
        fixed = np.full((len(GRID), len(y)), np.nan)
        inner1, inner5, ref, ratio = [], [], [], []
        for tr, te in pairs:
            inner = inner_searches(x[tr], y[tr], g[tr])
            inner1.append(inner[1])
            inner5.append(inner[5])
            for j, c in enumerate(GRID):
                fixed[j, te] = _fit_score(x[tr], y[tr], x[te], c)
            splits = _reference_splits(y[tr], g[tr], partitions)
            ratio.append(np.mean([len(va) / len(t) for t, va in splits]))
            xt, yt = x[tr], y[tr]
            ref.append([[roc_auc_score(yt[va], _fit_score(xt[t], yt[t], xt[va], c)) for c in GRID] for t, va in splits])
        fold = np.full(len(y), -1)
        for k, (_, te) in enumerate(pairs):
            fold[te] = k
        return {"inner1": np.asarray(inner1), "inner5": np.asarray(inner5), "ref": np.asarray(ref),
                "ratio": np.asarray(ratio), "fixed": fixed, "fold": fold}
    return _cached(cache, compute)


def real_encoder(record: dict[str, np.ndarray], y: np.ndarray) -> dict[str, object]:
    """Cross-fitted AUC of every rule, the best fixed C in hindsight, the picks within noise."""
    fixed, fold = record["fixed"], record["fold"]
    n_folds = len(record["inner1"])
    fixed_auc = np.array([roc_auc_score(y, f) for f in fixed])
    j = int(np.argmax(fixed_auc))
    auc, noisy, chosen = {}, {}, {}
    for name in RULES:
        scores = np.full(len(y), np.nan)
        noisy[name], chosen[name] = 0, []
        for k in range(n_folds):
            pick = pick_all({1: record["inner1"][k], 5: record["inner5"][k]})[name]
            scores[fold == k] = fixed[pick, fold == k]
            chosen[name].append(float(GRID[pick]))
            noisy[name] += within_noise(record["ref"][k], float(record["ratio"][k]), pick)
        auc[name] = roc_auc_score(y, scores)
    return {"auc": auc, "noisy": noisy, "n_picks": n_folds, "best fixed C": float(GRID[j]),
            "best fixed AUC": float(fixed_auc[j]), "chosen": chosen}


# --------------------------------------------------------------------------------------------------------- extract
def extract(args: argparse.Namespace) -> None:
    import pandas as pd
    import torch
    from monai.data import Dataset

    from monai_du.data.loading import load_images
    from monai_du.data.manifest import read_manifest
    from monai_du.data.real_cohort import nih_cxr_dev_manifest
    from monai_du.encoders import load_encoder
    from monai_du.evaluation import extract_features

    manifest = Path(args.manifest) if args.manifest else nih_cxr_dev_manifest()
    df = read_manifest(manifest, root=args.root).reset_index(drop=True)
    y = pd.to_numeric(df[args.label], errors="coerce").to_numpy(dtype=float)
    keep = np.isin(y, (0.0, 1.0))
    df, y = df[keep].reset_index(drop=True), y[keep]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "labels.npy", y)
    np.save(out / "groups.npy", df["patient_id"].astype(str).to_numpy())
    images: dict[tuple[int, ...], np.ndarray] = {}
    for models in sorted(Path(args.runs).glob("seed*/*/models")):
        seed, method = models.parent.parent.name, models.parent.name
        target = out / f"{seed}_{method}.npy"
        if target.exists():
            continue
        size = tuple(json.loads((models / "encoder_info.json").read_text())["spatial_size"])
        if size not in images:
            images[size] = load_images(df, modality="2d" if len(size) == 2 else "3d", image_size=list(size))
        encoder = load_encoder(models)
        dataset = Dataset([{"image": torch.from_numpy(img)} for img in images[size]])
        features, _ = extract_features(encoder, dataset, batch_size=64)
        np.save(target, features)
        print(f"{target}: {features.shape}", flush=True)


# ----------------------------------------------------------------------------------------------------------- table
def _label(name: str) -> str:
    return name + (" *" if name == SHIPPED else "")


def table(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    names = list(RULES)
    width = max(len(n) for n in names) + 2
    cache = Path(args.cache) if args.cache else None
    if args.draws > 0:
        synth = synthetic_table(args.draws, cache)
        print(f"synthetic cases: median held-out AUC over {args.draws} draws; short = median AUC of the best fixed C "
              f"- median AUC of the rule (criterion: <= 0.02 on {' and '.join(CRITERION_CASES)}); paired = mean over "
              "draws of the same difference within a draw")
        header = f"{'rule':<{width}}" + "".join(f"  {c:>13}  {'short':>6}  {'paired':>6}" for c in CASES)
        print(header)
        print("-" * len(header))
        for name in names:
            cells = "".join(f"  {synth[c][name]:>13.3f}  {synth[c][name + ' shortfall']:>+6.3f}"
                            f"  {synth[c][name + ' paired']:>+6.3f}" for c in CASES)
            ok = all(synth[c][name + " shortfall"] <= 0.02 for c in CRITERION_CASES)
            print(f"{_label(name):<{width}}{cells}  {'meets' if ok else 'fails'}")
        cells = "".join(f"  {synth[c]['best fixed AUC']:>13.3f}  {format(synth[c]['best fixed C'], '.3g'):>6}  {'':>6}"
                        for c in CASES)
        print(f"{'best fixed C (hindsight)':<{width}}{cells}")
        print(f"(* the shipped default; {time.perf_counter() - t0:.0f} s)\n", flush=True)
    for folder in args.features:
        folder = Path(folder)
        y = np.load(folder / "labels.npy")
        g = np.load(folder / "groups.npy", allow_pickle=True)
        encoders = sorted(p for p in folder.glob("*.npy") if p.stem not in ("labels", "groups"))
        results = {}
        for path in encoders:
            where = None if cache is None else (
                cache / f"real_{folder.name}_{path.stem}_f{args.folds}s{args.seed}r{args.ref_partitions}.npz")
            record = real_encoder_record(np.load(path).astype(np.float64), y, g, args.folds, args.seed,
                                         args.ref_partitions, where)
            results[path.stem] = real_encoder(record, y)
            print(f"  {folder.name}/{path.stem}: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
                  flush=True)
        print(f"{folder}: {len(y)} rows, {len(set(g))} patients, {len(encoders)} encoders; cross-fitted AUC "
              f"({args.folds} patient-grouped folds, seed {args.seed})")
        short = {n: [r["best fixed AUC"] - r["auc"][n] for r in results.values()] for n in names}
        total = sum(r["n_picks"] for r in results.values())
        header = (f"{'rule':<{width}}  {'mean AUC':>8}  {'mean shortfall':>14}  {'max shortfall':>13}  "
                  f"{'vs today':>8}  {'wins/ties/losses vs today':>25}  {'picks within noise':>18}")
        print(header)
        print("-" * len(header))
        today = TODAY
        for n in names:
            diffs = [r["auc"][n] - r["auc"][today] for r in results.values()]
            wins = sum(d > 1e-9 for d in diffs)
            losses = sum(d < -1e-9 for d in diffs)
            noisy = sum(r["noisy"][n] for r in results.values())
            mean_auc = statistics.mean(r["auc"][n] for r in results.values())
            print(f"{_label(n):<{width}}  {mean_auc:>8.3f}  {statistics.mean(short[n]):>+14.3f}  "
                  f"{max(short[n]):>+13.3f}  "
                  f"{statistics.mean(diffs):>+8.3f}  {f'{wins}/{len(diffs) - wins - losses}/{losses}':>25}  "
                  f"{f'{noisy}/{total}':>18}")
        best = statistics.mean(r["best fixed AUC"] for r in results.values())
        print(f"{'best fixed C (hindsight)':<{width}}  {best:>8.3f}  (per encoder: "
              + ", ".join(f"{k} {r['best fixed C']:g}" for k, r in results.items()) + ")")
        if args.verbose:
            for k, r in results.items():
                print(f"  {k}: " + "; ".join(f"{n} {r['auc'][n]:.3f} C={','.join(f'{c:g}' for c in r['chosen'][n])}"
                                            for n in names) + f"; best fixed {r['best fixed AUC']:.3f}")
        print(f"({time.perf_counter() - t0:.0f} s)\n", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("extract", help="cache frozen features of the encoders of a compare run")
    ex.add_argument("--runs", required=True, help="folder holding seed*/<method>/models")
    ex.add_argument("--manifest", default=None, help="labelled manifest (default: the embedded NIH cohort)")
    ex.add_argument("--root", default=None, help="root of the manifest's relative image paths")
    ex.add_argument("--label", default="label_no_finding")
    ex.add_argument("--out", required=True)
    tb = sub.add_parser("table", help="print the rule comparison")
    tb.add_argument("--features", nargs="*", default=[], help="folders written by extract")
    tb.add_argument("--draws", type=int, default=15, help="draws of each synthetic case (0: skip them)")
    tb.add_argument("--folds", type=int, default=5)
    tb.add_argument("--seed", type=int, default=0)
    tb.add_argument("--ref-partitions", type=int, default=3, help="partitions of the reference inner CV")
    tb.add_argument("--verbose", action="store_true", help="per-encoder AUCs and chosen C values")
    tb.add_argument("--cache", default=None, help="folder keeping the inner curves and scores (.npz) between runs")
    args = parser.parse_args(argv)
    with threadpool_limits(limits=1):
        (extract if args.command == "extract" else table)(args)


if __name__ == "__main__":
    main()
