"""End-to-end checks of the fine-tune bundles (bundles/cxr_finetune, bundles/brain_mri_finetune).

Every run goes through the real entry point (``python -m monai.bundle run``) in a subprocess (``ckpt_export`` is
called in this process), on a copy of the bundle in a temporary folder, one epoch: the chest X-ray bundle on 48 images
of its default data, the embedded real NIH cohort (a smaller manifest pointing at the shipped images, with the default
labels), the brain bundle on a tiny brain phantom (label label_lesion) and, for sex classification and age
regression, on 12 volumes copied from its default data, the shipped IXI cohort. The torchrun run of the multi-GPU
override is in test_bundles_distributed.py. References are computed independently: AUCs with scikit-learn from the
predictions of the saved model, MAEs and the mean-age floor with numpy from the manifest, weights compared tensor by
tensor with the encoder file the test wrote, TorchScript outputs against the eager ``ProbeClassifier`` loaded from
the checkpoint.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from _finetune_helpers import (
    IXI_OVERRIDES,
    SETTINGS,
    SPLIT,
    _assert_close_or_both_nan,
    _copy_bundle,
    _data_args,
    _infer,
    _ixi_subset,
    _label_name,
    _logged_metrics,
    _run,
    _sklearn_val_auc,
)

from monai_du.data.real_cohort import ixi_t1_dev_manifest, nih_cxr_dev_manifest
from monai_du.data.splits import patient_split
from monai_du.networks import ContrastiveEncoder, ProbeClassifier

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
SHARED = Path(__file__).resolve().parents[2] / "shared"
SCHEMA = SHARED / "monai" / "meta_schema_20240725.json"
SCHEMA_MD5 = "06954cad2cc5d3784e72077ac76f0fc8"

BACKBONE = {"backbone": "resnet10", "widen_factor": 0.25}  # the bundles' defaults (checked below)


def _write_pretrained(path: Path, spatial_dims: int, full_model: bool = False, seed: int = 123) -> dict:
    """A 'pretrained' encoder file with weights no fresh init reproduces (seed 123, shifted BN statistics)."""
    torch.manual_seed(seed)
    net = ContrastiveEncoder(
        BACKBONE["backbone"], spatial_dims=spatial_dims, backbone_kwargs={"widen_factor": BACKBONE["widen_factor"]}
    )
    with torch.no_grad():
        for name, buf in net.encoder.named_buffers():
            if name.endswith("running_mean"):
                buf.uniform_(-0.1, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    state = net.state_dict() if full_model else net.encoder.state_dict()
    torch.save(state, path)
    return {k: v.clone() for k, v in net.encoder.state_dict().items()}


def _train(bundle: Path, name: str, pretrained: Path | None, extra: list[str] = ()) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "train.yaml"),
            "--bundle_root", str(bundle), *_data_args(bundle, name),
            "--train#trainer#max_epochs", "1", "--split_fractions", repr(SPLIT), *SETTINGS[name]["overrides"]]
    if pretrained is not None:
        args += ["--pretrained", str(pretrained)]
    return _run(args + list(extra), cwd=bundle.parent)


def _checkpoint(bundle: Path) -> dict[str, torch.Tensor]:
    state = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    return state["model"] if "model" in state and isinstance(state["model"], dict) else state


def _eager_model(name: str, state: dict[str, torch.Tensor]) -> ProbeClassifier:
    net = ProbeClassifier(
        BACKBONE["backbone"], num_classes=len(SETTINGS[name]["labels"]), spatial_dims=SETTINGS[name]["spatial_dims"],
        encoder_kwargs={"widen_factor": BACKBONE["widen_factor"]},
    )
    net.load_state_dict(state)
    return net.eval()


def _config(name: str, file: str) -> dict:
    return yaml.safe_load((BUNDLES / name / "configs" / file).read_text())


# ---------------------------------------------------------------------------------------------------------------------
# static checks
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_metadata_verifies_against_monai_schema(name):
    if not SCHEMA.is_file():
        pytest.skip(f"MONAI's metadata schema not found at {SCHEMA} (../shared is not part of a user's clone)")
    pytest.importorskip("jsonschema", reason="monai.bundle verify_metadata needs jsonschema")
    from monai.bundle import verify_metadata

    verify_metadata(
        meta_file=str(BUNDLES / name / "configs" / "metadata.json"), filepath=str(SCHEMA), hash_val=SCHEMA_MD5
    )
    meta = json.loads((BUNDLES / name / "configs" / "metadata.json").read_text())
    out = meta["network_data_format"]["outputs"]["pred"]
    labels = _config(name, "train.yaml")["labels"]
    assert out["num_channels"] == len(labels)
    assert list(out["channel_def"].values()) == [_label_name(c) for c in labels]
    spatial_size = _config(name, "train.yaml")["spatial_size"]
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == spatial_size


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_configs_agree(name):
    """train.yaml and inference.yaml describe the same network and data; the backbone matches the pretrain bundle's."""
    train, infer = _config(name, "train.yaml"), _config(name, "inference.yaml")
    for key in ("backbone", "widen_factor", "spatial_size", "labels", "dataset_dir", "demo_cohort", "demo_num_images",
                "demo_seed", "demo_image_size", "manifest", "split_fractions", "split_seed", "task",
                "regression_target", "targets", "image_loading"):
        assert train.get(key) == infer.get(key), key
    for key in ("_target_", "encoder", "num_classes", "spatial_dims", "in_channels", "encoder_kwargs"):
        assert train["network_def"][key] == infer["network_def"][key], key
    assert train["backbone"] == BACKBONE["backbone"] and train["widen_factor"] == BACKBONE["widen_factor"]
    for key in ("bundle_root", "dataset_dir", "manifest", "device", "batch_size", "pretrained", "mode", "labels"):
        assert key in train, key
    assert "max_epochs" in train["train"]["trainer"]
    pretrain = BUNDLES / name.replace("_finetune", "_du_pretrain") / "configs" / "train.yaml"
    if pretrain.is_file():
        pre = yaml.safe_load(pretrain.read_text())
        for key in ("backbone", "widen_factor", "spatial_size", "split_fractions", "split_seed", "demo_cohort",
                    "demo_num_images", "demo_image_size", "dataset_dir", "manifest", "image_loading"):
            if key in pre or key in train:
                assert pre.get(key) == train.get(key), f"{key}: pretrain {pre.get(key)!r}, finetune {train.get(key)!r}"


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_configs_define_monai_bundle_properties(name, tmp_path):
    """Every required and optional id of MONAI's train / infer workflow properties exists (nothing is run)."""
    from monai.bundle import ConfigWorkflow

    bundle = _copy_bundle(name, tmp_path)
    for file, workflow_type in (("train.yaml", "train"), ("inference.yaml", "infer")):
        workflow = ConfigWorkflow(
            config_file=str(bundle / "configs" / file), workflow_type=workflow_type, logging_file=False,
            bundle_root=str(bundle), pretrained="null",
        )
        workflow.initialize()
        assert workflow.check_properties() == [], (file, workflow.check_properties())


def test_cxr_defaults_are_the_real_cohort_and_its_labels(tmp_path):
    """No data override: the embedded real NIH cohort, labels that have both classes there, the encoder of the
    pretrain bundle beside this one, and a patient split under which no validation patient was pretrained on."""
    from monai.bundle import ConfigParser

    def parsed(bundle: str) -> ConfigParser:
        parser = ConfigParser()
        parser.read_config(str(BUNDLES / bundle / "configs" / "train.yaml"))
        parser.update({"bundle_root": str(tmp_path / bundle)})
        return parser

    finetune = parsed("cxr_finetune")
    labels = finetune.get_parsed_content("labels")
    assert labels == SETTINGS["cxr_finetune"]["labels"]
    assert Path(finetune.get_parsed_content("manifest")) == nih_cxr_dev_manifest()
    manifest = finetune.get_parsed_content("manifest_df")
    assert len(manifest) == 498
    for label in labels:
        assert set(manifest[label].dropna().unique()) == {0.0, 1.0}, label
    expected = tmp_path / "cxr_du_pretrain" / "models" / "encoder.pt"
    assert Path(finetune.get_parsed_content("pretrained")) == expected
    pretrained_on = set(parsed("cxr_du_pretrain").get_parsed_content("train#df")["patient_id"])
    validation = set(finetune.get_parsed_content("validate#df")["patient_id"])
    assert validation and not pretrained_on & validation


# ---------------------------------------------------------------------------------------------------------------------
# one epoch through the real entry points
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_linear_probe_train_infer_export(name, tmp_path):
    cfg = SETTINGS[name]
    bundle = _copy_bundle(name, tmp_path)
    pretrained = _write_pretrained(tmp_path / "encoder.pt", cfg["spatial_dims"])

    proc = _train(bundle, name, tmp_path / "encoder.pt")
    out = proc.stdout + proc.stderr
    assert "loaded the pretrained encoder from" in out
    assert re.search(r"Metrics -- .*val_mean_auc: ", out), out[-3000:]
    assert (bundle / "models" / "model.pt").is_file()

    # the linear probe did not change the encoder: every weight and batch-norm buffer equals the pretrained file's
    state = _checkpoint(bundle)
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    assert encoder.keys() == pretrained.keys()
    for key, value in pretrained.items():
        assert torch.equal(encoder[key], value), key
    feature_dim = int(512 * BACKBONE["widen_factor"])  # resnet10's last width
    assert state["classifier.weight"].shape == (len(cfg["labels"]), feature_dim)

    # inference: one row per manifest row; the AUCs recomputed from them equal the logged validation AUCs
    predictions = _infer(bundle, name)
    assert list(predictions.columns) == ["image", "patient_id"] + [f"prob_{c[len('label_'):]}" for c in cfg["labels"]]
    probs = predictions.filter(like="prob_").to_numpy()
    assert np.all((probs > 0) & (probs < 1))
    _assert_close_or_both_nan(_logged_metrics(bundle), _sklearn_val_auc(bundle, predictions, cfg["labels"]))

    # TorchScript export gives the checkpointed model's outputs
    from monai.bundle import ckpt_export  # what `python -m monai.bundle ckpt_export network_def ...` calls

    ckpt_export("network_def", filepath=str(bundle / "models" / "model.ts"),
                ckpt_file=str(bundle / "models" / "model.pt"),
                meta_file=str(bundle / "configs" / "metadata.json"), config_file=str(bundle / "configs" / "train.yaml"),
                bundle_root=str(bundle))
    scripted = torch.jit.load(str(bundle / "models" / "model.ts"), map_location="cpu")
    torch.manual_seed(0)
    x = torch.rand(3, 1, *cfg["image_shape"])
    with torch.no_grad():
        expected = _eager_model(name, state)(x)
        got = scripted(x)
    assert got.shape == (3, len(cfg["labels"]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_finetune_mode_trains_the_loaded_encoder(tmp_path):
    """mode=finetune: the encoder starts from the file (a full pretraining model, projector included) and moves."""
    bundle = _copy_bundle("cxr_finetune", tmp_path)
    pretrained = _write_pretrained(tmp_path / "model.pt", spatial_dims=2, full_model=True)
    proc = _train(bundle, "cxr_finetune", tmp_path / "model.pt", ["--mode", "finetune", "--num_workers", "0"])
    assert "loaded the pretrained encoder from" in proc.stdout + proc.stderr
    state = _checkpoint(bundle)
    weights = [k for k in pretrained if k.endswith("weight")]
    moved = [k for k in weights if not torch.equal(state[f"encoder.{k}"], pretrained[k])]
    assert moved, "no encoder weight changed in finetune mode"
    # ... but only a little, from the pretrained values (a fresh initialisation would be ~sqrt(2) times their norm away)
    for key in weights:
        ref = pretrained[key]
        assert torch.linalg.vector_norm(state[f"encoder.{key}"] - ref) < 0.5 * torch.linalg.vector_norm(ref), key
    assert not torch.equal(state["encoder.bn1.running_mean"], pretrained["bn1.running_mean"])  # train-mode BN


def test_missing_pretrained_encoder_is_an_error_when_required(tmp_path):
    bundle = _copy_bundle("cxr_finetune", tmp_path)
    missing = tmp_path / "nowhere" / "encoder.pt"
    proc = _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "train.yaml"),
                 "--bundle_root", str(bundle), "--pretrained", str(missing), "--require_pretrained", "true"],
                cwd=tmp_path, expect_ok=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "pretrained encoder file" in out and "not found" in out and str(missing) in out
    assert not (bundle / "models" / "model.pt").exists()


# ---------------------------------------------------------------------------------------------------------------------
# the brain bundle on real volumes: sex (classification from M/F) and age (regression)
# ---------------------------------------------------------------------------------------------------------------------


def test_brain_defaults_are_the_pretrain_cohort_and_split(tmp_path):
    """No data override: the shipped IXI cohort, label sex, and the pretrain bundle's patient split, so that no
    validation patient was pretrained on; --task regression targets age, standardised with the training rows' ages."""
    from monai.bundle import ConfigParser

    def parsed(bundle: str, **overrides) -> ConfigParser:
        parser = ConfigParser()
        parser.read_config(str(BUNDLES / bundle / "configs" / "train.yaml"))
        parser.update({"bundle_root": str(tmp_path / bundle), **overrides})
        return parser

    finetune = parsed("brain_mri_finetune")
    assert finetune.get_parsed_content("task") == "classification"
    assert finetune.get_parsed_content("labels") == ["sex"]
    assert Path(finetune.get_parsed_content("manifest")) == ixi_t1_dev_manifest()
    assert finetune.get_parsed_content("network_def").classifier.out_features == 1
    pretrain = parsed("brain_mri_du_pretrain")
    pretrained_on = set(pretrain.get_parsed_content("train#df")["patient_id"])
    validation = finetune.get_parsed_content("validate#df")
    assert set(finetune.get_parsed_content("train#df")["patient_id"]) == pretrained_on
    assert len(validation) > 0 and not pretrained_on & set(validation["patient_id"])
    # sex read as male = 1, female = 0 into the target column, the manifest's own column kept for validation
    assert (validation["target_sex"] == validation["sex"].map({"M": 1.0, "F": 0.0})).all()
    assert set(validation["target_sex"]) == {0.0, 1.0}

    regression = parsed("brain_mri_finetune", task="regression")
    assert regression.get_parsed_content("targets") == ["age"]
    assert regression.get_parsed_content("network_def").classifier.out_features == 1
    manifest = pd.read_csv(ixi_t1_dev_manifest(), dtype={"patient_id": str})
    ages = manifest.loc[manifest["patient_id"].isin(pretrained_on), "age"].to_numpy()
    scaling = regression.get_parsed_content("target_scaling")
    assert scaling["n"] == len(ages) == len(pretrained_on)
    assert scaling["mean"] == pytest.approx(ages.mean()) and scaling["std"] == pytest.approx(ages.std(ddof=1))
    assert isinstance(regression.get_parsed_content("loss"), torch.nn.L1Loss)
    with pytest.raises(Exception) as raised:  # a misspelt task is refused (look_up_option's error, chained)
        parsed("brain_mri_finetune", task="regresion").get_parsed_content("targets")
    assert "regresion" in str(raised.value.__cause__)


def _ixi_train(bundle: Path, data_args: list[str], extra: list[str]) -> str:
    proc = _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "train.yaml"),
                 "--bundle_root", str(bundle), *data_args, "--pretrained", "null", "--split_fractions", repr(SPLIT),
                 *IXI_OVERRIDES, *extra], cwd=bundle.parent)
    return proc.stdout + proc.stderr


def _ixi_infer(bundle: Path, data_args: list[str], extra: list[str]) -> pd.DataFrame:
    _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.yaml"),
          "--bundle_root", str(bundle), *data_args, *IXI_OVERRIDES, *extra], cwd=bundle.parent)
    return pd.read_csv(bundle / "eval" / "predictions.csv", dtype={"patient_id": str})


def test_brain_sex_classification_from_m_f(tmp_path):
    """The default label, sex, written M/F in the manifest: the logged AUC is scikit-learn's with male = 1 (fine-tune
    mode, so the whole network trains)."""
    bundle = _copy_bundle("brain_mri_finetune", tmp_path)
    data_args = _ixi_subset(tmp_path)
    manifest = pd.read_csv(tmp_path / "data" / "manifest.csv", dtype={"patient_id": str})
    val = patient_split(manifest, fractions=SPLIT, seed=0)["split"] == "val"
    assert set(manifest.loc[val, "sex"]) == {"M", "F"}  # both classes among the validation patients

    out = _ixi_train(bundle, data_args, ["--mode", "finetune", "--train#trainer#max_epochs", "1"])
    assert re.search(r"Metrics -- .*val_auc_sex: ", out), out[-3000:]
    predictions = _ixi_infer(bundle, data_args, [])
    assert list(predictions.columns) == ["image", "patient_id", "prob_sex"]
    reference = _sklearn_val_auc(bundle, predictions, ["sex"])
    assert not math.isnan(reference["val_auc_sex"])
    _assert_close_or_both_nan(_logged_metrics(bundle), reference)
    info = json.loads((bundle / "models" / "target_info.json").read_text())
    assert info == {"task": "classification", "targets": ["sex"], "scaling": None}


def test_brain_age_regression_mae_floor_and_inference_in_years(tmp_path):
    """--task regression: a single-output head on the standardised age, MAE in years and the mean-age floor logged
    (the floor equal to a computation from the manifest), the best model kept by the lowest MAE, and inference that
    writes ages in years."""
    bundle = _copy_bundle("brain_mri_finetune", tmp_path)
    data_args = _ixi_subset(tmp_path)
    manifest = pd.read_csv(tmp_path / "data" / "manifest.csv", dtype={"patient_id": str})
    split = patient_split(manifest, fractions=SPLIT, seed=0)["split"].to_numpy()
    train_ages, val_ages = manifest["age"].to_numpy()[split == "train"], manifest["age"].to_numpy()[split == "val"]
    floor = float(np.mean(np.abs(val_ages - train_ages.mean())))

    # a large learning rate, so that the two epochs give different models and MAEs
    out = _ixi_train(bundle, data_args, ["--task", "regression", "--train#trainer#max_epochs", "2",
                                         "--learning_rate", "0.05"])
    logged = _logged_metrics(bundle)
    assert set(logged) == {"val_mae", "val_mae_floor"}
    assert math.isfinite(logged["val_mae"]) and logged["val_mae"] > 0
    assert logged["val_mae_floor"] == pytest.approx(floor, rel=1e-5)
    epochs = re.findall(r"Epoch\[(\d)\] Metrics -- val_mae: ([\d.]+) val_mae_floor: ([\d.]+)", out)
    assert [e[0] for e in epochs] == ["1", "2"], out[-3000:]
    assert epochs[0][1] != epochs[1][1]  # two different MAEs, so keeping the highest one would be caught below
    assert all(float(e[2]) == pytest.approx(floor, abs=1e-4) for e in epochs)

    info = json.loads((bundle / "models" / "target_info.json").read_text())
    assert info["task"] == "regression" and info["targets"] == ["age"]
    assert info["scaling"]["mean"] == pytest.approx(train_ages.mean())
    assert info["scaling"]["std"] == pytest.approx(train_ages.std(ddof=1))
    state = _checkpoint(bundle)
    assert state["classifier.weight"].shape[0] == 1

    # inference writes ages in years; on the validation rows their MAE is the best (lowest) logged epoch's
    predictions = _ixi_infer(bundle, data_args, ["--task", "regression"])
    assert list(predictions.columns) == ["image", "patient_id", "pred_age"]
    assert predictions["image"].tolist() == manifest["image"].tolist()
    ages = predictions["pred_age"].to_numpy()
    assert np.all(np.isfinite(ages))
    assert train_ages.min() <= ages.mean() <= train_ages.max()
    mae = float(np.mean(np.abs(ages[split == "val"] - val_ages)))
    assert mae == pytest.approx(min(float(e[1]) for e in epochs), abs=2e-4)

    # a classification inference of this regression model is refused (target_info.json records the task)
    infer = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.yaml")]
    proc = _run([*infer, "--bundle_root", str(bundle), *data_args, *IXI_OVERRIDES], cwd=tmp_path, expect_ok=False)
    assert proc.returncode != 0 and "trained for task 'regression'" in proc.stdout + proc.stderr
