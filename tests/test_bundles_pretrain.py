"""End-to-end tests of the pretraining bundles (bundles/cxr_du_pretrain, bundles/brain_mri_du_pretrain).

The runs go through the real entry point, ``python -m monai.bundle run``, in subprocesses, on a tiny copy of the demo
chest X-ray phantom (4 acquisition sites; passed with ``--manifest`` / ``--dataset_dir``, since the bundle's default
is the embedded real NIH cohort) and on the brain phantom, one epoch, a few iterations. Every method file of
``configs/methods`` runs once. Checks that need only the parsed config (defaults, bad input, NaN ages, overrides)
build the components in-process with MONAI's ``ConfigParser``. Multi-process runs are in test_bundles_distributed.py.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _bundle_helpers import BUNDLES, SCHEMA, bundle_run, config, data_args, make_phantom

N_IMAGES = 40  # phantom size for the runs: ~32 training images, a few iterations per epoch at batch size 8
SMALL = ("--batch_size", "8", "--max_epochs", "1", "--num_threads", "1")  # 1 torch thread: 2 shared cores
METHODS = sorted(p.stem for p in (BUNDLES["cxr"] / "configs" / "methods").glob("*.yaml")
                 if "method_stages" not in p.read_text())  # a composite method is several runs (test_compare)
SPLIT = {"train": 0.8, "val": 0.1, "test": 0.1}  # the bundles' default patient split
# what each method's run must show: its loss family and its kernel (None: no prior kernel, no kernel.json)
EXPECTED = {
    "random": {"trains": False, "kernel": None},
    "du": {"trains": True, "loss": "du", "kernel": None},
    "simclr": {"trains": True, "loss": "infonce", "kernel": None},
    "kdu_attr": {"trains": True, "loss": "du", "kernel": "ProductKernel"},
    "yaware": {"trains": True, "loss": "infonce", "kernel": "ProductKernel"},
    "kdu_gen": {"trains": True, "loss": "du", "kernel": "RBFKernel"},
    "kdu_encoder": {"trains": True, "loss": "du", "kernel": "RBFKernel"},
    "kdu_patient": {"trains": True, "loss": "du", "kernel": "ProductKernel"},
}


@pytest.fixture(scope="module")
def cxr_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cxr_data")
    make_phantom(folder, N_IMAGES)
    return folder


def _cxr_run(root: Path, data: Path, *overrides: str, methods=(), manifest: Path | None = None) -> str:
    root.mkdir(parents=True, exist_ok=True)
    files = config("cxr", *(f"methods/{m}.yaml" for m in methods))
    return bundle_run(files, root, *data_args(manifest or data / "manifest.csv", data), *overrides)


@pytest.fixture(scope="module")
def kdu_attr_run(tmp_path_factory, cxr_data) -> tuple[Path, str]:
    """kernel DU with age x sex within sites, 2 epochs (its epoch-1 checkpoint is what a run killed in epoch 2
    leaves behind), with the bundle's default number of data-loader workers."""
    root = tmp_path_factory.mktemp("kdu_attr") / "bundle"
    log = _cxr_run(root, cxr_data, "--batch_size", "8", "--max_epochs", "2", "--lr_schedule_epochs", "2",
                   "--num_threads", "1", methods=["kdu_attr"])
    return root, log


@pytest.fixture(scope="module")
def kdu_gen_run(tmp_path_factory, cxr_data) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("kdu_gen") / "bundle"
    return root, _cxr_run(root, cxr_data, *SMALL, "--num_workers", "0", methods=["kdu_gen"])


def _losses(log: str) -> list[float]:
    return [float(v) for v in re.findall(r"train_loss: (-?\d+\.\d+(?:e-?\d+)?)", log)]


def _epoch_metrics(log: str) -> dict[str, float]:
    line = re.findall(r"Metrics -- (.*)", log)[-1]
    return {k: float(v) for k, v in re.findall(r"(\w+): (-?\d+\.\d+)", line)}


def _load_backbone(models: Path, spatial_dims: int = 2) -> dict:
    from monai_du.networks import build_encoder

    encoder = torch.load(models / "encoder.pt", weights_only=True)
    backbone, _ = build_encoder("resnet10", spatial_dims=spatial_dims, widen_factor=0.25)
    backbone.load_state_dict(encoder)  # strict: exactly the backbone's keys, e.g. conv1.weight, layer1.0.conv1.weight
    return encoder


# ---------------------------------------------------------------------------------------------------------------
# metadata and layout
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


def test_both_bundles_offer_the_same_methods():
    brain = sorted(p.stem for p in (BUNDLES["brain"] / "configs" / "methods").glob("*.yaml")
                   if "method_stages" not in p.read_text())
    # the brain bundle adds the age-only priors of the weakly supervised brain MRI case (sex is probed there)
    assert set(brain) - set(METHODS) == {"kdu_age", "yaware_age"} and set(METHODS) <= set(brain)
    assert set(EXPECTED) <= set(METHODS)
    assert not (BUNDLES["cxr"] / "configs" / "generative_prior.yaml").exists()  # now methods/kdu_gen.yaml


def test_cxr_default_is_plain_du_on_the_real_cohort(tmp_path):
    """No override: the embedded real NIH cohort (one site), plain DU on random batches, workers and image cache on."""
    from monai_du.data.real_cohort import nih_cxr_dev_manifest
    from monai_du.engines import default_num_workers
    from monai_du.losses import DecoupledUniformityLoss

    parser = _parser("cxr", tmp_path, num_workers=None)
    assert Path(parser.get_parsed_content("manifest")) == nih_cxr_dev_manifest()
    df = parser.get_parsed_content("train#df")
    full = pd.read_csv(nih_cxr_dev_manifest())
    assert len(full) == 498 and 0.7 * len(full) < len(df) < 0.9 * len(full) and set(df["split"]) == {"train"}
    loss = parser.get_parsed_content("loss")
    assert isinstance(loss, DecoupledUniformityLoss) and loss.kernel is None
    assert parser.get_parsed_content("sampler_mode") == "random"
    assert parser.get_parsed_content("num_workers") == default_num_workers()
    assert parser.get_parsed_content("cache_images") is True and parser.get_parsed_content("init_checkpoint") is None


# ---------------------------------------------------------------------------------------------------------------
# one epoch through `python -m monai.bundle run`
# ---------------------------------------------------------------------------------------------------------------


def test_cxr_kdu_attr_run_saves_encoder(kdu_attr_run):
    from monai_du.kernels import kernel_from_dict
    from monai_du.networks import build_encoder
    from monai_du.prior_encoder import PriorEncoder

    root, log = kdu_attr_run
    models = root / "models"
    encoder = _load_backbone(models)
    _, feature_dim = build_encoder("resnet10", spatial_dims=2, widen_factor=0.25)
    assert "conv1.weight" in encoder and not any(k.startswith(("encoder.", "module.")) for k in encoder)
    model = torch.load(models / "model.pt", weights_only=True)
    assert all(torch.equal(model[f"encoder.{k}"], v) for k, v in encoder.items())
    assert any(k.startswith("projector.") for k in model)
    for epoch in (1, 2):
        ckpt = torch.load(models / f"checkpoint_epoch={epoch}.pt", weights_only=True)
        assert set(ckpt) == {"model", "optimizer", "lr_scheduler", "trainer"}
    assert torch.equal(ckpt["model"]["encoder.conv1.weight"], encoder["conv1.weight"])  # the last epoch's weights
    assert not [p.name for p in models.iterdir() if p.name.endswith(".tmp")]
    info = json.loads((models / "encoder_info.json").read_text())
    assert info["feature_dim"] == feature_dim and info["epoch"] == 2 and info["backbone"] == "resnet10"
    prior_encoder = PriorEncoder.load(models / "prior_encoder.json")
    assert prior_encoder.attributes == ["age", "sex"]
    kernel = kernel_from_dict(json.loads((models / "kernel.json").read_text()))
    assert kernel.k1.rule == "knn" and kernel.k1.bandwidth[0] > 0 and kernel.k2.categories_ == [[0.0, 1.0]]
    assert list((root / "eval" / "tensorboard").glob("events.out.tfevents.*"))
    metrics = _epoch_metrics(log)
    assert 0 < metrics["kernel_mean_offdiag"] < 1 and metrics["global_batch_size"] == 8


def test_cxr_kdu_gen_builds_its_prior_table(kdu_gen_run, cxr_data):
    from monai_du.data.manifest import read_manifest
    from monai_du.data.splits import select_split
    from monai_du.kernels import RBFKernel, kernel_from_dict
    from monai_du.priors import attach_prior_table, load_prior_table, prior_columns

    root, _ = kdu_gen_run
    table = load_prior_table(root / "eval" / "prior_table.csv")
    manifest = read_manifest(cxr_data / "manifest.csv", root=cxr_data)
    assert len(table) == len(manifest) and set(table["image"]) == set(manifest["image"])
    columns = prior_columns(table)
    kernel = kernel_from_dict(json.loads((root / "models" / "kernel.json").read_text()))
    assert isinstance(kernel, RBFKernel) and kernel.rule == "knn" and kernel.columns == list(range(len(columns)))
    # the bandwidth was fitted on the training patients' embeddings, in random batches of the run's batch size
    train = select_split(attach_prior_table(manifest, table), "train", fractions=SPLIT, seed=0)
    reference = RBFKernel("knn", knn_k=5, knn_batch_size=8).fit(train[columns].to_numpy())
    assert kernel.bandwidth[0] == pytest.approx(reference.bandwidth[0], rel=1e-9)


def _patient_manifest(cxr_data: Path, out: Path) -> Path:
    """The phantom's manifest plus ``follow_up``: each image's place in its patient's history (the phantom names
    images ``<patient>_<k>.png``, k = 0, 1, ... in study order), as NIH's ``Follow-up #``."""
    df = pd.read_csv(cxr_data / "manifest.csv")
    df["follow_up"] = df["image"].str.extract(r"_(\d+)\.png$", expand=False).astype(int)
    assert (df.groupby("patient_id")["follow_up"].nunique() > 1).sum() >= 4  # patients with follow-ups
    df.to_csv(out, index=False)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_every_method_file_runs_one_epoch(method, request, cxr_data, tmp_path):
    """train.yaml + methods/<method>.yaml through `python -m monai.bundle run`: the run exports an encoder, trains
    with the method's loss family (DU: log of a mean of exp(-t d^2) <= 0; InfoNCE: -log p >= 0) and its kernel."""
    from monai_du.kernels import kernel_from_dict

    root, manifest, extra = tmp_path / "bundle", None, []
    if method == "kdu_attr":
        root, log = request.getfixturevalue("kdu_attr_run")
    elif method == "kdu_gen":
        root, log = request.getfixturevalue("kdu_gen_run")
    else:
        if method == "kdu_patient":
            manifest = _patient_manifest(cxr_data, tmp_path / "manifest_follow_up.csv")
        if method == "kdu_encoder":  # the prior: embeddings of an encoder trained earlier (the kdu_attr run)
            earlier, _ = request.getfixturevalue("kdu_attr_run")
            table = tmp_path / "encoder_prior.csv"
            from monai_du.cli import main  # `monai-du prior ...`, in this process

            assert main(["prior", "--manifest", str(cxr_data / "manifest.csv"), "--root", str(cxr_data),
                         "--out", str(table), "--encoder", str(earlier / "models"), "--device", "cpu"]) == 0
            extra = ["--prior_table", str(table)]
        log = _cxr_run(root, cxr_data, *SMALL, "--num_workers", "0", *extra, methods=[method], manifest=manifest)
    expected = EXPECTED.get(method, {"trains": True})
    models = root / "models"
    _load_backbone(models)
    info = json.loads((models / "encoder_info.json").read_text())
    if not expected["trains"]:  # exported as initialised: no training step, no checkpoint
        assert "epoch" not in info and not list(models.glob("checkpoint_epoch=*.pt")) and not _losses(log)
        return
    epochs = 2 if method == "kdu_attr" else 1  # the kdu_attr run also serves the resume test
    assert info["epoch"] == epochs and (models / f"checkpoint_epoch={epochs}.pt").is_file()
    losses = _losses(log)
    assert losses and all(math.isfinite(v) for v in losses)
    if expected.get("loss") == "du":
        assert all(v <= 0 for v in losses), losses
    elif expected.get("loss") == "infonce":
        assert all(v >= 0 for v in losses), losses
    if "kernel" in expected:
        kernel_file = models / "kernel.json"
        if expected["kernel"] is None:
            assert not kernel_file.exists()
        else:
            assert json.loads(kernel_file.read_text())["type"] == expected["kernel"]
    if method == "kdu_patient":  # P patients x K images: same-patient pairs, so the kernel is not the identity
        kernel = kernel_from_dict(json.loads((models / "kernel.json").read_text()))
        assert kernel.k1.bandwidth == [2.0] and kernel.k2.columns == [1]
        assert _epoch_metrics(log)["kernel_mean_offdiag"] > 0
    if method == "kdu_encoder":
        from monai_du.priors import load_prior_table, prior_columns

        kernel = kernel_from_dict(json.loads((models / "kernel.json").read_text()))
        n_features = len(prior_columns(load_prior_table(tmp_path / "encoder_prior.csv")))
        assert n_features == info["feature_dim"] and kernel.columns == list(range(n_features))


def test_brain_pretrain_one_epoch_saves_encoder(tmp_path):
    root = tmp_path / "bundle"
    root.mkdir()
    bundle_run(config("brain"), root, "--demo_cohort", "phantom", "--dataset_dir", str(tmp_path / "brain_data"),
               "--demo_num_images", "24", "--demo_image_size", "32", *SMALL, "--num_workers", "0")
    encoder = _load_backbone(root / "models", spatial_dims=3)
    assert encoder["conv1.weight"].ndim == 5  # a 3D backbone
    assert (root / "models" / "checkpoint_epoch=1.pt").is_file()
    assert not (root / "models" / "kernel.json").exists()  # plain DU by default
    manifest = pd.read_csv(tmp_path / "brain_data" / "manifest.csv")
    assert len(manifest) == 24 and manifest.image.str.endswith(".nii.gz").all() and manifest.site.nunique() > 1


def test_cxr_resume_after_kill_matches_uninterrupted_run(kdu_attr_run, cxr_data, tmp_path):
    """Killed during epoch 2 (only checkpoint_epoch=1.pt left) and resumed == the 2 epochs straight, same seed and
    settings. The straight run had the default data-loader workers, the resumed epoch has none: the views depend on
    (seed, epoch, index) only."""
    straight, _ = kdu_attr_run
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for path in (resumed / "models").iterdir():  # what a run killed in epoch 2 leaves: the epoch-1 checkpoint
        if path.name != "checkpoint_epoch=1.pt":
            path.unlink()
    # torch threads pinned as in the straight run: another thread count sums a convolution in another order
    log = _cxr_run(resumed, cxr_data, "--batch_size", "8", "--lr_schedule_epochs", "2", "--max_epochs", "2",
                   "--num_workers", "0", "--num_threads", "1", methods=["kdu_attr"])
    assert "Resumed from" in log and "checkpoint_epoch=1.pt" in log
    a = torch.load(resumed / "models" / "model.pt", weights_only=True)
    b = torch.load(straight / "models" / "model.pt", weights_only=True)
    assert list(a) == list(b)
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= 1e-6, f"resumed and uninterrupted weights differ by {worst}"
    first = torch.load(straight / "models" / "checkpoint_epoch=1.pt", weights_only=True)["model"]
    assert max(float((a[k].double() - first[k].double()).abs().max()) for k in a) > 1e-4  # epoch 2 did train


# ---------------------------------------------------------------------------------------------------------------
# in-process checks on the parsed config: bad input, NaN ages, overrides
# ---------------------------------------------------------------------------------------------------------------


def _parser(bundle: str, root: Path, methods=(), **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config(bundle, *(f"methods/{m}.yaml" for m in methods)))
    values = {"bundle_root": str(root), "num_workers": 0, **overrides}
    parser.update({k: v for k, v in values.items() if v is not None})
    return parser


def _train_row(cxr_data: Path) -> int:
    from monai_du.data.manifest import read_manifest
    from monai_du.data.splits import select_split

    train = select_split(read_manifest(cxr_data / "manifest.csv"), "train", fractions=SPLIT, seed=0)
    return int(train.index[2])


def _chain(err: BaseException):
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


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
    parser = _parser("cxr", tmp_path, methods=["kdu_attr"], manifest=str(tmp_path / "manifest.csv"),
                     dataset_dir=str(cxr_data), batch_size=8, sampler_mode="random", max_epochs=1,
                     **{"train#trainer#epoch_length": 1})
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
    data = {"dataset_dir": str(cxr_data), "manifest": str(cxr_data / "manifest.csv")}
    parser = _parser("cxr", tmp_path, methods=["kdu_attr"], **data, lam=0.1, instance_weight=0.0, bandwidth=7.5,
                     sampler_mode="balanced", sampler_attribute="view", prior_categorical=["sex", "site"],
                     batch_size=4, kernel={"_target_": "monai_du.kernels.CategoricalKernel", "columns": [1, 2]})
    loss = parser.get_parsed_content("loss")
    assert (loss.lam, loss.instance_weight) == (0.1, 0.0)
    assert loss.kernel.columns == [1, 2] and loss.kernel.categories_ is not None  # fitted on the training rows
    assert parser.get_parsed_content("prior_encoder").attributes == ["age", "sex", "site"]
    sampler = parser.get_parsed_content("train#sampler")
    assert sampler.mode == "balanced" and sorted(sampler.group_labels) == ["AP", "PA"]
    parser = _parser("cxr", tmp_path, methods=["kdu_attr"], **data, bandwidth=7.5)
    assert parser.get_parsed_content("loss").kernel.k1.bandwidth == [7.5]
    # P patients x K images
    parser = _parser("cxr", tmp_path, **data, sampler_mode="pk", sampler_attribute="patient_id", images_per_group=2,
                     batch_size=6)
    sampler = parser.get_parsed_content("train#sampler")
    assert (sampler.mode, sampler.images_per_group, sampler.batch_size) == ("pk", 2, 6)
    patients = [d["patient_id"] for d in parser.get_parsed_content("train#dataset").data]
    pooled = set(sampler.merged_groups)  # patients with one image share the blocks of a pool
    for batch in sampler:
        blocks = [(patients[batch[j]], patients[batch[j + 1]]) for j in range(0, len(batch), 2)]
        assert all(a == b or {a, b} <= pooled for a, b in blocks), blocks


def test_run_setting_overrides_reach_the_trainer(kdu_attr_run, cxr_data, tmp_path):
    from monai.data import CacheDataset

    data = {"dataset_dir": str(cxr_data), "manifest": str(cxr_data / "manifest.csv")}
    checkpoint = kdu_attr_run[0] / "models" / "model.pt"
    parser = _parser("cxr", tmp_path, **data, max_epochs=3, batch_size=8, num_workers=1, cache_images=False,
                     init_checkpoint=str(checkpoint), resume=False)
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.state.max_epochs == 3 and trainer.data_loader.num_workers == 1
    assert not isinstance(parser.get_parsed_content("train#dataset"), CacheDataset)
    state = torch.load(checkpoint, weights_only=True)
    net = parser.get_parsed_content("network")
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())  # init_checkpoint was loaded
    cached = _parser("cxr", tmp_path, **data).get_parsed_content("train#dataset")
    assert isinstance(cached, CacheDataset)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
