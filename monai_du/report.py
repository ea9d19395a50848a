"""The report of a comparison: seed-averaged table, label-efficiency table, verdict, CSV/JSON and PNG plots.

Input rows come from :func:`monai_du.compare.run_compare`: one per method and seed, with ``auc`` (linear probe),
``auc_low`` / ``auc_high`` (patient-level bootstrap 95% CI), ``chosen_C``, ``knn_auc``, ``site_leakage`` and
``site_chance`` (NaN with one site), ``steps`` and ``wall_time_s``; the label-efficiency rows hold ``n_patients``,
``draw`` and ``auc`` per method and seed.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "detectable_difference",
    "format_summary",
    "json_safe",
    "paired_difference",
    "paired_t_power",
    "power_words",
    "seeds_needed",
    "summarise",
    "verdict",
    "write_report",
]


def json_safe(value: Any) -> Any:
    """``value`` with numpy scalars as Python numbers and non-finite floats as None (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan


#: Columns of the age probe (``compare --age``): ridge MAE, its bootstrap CI and the mean-age predictor's MAE.
AGE_COLUMNS: tuple[str, ...] = ("age_mae", "age_mae_low", "age_mae_high", "age_floor_mae")
#: Paired differences of age MAE (years) that the power line sizes seeds for.
AGE_POWER_TARGETS: tuple[float, ...] = (0.5, 1.0)


def summarise(results: pd.DataFrame, methods: Sequence[str]) -> pd.DataFrame:
    """One row per method: mean and std over seeds of every metric, in ``methods`` order."""
    rows = []
    for key in methods:
        part = results[results["method_key"] == key]
        if part.empty:
            continue
        row: dict[str, Any] = {"method_key": key, "method": part["method"].iloc[0], "n_seeds": len(part)}
        for name in ("auc", "auc_low", "auc_high", "knn_auc", "site_leakage", "chosen_C", "steps", "wall_time_s",
                     *[n for n in AGE_COLUMNS if n in part.columns]):
            row[f"{name}_mean"], row[f"{name}_std"] = _mean_std(part[name].astype(float))
        row["site_chance"] = _mean_std(part["site_chance"].astype(float))[0]
        rows.append(row)
    return pd.DataFrame(rows)


def _pm(mean: float, std: float, digits: int = 3) -> str:
    if not np.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if np.isfinite(std) else f"{mean:.{digits}f}"


def _render(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(row[j]) for row in [header] + body) for j in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(b) for b in body])


def format_summary(summary: pd.DataFrame, label: str) -> str:
    """The seed-averaged table: linear-probe AUC (mean ± std over seeds), the mean of the per-seed 95% CI bounds,
    the probe's chosen C (median over seeds), kNN AUC, site leakage (when the manifest has several sites), optimiser
    steps and wall time."""
    n = int(summary["n_seeds"].max()) if len(summary) else 0
    sites = bool(np.isfinite(summary.get("site_leakage_mean", pd.Series(dtype=float))).any())
    ages = "age_mae_mean" in summary.columns
    header = ["method", f"AUC {label} (mean ± std, {n} seed{'s' if n != 1 else ''})", "mean 95% CI", "probe C",
              "kNN AUC"] + (["site leakage (chance)"] if sites else []) \
        + (["age MAE, years (floor)", "mean 95% CI"] if ages else []) + ["steps", "wall time"]
    body = []
    for _, r in summary.iterrows():
        ci = f"[{r['auc_low_mean']:.3f}, {r['auc_high_mean']:.3f}]" if np.isfinite(r["auc_low_mean"]) else "-"
        line = [r["method"], _pm(r["auc_mean"], r["auc_std"]), ci,
                f"{r['chosen_C_mean']:.3g}" if np.isfinite(r["chosen_C_mean"]) else "-",
                _pm(r["knn_auc_mean"], r["knn_auc_std"])]
        if sites:
            leak = _pm(r["site_leakage_mean"], r["site_leakage_std"])
            line.append(leak + (f" ({r['site_chance']:.3f})" if leak != "-" else ""))
        if ages:
            mae = _pm(r["age_mae_mean"], r["age_mae_std"], 2)
            line += [mae + (f" ({r['age_floor_mae_mean']:.2f})" if mae != "-" else ""),
                     f"[{r['age_mae_low_mean']:.2f}, {r['age_mae_high_mean']:.2f}]"
                     if np.isfinite(r["age_mae_low_mean"]) else "-"]
        line += [f"{r['steps_mean']:.0f}" if np.isfinite(r["steps_mean"]) else "-", f"{r['wall_time_s_mean']:.1f} s"]
        body.append(line)
    return _render(header, body)


def paired_difference(results: pd.DataFrame, a: str, b: str, column: str = "auc") -> tuple[float, float, int]:
    """Mean and std over seeds of ``column(a) - column(b)``, paired by seed, and the number of seeds."""
    pa = results[results["method_key"] == a].set_index("seed")[column].astype(float)
    pb = results[results["method_key"] == b].set_index("seed")[column].astype(float)
    diff = (pa - pb).dropna()
    if diff.empty:
        return math.nan, math.nan, 0
    return float(diff.mean()), float(diff.std(ddof=1)) if len(diff) > 1 else math.nan, len(diff)


def paired_t_pvalue(mean: float, std: float, n: int) -> float:
    """Two-sided p-value of the paired t-test of a mean difference over ``n`` seeds (``n - 1`` degrees of freedom)."""
    from scipy.stats import t as student_t

    if n < 2 or not np.isfinite(std) or std == 0:
        return math.nan
    return float(2 * student_t.sf(abs(mean) / (std / math.sqrt(n)), n - 1))


#: The power line's settings: two-sided level and power of the paired t-test, and the differences it sizes seeds for.
POWER_ALPHA = 0.05
POWER = 0.8
POWER_TARGETS: tuple[float, ...] = (0.02, 0.05)
MAX_SEEDS = 10_000


def paired_t_power(delta: float, std: float, n: int, alpha: float = POWER_ALPHA) -> float:
    """Power of the two-sided paired t-test at level ``alpha`` over ``n`` seeds to detect a true mean difference
    ``delta``, for paired differences of standard deviation ``std`` (exact, from the noncentral t distribution)."""
    from scipy.stats import nct
    from scipy.stats import t as student_t

    if n < 2 or not np.isfinite(std) or std <= 0:
        return math.nan
    crit = student_t.ppf(1 - alpha / 2, n - 1)
    shift = abs(delta) * math.sqrt(n) / std
    power = float(nct.sf(crit, n - 1, shift) + nct.cdf(-crit, n - 1, shift))
    if not np.isfinite(power):  # scipy's noncentral t fails far in the tail: the normal limit is exact enough there
        from scipy.stats import norm

        power = float(norm.sf(crit - shift) + norm.cdf(-crit - shift))
    return power


def detectable_difference(std: float, n: int, alpha: float = POWER_ALPHA, power: float = POWER) -> float:
    """The smallest true paired difference that ``n`` seeds detect with ``power`` (two-sided paired t-test at level
    ``alpha``), given the paired standard deviation ``std``: the root of :func:`paired_t_power`."""
    from scipy.optimize import brentq

    if n < 2 or not np.isfinite(std) or std <= 0:
        return math.nan
    high = std
    while paired_t_power(high, std, n, alpha) < power:
        high *= 2
    return float(brentq(lambda d: paired_t_power(d, std, n, alpha) - power, 0.0, high, xtol=1e-10))


def seeds_needed(delta: float, std: float, alpha: float = POWER_ALPHA, power: float = POWER) -> int:
    """The fewest seeds (>= 2) whose paired t-test detects ``delta`` with ``power``; 0 when ``std`` is unknown, and
    :data:`MAX_SEEDS` when even that many do not."""
    if not np.isfinite(std) or std <= 0:
        return 0
    low, high = 2, 2
    while paired_t_power(delta, std, high, alpha) < power:
        if high >= MAX_SEEDS:
            return MAX_SEEDS
        low, high = high, min(2 * high, MAX_SEEDS)
    while low < high:  # power grows with n: the first n that reaches it
        mid = (low + high) // 2
        if paired_t_power(delta, std, mid, alpha) >= power:
            high = mid
        else:
            low = mid + 1
    return high


def power_words(std: float, n: int, targets: Sequence[float] = POWER_TARGETS, digits: int = 3) -> str:
    """The power line of a paired difference: what ``n`` seeds could detect, and the seeds for the ``targets``."""
    if n < 2 or not np.isfinite(std) or std <= 0:
        return "power: needs 2 or more seeds with a spread"
    need = ", ".join(f"±{d:g}: {seeds_needed(d, std)}" for d in targets)
    return (f"{n} seeds detect ±{detectable_difference(std, n):.{digits}f} at {POWER:.0%} power (two-sided "
            f"{POWER_ALPHA:.0%}); seeds needed for {need}")


def _judge(mean: float, std: float, n: int) -> str:
    """'beyond the seed spread' when the paired mean difference exceeds twice its standard error, with the paired
    t-test's p-value: with 3 seeds, 2 standard errors is p ~ 0.18, and re-drawing the augmentations alone has
    moved a mean AUC by that much."""
    if n < 2 or not np.isfinite(std):
        return "single seed, no spread to judge by"
    se = std / math.sqrt(n)
    if se == 0:
        return "identical on every seed" if mean == 0 else "the same difference on every seed"
    p = f"paired t-test p = {paired_t_pvalue(mean, std, n):.2g}"
    if abs(mean) > 2 * se:
        return f"beyond the seed spread (> 2 standard errors; {p})"
    return f"within the seed spread ({p})"


def verdict(results: pd.DataFrame, summary: pd.DataFrame, label: str) -> list[str]:
    """Plain sentences, computed from the numbers: the winner, each method against plain DU and random init."""
    ranked = summary.dropna(subset=["auc_mean"]).sort_values("auc_mean", ascending=False)
    if ranked.empty:
        return [f"No method could be scored on {label!r} (see the notes column of results.csv)."]
    best = ranked.iloc[0]
    lines = [f"Best mean linear-probe AUC for {label}: {best['method']} ({_pm(best['auc_mean'], best['auc_std'])})."]
    if len(ranked) > 1:
        second = ranked.iloc[1]
        d, s, n = paired_difference(results, best["method_key"], second["method_key"])
        judged = _judge(d, s, n)
        lines.append(
            f"Its lead over {second['method']} is {d:+.3f} AUC (paired over {n} seeds, std {s:.3f}): {judged}; "
            f"{power_words(s, n)}."
        )
        if judged.startswith("within the seed spread"):
            lines.append("So no method wins clearly here at this budget: the top two are within the seed spread.")
    names = summary.set_index("method_key")["method"]
    for base, what in (("du", "plain DU"), ("random", "the random-init encoder")):
        if base not in names:
            continue
        for key in names.index:
            if key in (base, "random") or (base == "random" and key not in ("du", "simclr")):
                continue
            d, s, n = paired_difference(results, key, base)
            if np.isfinite(d):
                verb = "ties with" if abs(d) < 5e-4 else "is above" if d > 0 else "is below"
                lines.append(f"{names[key]} {verb} {what}: {d:+.3f} AUC (paired std {s:.3f}; {_judge(d, s, n)}; "
                             f"{power_words(s, n)}).")
    return lines + age_verdict(results, summary)


def age_verdict(results: pd.DataFrame, summary: pd.DataFrame) -> list[str]:
    """Sentences on the age probe (lower MAE is better): the best method against the mean-age floor, and each method
    against plain DU and random init, paired by seed, with the power line in years."""
    if "age_mae_mean" not in summary.columns:
        return []
    ranked = summary.dropna(subset=["age_mae_mean"]).sort_values("age_mae_mean")
    if ranked.empty:
        return []
    best = ranked.iloc[0]
    lines = [f"Lowest mean age MAE: {best['method']} ({_pm(best['age_mae_mean'], best['age_mae_std'], 2)} years; the "
             f"mean-age predictor on the same splits: {best['age_floor_mae_mean']:.2f})."]
    names = summary.set_index("method_key")["method"]
    for base, what in (("du", "plain DU"), ("random", "the random-init encoder")):
        if base not in names:
            continue
        for key in names.index:
            if key in (base, "random"):
                continue
            d, sd, n = paired_difference(results, key, base, column="age_mae")
            if np.isfinite(d):
                verb = "ties with" if abs(d) < 5e-3 else "is worse than" if d > 0 else "is better than"
                lines.append(f"age MAE: {names[key]} {verb} {what}: {d:+.2f} years (paired std {sd:.2f}; "
                             f"{_judge(d, sd, n)}; {power_words(sd, n, AGE_POWER_TARGETS, 2)}).")
    return lines


def finetune_lines(finetune: pd.DataFrame, results: pd.DataFrame, methods: Sequence[str]) -> list[str]:
    """The fine-tuning table (pooled held-out AUC by number of labelled training patients, mean ± std over seeds)
    and, at each size, every method against random init, paired by seed, with the linear probe's gain beside it at
    all patients: a pretraining gain can shrink once every layer learns."""
    from monai_du.evaluation import format_label_efficiency

    summaries = _efficiency_summaries(finetune, methods)
    if not summaries:
        return []
    lines = ["fine-tuned end to end (the fine-tune bundle, every layer learns; held-out AUC pooled over the splits, "
             "by number of labelled training patients; mean ± std over seeds):", format_label_efficiency(summaries)]
    names = dict(zip(finetune["method_key"], finetune["method"]))
    if "random" not in names:
        return lines
    largest = int(finetune["n_patients"].max())
    for size in sorted(int(n) for n in finetune["n_patients"].unique()):
        part = finetune[finetune["n_patients"] == size]
        for key in methods:
            if key == "random" or key not in names:
                continue
            d, sd, n = paired_difference(part, key, "random")
            if not np.isfinite(d):
                continue
            probe = ""
            if size == largest:
                dp, _, np_ = paired_difference(results, key, "random")
                probe = f"; the linear probe's gain: {dp:+.3f} over {np_} seeds" if np.isfinite(dp) else ""
            lines.append(f"fine-tuned, n={size}: {names[key]} against random init {d:+.3f} AUC (paired std {sd:.3f}; "
                         f"{_judge(d, sd, n)}; {power_words(sd, n)}){probe}.")
    return lines


def _efficiency_summaries(curve: pd.DataFrame, methods: Sequence[str]) -> dict[str, pd.DataFrame]:
    from monai_du.evaluation import summarise_label_efficiency

    out = {}
    for key in methods:
        part = curve[curve["method_key"] == key]
        if not part.empty:
            out[str(part["method"].iloc[0])] = summarise_label_efficiency(part)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _plot_losses(losses: Mapping[str, Mapping[int, Sequence[float]]], names: Mapping[str, str], path: Path) -> Path:
    plt = _pyplot()
    keys = [k for k, h in losses.items() if any(len(v) for v in h.values())]
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4.0 * max(len(keys), 1), 3.3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for seed, values in sorted(losses[key].items()):
            ax.plot(np.arange(1, len(values) + 1), values, lw=1, label=f"seed {seed}")
        ax.set_title(textwrap.fill(names[key], 30), fontsize=8)
        ax.set_xlabel("iteration")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
    if not keys:
        axes[0][0].text(0.5, 0.5, "no pretraining run", ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_summary(summary: pd.DataFrame, label: str, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(summary)), 3.6))
    x = np.arange(len(summary))
    ax.bar(x, summary["auc_mean"], yerr=summary["auc_std"].fillna(0), color="tab:blue", capsize=3)
    ax.set_ylabel(f"AUC {label} (mean ± std)")
    lo = np.nanmin(summary["auc_mean"] - summary["auc_std"].fillna(0)) if len(summary) else 0.5
    ax.set_ylim(max(0.0, min(0.5, lo - 0.05)), 1.0)
    ax.set_xticks(x)
    ax.set_xticklabels([textwrap.fill(m, 16) for m in summary["method"]], fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# the report folder
# ---------------------------------------------------------------------------------------------------------------------
def write_report(
    out: Path,
    header: str,
    results: pd.DataFrame,
    curve: pd.DataFrame,
    losses: Mapping[str, Mapping[int, Sequence[float]]],
    methods: Sequence[str],
    plots: bool = True,
    config: Mapping[str, Any] | None = None,
    finetune: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """Write ``results.csv``, ``summary.csv``, ``label_efficiency.csv``, ``results.json``, ``report.txt`` and (with
    ``plots``) ``loss_curves.png``, ``summary.png``, ``label_efficiency.png`` into ``out``; with ``finetune`` (rows
    of ``method_key``, ``method``, ``seed``, ``n_patients``, ``auc``: ``compare --finetune``) also ``finetune.csv``,
    its table and verdict (:func:`finetune_lines`) and ``finetune.png``.

    Returns:
        ``summary``, ``table``, ``efficiency_table``, ``verdict`` (sentences), ``lines`` (the printed report) and
        ``files`` (name -> path).
    """
    from monai_du.evaluation import format_label_efficiency, plot_label_efficiency

    label = str((config or {}).get("label", "label"))
    summary = summarise(results, methods)
    table = format_summary(summary, label)
    sentences = verdict(results, summary, label)
    efficiency = _efficiency_summaries(curve, methods)
    efficiency_table = format_label_efficiency(efficiency) if efficiency else ""
    columns = ["method", "seed", "auc", "chosen_C", "knn_auc", *[c for c in ("age_mae",) if c in results.columns],
               "steps", "wall_time_s"]
    per_seed = results[columns].to_string(
        index=False, formatters={"chosen_C": "{:.3g}".format}, float_format=lambda v: f"{v:.3f}")
    lines = [header, "", table, "", "label efficiency (linear-probe AUC on the held-out patients, by number of "
             "labelled training patients; mean ± std over seeds and draws):", efficiency_table, "", *sentences, "",
             "per seed:", per_seed]
    tuned = finetune_lines(finetune, results, methods) if finetune is not None and not finetune.empty else []
    if tuned:
        lines += ["", *tuned]
    files: dict[str, str] = {}

    def keep(name: str, path: Path) -> None:
        files[name] = str(path)

    results.to_csv(out / "results.csv", index=False)
    keep("results.csv", out / "results.csv")
    summary.to_csv(out / "summary.csv", index=False)
    keep("summary.csv", out / "summary.csv")
    curve.to_csv(out / "label_efficiency.csv", index=False)
    keep("label_efficiency.csv", out / "label_efficiency.csv")
    if tuned:
        finetune.to_csv(out / "finetune.csv", index=False)
        keep("finetune.csv", out / "finetune.csv")
    (out / "report.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    keep("report.txt", out / "report.txt")
    payload = {"config": json_safe(dict(config or {})), "summary": json_safe(summary.to_dict("records")),
               "results": json_safe(results.to_dict("records")),
               "label_efficiency": json_safe(curve.to_dict("records")),
               "verdict": sentences, "table": table, "efficiency_table": efficiency_table,
               "finetune": json_safe(finetune.to_dict("records")) if tuned else [], "finetune_lines": tuned}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    keep("results.json", out / "results.json")
    if plots:
        names = dict(zip(summary["method_key"], summary["method"]))
        keep("loss_curves.png", _plot_losses({k: v for k, v in losses.items() if k in names}, names,
                                             out / "loss_curves.png"))
        keep("summary.png", _plot_summary(summary, label, out / "summary.png"))
        if efficiency:
            plot_label_efficiency(efficiency, out / "label_efficiency.png")
            keep("label_efficiency.png", out / "label_efficiency.png")
        if tuned:
            plot_label_efficiency(_efficiency_summaries(finetune, methods), out / "finetune.png",
                                  title="fine-tuned end to end: held-out AUC by labelled training patients")
            keep("finetune.png", out / "finetune.png")
    return {"summary": summary, "table": table, "efficiency_table": efficiency_table, "verdict": sentences,
            "lines": lines, "files": files}
