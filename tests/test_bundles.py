"""Tests of monai_du.bundles: where the shipped bundles are, and the contract of a method file (it declares its printed
name, builds under MONAI's ConfigParser, and a kernel method yields an audit candidate); a new method is one file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from monai.bundle import ConfigParser

from monai_du.audit import bundle_candidates
from monai_du.bundles import (
    PRETRAIN_BUNDLES,
    SHIPPED_BUNDLES,
    bundle_path,
    check_overrides,
    default_methods,
    kernel_methods,
    method_files,
    method_spec,
    shipped_bundle,
    shipped_bundles_root,
    stage_files,
)
from monai_du.compare import CompareConfig
from monai_du.priors import make_prior_table, write_prior_table

REPO = Path(__file__).resolve().parents[1]


def _method_paths(bundle: str) -> list[Path]:
    return sorted((bundle_path(bundle) / "configs" / "methods").glob("*.yaml"))


def _manifest(tmp_path: Path, n_patients: int = 40) -> Path:
    """Patients with 1..4 studies, age, sex, two sites, follow-up and a label; no image is read."""
    rng = np.random.default_rng(0)
    rows = []
    for p in range(n_patients):
        for visit in range(int(rng.integers(1, 5))):
            rows.append({"image": f"img/{p:03d}_{visit}.png", "patient_id": f"p{p:03d}",
                         "age": float(rng.uniform(20, 90)), "sex": "MF"[p % 2], "site": f"s{p % 2}",
                         "follow_up": visit, "label_x": float(rng.integers(0, 2))})
    path = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _manifest_and_prior_table(tmp_path: Path) -> tuple[Path, Path]:
    """:func:`_manifest` and a prior table (3 random features) of every one of its images."""
    manifest = _manifest(tmp_path)
    table = tmp_path / "table.csv"
    df = pd.read_csv(manifest)
    write_prior_table(make_prior_table(df["image"], np.random.default_rng(1).normal(size=(len(df), 3))), table)
    return manifest, table


def test_the_shipped_bundles_are_found_in_the_package():
    root = shipped_bundles_root()
    assert sorted(p.name for p in root.iterdir() if (p / "configs").is_dir()) == sorted(SHIPPED_BUNDLES)
    for key, folder in PRETRAIN_BUNDLES.items():
        assert bundle_path(key) == shipped_bundle(folder) == root / folder
    with pytest.raises(ValueError, match="unknown bundle 'ct'"):
        shipped_bundle("ct")
    with pytest.raises(ValueError, match="no configs/train.yaml under"):
        bundle_path(REPO / "tests")


@pytest.mark.parametrize("bundle", sorted(PRETRAIN_BUNDLES))
def test_every_method_file_declares_its_name_and_place(bundle):
    for path in _method_paths(bundle):
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert isinstance(raw.get("method_name"), str) and raw["method_name"].strip(), path
        assert "method_order" in raw, path  # a number, or null: not compared by default
        spec = method_spec(path)
        assert (spec.key, spec.name, spec.order) == (path.stem, raw["method_name"], raw["method_order"])
    orders = [method_spec(p).order for p in _method_paths(bundle) if method_spec(p).order is not None]
    assert len(orders) == len(set(orders)), f"two methods share a method_order: {orders}"
    expected = [p.stem for p in sorted(_method_paths(bundle), key=lambda p: method_spec(p).order or 0)
                if method_spec(p).order is not None]
    assert list(default_methods(bundle)) == expected and expected[:2] == ["random", "du"]


@pytest.mark.parametrize("bundle", sorted(PRETRAIN_BUNDLES))
def test_every_method_file_builds_under_the_config_parser(bundle, tmp_path):
    """train.yaml plus the method file resolve the loss, the fitted kernel and the batch sampler on a manifest."""
    manifest, table = _manifest_and_prior_table(tmp_path)
    folder = bundle_path(bundle)
    for path in _method_paths(bundle):
        spec = method_spec(path)
        for file in stage_files(folder, spec):
            parser = ConfigParser()
            parser.read_config([str(folder / "configs" / "train.yaml"), str(file)])
            parser.update({"manifest": str(manifest), "dataset_dir": str(tmp_path), "bundle_root": str(tmp_path / "r"),
                           "batch_size": 8, "spatial_size": [16] * len(parser["spatial_size"])})
            if "prior_table" in parser:
                parser["prior_table"] = str(table)
            loss = parser.get_parsed_content("loss")
            assert callable(loss), (path.name, file.name)
            if parser.get("kernel") is not None:
                kernel = parser.get_parsed_content("fitted_kernel")
                assert "Kernel" in type(kernel).__name__, (path.name, file.name)
            parser["train#dataset"] = type("Records", (), {"data": parser.get_parsed_content("train#df").to_dict(
                "records")})()
            batches = list(iter(parser.get_parsed_content("train#sampler")))
            assert batches and all(len(b) == 8 for b in batches), (path.name, file.name)


@pytest.mark.parametrize("bundle", sorted(PRETRAIN_BUNDLES))
def test_every_kernel_method_yields_an_audit_candidate(bundle, tmp_path):
    manifest, table = _manifest_and_prior_table(tmp_path)
    methods = kernel_methods(bundle)
    assert methods == sorted(p.stem for p in _method_paths(bundle)
                             if yaml.safe_load(p.read_text(encoding="utf-8")).get("kernel") is not None)
    tables = {key: table for key in ("kdu_gen", "kdu_encoder")}
    candidates, skipped = bundle_candidates(bundle, manifest, methods=methods, prior_tables=tables,
                                            overrides={"batch_size": 8}, n_batches=3, work_dir=tmp_path / "work")
    assert not skipped and sorted(candidates) == sorted(methods)


def test_composite_methods_name_single_run_stages(tmp_path):
    for bundle in PRETRAIN_BUNDLES:
        folder = bundle_path(bundle)
        for path in _method_paths(bundle):
            spec = method_spec(path)
            for stage in spec.stages:
                stage_spec = method_spec(folder / "configs" / "methods" / f"{stage.method}.yaml")
                assert not stage_spec.stages, (path.name, stage.method)
            if spec.stages:
                assert abs(sum(s.share for s in spec.stages) - 1) < 1e-12
    bad = tmp_path / "bad.yaml"
    for text, words in [
        ("method_stages: [{method: du, share: 1.0}]\n", "at least two stages"),
        ("method_stages: [{method: du, share: 0.5}, {method: simclr, share: 0.6}]\n", "add up to 1"),
        ("method_stages: [{method: du, share: 0.5, init_from_previous: true}, {method: du, share: 0.5}]\n",
         "first stage has no previous stage"),
        ("method_stages: [{method: du, share: 0.5}, {method: du, sharing: 0.5}]\n", "stage 1 must be a mapping"),
        ("method_stages: [{method: du, share: 0.5}, {method: du, share: 0.5}]\nlam: 0.1\n", "sets no bundle ids"),
        ("method_order: first\n", "method_order must be a whole number"),
    ]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=words):
            method_spec(bad)
    bad.write_text("method_stages: [{method: du, share: 0.5}, {method: kdu_bootstrap, share: 0.5}]\n")
    with pytest.raises(ValueError, match="'kdu_bootstrap' is not a single-run method"):
        method_files("cxr", [], [bad])


def test_a_new_method_is_one_file(tmp_path):
    """Dropping one YAML file into a copy of the bundle makes a method that compare runs by default, in its place."""
    copy = tmp_path / "my_bundle"
    shutil.copytree(bundle_path("cxr"), copy)
    (copy / "configs" / "methods" / "du_t4.yaml").write_text(
        'method_name: "plain DU (lr 0.002)"\nmethod_order: 3\nkernel: null\nsampler_mode: random\n'
        "learning_rate: 0.002\n")
    methods = default_methods(copy)
    assert methods[:3] == ("random", "du", "du_t4") and "simclr" in methods
    assert method_files(copy, ["du_t4"])["du_t4"].name == "plain DU (lr 0.002)"
    config = CompareConfig(manifest=_manifest(tmp_path), label="x", bundle=copy, out=tmp_path / "out")
    assert config.methods == methods


def test_overrides_are_known_ids_and_data(tmp_path):
    assert check_overrides("cxr", {"learning_rate": 0.1, "train#sampler#num_replicas": 1, "time_column": "age"}) \
        == {"learning_rate": 0.1, "train#sampler#num_replicas": 1, "time_column": "age"}
    with pytest.raises(ValueError, match="no such id; did you mean learning_rate"):
        check_overrides("cxr", {"lerning_rate": 0.1})
    for value in ("$__import__('os').getcwd()", "@network_def", "%train.yaml#lam", ["a", "$1 + 1"],
                  {"_target_": "os.system", "command": "true"}, {"a": {"b": "$x"}}):
        with pytest.raises(ValueError, match="would run as code"):
            check_overrides("cxr", {"manifest": value})
    mine = tmp_path / "mine.yaml"
    mine.write_text("my_setting: 3\n")
    assert check_overrides("cxr", {"my_setting": 4}, [mine]) == {"my_setting": 4}


def test_a_composite_method_run_by_hand_says_it_is_several_runs(tmp_path):
    import subprocess
    import sys

    folder = bundle_path("cxr") / "configs"
    files = f"['{folder / 'train.yaml'}','{folder / 'methods' / 'kdu_bootstrap.yaml'}']"
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", files, "--bundle_root",
                           str(tmp_path / "run")], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode != 0
    assert "method 'kdu_bootstrap' is made of separate runs (du then kdu_encoder)" in done.stderr
    assert not (tmp_path / "run" / "models" / "encoder.pt").exists()
