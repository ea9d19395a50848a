"""Tests of monai_du.priors: the prior table (round trip, joins by key, errors) and the prior autoencoder."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from monai_du.kernels import CosineKernel, RBFKernel
from monai_du.priors import (
    attach_prior_table,
    build_prior_autoencoder,
    build_prior_table,
    encode_images,
    generative_prior_kernel,
    load_prior_autoencoder,
    load_prior_table,
    make_prior_table,
    prior_columns,
    save_prior_autoencoder,
    train_prior_autoencoder,
    write_prior_table,
)

N, K = 30, 5


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
    from monai_du.data.cohorts import make_cxr_cohort

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
    assert ensure_prior_table(manifest, out) == str(out) and out.stat().st_mtime_ns == stamp
    built = ensure_prior_table(manifest, tmp_path / "new.csv", checkpoint=tmp_path / "ae.pt")
    pd.testing.assert_frame_equal(load_prior_table(built), table, atol=1e-6)
