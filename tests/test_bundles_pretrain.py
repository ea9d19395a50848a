"""End-to-end tests of the pretraining bundles (bundles/cxr_du_pretrain, bundles/brain_mri_du_pretrain).

The runs go through the real entry points, ``python -m monai.bundle run`` and ``torchrun ... -m monai.bundle run``,
in subprocesses, on small demo cohorts (one epoch, a few iterations). Checks that need only the parsed config (bad
input, NaN ages, overrides) build the components in-process with MONAI's ``ConfigParser``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLES = {"cxr": REPO / "bundles" / "cxr_du_pretrain", "brain": REPO / "bundles" / "brain_mri_du_pretrain"}
SCHEMA = Path(__file__).resolve().parents[2] / "shared" / "monai" / "meta_schema_20240725.json"
N_IMAGES = 40  # demo cohort size for the runs: ~32 training images, a few iterations per epoch


def _env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # 2 shared cores: avoid OpenMP spin contention; also makes runs comparable
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _check_fire() -> None:
    try:
        import fire  # noqa: F401
    except ImportError:  # pragma: no cover
        pytest.fail("`python -m monai.bundle` needs the `fire` package: pip install fire (listed in pyproject.toml)")


def _run(cmd: list[str], cwd: Path, timeout: int = 240) -> str:
    _check_fire()
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"command failed ({proc.returncode}): {' '.join(cmd)}\n{out[-6000:]}"
    return out


def _bundle_run(bundle: str, bundle_root: Path, dataset_dir: Path, *overrides: str, config_files=None) -> str:
    configs = config_files or [str(BUNDLES[bundle] / "configs" / "train.yaml")]
    config_arg = configs[0] if len(configs) == 1 else repr(configs)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_arg,
           "--bundle_root", str(bundle_root), "--dataset_dir", str(dataset_dir),
           "--demo_num_images", str(N_IMAGES), *overrides]
    return _run(cmd, cwd=bundle_root.parent)


@pytest.fixture(scope="module")
def cxr_data(tmp_path_factory) -> Path:
    from monai_du.data.cohorts import ensure_demo_cohort

    folder = tmp_path_factory.mktemp("cxr_data")
    ensure_demo_cohort(folder, "cxr", n=N_IMAGES, seed=0, size=64)  # what the bundle's default expression makes
    return folder


@pytest.fixture(scope="module")
def cxr_one_epoch(tmp_path_factory, cxr_data) -> Path:
    root = tmp_path_factory.mktemp("cxr_run") / "bundle"
    root.mkdir()
    _bundle_run("cxr", root, cxr_data, "--batch_size", "8", "--lr_schedule_epochs", "2",
                "--train#trainer#max_epochs", "1")
    return root


# ---------------------------------------------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:No hash value provided")
@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_metadata_passes_monai_schema(bundle, tmp_path):
    if not SCHEMA.is_file():
        pytest.skip(f"MONAI's metadata schema is not at {SCHEMA} (../shared is absent outside the project workspace)")
    from monai.bundle import verify_metadata

    schema = tmp_path / SCHEMA.name
    shutil.copy(SCHEMA, schema)
    meta_file = BUNDLES[bundle] / "configs" / "metadata.json"
    verify_metadata(meta_file=str(meta_file), filepath=str(schema))  # raises ValueError when invalid
    meta = json.loads(meta_file.read_text())
    assert "monai_du" in meta["required_packages_version"]
    broken = dict(meta)
    del broken["network_data_format"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError):  # the check can fail
        verify_metadata(meta_file=str(tmp_path / "broken.json"), filepath=str(schema))


# ---------------------------------------------------------------------------------------------------------------
# one epoch through `python -m monai.bundle run`
# ---------------------------------------------------------------------------------------------------------------


def test_cxr_pretrain_one_epoch_saves_encoder(cxr_one_epoch):
    from monai_du.kernels import kernel_from_dict
    from monai_du.networks import build_encoder
    from monai_du.transforms import PriorEncoder

    models = cxr_one_epoch / "models"
    encoder = torch.load(models / "encoder.pt", weights_only=True)
    backbone, feature_dim = build_encoder("resnet10", spatial_dims=2, widen_factor=0.25)
    backbone.load_state_dict(encoder)  # strict: exactly the backbone's keys, e.g. conv1.weight, layer1.0.conv1.weight
    assert "conv1.weight" in encoder and not any(k.startswith(("encoder.", "module.")) for k in encoder)
    model = torch.load(models / "model.pt", weights_only=True)
    assert all(torch.equal(model[f"encoder.{k}"], v) for k, v in encoder.items())
    assert any(k.startswith("projector.") for k in model)
    ckpt = torch.load(models / "checkpoint_epoch=1.pt", weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "lr_scheduler", "trainer"}
    assert not [p.name for p in models.iterdir() if p.name.endswith(".tmp")]
    info = json.loads((models / "encoder_info.json").read_text())
    assert info["feature_dim"] == feature_dim and info["epoch"] == 1 and info["backbone"] == "resnet10"
    prior_encoder = PriorEncoder.load(models / "prior_encoder.json")
    assert prior_encoder.attributes == ["age", "sex"]
    kernel = kernel_from_dict(json.loads((models / "kernel.json").read_text()))
    assert kernel.k1.rule == "knn" and kernel.k1.bandwidth[0] > 0 and kernel.k2.categories_ == [[0.0, 1.0]]
    assert list((cxr_one_epoch / "eval" / "tensorboard").glob("events.out.tfevents.*"))


def test_cxr_pretrain_with_generative_prior_override(tmp_path, cxr_data):
    from monai_du.data.manifest import read_manifest
    from monai_du.data.splits import select_split
    from monai_du.kernels import RBFKernel, kernel_from_dict
    from monai_du.priors import attach_prior_table, load_prior_table, prior_columns

    root = tmp_path / "bundle"
    root.mkdir()
    configs = [str(BUNDLES["cxr"] / "configs" / name) for name in ("train.yaml", "generative_prior.yaml")]
    _bundle_run("cxr", root, cxr_data, "--batch_size", "8", "--train#trainer#max_epochs", "1", config_files=configs)
    table = load_prior_table(root / "eval" / "prior_table.csv")
    manifest = read_manifest(cxr_data / "manifest.csv", root=cxr_data)
    assert len(table) == len(manifest) and set(table["image"]) == set(manifest["image"])
    columns = prior_columns(table)
    kernel = kernel_from_dict(json.loads((root / "models" / "kernel.json").read_text()))
    assert isinstance(kernel, RBFKernel) and kernel.rule == "knn" and kernel.columns == list(range(len(columns)))
    # the bandwidth was fitted on the training patients' embeddings, in batches drawn within one site
    train = select_split(attach_prior_table(manifest, table), "train", fractions={"train": 0.8, "val": 0.1, "test": 0.1},
                         seed=0)
    reference = RBFKernel("knn", knn_k=5, knn_batch_size=8).fit(train[columns].to_numpy(), groups=train["site"])
    assert kernel.bandwidth[0] == pytest.approx(reference.bandwidth[0], rel=1e-9)


def test_brain_pretrain_one_epoch_saves_encoder(tmp_path):
    from monai_du.networks import build_encoder

    root = tmp_path / "bundle"
    root.mkdir()
    _bundle_run("brain", root, tmp_path / "brain_data", "--batch_size", "8", "--train#trainer#max_epochs", "1")
    encoder = torch.load(root / "models" / "encoder.pt", weights_only=True)
    backbone, _ = build_encoder("resnet10", spatial_dims=3, widen_factor=0.25)
    backbone.load_state_dict(encoder)
    assert encoder["conv1.weight"].ndim == 5  # a 3D backbone
    assert (root / "models" / "checkpoint_epoch=1.pt").is_file()
    manifest = pd.read_csv(tmp_path / "brain_data" / "manifest.csv")
    assert len(manifest) == N_IMAGES and manifest.image.str.endswith(".nii.gz").all()


def test_cxr_resume_after_kill_matches_uninterrupted_run(cxr_one_epoch, cxr_data, tmp_path):
    """Stopped after epoch 1 (max_epochs=1) and resumed to 2 == 2 epochs straight, same seed and settings."""
    resumed = tmp_path / "resumed"
    shutil.copytree(cxr_one_epoch, resumed)
    common = ("--batch_size", "8", "--lr_schedule_epochs", "2", "--train#trainer#max_epochs", "2")
    log = _bundle_run("cxr", resumed, cxr_data, *common)
    assert "Resumed from" in log and "checkpoint_epoch=1.pt" in log
    straight = tmp_path / "straight"
    straight.mkdir()
    _bundle_run("cxr", straight, cxr_data, *common)
    a = torch.load(resumed / "models" / "model.pt", weights_only=True)
    b = torch.load(straight / "models" / "model.pt", weights_only=True)
    assert list(a) == list(b)
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= 1e-6, f"resumed and uninterrupted weights differ by {worst}"
    first = torch.load(cxr_one_epoch / "models" / "model.pt", weights_only=True)
    assert max(float((a[k].double() - first[k].double()).abs().max()) for k in a) > 1e-4  # epoch 2 did train


# ---------------------------------------------------------------------------------------------------------------
# multi-process: torchrun with the multi-GPU override on CPU (gloo)
# ---------------------------------------------------------------------------------------------------------------

_PROBE = """
run:
  - $@train#trainer.run()
  - "$torch.save({'pred': @train#trainer.state.output['pred'].detach(), 'prior': @train#trainer.state.output['label'],
      'loss': float(@train#trainer.state.output['loss']), 'metrics': dict(@train#trainer.state.metrics),
      'world': dist.get_world_size()}, os.path.join(@bundle_root, f'probe_rank{dist.get_rank()}.pt'))"
"""


def _du_reference(pred: torch.Tensor, prior: torch.Tensor, bandwidth: float, lam=0.01, eta=0.05, t=2.0) -> float:
    """Kernel DU in float64 from its definition: K = RBF(age) * [sex equal] + eta I, c = (K + lam I)^-1 K mu."""
    z = pred.double()
    mu = (z / z.norm(dim=-1, keepdim=True)).mean(1)
    age, sex = prior[:, 0].double(), prior[:, 1].double()
    b = len(age)
    k = torch.exp(-((age[:, None] - age[None, :]) ** 2) / (2 * bandwidth**2)) * (sex[:, None] == sex[None, :])
    k = k + eta * torch.eye(b, dtype=torch.float64)
    c = torch.linalg.solve(k + lam * torch.eye(b, dtype=torch.float64), k @ mu)
    vals = [math.exp(-t * float(((c[i] - c[j]) ** 2).sum())) for i in range(b) for j in range(i + 1, b)]
    return math.log(np.mean(vals))


def test_torchrun_two_processes_gloo_loss_sees_global_batch(cxr_data, tmp_path):
    root = tmp_path / "bundle"
    root.mkdir()
    probe = tmp_path / "probe.yaml"
    probe.write_text(_PROBE)
    configs = [str(BUNDLES["cxr"] / "configs" / "train.yaml"), str(BUNDLES["cxr"] / "configs" / "multi_gpu_train.yaml"),
               str(probe)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "monai.bundle", "run", "--config_file", repr(configs),
           "--bundle_root", str(root), "--dataset_dir", str(cxr_data), "--demo_num_images", str(N_IMAGES),
           "--batch_size", "4", "--train#trainer#max_epochs", "1", "--backend", "gloo"]
    _run(cmd, cwd=tmp_path, timeout=300)
    ranks = [torch.load(root / f"probe_rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    assert all(r["pred"].shape == (4, 2, 128) and r["prior"].shape == (4, 2) for r in ranks)
    assert all(r["metrics"]["global_batch_size"] == 8 and r["metrics"]["batch_size"] == 4 for r in ranks)
    assert ranks[0]["loss"] == pytest.approx(ranks[1]["loss"], abs=1e-6)  # every rank computes the same loss
    kernel = json.loads((root / "models" / "kernel.json").read_text())
    bandwidth = kernel["k1"]["bandwidth_"][0]
    pred = torch.cat([r["pred"] for r in ranks])
    prior = torch.cat([r["prior"] for r in ranks])
    assert not torch.isnan(prior).any()
    global_ref = _du_reference(pred, prior, bandwidth)
    local_ref = _du_reference(ranks[0]["pred"], ranks[0]["prior"], bandwidth)
    assert ranks[0]["loss"] == pytest.approx(global_ref, abs=1e-4)
    assert abs(ranks[0]["loss"] - local_ref) > 1e-3  # the local-batch loss would be a different number
    # only rank 0 wrote the model files; the checkpoint has no DDP "module." prefix
    ckpt = torch.load(root / "models" / "checkpoint_epoch=1.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert (root / "models" / "encoder.pt").is_file()


# ---------------------------------------------------------------------------------------------------------------
# in-process checks on the parsed config: bad input, NaN ages, overrides
# ---------------------------------------------------------------------------------------------------------------


def _parser(bundle: str, root: Path, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES[bundle] / "configs" / "train.yaml"))
    parser.update({"bundle_root": str(root), "num_workers": 0, **overrides})
    return parser


def _train_row(cxr_data: Path) -> int:
    from monai_du.data.manifest import read_manifest
    from monai_du.data.splits import select_split

    train = select_split(read_manifest(cxr_data / "manifest.csv"), "train", fractions={"train": 0.8, "val": 0.1,
                         "test": 0.1}, seed=0)
    return int(train.index[2])


def test_missing_image_raises_naming_row_and_file(cxr_data, tmp_path):
    df = pd.read_csv(cxr_data / "manifest.csv")
    row = _train_row(cxr_data)
    df.loc[row, "image"] = "images/gone/missing_scan.png"
    df.to_csv(tmp_path / "manifest.csv", index=False)
    parser = _parser("cxr", tmp_path, manifest=str(tmp_path / "manifest.csv"), dataset_dir=str(cxr_data))
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("train#dataset")
    text = "".join(str(e) for e in _chain(info.value))
    assert f"row {row}" in text and "missing_scan.png" in text
    assert str(tmp_path / "manifest.csv") in text  # the manifest file, not just "a DataFrame"


def _chain(err: BaseException):
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def test_missing_image_skipped_and_reported_with_on_error_skip(cxr_data, tmp_path):
    df = pd.read_csv(cxr_data / "manifest.csv")
    row = _train_row(cxr_data)
    df.loc[row, "image"] = "images/gone/missing_scan.png"
    df.to_csv(tmp_path / "manifest.csv", index=False)
    parser = _parser("cxr", tmp_path, manifest=str(tmp_path / "manifest.csv"), dataset_dir=str(cxr_data),
                     on_error="skip", batch_size=4)
    with pytest.warns(UserWarning, match="skipped 1 of"):
        dataset = parser.get_parsed_content("train#dataset")
    n_train = len(parser.get_parsed_content("train#df"))
    assert len(dataset) == n_train - 1
    assert all("missing_scan" not in d["image"] for d in dataset.data)
    report = pd.read_csv(tmp_path / "eval" / "skipped_images.csv")
    assert report["image"].tolist() == ["images/gone/missing_scan.png"] and report["row"].tolist() == [row]
    batch = next(iter(parser.get_parsed_content("train#dataloader")))  # sampler indices fit the shorter dataset
    assert batch["image"].shape == (4, 2, 1, 64, 64)


def test_nan_ages_never_give_a_nan_loss(cxr_data, tmp_path):
    df = pd.read_csv(cxr_data / "manifest.csv")
    df.loc[df.index % 2 == 0, "age"] = np.nan
    df.to_csv(tmp_path / "manifest.csv", index=False)
    torch.manual_seed(0)
    parser = _parser("cxr", tmp_path, manifest=str(tmp_path / "manifest.csv"), dataset_dir=str(cxr_data),
                     batch_size=8, sampler_mode="random", **{"train#trainer#max_epochs": 1,
                                                              "train#trainer#epoch_length": 1})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = parser.get_parsed_content("train#trainer")
        trainer.run()
    finally:
        torch.set_num_threads(threads)
    prior = trainer.state.output["label"]
    assert torch.isnan(prior[:, 0]).any() and not torch.isnan(prior[:, 0]).all()
    assert math.isfinite(float(trainer.state.output["loss"].detach()))
    assert math.isfinite(trainer.state.metrics["kernel_mean_offdiag"])
    assert all(torch.isfinite(p).all() for p in trainer.network.parameters())


def test_prior_and_sampler_overrides_reach_the_components(cxr_data, tmp_path):
    parser = _parser("cxr", tmp_path, dataset_dir=str(cxr_data), manifest=str(cxr_data / "manifest.csv"),
                     lam=0.1, instance_weight=0.0, bandwidth=7.5, sampler_mode="balanced", sampler_attribute="view",
                     prior_categorical=["sex", "site"], batch_size=4,
                     kernel={"_target_": "monai_du.kernels.CategoricalKernel", "columns": [1, 2]})
    loss = parser.get_parsed_content("loss")
    assert (loss.lam, loss.instance_weight) == (0.1, 0.0)
    assert loss.kernel.columns == [1, 2] and loss.kernel.categories_ is not None  # fitted on the training rows
    assert parser.get_parsed_content("prior_encoder").attributes == ["age", "sex", "site"]
    sampler = parser.get_parsed_content("train#sampler")
    assert sampler.mode == "balanced" and sorted(sampler.group_labels) == ["AP", "PA"]
    parser = _parser("cxr", tmp_path, dataset_dir=str(cxr_data), manifest=str(cxr_data / "manifest.csv"),
                     bandwidth=7.5)
    assert parser.get_parsed_content("loss").kernel.k1.bandwidth == [7.5]
