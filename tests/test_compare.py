"""Tests of monai_du.compare and monai_du.report: bad input as one clear line, a tiny end-to-end comparison that
resumes without rerunning, the same encoder as a command-line bundle run, and the verdict against hand computations.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from monai_du.bundles import bundle_path, method_files, stage_files
from monai_du.cli import main
from monai_du.compare import CompareConfig, run_compare
from monai_du.phantoms import make_cxr_cohort
from monai_du.report import paired_difference, summarise, verdict

TINY = {"spatial_size": [32, 32], "num_workers": 0, "widen_factor": 0.125}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cohort")
    return make_cxr_cohort(folder, n=48, seed=3, size=32)


def _config(manifest, out, **kwargs) -> CompareConfig:
    settings = dict(manifest=manifest, label="effusion", methods=("random", "du"), seeds=(0,), epochs=1,
                    batch_size=8, out=out, label_sizes=(5, None), label_draws=2, n_bootstrap=20,
                    overrides=TINY, plots=True)
    settings.update(kwargs)
    return CompareConfig(**settings)


# ---------------------------------------------------------------------------------------------------------------------
# bad input: one line naming the file, column or method
# ---------------------------------------------------------------------------------------------------------------------
def test_unknown_method_and_bad_method_file_are_named(tmp_path):
    bundle = bundle_path("cxr")
    with pytest.raises(ValueError, match="unknown method 'simclr2'"):
        method_files(bundle, ["du", "simclr2"])
    broken = tmp_path / "mine.yaml"
    broken.write_text("loss: [unclosed\n")
    with pytest.raises(ValueError, match=f"method file {broken} does not parse"):
        method_files(bundle, ["du"], [broken])
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        method_files(bundle, [], [listed])
    specs = method_files(bundle, ["du", "kdu_bootstrap"])
    assert [p.name for p in stage_files(bundle, specs["kdu_bootstrap"])] == ["du.yaml", "kdu_encoder.yaml"]
    assert [p.name for p in stage_files(bundle, specs["du"])] == ["du.yaml"]


def test_bad_manifest_and_labels_are_one_line_cli_errors(cohort, tmp_path, capsys):
    out = tmp_path / "report"
    base = ["compare", "--manifest", str(cohort), "--out", str(out), "--seeds", "0", "--epochs", "1"]
    assert main(base + ["--label", "fracture"]) == 1
    err = capsys.readouterr().err
    assert "label column 'fracture' is not in the manifest" in err and str(cohort) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    # a label with one class in a split
    df = pd.read_csv(cohort)
    df["label_constant"] = 1.0
    one_class = tmp_path / "one_class.csv"
    df.to_csv(one_class, index=False)
    assert main(["compare", "--manifest", str(one_class), "--dataset-dir", str(Path(cohort).parent), "--label",
                 "constant", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "has one class" in err and "label_constant" in err and "seed 0" in err
    assert main(base + ["--label", "effusion", "--methods", "nope"]) == 1
    assert "unknown method 'nope'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("kernel: {a: [1, 2\n")
    assert main(base + ["--label", "effusion", "--method-config", str(bad)]) == 1
    assert f"method file {bad} does not parse" in capsys.readouterr().err
    assert main(["compare", "--manifest", str(tmp_path / "missing.csv"), "--label", "x", "--out", str(out)]) == 1
    assert "missing.csv does not exist" in capsys.readouterr().err
    assert not (out / "runs").exists()  # nothing ran


# ---------------------------------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    lines: list[str] = []
    return run_compare(_config(cohort, out), log=lines.append), out, lines


def test_tiny_comparison_writes_the_report(tiny, cohort):
    result, out, lines = tiny
    for name in ("results.csv", "summary.csv", "label_efficiency.csv", "results.json", "report.txt",
                 "loss_curves.png", "summary.png", "label_efficiency.png"):
        assert (out / name).is_file(), name
    results = pd.read_csv(out / "results.csv")
    assert sorted(results["method_key"]) == ["du", "random"]
    assert results["auc"].between(0, 1).all() and (results["chosen_C"] > 0).all()
    assert results.set_index("method_key").loc["random", "steps"] == 0
    assert results.set_index("method_key").loc["du", "steps"] > 0
    curve = pd.read_csv(out / "label_efficiency.csv")
    assert set(curve["method_key"]) == {"du", "random"} and curve["auc"].between(0, 1).all()
    printed = "\n".join(lines)
    assert result["table"] in printed and result["efficiency_table"] in printed
    # what the probes read of the label, counted here with pandas, is printed and in the report
    df = pd.read_csv(cohort)
    y = df["label_effusion"]
    counted = (f"label label_effusion: {int(y.isin([0, 1]).sum())} labelled images ({int((y == 1).sum())} positive); "
               f"left out of the probes: {int(y.isna().sum())} blank, {int((y == -1).sum())} uncertain (-1)")
    assert counted in printed and counted in (out / "report.txt").read_text()
    from monai_du.data.splits import select_split

    test = df.drop(select_split(df, "train", fractions={"train": 0.7, "test": 0.3}, seed=0).index)
    few = test.groupby("label_effusion")["patient_id"].nunique().reindex([0.0, 1.0], fill_value=0).min() < 5
    assert any(line.startswith("warning: the test split of seed 0 holds") for line in lines) == few
    payload = json.loads((out / "results.json").read_text())
    assert payload["table"] == result["table"] and payload["config"]["label"] == "label_effusion"
    # each run is a bundle run with its own bundle_root
    for key in ("random", "du"):
        models = out / "runs" / "seed0" / key / "models"
        assert (models / "encoder.pt").is_file() and (models / "compare_done.json").is_file()


def test_a_finished_comparison_resumes_without_rerunning(tiny, cohort, monkeypatch):
    import monai_du.compare

    monkeypatch.setattr(monai_du.compare, "PARALLEL_PROBE_ROWS", 0)  # the probe redone below in worker processes
    result, out, _ = tiny
    done = out / "runs" / "seed0" / "du" / "models" / "compare_done.json"
    stamp = done.stat().st_mtime_ns
    (out / "runs" / "seed0" / "du" / "eval" / "probe.json").unlink()  # the probe was lost: redo it, not the run
    lines: list[str] = []
    again = run_compare(_config(cohort, out), log=lines.append)
    assert multiprocessing.active_children() == []  # the probe's worker processes stopped with the comparison
    assert done.stat().st_mtime_ns == stamp
    assert any("random init: done before" in line for line in lines)
    pd.testing.assert_frame_equal(again["results"].drop(columns="wall_time_s"),
                                  result["results"].drop(columns="wall_time_s"), check_exact=False, atol=1e-12)


def test_dropped_rows_and_a_small_test_split_are_reported(cohort, tmp_path):
    df = pd.read_csv(cohort)
    df.loc[:4, "label_effusion"] = np.nan
    df.loc[5:7, "label_effusion"] = -1.0
    path = tmp_path / "labels.csv"
    df.to_csv(path, index=False)
    lines: list[str] = []
    run_compare(_config(path, tmp_path / "r", dataset_dir=Path(cohort).parent, methods=("random", "kdu_attr"),
                        test_fraction=0.15, batch_size=64), log=lines.append)
    y = df["label_effusion"]
    assert (f"label label_effusion: {int(y.isin([0, 1]).sum())} labelled images ({int((y == 1).sum())} positive); "
            "left out of the probes: 5 blank, 3 uncertain (-1)") in lines
    warning = [line for line in lines if line.startswith("warning: the test split of seed 0 holds")]
    assert warning and "fewer than 5 of a class" in warning[0]
    assert warning[0] in (tmp_path / "r" / "report.txt").read_text()
    # batch 64 over fewer training images is clamped: the report says so, and the audit uses what training used
    from monai_du.data.splits import select_split

    n_train = len(select_split(df, "train", fractions={"train": 0.85, "test": 0.15}, seed=0))
    assert n_train < 64 and any(f"batch 64 (clamped to the training images: [{n_train}])" in line for line in lines)
    audit = pd.read_csv(tmp_path / "r" / "audit" / "audit.csv").set_index("prior")
    assert audit.loc["kdu_attr", "batch_size"] == n_train


def test_a_rerun_with_another_label_probes_again_and_matches_a_fresh_folder(tiny, cohort, tmp_path):
    """The runs do not depend on the label and are reused; the probes do, and are redone."""
    _, out, _ = tiny
    lines: list[str] = []
    again = run_compare(_config(cohort, out, label="cardiomegaly"), log=lines.append)
    assert not any("done before" in line for line in lines)  # no probe of label_effusion is served
    fresh = run_compare(_config(cohort, tmp_path / "fresh", label="cardiomegaly"), log=None)
    columns = ["method_key", "auc", "knn_auc", "chosen_C"]
    pd.testing.assert_frame_equal(again["results"][columns], fresh["results"][columns], check_exact=False,
                                  atol=1e-12)
    assert again["results"]["auc"].tolist() != pytest.approx(tiny[0]["results"]["auc"].tolist(), abs=1e-12)


@pytest.mark.parametrize("change, words", [
    ({"epochs": 2}, "max_epochs (1 -> 2)"),
    ({"overrides": {**TINY, "learning_rate": 0.01}}, "learning_rate ('unset' -> 0.01)"),
    ({"manifest": "other"}, "manifest_sha256"),
])
def test_a_run_folder_of_other_inputs_is_refused_with_what_changed(tiny, cohort, tmp_path, change, words):
    _, out, _ = tiny
    if change.get("manifest") == "other":  # the same file name and rows, one age changed: other content
        df = pd.read_csv(cohort)
        df.loc[0, "age"] = float(df.loc[0, "age"]) + 1
        copy = tmp_path / Path(cohort).name
        df.to_csv(copy, index=False)
        cohort, change = copy, {"dataset_dir": Path(cohort).parent}
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="holds a run of other inputs") as info:
        run_compare(_config(cohort, out, **change), log=None)
    assert words in str(info.value) and "Use a new --out, or delete that folder" in str(info.value)
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()} == before  # nothing lost


def test_no_path_runs_as_code(cohort, tmp_path, monkeypatch):
    """--out, --manifest and --dataset-dir values that start with '$' are file names, and a manifest cell is data."""
    monkeypatch.chdir(tmp_path)
    pwned = tmp_path / "pwned"
    code = "$__import__('os').mkdir('pwned') or 'zz'"  # run in tmp_path, it would make tmp_path / pwned
    data = tmp_path / code
    data.mkdir()
    df = pd.read_csv(cohort)
    for name in df["image"]:
        target = data / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(cohort).parent / name, target)
    df.loc[0, "patient_id"] = code  # a cell is data too
    manifest = tmp_path / f"{code}.csv"
    df.to_csv(manifest, index=False)
    assert main(["compare", "--manifest", code + ".csv", "--dataset-dir", code, "--out", code, "--label", "effusion",
                 "--methods", "random", "--seeds", "0", "--epochs", "1", "--batch-size", "8", "--label-sizes", "5",
                 "--label-draws", "1", "--n-bootstrap", "10", "--no-plots", "--no-audit", "--set", "num_workers=0",
                 "spatial_size=[32, 32]", "widen_factor=0.125"]) == 0
    assert not pwned.exists()
    assert (tmp_path / code / "runs" / "seed0" / "random" / "models" / "encoder.pt").is_file()


def _assert_the_bundle_command_gives_the_encoder(run: Path, overrides: dict, root: Path, cwd: Path) -> None:
    """`python -m monai.bundle run` of train.yaml + methods/du.yaml with ``overrides`` into ``root`` exports the
    same encoder, tensor for tensor, as the run in ``run``."""
    config = "['{}','{}']".format(bundle_path("cxr") / "configs/train.yaml",
                                  bundle_path("cxr") / "configs/methods/du.yaml")
    argv = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config, "--bundle_root", str(root)]
    for key, value in overrides.items():
        argv += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    subprocess.run(argv, check=True, capture_output=True, cwd=cwd)
    ours = torch.load(run / "models" / "encoder.pt", weights_only=True)
    theirs = torch.load(root / "models" / "encoder.pt", weights_only=True)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_compare_and_the_bundle_command_give_the_same_encoder(tiny, cohort, tmp_path):
    _, out, _ = tiny
    root = tmp_path / "cli_run"
    overrides = {"manifest": str(cohort), "dataset_dir": str(Path(cohort).parent), "seed": 0, "split_seed": 0,
                 "split_fractions": {"train": 0.7, "test": 0.3}, "pretrain_split": "train", "max_epochs": 1,
                 "batch_size": 8, **TINY}
    _assert_the_bundle_command_gives_the_encoder(out / "runs" / "seed0" / "du", overrides, root, tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# report: summary and verdict from the numbers
# ---------------------------------------------------------------------------------------------------------------------
def _results(values: dict[str, list[float]]) -> pd.DataFrame:
    rows = []
    for key, aucs in values.items():
        for seed, auc in enumerate(aucs):
            rows.append({"method_key": key, "method": key.upper(), "seed": seed, "auc": auc, "auc_low": auc - 0.05,
                         "auc_high": auc + 0.05, "knn_auc": auc, "site_leakage": np.nan, "site_chance": np.nan,
                         "chosen_C": 0.01, "steps": 10, "wall_time_s": 1.0})
    return pd.DataFrame(rows)


def test_summary_and_paired_difference_match_hand_computation():
    results = _results({"du": [0.70, 0.72, 0.68], "kdu": [0.74, 0.75, 0.71], "random": [0.60, 0.61, 0.59]})
    summary = summarise(results, ["random", "du", "kdu"])
    row = summary.set_index("method_key").loc["kdu"]
    assert row["auc_mean"] == pytest.approx(np.mean([0.74, 0.75, 0.71]))
    assert row["auc_std"] == pytest.approx(np.std([0.74, 0.75, 0.71], ddof=1))
    d, s, n = paired_difference(results, "kdu", "du")
    diffs = np.array([0.04, 0.03, 0.03])
    assert (d, s, n) == (pytest.approx(diffs.mean()), pytest.approx(diffs.std(ddof=1)), 3)
    lines = verdict(results, summary, "label_x")
    assert lines[0].startswith("Best mean linear-probe AUC for label_x: KDU")
    # +0.033 with a paired std of 0.0058: more than 2 standard errors
    assert any(line.startswith("KDU is above plain DU") or "KDU is above" in line and "beyond the seed spread" in line
               for line in lines)


def test_verdict_p_value_is_scipy_paired_t_test():
    from scipy.stats import ttest_rel

    from monai_du.report import paired_t_pvalue

    a, b = [0.74, 0.75, 0.71, 0.69], [0.70, 0.72, 0.68, 0.70]
    results = _results({"du": b, "kdu": a})
    d, s, n = paired_difference(results, "kdu", "du")
    reference = ttest_rel(a, b).pvalue
    assert paired_t_pvalue(d, s, n) == pytest.approx(reference, rel=1e-9)
    lines = verdict(results, summarise(results, ["du", "kdu"]), "y")
    assert any(f"paired t-test p = {reference:.2g}" in line for line in lines if line.startswith("KDU is above"))
    assert np.isnan(paired_t_pvalue(0.01, 0.0, 3)) and np.isnan(paired_t_pvalue(0.01, 0.02, 1))


def test_verdict_says_within_the_spread_when_it_is():
    results = _results({"du": [0.70, 0.65, 0.72], "kdu": [0.72, 0.63, 0.73]})
    lines = verdict(results, summarise(results, ["du", "kdu"]), "y")
    assert any("within the seed spread" in line for line in lines)
    assert any("no method wins clearly" in line for line in lines)


def test_the_audit_of_the_compared_priors_is_printed_beside_the_measured_difference(cohort, tmp_path):
    lines: list[str] = []
    result = run_compare(_config(cohort, tmp_path / "r", methods=("du", "kdu_attr"), label_sizes=(None,),
                                 label_draws=1), log=lines.append)
    audit = pd.read_csv(tmp_path / "r" / "audit" / "audit.csv").set_index("prior")
    assert "kdu_attr" in audit.index and audit.loc["kdu_attr", "batch_size"] == 8
    assert audit.loc["kdu_attr", "sampler"] == "within:site"
    measured = result["results"].pivot(index="seed", columns="method_key", values="auc")
    expected = f"measured {float(measured['kdu_attr'].iloc[0] - measured['du'].iloc[0]):+.3f} AUC vs plain DU"
    beside = (tmp_path / "r" / "audit" / "audit_vs_compare.txt").read_text()
    assert f"kernel DU (age x sex): audit rank {int(audit.loc['kdu_attr', 'rank'])} of {len(audit)}" in beside
    assert expected in beside and expected in "\n".join(lines) and result["audit"]
    # kdu_bootstrap is audited on its first stage's encoder, through the kdu_encoder method, for every labelled row
    bootstrap = run_compare(_config(cohort, tmp_path / "b", methods=("du", "kdu_bootstrap"), epochs=2,
                                    label_sizes=(None,), label_draws=1), log=None)
    rows = pd.read_csv(tmp_path / "b" / "audit" / "audit.csv").set_index("prior")
    assert rows.loc["kdu_bootstrap", "kernel"].startswith("kdu_encoder: ")
    table = pd.read_csv(tmp_path / "b" / "runs" / "seed0" / "kdu_bootstrap" / "stage1" / "eval"
                        / "encoder_prior_table_all.csv")
    assert len(table) == len(pd.read_csv(cohort))
    assert any(line.startswith("- kernel DU (bootstrap: DU encoder prior): audit rank") for line in bootstrap["audit"])
    skipped = run_compare(_config(cohort, tmp_path / "s", methods=("du", "kdu_attr"), label_sizes=(None,),
                                  label_draws=1, audit=False), log=None)
    assert skipped["audit"] == [] and not (tmp_path / "s" / "audit").exists()


def test_power_line_matches_a_simulated_paired_t_test():
    """At the detectable difference, simulated paired t-tests reject 80 % of the time; seeds_needed is the fewest
    seeds that reach 80 %, and for many seeds the detectable difference is the normal formula's."""
    from scipy.stats import norm, ttest_1samp

    from monai_du.report import detectable_difference, paired_t_power, power_words, seeds_needed

    rng = np.random.default_rng(0)
    std = 0.03
    for n in (3, 5, 8):
        delta = detectable_difference(std, n)
        draws = rng.normal(delta, std, size=(40_000, n))
        rejected = float(np.mean(ttest_1samp(draws, 0.0, axis=1).pvalue < 0.05))
        assert abs(rejected - 0.8) < 0.01, (n, rejected)  # 40k draws: Monte Carlo sd 0.002
    for delta in (0.02, 0.05):
        n = seeds_needed(delta, std)
        assert paired_t_power(delta, std, n) >= 0.8 > paired_t_power(delta, std, n - 1)
    assert detectable_difference(std, 2000) == pytest.approx((norm.ppf(0.975) + norm.ppf(0.8)) * std / np.sqrt(2000),
                                                             rel=2e-3)
    assert seeds_needed(0.05, 0.0) == 0 and np.isnan(detectable_difference(std, 1))
    words = power_words(std, 3)
    assert f"3 seeds detect ±{detectable_difference(std, 3):.3f} at 80% power" in words
    assert f"±0.02: {seeds_needed(0.02, std)}" in words and f"±0.05: {seeds_needed(0.05, std)}" in words
    results = _results({"du": [0.70, 0.72, 0.68], "kdu": [0.74, 0.73, 0.71]})
    d, s, n = paired_difference(results, "kdu", "du")
    lines = verdict(results, summarise(results, ["du", "kdu"]), "y")
    assert any(power_words(s, n) in line for line in lines if line.startswith("KDU is above plain DU"))


def test_run_logs_go_to_the_run_folder_and_progress_is_one_line_an_epoch(cohort, tmp_path, capfd):
    lines: list[str] = []
    updates: list[str] = []
    result = run_compare(_config(cohort, tmp_path / "r", methods=("du",), epochs=2, label_sizes=(None,),
                                 label_draws=1, audit=False, plots=False), log=lines.append, progress=updates.append)
    printed = capfd.readouterr()
    assert "Iter:" not in printed.out + printed.err  # MONAI's per-iteration lines are not on the console
    log = (tmp_path / "r" / "runs" / "seed0" / "du" / "logs" / "run.log").read_text()
    steps = int(result["results"]["steps"].iloc[0])
    assert log.count("Iter:") == steps and steps > 0  # they are in the run's log, one per step
    assert [u.split(": ", 1)[1].split(",")[0] for u in updates] == ["epoch 1/2", "epoch 2/2"]
    assert all(u.startswith("[1/1] seed 0 plain DU: ") and "images/s, ETA" in u for u in updates)
    assert updates[-1].endswith("ETA 0 s")
    assert any("images/s (log: " in line for line in lines)
    import logging

    handlers = logging.getLogger("monai.handlers.StatsHandler").handlers
    assert handlers and not any(isinstance(h, logging.FileHandler) for h in handlers)  # the console handler is back


def test_a_pool_pretrains_and_the_probes_are_cross_fitted(cohort, tmp_path):
    """--pool: pretraining reads the pool less the labelled patients (counted), the probes are cross-fitted over
    every labelled patient, and MONAI's own runner with the same overrides gives the same encoder."""
    from monai_du.evaluation import linear_probe

    labelled = pd.read_csv(cohort)
    other = make_cxr_cohort(tmp_path / "other", n=40, seed=5, size=32)
    pool = pd.read_csv(other)
    pool["image"] = [str(Path(other).parent / name) for name in pool["image"]]
    shared = labelled[labelled["patient_id"].isin(labelled["patient_id"].unique()[:6])].copy()
    shared["image"] = [str(Path(cohort).parent / name) for name in shared["image"]]
    pool = pd.concat([pool, shared], ignore_index=True)
    pool_path = tmp_path / "pool.csv"
    pool.to_csv(pool_path, index=False)
    lines: list[str] = []
    out = tmp_path / "r"
    result = run_compare(_config(cohort, out, pool=pool_path, folds=3, label_sizes=(5, None)), log=lines.append)
    # label efficiency: size 5 and "all", the latter one column (labelled patients less a fold's share) for any fold
    patients = labelled.loc[labelled["label_effusion"].isin([0, 1]), "patient_id"].nunique()
    assert set(result["efficiency"]["n_patients"]) == {5, int(patients * 2 / 3)}
    written = pd.read_csv(out / "pool_manifest.csv")
    assert len(written) == len(pool) - len(shared) and not set(written["patient_id"]) & set(labelled["patient_id"])
    # the runs share one decode-once cache in the report folder: every pool image decoded once
    assert len(list((out / "image_cache").rglob("*.npy"))) == len(written)
    assert (f"pool {pool_path}: {len(pool)} images of {pool['patient_id'].nunique()} patients from 4 sites; "
            f"{len(shared)} images of 6 patients of the labelled manifest removed") in "\n".join(lines)
    assert "cross-fitted over 3 patient-grouped folds of every labelled patient" in result["table"] or any(
        "cross-fitted over 3 patient-grouped folds" in line for line in lines)
    # the probe's AUC is the out-of-fold AUC over every labelled patient of the exported encoder's features
    from monai_du.compare import _features
    from monai_du.data.loading import load_images

    images = load_images(labelled.assign(image_path=[str(Path(cohort).parent / i) for i in labelled["image"]]),
                         modality="2d", image_size=32)
    features = _features(out / "runs" / "seed0" / "du" / "models", images, "cpu")
    y = labelled["label_effusion"]
    scores = linear_probe(features, y, groups=labelled["patient_id"].astype(str).to_numpy(), n_splits=3, seed=0)
    assert scores.evaluated.sum() == y.isin([0, 1]).sum()  # every labelled image scored once
    row = result["results"].set_index("method_key").loc["du"]
    assert row["auc"] == pytest.approx(scores.roc_auc(n_bootstrap=0)[0], abs=1e-12)
    # site leakage is measured on a fixed sample of the pool's own images, up to POOL_LEAKAGE_PER_SITE per site
    from monai_du.compare import POOL_LEAKAGE_PER_SITE, _pool_leakage_rows
    from monai_du.data.manifest import read_manifest
    from monai_du.evaluation import site_leakage

    sample = _pool_leakage_rows(read_manifest(out / "pool_manifest.csv", root=tmp_path))
    assert 2 <= sample["site"].nunique() and sample["site"].value_counts().max() <= POOL_LEAKAGE_PER_SITE
    assert set(sample["patient_id"]) <= set(written["patient_id"])
    leak = site_leakage(_features(out / "runs" / "seed0" / "du" / "models", load_images(sample, modality="2d",
                                                                                        image_size=32), "cpu"),
                        sample["site"].astype(str).to_numpy(), groups=sample["patient_id"].astype(str).to_numpy(),
                        n_splits=5, seed=0)
    assert row["site_leakage"] == pytest.approx(leak.balanced_accuracy, abs=1e-12)
    assert row["site_chance"] == pytest.approx(1 / sample["site"].nunique())
    assert any(line.startswith(f"site leakage: measured on {len(sample)} pool images") for line in lines)
    # the pool run is an ordinary bundle run: the same overrides through MONAI's runner give the same encoder
    root = tmp_path / "cli_run"
    overrides = {"manifest": str(out / "pool_manifest.csv"), "dataset_dir": str(tmp_path), "seed": 0,
                 "split_seed": 0, "split_fractions": {"train": 1.0}, "pretrain_split": "train", "max_epochs": 1,
                 "batch_size": 8, **TINY}
    _assert_the_bundle_command_gives_the_encoder(out / "runs" / "seed0" / "du", overrides, root, tmp_path)


def test_a_method_that_cannot_run_on_the_data_is_one_line_and_keeps_the_finished_runs(cohort, tmp_path, capsys):
    """A pool with no known age cannot fit kdu_attr's age bandwidth: one line naming the method, its cause and what
    to do; the runs finished before it stay."""
    pool = pd.read_csv(cohort).assign(age=np.nan, patient_id=lambda d: "pool_" + d["patient_id"].astype(str))
    pool_path = tmp_path / "pool_no_age.csv"
    pool.to_csv(pool_path, index=False)
    out = tmp_path / "r"
    status = main(["compare", "--manifest", str(cohort), "--label", "effusion", "--pool", str(pool_path),
                   "--pool-dataset-dir", str(Path(cohort).parent), "--methods", "random", "kdu_attr", "--seeds", "0",
                   "--epochs", "1", "--batch-size", "8", "--folds", "3", "--label-sizes", "5", "--label-draws", "1",
                   "--n-bootstrap", "10", "--no-audit", "--no-plots", "--out", str(out), "--set", "num_workers=0",
                   "spatial_size=[32, 32]", "widen_factor=0.125"])
    err = capsys.readouterr().err.strip()
    assert status == 1 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "method 'kdu_attr' (seed 0) could not run on" in err and "fewer than 2 rows without missing values" in err
    assert "leave the method out (--methods)" in err
    assert (out / "runs" / "seed0" / "random" / "eval" / "probe.json").is_file()  # kept


def test_the_all_patients_label_efficiency_rows_are_the_main_probe_fits(cohort, tmp_path):
    """The "all patients" rows of the label-efficiency table reuse the main probe's fits: on the one split and on
    each cross-fitting fold they equal what label_efficiency computes on its own, uncertain (-1) rows left out."""
    from joblib.externals.loky import get_reusable_executor

    from monai_du.compare import _probe, _probe_folds, _split
    from monai_du.evaluation import label_efficiency

    df = pd.read_csv(cohort, dtype={"patient_id": str})
    y = df["label_effusion"].astype(float).copy()
    y.iloc[::6] = -1.0
    df["label_effusion"] = y
    rng = np.random.default_rng(0)
    features = rng.normal(size=(len(df), 6)) + y.clip(lower=0).to_numpy()[:, None]
    groups = df["patient_id"].to_numpy()
    folds = _probe_folds(df["label_effusion"], groups, 3, 0)
    train_mask = _split(df, 0, 0.3)
    cases = [(_config(cohort, tmp_path / "split", label_sizes=(None,)), train_mask, None, [train_mask]),
             (_config(cohort, tmp_path / "pool", pool=cohort, folds=3, label_sizes=(None,)), None, folds,
              [(folds >= 0) & (folds != k) for k in range(3)])]
    for config, mask, fold_ids, fit_masks in cases:
        try:
            curve = pd.DataFrame(_probe(features, df, "label_effusion", mask, fold_ids, 0, config)["label_efficiency"])
        finally:  # _probe alone, outside run_compare: stop its worker processes here
            get_reusable_executor().shutdown(wait=True)
        assert len(curve) == len(fit_masks)
        for (_, row), fit in zip(curve.iterrows(), fit_masks):
            alone = label_efficiency(features, y, groups, fit, n_patients=(None,), n_draws=1)
            for name in ("auc", "chosen_C", "n_images", "n_positive"):
                assert row[name] == pytest.approx(alone[name].iloc[0], abs=1e-12), name
