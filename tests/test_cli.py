"""Tests of monai_du.cli: argument parsing, --help through both entry points, errors, and `monai-du prior`."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pandas as pd
import pytest

from monai_du.cli import build_parser, main


def test_demo_and_compare_defaults_and_options():
    from monai_du.cli import _budget

    args = build_parser().parse_args(["demo"])
    assert (args.modality, args.seeds) == ("cxr", [0, 1, 2])
    budget = _budget(args)  # unset options keep the demo's (or compare's) own defaults
    assert "methods" not in budget and "label_draws" not in budget and budget["epochs"] is None
    args = build_parser().parse_args(
        ["compare", "--manifest", "m.csv", "--label", "effusion", "--methods", "du", "kdu_attr", "--seeds", "3", "4",
         "--epochs", "2", "--method-config", "a.yaml", "b.yaml", "--set", "num_workers=0", "lam=0.1", "--out", "r"]
    )
    assert args.manifest == "m.csv" and args.label == "effusion" and args.methods == ["du", "kdu_attr"]
    assert args.seeds == [3, 4] and args.epochs == 2 and args.method_config == ["a.yaml", "b.yaml"]
    from monai_du.cli import _overrides

    assert _overrides(args.set) == {"num_workers": 0, "lam": 0.1}


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--modality", "ct"],
        ["demo", "--epochs", "-1"],
        ["demo", "--batch-size", "0"],
        ["compare", "--label", "x"],  # --manifest is required
        ["compare", "--manifest", "m.csv"],  # --label is required
        ["prior", "--out", "t.csv"],  # --manifest is required
    ],
)
def test_bad_arguments_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    assert "usage: monai-du" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "{demo,compare," in capsys.readouterr().out


def test_invalid_settings_are_one_line_errors(tmp_path, capsys):
    assert main(["demo", "--test-fraction", "1.5", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("monai-du demo: error:") and "test_fraction" in err and "Traceback" not in err


def test_help_of_the_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "monai_du.cli", "--help"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("usage: monai-du") and "demo" in out.stdout and "prior" in out.stdout


@pytest.mark.parametrize(
    "command, options",
    [
        ("demo", ("--modality", "--seeds", "--epochs", "--out", "--methods", "--method-config", "--set")),
        ("compare", ("--manifest", "--dataset-dir", "--label", "--methods", "--method-config", "--seeds", "--epochs",
                     "--batch-size", "--out", "--bundle")),
        ("prior", ("--manifest", "--out", "--epochs", "--latent-dim", "--checkpoint", "--train-split")),
    ],
)
def test_subcommand_help(command, options, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: monai-du {command}")
    for option in options:
        assert option in text


def test_help_of_the_console_script():
    exe = shutil.which("monai-du")
    if exe is None:
        pytest.skip("the monai-du console script is not installed (pip install -e . creates it)")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("usage: monai-du")


def test_prior_command_writes_a_table_keyed_by_image(tmp_path, capsys):
    from monai_du.data.cohorts import make_cxr_cohort
    from monai_du.priors import load_prior_table

    manifest = make_cxr_cohort(tmp_path / "cohort", n=10, seed=1, size=16)
    df = pd.read_csv(manifest)
    df["split"] = ["train"] * 7 + ["test"] * 3
    df.to_csv(manifest, index=False)
    status = main(["prior", "--manifest", str(manifest), "--out", str(tmp_path / "prior.csv"), "--image-size", "16",
                   "--latent-dim", "3", "--epochs", "1", "--batch-size", "4", "--train-split", "train"])
    assert status == 0
    table = load_prior_table(tmp_path / "prior.csv")
    assert table["image"].tolist() == df["image"].tolist()  # every image encoded, not only the training rows
    assert list(table.columns) == ["image", "gen_0", "gen_1", "gen_2"]
    assert "wrote the prior table" in capsys.readouterr().out
    assert main(["prior", "--manifest", str(manifest), "--out", str(tmp_path / "p2.csv"), "--image-size", "16",
                 "--epochs", "1", "--train-split", "val"]) == 1
    assert "no row has split == 'val'" in capsys.readouterr().err
