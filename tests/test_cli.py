"""Tests of monai_du.cli: argument parsing, --help through both entry points, errors, and `monai-du prior`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from monai_du.cli import build_parser, main


def test_demo_and_compare_defaults_are_the_librarys():
    from monai_du.cli import _budget

    args = build_parser().parse_args(["demo"])
    assert args.modality is None and args.seeds is None
    budget = _budget(args)  # unset options are not passed on: the demo's (or compare's) own defaults apply
    assert set(budget) == {"overrides", "plots", "audit"}
    args = build_parser().parse_args(
        ["compare", "--manifest", "m.csv", "--label", "effusion", "--methods", "du", "kdu_attr", "--seeds", "3", "4",
         "--epochs", "2", "--method-config", "a.yaml", "b.yaml", "--set", "num_workers=0", "lam=0.1", "--out", "r"]
    )
    assert args.manifest == "m.csv" and args.label == "effusion" and args.methods == ["du", "kdu_attr"]
    assert args.seeds == [3, 4] and args.epochs == 2 and args.method_config == ["a.yaml", "b.yaml"]
    budget = _budget(args)
    assert budget["seeds"] == (3, 4) and budget["methods"] == ("du", "kdu_attr") and budget["epochs"] == 2
    assert budget["overrides"] == {"num_workers": 0, "lam": 0.1}


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--modality", "ct"],
        ["demo", "--epochs", "two"],
        ["compare", "--label", "x"],  # --manifest is required
        ["compare", "--manifest", "m.csv"],  # --label is required
        ["prior", "--out", "t.csv"],  # --manifest is required
        ["bundle", "path", "nope"],
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


@pytest.mark.parametrize(
    "options, words",
    [
        (["--test-fraction", "1.5"], "test_fraction must lie in (0, 1)"),
        (["--epochs", "0"], "epochs must be a whole number >= 1, got 0"),
        (["--epochs", "-1"], "epochs must be a whole number >= 1, got -1"),
        (["--batch-size", "0"], "batch_size must be a whole number >= 2"),
        (["--seeds", "0", "0"], "seeds [0] are given twice"),
        (["--seeds", "-1"], "each seed must be a whole number >= 0, got -1"),
        (["--label-draws", "0"], "label_draws must be a whole number >= 1"),
        (["--n-bootstrap", "-5"], "n_bootstrap must be a whole number >= 0"),
        (["--set", "lerning_rate=0.1"], "no such id; did you mean learning_rate?"),
        (["--set", "learning_rate=[1"], "--set learning_rate: the value '[1' is not valid YAML"),
        (["--set", "learning_rate=abc"], "override 'learning_rate': expected a number like the bundle's 0.001"),
        (["--set", "batch_size=64"], "override 'batch_size': compare sets it for every run; use its batch_size"),
        (["--set", "max_epochs=3"], "override 'max_epochs': compare sets it for every run; use its epochs setting"),
        (["--set", "time_column=$__import__('os')"], "would run as code"),
        (["--methods", "du", "du"], "lists a method twice"),
    ],
)
def test_invalid_settings_are_one_line_errors_before_any_work(tmp_path, capsys, options, words):
    """The library checks every setting when the config is made; the CLI prints its message in one line."""
    out = tmp_path / "r"
    assert main(["demo", "--out", str(out), *options]) == 1
    err = capsys.readouterr().err
    assert err.startswith("monai-du demo: error:") and words in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing ran, nothing was written


def test_the_library_gives_the_same_messages_as_the_cli(tmp_path):
    from monai_du.compare import CompareConfig
    from monai_du.data.real_cohort import nih_cxr_dev_manifest

    with pytest.raises(ValueError, match=r"seeds \[0\] are given twice"):
        CompareConfig(manifest=nih_cxr_dev_manifest(), label="no_finding", seeds=(0, 0), out=tmp_path / "r")
    with pytest.raises(ValueError, match="epochs must be a whole number >= 1, got 0"):
        CompareConfig(manifest=nih_cxr_dev_manifest(), label="no_finding", epochs=0, out=tmp_path / "r")
    with pytest.raises(ValueError, match="manifest .*missing.csv does not exist"):
        CompareConfig(manifest=tmp_path / "missing.csv", label="x")


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


def test_bundle_command_prints_and_copies_the_shipped_bundles(tmp_path, capsys):
    from monai_du.bundles import SHIPPED_BUNDLES

    assert main(["bundle", "path", "cxr"]) == 0
    source = Path(capsys.readouterr().out.strip())
    assert source.name == "cxr_du_pretrain" and (source / "configs" / "train.yaml").is_file()
    for name in SHIPPED_BUNDLES:
        assert main(["bundle", "path", name]) == 0
        assert (Path(capsys.readouterr().out.strip()) / "configs" / "metadata.json").is_file(), name
    target = tmp_path / "my_bundle"
    assert main(["bundle", "copy", "cxr", str(target)]) == 0
    assert Path(capsys.readouterr().out.strip()) == target

    def files(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                      if p.is_file() and not {"__pycache__", "models", "eval", "logs", "data"} & set(p.parts))

    assert files(target) == files(source) and "configs/methods/du.yaml" in files(target)
    assert (target / "configs" / "train.yaml").read_bytes() == (source / "configs" / "train.yaml").read_bytes()
    assert main(["bundle", "copy", "cxr", str(target)]) == 1  # never over an existing folder
    assert "exists already" in capsys.readouterr().err
    assert main(["bundle", "copy", "cxr"]) == 1
    assert "needs a destination" in capsys.readouterr().err


def test_help_of_the_console_script():
    exe = shutil.which("monai-du")
    if exe is None:
        pytest.skip("the monai-du console script is not installed (pip install -e . creates it)")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("usage: monai-du")


def test_prior_command_writes_a_table_keyed_by_image(tmp_path, capsys):
    from monai_du.phantoms import make_cxr_cohort
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


def test_audit_settings_and_skipped_candidates_are_named(tmp_path, capsys):
    """Bad audit settings are one line before any work; an attribute left out of the candidates says why."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = 80
    df = pd.DataFrame({"image": [f"i{k}.png" for k in range(n)], "patient_id": [f"p{k // 2}" for k in range(n)],
                       "age": np.nan, "sex": rng.choice(["M", "F"], n), "site": "A",
                       "label_x": rng.integers(0, 2, n).astype(float)})
    manifest = tmp_path / "m.csv"
    df.to_csv(manifest, index=False)
    base = ["audit", "--manifest", str(manifest), "--label", "x"]
    for options, words in ((["--batch-size", "1"], "batch_size must be a whole number >= 2, got 1"),
                           (["--seed", "-1"], "seed must be a whole number >= 0, got -1"),
                           (["--set", "lerning_rate=0.1"], "did you mean learning_rate?")):
        assert main(base + options) == 1
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
    assert main(base + ["--bundle", "none", "--batch-size", "16", "--n-permutations", "19"]) == 0
    out = capsys.readouterr().out
    assert "- age: skipped (column 'age' has 0 distinct known value(s); a prior needs 2)" in out
    assert "- site: skipped (column 'site' has 1 distinct known value(s); a prior needs 2)" in out
    assert "- view: skipped (the manifest has no 'view' column)" in out
    assert "- age x sex: skipped (needs both age and sex" in out


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    taken = tmp_path / "report.txt"
    taken.write_text("keep me\n")
    assert main(["demo", "--out", str(taken)]) == 1
    err = capsys.readouterr().err
    assert f"out {taken} is a file, not a folder" in err and len(err.strip().splitlines()) == 1
    assert taken.read_text() == "keep me\n"  # nothing lost


def test_out_in_a_read_only_folder_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    """As root every folder is writable, so the check is exercised through os.access, which it asks."""
    import os

    read_only = tmp_path / "read_only"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == read_only else real_access(path, mode))
    assert main(["demo", "--out", str(read_only / "report")]) == 1
    err = capsys.readouterr().err
    assert f"{read_only} is not writable; choose another report folder" in err and len(err.strip().splitlines()) == 1
    assert not (read_only / "report").exists()


def test_no_path_runs_as_code_in_audit_cache_and_prior(tmp_path, monkeypatch, capsys):
    """Paths that start with '$' stay file names in every entry point that reaches a bundle config or writes files."""
    from monai_du.phantoms import make_cxr_cohort

    monkeypatch.chdir(tmp_path)
    code = "$__import__('os').mkdir('pwned') or 'zz'"
    cohort = make_cxr_cohort(tmp_path / code, n=24, seed=2, size=16)
    manifest = Path(code) / cohort.name  # relative, and starting with '$'
    assert main(["audit", "--manifest", str(manifest), "--label", "effusion", "--batch-size", "8", "--n-batches", "2",
                 "--n-permutations", "9", "--methods", "kdu_attr", "--out", code + "_audit"]) == 0
    assert main(["cache", "--manifest", str(manifest), "--out", code + "_cache", "--spatial-size", "16"]) == 0
    assert main(["prior", "--manifest", str(manifest), "--out", code + "_prior.csv", "--image-size", "16",
                 "--latent-dim", "2", "--epochs", "1", "--batch-size", "8", "--split", "all"]) == 0
    capsys.readouterr()
    assert not (tmp_path / "pwned").exists()
    assert (tmp_path / (code + "_audit") / "audit.csv").is_file() and (tmp_path / (code + "_prior.csv")).is_file()
    assert (tmp_path / (code + "_cache")).is_dir()
    assert main(["audit", "--manifest", str(manifest), "--label", "effusion", "--set", "time_column=" + code]) == 1
    assert "would run as code" in capsys.readouterr().err
