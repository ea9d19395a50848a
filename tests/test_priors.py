"""Tests of monai_du.priors: the prior table (round trip, joins by key, errors), the prior autoencoder
(monai_du.prior_autoencoder, fitted on the pretraining split), priors from any encoder (monai_du.encoders: TorchScript,
monai_du export, MONAI bundle network) and the table cache."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from monai_du.encoders import load_encoder
from monai_du.kernels import CosineKernel, RBFKernel
from monai_du.prior_autoencoder import (
    build_prior_autoencoder,
    encode_images,
    load_prior_autoencoder,
    save_prior_autoencoder,
    train_prior_autoencoder,
)
from monai_du.priors import (
    attach_prior_table,
    build_prior_table,
    generative_prior_kernel,
    load_prior_table,
    make_prior_table,
    prior_columns,
    write_prior_table,
)

N, K = 30, 5


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture()
def cohort():
    """A manifest of N images (two rows of patient p0 included) and an embedding per image, keyed by path."""
    rng = np.random.default_rng(7)
    paths = [f"images/P{i // 2:03d}/img_{i:02d}.png" for i in range(N)]
    embeddings = rng.normal(size=(N, K)).astype(np.float32)
    manifest = pd.DataFrame(
        {"image": paths, "patient_id": [f"P{i // 2:03d}" for i in range(N)], "age": rng.uniform(20, 80, N)}
    )
    return manifest, embeddings


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
def test_table_round_trip(tmp_path, cohort, suffix):
    manifest, emb = cohort
    table = make_prior_table(manifest["image"], emb)
    assert list(table.columns) == ["image"] + [f"gen_{j}" for j in range(K)]
    path = write_prior_table(table, tmp_path / f"table{suffix}")
    back = load_prior_table(path)
    pd.testing.assert_frame_equal(back, table)
    np.testing.assert_array_equal(back[[f"gen_{j}" for j in range(K)]].to_numpy(), emb)  # float32 exactly
    assert back["image"].tolist() == manifest["image"].tolist()


def test_parquet_round_trip(tmp_path, cohort):
    pytest.importorskip("pyarrow", reason="Parquet prior tables need pyarrow (optional extra 'parquet')")
    manifest, emb = cohort
    table = make_prior_table(manifest["image"], emb)
    pd.testing.assert_frame_equal(load_prior_table(write_prior_table(table, tmp_path / "t.parquet")), table)


def test_kernel_reads_the_right_rows_after_shuffling(tmp_path, cohort):
    manifest, emb = cohort
    # the table itself is stored in another order than the manifest
    table_order = np.random.default_rng(1).permutation(N)
    stored = make_prior_table(manifest["image"].iloc[table_order], emb[table_order])
    path = write_prior_table(stored, tmp_path / "t.csv")
    table = load_prior_table(path)
    cols = prior_columns(table)

    attached = attach_prior_table(manifest, table)
    # independent reference: a dict lookup by path
    by_path = {p: emb[i] for i, p in enumerate(manifest["image"])}
    expected = np.stack([by_path[p] for p in manifest["image"]])
    np.testing.assert_array_equal(attached[cols].to_numpy(), expected)
    pd.testing.assert_frame_equal(attached[manifest.columns], manifest)  # the manifest columns are untouched

    perm = np.random.default_rng(2).permutation(N)
    shuffled = manifest.iloc[perm]
    attached_shuffled = attach_prior_table(shuffled, table)
    assert attached_shuffled.index.tolist() == shuffled.index.tolist()

    for kernel in (RBFKernel("knn", knn_k=3, knn_batch_size=16), CosineKernel()):
        kernel.fit(torch.from_numpy(expected).double())
        gram = kernel(torch.tensor(attached[cols].to_numpy(), dtype=torch.float64)).numpy()
        gram_shuffled = kernel(torch.tensor(attached_shuffled[cols].to_numpy(), dtype=torch.float64)).numpy()
        np.testing.assert_allclose(gram_shuffled, gram[np.ix_(perm, perm)], rtol=0, atol=1e-12)
    # the cosine Gram matrix against a float64 formula
    unit = expected.astype(np.float64) / np.linalg.norm(expected.astype(np.float64), axis=1, keepdims=True)
    np.testing.assert_allclose(gram, unit @ unit.T, atol=1e-6)


def test_keys_are_normalised_paths(cohort):
    manifest, emb = cohort
    table = make_prior_table(manifest["image"], emb)
    spelled = manifest.assign(image=["./" + p.replace("/", "\\") for p in manifest["image"]])
    np.testing.assert_array_equal(
        attach_prior_table(spelled, table)[prior_columns(table)].to_numpy(), emb
    )


def test_duplicate_keys_raise(tmp_path, cohort):
    manifest, emb = cohort
    keys = manifest["image"].tolist()
    keys[5] = keys[3]
    with pytest.raises(ValueError, match="img_03"):
        make_prior_table(keys, emb)
    raw = make_prior_table(manifest["image"], emb)
    raw.loc[5, "image"] = raw.loc[3, "image"]
    raw.to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(ValueError, match="more than once.*img_03"):
        load_prior_table(tmp_path / "dup.csv")
    with pytest.raises(ValueError, match="img_03"):
        attach_prior_table(manifest, raw)


def test_missing_keys_raise(cohort):
    manifest, emb = cohort
    table = make_prior_table(manifest["image"].iloc[2:], emb[2:])
    with pytest.raises(ValueError, match=r"2 manifest image\(s\) have no row.*img_00.*img_01"):
        attach_prior_table(manifest, table)


def test_table_validation_errors(tmp_path, cohort):
    manifest, emb = cohort
    table = make_prior_table(manifest["image"], emb)
    with pytest.raises(ValueError, match="gen_0 .. gen_"):
        prior_columns(table.drop(columns=["gen_2"]))
    table.drop(columns=["gen_2"]).to_csv(tmp_path / "gap.csv", index=False)
    with pytest.raises(ValueError, match="gap"):
        load_prior_table(tmp_path / "gap.csv")
    table.drop(columns=["image"]).to_csv(tmp_path / "nokey.csv", index=False)
    with pytest.raises(ValueError, match="'image'"):
        load_prior_table(tmp_path / "nokey.csv")
    with pytest.raises(ValueError, match="no such file"):
        load_prior_table(tmp_path / "absent.csv")
    with pytest.raises(ValueError, match="format"):
        write_prior_table(table, tmp_path / "table.xlsx")
    with pytest.raises(ValueError, match="already has prior columns"):
        attach_prior_table(attach_prior_table(manifest, table), table)
    again = attach_prior_table(attach_prior_table(manifest, table), table, overwrite=True)
    assert prior_columns(again) == [f"gen_{j}" for j in range(K)]
    assert attach_prior_table(manifest, None) is manifest
    assert prior_columns(None) == []


def test_generative_prior_kernel(cohort):
    _, emb = cohort
    x = torch.from_numpy(emb).double()
    rbf = generative_prior_kernel(K, kind="rbf", bandwidth=2.0)
    d2 = ((emb[:, None, :].astype(np.float64) - emb[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(rbf(x).numpy(), np.exp(-d2 / (2 * 2.0**2)), atol=1e-12)
    knn = generative_prior_kernel([0, 1, 2, 3, 4], kind="rbf", knn_k=3, knn_batch_size=N).fit(x)
    # "knn" bandwidth: the median distance to the 3rd nearest neighbour within a batch of all N rows
    dist = np.sqrt(d2)
    np.testing.assert_allclose(knn.bandwidth[0], np.median(np.sort(dist, axis=1)[:, 3]), rtol=1e-6)
    with pytest.raises(ValueError, match="kind"):
        generative_prior_kernel(K, kind="linear")


def test_autoencoder_2d_trains_and_encodes(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.random((10, 1, 16, 16)).astype(np.float32)
    model, losses = train_prior_autoencoder(images, latent_dim=3, epochs=1, batch_size=4, channels=(4, 8), seed=0)
    assert len(losses) == 1 and np.isfinite(losses[0])
    emb = encode_images(model, images, batch_size=3)
    assert emb.shape == (10, 3) and emb.dtype == np.float32 and np.isfinite(emb).all()
    # the embedding is the encoder's latent mean, image by image (batching plays no part)
    with torch.no_grad():
        one = model.encode_forward(torch.from_numpy(images[4:5]))[0].numpy()
    np.testing.assert_allclose(emb[4:5], one, atol=1e-5)
    # training moved the weights away from the seed's initialisation
    torch.manual_seed(0)
    fresh = build_prior_autoencoder(2, 16, 1, 3, (4, 8))
    assert any(not torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    # save / load gives the same encodings
    loaded = load_prior_autoencoder(save_prior_autoencoder(model, tmp_path / "ae.pt"))
    np.testing.assert_allclose(encode_images(loaded, images), emb, atol=1e-6)
    with pytest.raises(ValueError, match="takes images of shape"):
        encode_images(model, rng.random((2, 1, 32, 32)).astype(np.float32))


def test_autoencoder_3d_tiny():
    images = np.random.default_rng(1).random((4, 1, 16, 16, 16)).astype(np.float32)
    model, losses = train_prior_autoencoder(images, latent_dim=2, epochs=1, batch_size=2, channels=(2, 4), seed=0)
    assert len(losses) == 1
    assert encode_images(model, images).shape == (4, 2)


def test_autoencoder_argument_errors():
    with pytest.raises(ValueError, match="divisible"):
        build_prior_autoencoder(2, 20, channels=(4, 8, 16))
    with pytest.raises(ValueError, match="shape"):
        train_prior_autoencoder(np.zeros((3, 16, 16), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        train_prior_autoencoder(np.full((3, 1, 16, 16), np.nan, np.float32))


def test_build_prior_table_from_a_manifest(tmp_path):
    from monai_du.phantoms import make_cxr_cohort

    manifest = make_cxr_cohort(tmp_path / "cohort", n=12, seed=3, size=16)
    out = build_prior_table(
        manifest, tmp_path / "table.csv", image_size=16, latent_dim=4, epochs=1, batch_size=4,
        save_checkpoint=tmp_path / "ae.pt", log=None,
    )
    table = load_prior_table(out)
    df = pd.read_csv(manifest)
    assert table["image"].tolist() == df["image"].tolist()
    assert prior_columns(table) == ["gen_0", "gen_1", "gen_2", "gen_3"]
    # loading the saved autoencoder instead of training reproduces the table
    again_path = build_prior_table(manifest, tmp_path / "again.csv", checkpoint=tmp_path / "ae.pt", log=None)
    again = load_prior_table(again_path)
    pd.testing.assert_frame_equal(again, table, atol=1e-6)
    # ensure_prior_table keeps an existing table and builds a missing one
    from monai_du.priors import ensure_prior_table

    stamp = out.stat().st_mtime_ns
    with pytest.warns(UserWarning, match="no settings record"):  # not built by ensure_prior_table: kept, unchecked
        assert ensure_prior_table(manifest, out) == str(out) and out.stat().st_mtime_ns == stamp
    built = ensure_prior_table(manifest, tmp_path / "new.csv", checkpoint=tmp_path / "ae.pt")
    pd.testing.assert_frame_equal(load_prior_table(built), table, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# the pretraining split, and priors from any encoder
# ---------------------------------------------------------------------------------------------------------------------
SIDE = 16  # the cohort's image side: the pipeline's resize is then the identity, and PIL gives the reference pixels


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    """A 20-image chest X-ray cohort (12 patients, follow-ups included) with no split column."""
    from monai_du.phantoms import make_cxr_cohort

    folder = tmp_path_factory.mktemp("cohort")
    return make_cxr_cohort(folder, n=20, seed=5, size=SIDE)


def _reference_images(manifest, images) -> np.ndarray:
    """(N, 1, SIDE, SIDE) float64, read with PIL: MONAI's (x, y) axis order (the transpose), min-max to [0, 1]."""
    from PIL import Image

    out = []
    for name in images:
        a = np.asarray(Image.open(manifest.parent / name), dtype=np.float64).T
        out.append((a - a.min()) / (a.max() - a.min()))
    return np.stack(out)[:, None]


def _patients_by_split(manifest) -> dict[str, set[str]]:
    from monai_du.data.manifest import read_manifest
    from monai_du.data.splits import patient_split

    assigned = patient_split(read_manifest(manifest), fractions={"train": 0.8, "val": 0.1, "test": 0.1}, seed=0)
    return {name: set(group["patient_id"]) for name, group in assigned.groupby("split")}


def _patient_of(manifest) -> dict[str, str]:
    df = pd.read_csv(manifest, dtype=str)
    return dict(zip(df["image"], df["patient_id"]))


def _brute_force_table(manifest, model, images, pool="mean") -> np.ndarray:
    """One image at a time through a float64 copy of the eager model, pooled by hand."""
    import copy

    ref = copy.deepcopy(model).double().eval()
    x = torch.from_numpy(_reference_images(manifest, images))
    rows = []
    with torch.no_grad():
        for i in range(len(x)):
            out = ref(x[i : i + 1])[0]
            rows.append((out.reshape(out.shape[0], -1).mean(1) if pool == "mean" else out.reshape(-1)).numpy())
    return np.stack(rows)


class _ConvFeatures(torch.nn.Module):
    """(N, 1, H, W) -> (N, 3, H/2, W/2): a feature map, so the table is its global average."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 3, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


def _small_contrastive_net(seed: int):
    from monai_du.networks import ContrastiveEncoder

    torch.manual_seed(seed)
    net = ContrastiveEncoder("resnet10", spatial_dims=2, projection_dim=8, backbone_kwargs={"widen_factor": 0.125})
    with torch.no_grad():  # batch-norm statistics away from their initial values, so loading them matters
        for module in net.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _check_train_only(manifest, table):
    patient = _patient_of(manifest)
    splits = _patients_by_split(manifest)
    seen = {patient[name] for name in table["image"]}
    assert seen == splits["train"]
    assert not seen & (splits.get("val", set()) | splits.get("test", set()))
    df = pd.read_csv(manifest, dtype=str)
    expected = [name for name in df["image"] if patient[name] in splits["train"]]
    assert table["image"].tolist() == expected  # every training image, in manifest order


def test_torchscript_encoder_prior_table(tmp_path, small_cohort):
    from monai_du.priors import encoder_prior_table

    torch.manual_seed(0)
    model = _ConvFeatures().eval()
    path = tmp_path / "features.ts"
    torch.jit.save(torch.jit.script(model), str(path))
    assert isinstance(load_encoder(path), torch.jit.ScriptModule)

    table = encoder_prior_table(small_cohort, path, image_size=SIDE, batch_size=7)
    _check_train_only(small_cohort, table)
    expected = _brute_force_table(small_cohort, model, table["image"])
    np.testing.assert_allclose(table[prior_columns(table)].to_numpy(), expected, rtol=1e-4, atol=1e-5)

    every = encoder_prior_table(small_cohort, path, image_size=SIDE, split="all", pool="flatten")
    assert every["image"].tolist() == pd.read_csv(small_cohort)["image"].tolist()
    flat = _brute_force_table(small_cohort, model, every["image"], pool="flatten")
    np.testing.assert_allclose(every[prior_columns(every)].to_numpy(), flat, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="image_size"):  # a TorchScript file does not record its input size
        encoder_prior_table(small_cohort, path)


def test_export_encoder_prior_table(tmp_path, small_cohort):
    from monai_du.handlers import PretrainedEncoderExporter
    from monai_du.priors import encoder_prior_table

    net = _small_contrastive_net(seed=1)
    info = {"backbone": "resnet10", "backbone_kwargs": {"widen_factor": 0.125}, "spatial_size": [SIDE, SIDE]}
    PretrainedEncoderExporter(tmp_path / "models", net, info=info)()
    torch.manual_seed(99)  # the rebuilt backbone starts from other weights: only the loaded ones can match
    loaded = load_encoder(tmp_path / "models")
    for name, value in net.encoder.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)

    table = encoder_prior_table(small_cohort, tmp_path / "models")  # the input size comes from encoder_info.json
    _check_train_only(small_cohort, table)
    expected = _brute_force_table(small_cohort, net.encoder, table["image"])
    np.testing.assert_allclose(table[prior_columns(table)].to_numpy(), expected, rtol=1e-4, atol=1e-5)
    by_file = encoder_prior_table(small_cohort, tmp_path / "models" / "encoder.pt")
    pd.testing.assert_frame_equal(by_file, table)


def test_an_export_prior_table_loads_images_as_the_encoder_was_trained(tmp_path, small_cohort):
    """The export's image_loading (here percentile scaling) is how encoder_prior_table loads the images; an
    explicit intensity still wins."""
    import copy

    from PIL import Image

    from monai_du.handlers import PretrainedEncoderExporter
    from monai_du.priors import encoder_prior_table

    net = _small_contrastive_net(seed=3)
    info = {"backbone": "resnet10", "backbone_kwargs": {"widen_factor": 0.125}, "spatial_size": [SIDE, SIDE],
            "image_loading": {"modality": "2d", "intensity": "percentile", "size_mode": "resize"}}
    PretrainedEncoderExporter(tmp_path / "models", net, info=info)()
    table = encoder_prior_table(small_cohort, tmp_path / "models")
    images = []
    for name in table["image"]:  # numpy's percentiles, clipped: the reference of the recorded loading
        a = np.asarray(Image.open(small_cohort.parent / name), dtype=np.float64).T
        lo, hi = np.percentile(a, 0.5), np.percentile(a, 99.5)
        images.append(np.clip((a - lo) / (hi - lo), 0.0, 1.0))
    ref = copy.deepcopy(net.encoder).double().eval()  # float64, one image at a time; the output is (1, F)
    with torch.no_grad():
        expected = np.stack([ref(torch.from_numpy(x[None, None]))[0].reshape(-1).numpy() for x in images])
    np.testing.assert_allclose(table[prior_columns(table)].to_numpy(), expected, rtol=1e-4, atol=1e-5)
    minmax = encoder_prior_table(small_cohort, tmp_path / "models", intensity="minmax")
    np.testing.assert_allclose(minmax[prior_columns(minmax)].to_numpy(),
                               _brute_force_table(small_cohort, net.encoder, minmax["image"]), rtol=1e-4, atol=1e-5)


def _tiny_bundle(tmp_path, net):
    config = tmp_path / "configs" / "train.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(
        "imports:\n  - $import monai_du\n"
        "backbone: resnet10\n"
        f"spatial_size: [{SIDE}, {SIDE}]\n"
        "network_def:\n"
        "  _target_: monai_du.networks.ContrastiveEncoder\n"
        "  backbone: '@backbone'\n  spatial_dims: 2\n  in_channels: 1\n  projection_dim: 8\n"
        "  backbone_kwargs: {widen_factor: 0.125}\n"
        "network: $@network_def\n"
    )
    checkpoint = tmp_path / "models" / "checkpoint_epoch=2.pt"
    checkpoint.parent.mkdir(exist_ok=True)
    torch.save({"model": net.state_dict(), "epoch": 2}, checkpoint)  # as the bundles' checkpoint saver writes it
    return config, checkpoint


def test_bundle_network_prior_table(tmp_path, small_cohort):
    from monai_du.priors import encoder_prior_table

    net = _small_contrastive_net(seed=2)
    config, checkpoint = _tiny_bundle(tmp_path, net)
    spec = {"bundle_config": str(config), "network_id": "network_def", "checkpoint": str(checkpoint)}
    table = encoder_prior_table(small_cohort, spec)  # the bundle's spatial_size is the input size
    _check_train_only(small_cohort, table)
    assert len(prior_columns(table)) == 8  # the network's forward: the projection head's output
    expected = _brute_force_table(small_cohort, net, table["image"])
    np.testing.assert_allclose(table[prior_columns(table)].to_numpy(), expected, rtol=1e-4, atol=1e-5)

    backbone = encoder_prior_table(small_cohort, {**spec, "submodule": "encoder"}, split="all")
    expected = _brute_force_table(small_cohort, net.encoder, backbone["image"])
    np.testing.assert_allclose(backbone[prior_columns(backbone)].to_numpy(), expected, rtol=1e-4, atol=1e-5)


def test_encoder_errors_name_the_file_or_id(tmp_path, small_cohort):
    from monai_du.handlers import PretrainedEncoderExporter

    with pytest.raises(ValueError, match="no such encoder file or folder.*absent.ts"):
        load_encoder(tmp_path / "absent.ts")
    (tmp_path / "notes.pt").write_text("not a model")
    with pytest.raises(ValueError, match="notes.pt.*is not a TorchScript file"):
        load_encoder(tmp_path / "notes.pt")
    (tmp_path / "empty_export").mkdir()
    with pytest.raises(ValueError, match="empty_export.*no encoder_info.json"):
        load_encoder(tmp_path / "empty_export")
    net = _small_contrastive_net(seed=3)
    PretrainedEncoderExporter(tmp_path / "export", net, info={"spatial_size": [SIDE, SIDE]})()
    with pytest.raises(ValueError, match="encoder_info.json.*'backbone'"):
        load_encoder(tmp_path / "export")
    (tmp_path / "export" / "encoder.pt").unlink()
    with pytest.raises(ValueError, match="export.*no weights file 'encoder.pt'"):
        load_encoder(tmp_path / "export")

    config, checkpoint = _tiny_bundle(tmp_path, net)
    with pytest.raises(ValueError, match="no network id 'netwrok_def' in the bundle config .*train.yaml"):
        load_encoder({"bundle_config": config, "network_id": "netwrok_def", "checkpoint": checkpoint})
    with pytest.raises(ValueError, match="no such checkpoint file .*absent_ckpt.pt"):
        load_encoder(config, checkpoint=tmp_path / "absent_ckpt.pt")
    with pytest.raises(ValueError, match="no such bundle config file .*inference.yaml"):
        load_encoder({"bundle_config": config.parent / "inference.yaml", "checkpoint": checkpoint})
    with pytest.raises(ValueError, match="needs a checkpoint"):
        load_encoder(config)
    torch.save({"model": {"encoder.conv1.weight": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt.*do not fit.*missing keys"):
        load_encoder(config, checkpoint=tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no submodule 'backbone'"):
        load_encoder(config, checkpoint=checkpoint, submodule="backbone")


def _spy_on_training(monkeypatch):
    import monai_du.priors as priors

    seen: list[np.ndarray] = []
    real = priors.train_prior_autoencoder

    def spy(images, *args, **kwargs):
        seen.append(np.array(images, dtype=np.float64))
        return real(images, *args, **kwargs)

    monkeypatch.setattr(priors, "train_prior_autoencoder", spy)
    return seen


def _rows_of(images: np.ndarray, reference: np.ndarray) -> list[int]:
    """For each image, the one reference row it equals (to 1e-6)."""
    rows = []
    for image in images:
        hits = np.flatnonzero(np.abs(reference - image).reshape(len(reference), -1).max(1) < 1e-6)
        assert len(hits) == 1
        rows.append(int(hits[0]))
    return rows


def test_autoencoder_is_fitted_on_the_pretraining_split_only(tmp_path, small_cohort, monkeypatch):
    seen = _spy_on_training(monkeypatch)
    kw = dict(image_size=SIDE, latent_dim=3, epochs=1, batch_size=4, log=None)
    table = load_prior_table(build_prior_table(small_cohort, tmp_path / "t.csv", **kw))
    df = pd.read_csv(small_cohort, dtype=str)
    assert table["image"].tolist() == df["image"].tolist()  # the table still covers every manifest image

    reference = _reference_images(small_cohort, df["image"])
    trained_on = df["patient_id"].iloc[_rows_of(seen[0], reference)]
    splits = _patients_by_split(small_cohort)
    assert set(trained_on) == splits["train"] and len(trained_on) == df["patient_id"].isin(splits["train"]).sum()
    assert not set(trained_on) & (splits["val"] | splits["test"])

    build_prior_table(small_cohort, tmp_path / "all.csv", split="all", **kw)
    assert sorted(_rows_of(seen[1], reference)) == list(range(len(df)))


def test_ensure_prior_table_keys_the_cache_on_the_split(tmp_path, small_cohort, monkeypatch):
    import json
    import warnings

    from monai_du.priors import ensure_prior_table

    seen = _spy_on_training(monkeypatch)
    kw = dict(image_size=SIDE, latent_dim=3, epochs=1, batch_size=4)
    path = tmp_path / "prior_table.csv"
    assert ensure_prior_table(small_cohort, path, **kw) == str(path) and len(seen) == 1
    record = json.loads((tmp_path / "prior_table.csv.settings.json").read_text())  # a monai_du.io.DoneMarker
    assert record["inputs"]["split"] == "train" and record["inputs"]["split_seed"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # an up-to-date table is served silently
        ensure_prior_table(small_cohort, path, **kw)
        ensure_prior_table(small_cohort, path, fractions={"test": 0.1, "train": 0.8, "val": 0.1}, **kw)  # the default
    assert len(seen) == 1
    with pytest.warns(UserWarning, match="split_seed"):
        ensure_prior_table(small_cohort, path, split_seed=1, **kw)
    assert len(seen) == 2
    with pytest.warns(UserWarning, match="fractions"):
        ensure_prior_table(small_cohort, path, split_seed=1, fractions={"train": 0.5, "val": 0.25, "test": 0.25}, **kw)
    with pytest.warns(UserWarning, match="'split'"):
        ensure_prior_table(small_cohort, path, split="all", **kw)
    assert len(seen) == 4 and len(seen[-1]) == 20
    assert len(load_prior_table(path)) == 20

    # an encoder's table: rebuilt when the encoder's file changes
    ts = tmp_path / "features.ts"
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(_ConvFeatures()), str(ts))
    enc_path = tmp_path / "encoder_prior.csv"
    ensure_prior_table(small_cohort, enc_path, encoder=ts, image_size=SIDE)
    first = load_prior_table(enc_path)
    _check_train_only(small_cohort, first)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ensure_prior_table(small_cohort, enc_path, encoder=ts, image_size=SIDE)
    torch.manual_seed(1)
    torch.jit.save(torch.jit.script(_ConvFeatures()), str(ts))
    with pytest.warns(UserWarning, match="encoder"):
        ensure_prior_table(small_cohort, enc_path, encoder=ts, image_size=SIDE)
    assert not np.allclose(load_prior_table(enc_path)[prior_columns(first)], first[prior_columns(first)])


def test_ensure_prior_table_rebuilds_beside_an_unreadable_record(tmp_path, small_cohort):
    import json

    from monai_du.priors import ensure_prior_table

    ts = tmp_path / "features.ts"
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(_ConvFeatures()), str(ts))
    path, marker = tmp_path / "prior.csv", tmp_path / "prior.csv.settings.json"
    ensure_prior_table(small_cohort, path, encoder=ts, image_size=SIDE)
    record = json.loads(marker.read_text())
    assert len(record["inputs"]["manifest"]["sha256"]) == 64 and record["inputs"]["monai_du_version"]
    # a torn record, or one of another format (an older monai_du's), cannot vouch for the table: it is rebuilt
    for text in ("{not json", json.dumps({"format": "monai_du.prior_table_settings/1", "settings": record["inputs"]})):
        marker.write_text(text)
        with pytest.warns(UserWarning, match="rebuilding .*'manifest'"):
            ensure_prior_table(small_cohort, path, encoder=ts, image_size=SIDE)
        assert json.loads(marker.read_text()) == record


def test_prior_command_with_an_encoder(tmp_path, small_cohort, capsys):
    from monai_du.cli import main
    from monai_du.handlers import PretrainedEncoderExporter
    from monai_du.priors import encoder_prior_table

    net = _small_contrastive_net(seed=4)
    info = {"backbone": "resnet10", "backbone_kwargs": {"widen_factor": 0.125}, "spatial_size": [SIDE, SIDE]}
    PretrainedEncoderExporter(tmp_path / "models", net, info=info)()
    assert main(["prior", "--manifest", str(small_cohort), "--out", str(tmp_path / "a.csv"),
                 "--encoder", str(tmp_path / "models")]) == 0
    assert "wrote the prior table" in capsys.readouterr().out
    pd.testing.assert_frame_equal(load_prior_table(tmp_path / "a.csv"),
                                  encoder_prior_table(small_cohort, tmp_path / "models"), atol=1e-6)

    config, checkpoint = _tiny_bundle(tmp_path, net)
    assert main(["prior", "--manifest", str(small_cohort), "--out", str(tmp_path / "b.csv"), "--bundle-config",
                 str(config), "--network-id", "network_def", "--checkpoint", str(checkpoint), "--submodule",
                 "encoder", "--split", "all"]) == 0
    table = load_prior_table(tmp_path / "b.csv")
    assert len(table) == 20
    expected = _brute_force_table(small_cohort, net.encoder, table["image"])
    np.testing.assert_allclose(table[prior_columns(table)].to_numpy(), expected, rtol=1e-4, atol=1e-5)
    capsys.readouterr()
    assert main(["prior", "--manifest", str(small_cohort), "--out", str(tmp_path / "c.csv"), "--bundle-config",
                 str(config), "--network-id", "net", "--checkpoint", str(checkpoint)]) == 1
    assert "no network id 'net'" in capsys.readouterr().err
