"""Tests of monai_du.demo: tiny end-to-end runs (2D with the sweep, 3D) and the verdict computed from the numbers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from monai_du.demo import METHODS, SWEEP_VARIANTS, DemoConfig, format_summary, run_demo, verdict

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_SIGNATURE


@pytest.fixture(scope="module")
def tiny_cxr(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_cxr")
    lines: list[str] = []
    config = DemoConfig(
        modality="cxr", n=60, image_size=32, epochs=1, seeds=(0,), out=str(out), n_bootstrap=50, gen_epochs=1,
        sweep=True,
    )
    return run_demo(config, log=lines.append), out, lines


def test_tiny_demo_writes_the_report(tiny_cxr):
    result, out, lines = tiny_cxr
    for name in ("loss_curves.png", "prior_kernel_batch.png", "embeddings_pca.png", "summary.png"):
        assert (out / name).is_file() and _is_png(out / name), name
    results = pd.read_csv(out / "results.csv")
    assert sorted(results["method"]) == sorted(spec.name for spec in METHODS.values())
    assert (results["seed"] == 0).all()
    payload = json.loads((out / "results.json").read_text())
    assert payload["config"]["epochs"] == 1 and len(payload["results"]) == len(METHODS)
    assert payload["table"] == result["table"]
    # the printed table names every method and appears in the log
    printed = "\n".join(lines)
    for spec in METHODS.values():
        assert spec.name in result["table"]
    assert result["table"] in printed
    # trained methods logged one loss per iteration; the random-init encoder did not train
    trained = results[results["method_key"] != "random"]
    assert np.isfinite(trained["final_loss"]).all()
    assert np.isnan(results.loc[results["method_key"] == "random", "final_loss"]).all()
    # the sweep ran its variants on the first seed
    sweep = pd.read_csv(out / "sweep.csv")
    assert set(SWEEP_VARIANTS) <= set(sweep["method_key"])


def test_tiny_demo_prior_table_is_keyed_by_image(tiny_cxr):
    from monai_du.priors import load_prior_table, prior_columns

    _, out, _ = tiny_cxr
    manifest = pd.read_csv(out / "cohort" / "manifest.csv")
    table = load_prior_table(out / "priors" / "prior_table_seed0.csv")
    assert sorted(table["image"]) == sorted(manifest["image"])
    assert len(prior_columns(table)) == DemoConfig().gen_latent_dim


def test_tiny_demo_numbers_match_a_direct_sklearn_probe(tiny_cxr):
    """The random-init row, recomputed outside the demo: same split, same initial weights, scikit-learn probe."""
    from monai_du.data.manifest import read_manifest
    from monai_du.data.splits import patient_split
    from monai_du.networks import ContrastiveEncoder
    from monai_du.priors import load_images

    result, out, _ = tiny_cxr
    config = DemoConfig(modality="cxr", n=60, image_size=32, seeds=(0,)).resolved()
    df = read_manifest(out / "cohort" / "manifest.csv").reset_index(drop=True)
    images = load_images(df, modality="2d", image_size=32)
    fractions = {"train": 1 - config.test_fraction, "test": config.test_fraction}
    split = patient_split(df, fractions, seed=0, stratify="site")
    train = (split["split"] == "train").to_numpy()
    torch.manual_seed(0)
    net = ContrastiveEncoder(config.backbone, spatial_dims=2, projection_dim=config.projection_dim,
                             backbone_kwargs={"widen_factor": config.widen_factor}).eval()
    with torch.no_grad():
        feats = net.encoder(torch.from_numpy(images)).numpy().astype(np.float64)
    row = result["results"].set_index("method_key").loc["random"]
    checked = 0
    for label in ("effusion", "cardiomegaly"):
        y = df[f"label_{label}"].to_numpy()
        if len(np.unique(y[~train])) < 2 or len(np.unique(y[train])) < 2:
            assert np.isnan(row[f"auc_{label}"])  # not scorable: reported as missing, not made up
            continue
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(feats[train], y[train])
        expected = roc_auc_score(y[~train], probe.predict_proba(feats[~train])[:, 1])
        assert row[f"auc_{label}"] == pytest.approx(expected, abs=1e-4)
        checked += 1
    assert checked >= 1
    site = df["site"].astype(str).to_numpy()
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(feats[train], site[train])
    expected = balanced_accuracy_score(site[~train], probe.predict(feats[~train]))
    assert row["site_leakage"] == pytest.approx(expected, abs=1e-4)


def test_tiny_brain_demo_reports_age_mae(tmp_path):
    config = DemoConfig(
        modality="brain", n=24, image_size=16, epochs=1, seeds=(0,), out=str(tmp_path), n_bootstrap=20,
        gen_epochs=1, ae_image_size=16, batch_size=8, methods=("random", "kdu_attr", "kdu_gen"),
    )
    result = run_demo(config, log=None)
    results = result["results"]
    assert list(results["method_key"]) == ["random", "kdu_attr", "kdu_gen"]
    assert np.isfinite(results["age_mae"]).all() and (results["age_mae"] > 0).all()
    assert "age MAE" in result["table"]
    assert _is_png(tmp_path / "embeddings_pca.png")


def _fake_results(auc: dict[str, list[float]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = []
    for key, values in auc.items():
        for seed, value in enumerate(values):
            rows.append({"method_key": key, "method": METHODS[key].name, "seed": seed, "auc_x": value,
                         "site_leakage": 0.5, "site_chance": 0.25})
    results = pd.DataFrame(rows)
    summary = pd.DataFrame(
        [
            {"method_key": k, "method": METHODS[k].name, "auc_x_mean": np.mean(v), "auc_x_std": np.std(v, ddof=1),
             "site_leakage_mean": 0.5, "site_leakage_std": 0.0, "site_chance": 0.25}
            for k, v in auc.items()
        ]
    )
    return results, summary


def test_verdict_follows_the_numbers():
    results, summary = _fake_results(
        {"random": [0.60, 0.62, 0.61], "du": [0.80, 0.82, 0.81], "kdu_attr": [0.70, 0.71, 0.69]}
    )
    lines = verdict(results, summary, "x")
    assert lines[0].startswith(f"Winner on the demo cohort (mean linear-probe AUC for x): {METHODS['du'].name}")
    assert any(line.startswith(f"{METHODS['kdu_attr'].name} does not beat plain DU: -0.110") for line in lines)
    results, summary = _fake_results({"du": [0.70, 0.71, 0.69], "kdu_attr": [0.75, 0.78, 0.74]})
    lines = verdict(results, summary, "x")
    assert METHODS["kdu_attr"].name in lines[0]
    assert any("beats plain DU: +0.057" in line and "larger than twice its standard error" in line for line in lines)
    # a difference inside the seed noise is called so
    results, summary = _fake_results({"du": [0.70, 0.80, 0.60], "kdu_attr": [0.80, 0.60, 0.72]})
    assert any("within the seed-to-seed noise" in line for line in verdict(results, summary, "x"))


def test_format_summary_shows_mean_and_spread():
    _, summary = _fake_results({"du": [0.70, 0.72, 0.74]})
    summary["auc_low_x_mean"], summary["auc_high_x_mean"], summary["wall_time_s_mean"] = 0.6, 0.8, 12.0
    summary["steps_mean"] = 40.0
    table = format_summary(summary, "x", ["x"], 3)
    assert "0.720 ± 0.020" in table and "[0.600, 0.800]" in table and "0.500 ± 0.000 (0.250)" in table
    assert "3 seeds" in table and "12.0 s" in table


def test_config_validation():
    with pytest.raises(ValueError, match="modality"):
        DemoConfig(modality="ct").resolved()
    with pytest.raises(ValueError, match="unknown method"):
        DemoConfig(methods=("simclr",)).resolved()
    with pytest.raises(ValueError, match="lam > 0"):
        DemoConfig(lam=0).resolved()
    resolved = DemoConfig(modality="brain").resolved()
    assert resolved.image_size == 32 and resolved.label == "lesion"
