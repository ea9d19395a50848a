"""Tests of ``compare --finetune`` (monai_du.finetune_compare): the plan of fine-tune runs (patients never on two
sides, the same for every method, both classes in every validation split), and a tiny comparison whose fine-tuned
AUC is recomputed with scikit-learn from the bundle's own prediction files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from monai_du.cli import main
from monai_du.compare import CompareConfig, _split, run_compare
from monai_du.finetune_compare import finetune_plan
from monai_du.phantoms import make_cxr_cohort

TINY = {"spatial_size": [32, 32], "num_workers": 0, "widen_factor": 0.125}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cxr_cohort(tmp_path_factory.mktemp("cohort"), n=48, seed=3, size=32)


def _synthetic(n_patients: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    per_patient = rng.integers(1, 4, n_patients)
    groups = np.repeat([f"p{i}" for i in range(n_patients)], per_patient)
    y = np.repeat(rng.integers(0, 2, n_patients).astype(float), per_patient)
    y[rng.random(y.size) < 0.05] = np.nan  # unlabelled rows are never used
    return y, groups


def test_the_plan_keeps_patients_apart_and_is_the_same_for_every_call():
    y, groups = _synthetic()
    folds = np.arange(len(np.unique(groups))) % 3
    fold_of_row = folds[np.unique(groups, return_inverse=True)[1]]
    splits = [(fold_of_row != k, fold_of_row == k) for k in range(3)]
    plan, notes = finetune_plan(y, groups, splits, (10, 500, None), seed=4)
    again, _ = finetune_plan(y, groups, splits, (10, 500, None), seed=4)
    other, _ = finetune_plan(y, groups, splits, (10, 500, None), seed=5)
    assert notes == []
    assert [r.name for r in plan] == ["split0_n10", "split0_all", "split1_n10", "split1_all", "split2_n10",
                                      "split2_all"]  # 500 is more than a split has: the "all" run covers it
    assert all((a.roles == b.roles).all() for a, b in zip(plan, again))
    assert any((a.roles != b.roles).any() for a, b in zip(plan, other))
    labelled = np.isin(y, (0, 1))
    for run in plan:
        assert not (run.roles[~labelled] != "").any()
        sides = {role: set(groups[run.roles == role]) for role in ("train", "val", "test")}
        assert not (sides["train"] & sides["val"] or sides["train"] & sides["test"] or sides["val"] & sides["test"])
        assert sides["test"] == set(groups[splits[run.split][1] & labelled])  # the probe split's held-out patients
        assert sides["train"] | sides["val"] <= set(groups[splits[run.split][0]])
        for role in ("train", "val"):
            assert set(y[run.roles == role]) == {0.0, 1.0}
        learned = len(sides["train"] | sides["val"])
        if run.size is None:
            assert learned == len(set(groups[splits[run.split][0] & labelled]))
        else:
            assert learned == run.size


def test_a_size_without_two_patients_of_each_class_is_skipped_with_a_note():
    y = np.array([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    groups = np.array(list("abcdefgh"))
    fit = np.array([True] * 6 + [False] * 2)
    plan, notes = finetune_plan(y, groups, [(fit, ~fit)], (3, None), seed=0)
    assert plan == [] and len(notes) == 2 and "split 0 has no draw of 3 patients with 2 of each class" in notes[0]


def test_a_run_manifest_keeps_the_written_label_values_and_absolute_paths(tmp_path):
    """The fine-tune bundle reads the run's manifest with the manifest schema: sex stays M/F (the probes' 0/1 is
    only the scored truth), images are absolute, and unused rows are left out."""
    from monai_du.data.manifest import RESOLVED_IMAGE_COLUMN, read_manifest
    from monai_du.finetune_compare import FineTuneSplit, _write_run_manifest

    rows = pd.DataFrame({"image": [f"v{i}.nii.gz" for i in range(4)], "patient_id": list("abcd"),
                         "sex": ["M", "F", "M", "F"], "age": [30.0, 40.0, 50.0, 60.0]})
    rows[RESOLVED_IMAGE_COLUMN] = [str(tmp_path / "images" / i) for i in rows["image"]]
    run = FineTuneSplit(0, None, np.array(["train", "val", "", "test"], dtype=object))
    path = _write_run_manifest(rows, run, tmp_path / "m" / "run.csv")
    back = pd.read_csv(path, dtype={"patient_id": str})
    assert list(back["sex"]) == ["M", "F", "F"] and list(back["split"]) == ["train", "val", "test"]
    assert list(back["image"]) == [str(tmp_path / "images" / f"v{i}.nii.gz") for i in (0, 1, 3)]
    assert list(read_manifest(path)[RESOLVED_IMAGE_COLUMN]) == list(back["image"])


def test_finetune_options_without_finetune_are_one_line_errors(cohort, tmp_path, capsys):
    base = ["compare", "--manifest", str(cohort), "--label", "effusion", "--out", str(tmp_path / "r")]
    assert main(base + ["--finetune-epochs", "2"]) == 1
    assert "go with --finetune" in capsys.readouterr().err
    assert main(base + ["--finetune", "--finetune-set", "no_such_id=1"]) == 1
    err = capsys.readouterr().err
    assert "no_such_id" in err and "cxr_finetune" in err and len(err.strip().splitlines()) == 1
    assert main(base + ["--finetune", "--finetune-set", "labels=['x']"]) == 1
    assert "compare sets it" in capsys.readouterr().err


def test_a_tiny_comparison_fine_tunes_every_encoder_and_pools_the_bundle_predictions(cohort, tmp_path):
    out = tmp_path / "r"
    config = CompareConfig(manifest=cohort, label="effusion", methods=("random", "du"), seeds=(0,), epochs=1,
                           batch_size=8, out=out, label_sizes=(8, None), label_draws=1, n_bootstrap=20,
                           overrides=TINY, plots=False, audit=False, finetune=True, finetune_epochs=1,
                           finetune_overrides={"num_workers": 0, "batch_size": 4})
    lines: list[str] = []
    result = run_compare(config, log=lines.append)
    tuned = result["finetune"]
    df = pd.read_csv(cohort, dtype={"patient_id": str})
    train_mask = _split(df, 0, config.test_fraction)
    patients = df.loc[df["label_effusion"].isin([0, 1]), "patient_id"].nunique()
    assert sorted(tuned["method_key"]) == ["du", "du", "random", "random"]
    assert set(tuned["n_patients"]) == {8, int(round(patients * (1 - config.test_fraction)))}
    for r in tuned.itertuples():
        run = out / "runs" / "seed0" / r.method_key / "finetune" / f"split0_{'all' if pd.isna(r.size) else 'n8'}"
        predicted = pd.read_csv(run / "predict" / "eval" / "predictions.csv", dtype={"patient_id": str})
        # the bundle scored exactly the probe's held-out patients
        assert set(predicted["patient_id"]) == set(df.loc[~train_mask & df["label_effusion"].isin([0, 1]),
                                                          "patient_id"])
        by_name = dict(zip([Path(i).name for i in df["image"]], df["label_effusion"]))
        y = [by_name[Path(p).name] for p in predicted["image"]]
        assert r.auc == pytest.approx(roc_auc_score(y, predicted["prob_effusion"]), abs=1e-12)
        # every layer learned: the fine-tuned encoder differs from the pretrained one it started from
        start = torch.load(out / "runs" / "seed0" / r.method_key / "models" / "encoder.pt", map_location="cpu")
        tuned_model = torch.load(run / "models" / "model.pt", map_location="cpu")
        tuned_model = tuned_model.get("model", tuned_model)
        key = next(k for k in start if k.endswith("weight") and start[k].ndim > 1)
        assert not torch.equal(start[key], tuned_model["encoder." + key])
    assert (out / "finetune.csv").is_file()
    text = (out / "report.txt").read_text()
    assert "fine-tuned end to end" in text and "plain DU against random init" in text
    assert any("fine-tuned AUC" in line for line in lines)
    # a rerun reuses the finished fine-tune runs and gives the same numbers
    marker = out / "runs" / "seed0" / "du" / "finetune" / "split0_all" / "models" / "compare_done.json"
    stamp = marker.stat().st_mtime_ns
    again = run_compare(config, log=None)
    assert marker.stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(again["finetune"], tuned)
