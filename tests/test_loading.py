"""Tests of manifest loading (monai_du.data.loading) on real files: pydicom's and pydicom-data's DICOMs, nibabel's
anatomical.nii, nilearn's MNI152 template and PIL-written PNGs. Loaded arrays are compared with direct reads by
pydicom, nibabel and PIL."""

from __future__ import annotations

import gzip
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from monai_du.data.loading import (
    CHECK_REPORT_COLUMNS,
    InvertMonochrome1d,
    UnusableImageError,
    check_image_file,
    check_images,
    load_image_transforms,
    manifest_to_dataset,
)


def _testdata(name: str) -> str:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed (pydicom-data)")
    return str(path)


def _anatomical() -> str:
    import nibabel

    path = Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"
    if not path.is_file():
        pytest.skip("nibabel's tests/data/anatomical.nii is not installed")
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# readers and transforms on real files
# ---------------------------------------------------------------------------------------------------------------


def test_monochrome1_radiograph_is_inverted():
    import pydicom
    from monai.data import PydicomReader
    from monai.transforms import LoadImage

    path = _testdata("RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    raw = ds.pixel_array.astype(np.float64)  # (rows, cols)

    # MONAI's own PydicomReader returns the stored values, not inverted: the reason for InvertMonochrome1d
    plain = LoadImage(reader=PydicomReader(), image_only=True)(path)
    np.testing.assert_array_equal(plain.numpy().T, raw)

    out = load_image_transforms(intensity=None)({"image": path})["image"]
    assert tuple(out.shape) == (1, raw.shape[1], raw.shape[0])
    np.testing.assert_array_equal(out[0].numpy().T, (2 ** int(ds.BitsStored) - 1) - raw)
    assert out.meta["monochrome1_inverted"] is True
    assert not [k for k in out.meta if isinstance(k, str) and re.fullmatch(r"[0-9A-Fa-f]{8}", k)]  # raw tags dropped

    scaled = load_image_transforms()({"image": path})["image"][0].numpy().T.astype(np.float64)
    np.testing.assert_allclose(scaled, (raw.max() - raw) / (raw.max() - raw.min()), atol=1e-6)
    assert np.corrcoef(scaled.ravel(), raw.ravel())[0, 1] == pytest.approx(-1.0, abs=1e-9)


def test_ct_small_is_rescaled_and_not_inverted():
    import pydicom

    path = _testdata("CT_small.dcm")
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    out = load_image_transforms(intensity=None)({"image": path})["image"]
    assert tuple(out.shape) == (1, int(ds.Columns), int(ds.Rows))
    np.testing.assert_allclose(out[0].numpy().T, expected)
    assert "monochrome1_inverted" not in out.meta


def test_invert_monochrome1_closed_form_with_rescale_and_idempotent():
    from monai.data import MetaTensor

    x = torch.tensor([[[0.0, 10.0], [3.0, 8090.0]]])
    meta = {
        "00280004": {"vr": "CS", "Value": ["MONOCHROME1"]},
        "00280101": {"vr": "US", "Value": [12]},
        "00280103": {"vr": "US", "Value": [0]},
        "00281053": {"vr": "DS", "Value": [2.0]},
        "00281052": {"vr": "DS", "Value": [-100.0]},
    }
    t = InvertMonochrome1d("image")
    once = t({"image": MetaTensor(x.clone(), meta=dict(meta))})
    lo, hi = 2.0 * 0 - 100.0, 2.0 * 4095 - 100.0
    np.testing.assert_allclose(once["image"].numpy(), (lo + hi) - x.numpy())
    twice = t(once)
    np.testing.assert_allclose(twice["image"].numpy(), (lo + hi) - x.numpy())
    # keyword form without BitsStored: the image's own range
    y = MetaTensor(torch.tensor([[1.0, 4.0, 9.0]]), meta={"PhotometricInterpretation": "MONOCHROME1"})
    np.testing.assert_allclose(InvertMonochrome1d("image")({"image": y})["image"].numpy(), [[9.0, 6.0, 1.0]])
    # MONOCHROME2 passes unchanged
    z = MetaTensor(x.clone(), meta={"00280004": {"vr": "CS", "Value": ["MONOCHROME2"]}})
    np.testing.assert_array_equal(InvertMonochrome1d("image")({"image": z})["image"].numpy(), x.numpy())


@pytest.mark.parametrize("mode, dtype", [("L", np.uint8), ("I;16", np.uint16)])
def test_png_grey_8_and_16_bit(tmp_path, mode, dtype):
    from PIL import Image

    rng = np.random.default_rng(0)
    top = 255 if dtype == np.uint8 else 65535
    arr = rng.integers(0, top + 1, size=(30, 45)).astype(dtype)
    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    with Image.open(path) as im:
        direct = np.asarray(im).astype(np.float64)
    out = load_image_transforms(intensity=None)({"image": str(path)})["image"]
    assert tuple(out.shape) == (1, 45, 30)
    np.testing.assert_array_equal(out[0].numpy().T, direct)
    scaled = load_image_transforms()({"image": str(path)})["image"][0].numpy().T
    np.testing.assert_allclose(scaled, (direct - direct.min()) / (direct.max() - direct.min()), atol=1e-6)


def test_png_rgb_collapses_to_luma(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(1).integers(0, 256, size=(20, 24, 3)).astype(np.uint8)
    path = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(path)
    out = load_image_transforms(intensity=None)({"image": str(path)})["image"]
    luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    assert tuple(out.shape) == (1, 24, 20)
    np.testing.assert_allclose(out[0].numpy().T, luma, rtol=1e-5, atol=1e-3)
    kept = load_image_transforms(intensity=None, grayscale=False)({"image": str(path)})["image"]
    assert tuple(kept.shape) == (3, 24, 20)


def test_nifti_anatomical_matches_nibabel():
    import nibabel as nib

    path = _anatomical()
    img = nib.load(path)
    out = load_image_transforms(modality="3d", intensity=None, orientation=None)({"image": path})["image"]
    assert tuple(out.shape) == (1, *img.shape)
    np.testing.assert_allclose(out[0].numpy(), img.get_fdata(), rtol=1e-6)
    np.testing.assert_allclose(out.affine.numpy(), img.affine, atol=1e-5)
    ras = load_image_transforms(modality="brain", intensity=None)({"image": path})["image"]
    canonical = nib.as_closest_canonical(img)
    assert tuple(ras.shape[1:]) == canonical.shape
    np.testing.assert_allclose(ras[0].numpy(), canonical.get_fdata(), rtol=1e-6)


def test_mni152_template_matches_nibabel_and_resizes(tmp_path):
    import nibabel as nib

    nilearn_datasets = pytest.importorskip("nilearn.datasets")
    template = nilearn_datasets.load_mni152_template(resolution=2)
    path = tmp_path / "mni152_2mm.nii.gz"
    nib.save(template, path)
    direct = nib.load(path)
    out = load_image_transforms(modality="mri", intensity=None, orientation=None)({"image": str(path)})["image"]
    assert tuple(out.shape) == (1, *direct.shape)
    np.testing.assert_allclose(out[0].numpy(), direct.get_fdata(), rtol=1e-5, atol=1e-5)
    small = load_image_transforms(modality="3d", spatial_size=24)({"image": str(path)})["image"]
    assert tuple(small.shape) == (1, 24, 24, 24)
    assert float(small.min()) >= 0.0 and float(small.max()) <= 1.0 + 1e-6
    # area resizing: the mean over blocks, so the volume's mean intensity is nearly kept
    full = load_image_transforms(modality="3d")({"image": str(path)})["image"]
    assert float(small.mean()) == pytest.approx(float(full.mean()), rel=0.05)


def test_size_modes(tmp_path):
    from PIL import Image

    arr = np.full((20, 40), 200, dtype=np.uint8)  # 40 wide, 20 high
    arr[:, :20] = 100
    path = tmp_path / "wide.png"
    Image.fromarray(arr).save(path)
    resized = load_image_transforms(spatial_size=16, intensity=None)({"image": str(path)})["image"]
    assert tuple(resized.shape) == (1, 16, 16)
    longest_t = load_image_transforms(spatial_size=(32, 32), size_mode="longest", intensity=None)
    longest = longest_t({"image": str(path)})["image"]
    assert tuple(longest.shape) == (1, 32, 32)
    img = longest[0].numpy()  # (x, y): the 40 px width becomes 32, the 20 px height 16, padded by 8 each side
    assert np.all(img[:, :8] == 0) and np.all(img[:, 24:] == 0)
    np.testing.assert_allclose(img[:16, 8:24], 100)
    np.testing.assert_allclose(img[16:, 8:24], 200)
    crop_t = load_image_transforms(spatial_size=(30, 30), size_mode="pad_crop", intensity=None)
    crop = crop_t({"image": str(path)})["image"]
    assert tuple(crop.shape) == (1, 30, 30)
    np.testing.assert_array_equal(crop[0].numpy()[:, 5:25], arr[:, 5:35].T.astype(np.float32))
    with pytest.raises(ValueError, match="spatial_size"):
        load_image_transforms(modality="2d", spatial_size=(8, 8, 8))
    with pytest.raises(ValueError, match="modality"):
        load_image_transforms(modality="4d")


def test_cohort_png_and_dicom_load_alike(tmp_path):
    from monai_du.phantoms import make_cxr_cohort

    df = pd.read_csv(make_cxr_cohort(tmp_path, n=12, seed=0, size=32, formats=("png", "dicom")))
    t = load_image_transforms(spatial_size=32)
    for png, dcm in zip(df["image_png"], df["image_dicom"]):
        a = t({"image": str(tmp_path / png)})["image"].numpy()
        b = t({"image": str(tmp_path / dcm)})["image"].numpy()
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.995  # MONOCHROME1 sites included


# ---------------------------------------------------------------------------------------------------------------
# manifests -> datasets
# ---------------------------------------------------------------------------------------------------------------


def _write_png(path: Path, seed: int = 0) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(16, 16)).astype(np.uint8)).save(path)


def test_manifest_to_dataset_keeps_types_and_resolves_paths(tmp_path):
    for i in range(3):
        _write_png(tmp_path / "img" / f"{i}.png", seed=i)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "image,patient_id,age,sex,site,label_effusion,label_edema\n"
        "img/0.png,00042,65.5,M,siteA,1,\n"
        "img/1.png,00043,,,siteB,0,-1\n"
        f"{tmp_path / 'img' / '2.png'},00044,30,F,,-1,0\n"
    )
    ds = manifest_to_dataset(manifest)
    assert len(ds) == 3 and len(ds.report) == 0
    first, second, third = ds[0], ds[1], ds[2]
    assert first["image"] == str((tmp_path / "img" / "0.png").resolve())
    assert third["image"] == str(tmp_path / "img" / "2.png")
    assert first["patient_id"] == "00042" and isinstance(first["patient_id"], str)
    assert first["age"] == 65.5 and isinstance(first["age"], float)
    assert isinstance(second["age"], float) and math.isnan(second["age"])
    assert isinstance(second["sex"], float) and math.isnan(second["sex"])
    assert first["sex"] == "M" and first["site"] == "siteA" and isinstance(third["site"], float)
    assert first["label_effusion"] == 1.0 and math.isnan(first["label_edema"]) and second["label_edema"] == -1.0
    # a DataFrame with relative paths and a root
    df = pd.DataFrame({"image": ["0.png", "1.png"], "patient_id": ["a", "b"], "age": [1.0, np.nan]})
    ds2 = manifest_to_dataset(df, root=tmp_path / "img", columns=["age"])
    assert set(ds2[0]) == {"image", "age"} and ds2[1]["image"] == str(tmp_path / "img" / "1.png")
    with pytest.raises(ValueError, match="columns"):
        manifest_to_dataset(df, root=tmp_path / "img", columns=["weight"])
    with pytest.raises(ValueError, match="on_error"):
        manifest_to_dataset(df, root=tmp_path / "img", on_error="ignore")


def test_dataset_with_transforms_cache_and_dataloader(tmp_path):
    from monai.data import DataLoader

    from monai_du.phantoms import make_cxr_cohort

    path = make_cxr_cohort(tmp_path, n=10, seed=1, size=32)
    df = pd.read_csv(path)
    for cache in (False, True):
        ds = manifest_to_dataset(
            path, transform=load_image_transforms(spatial_size=24), cache=cache, columns=["age", "label_effusion"]
        )
        batch = next(iter(DataLoader(ds, batch_size=4, shuffle=False)))
        assert tuple(batch["image"].shape) == (4, 1, 24, 24)
        assert float(batch["image"].min()) >= 0.0 and float(batch["image"].max()) <= 1.0 + 1e-6
        np.testing.assert_allclose(batch["age"].numpy(), df["age"].to_numpy()[:4])
        np.testing.assert_allclose(batch["label_effusion"].numpy(), df["label_effusion"].to_numpy()[:4])


@pytest.fixture
def mixed_manifest(tmp_path):
    """Good and broken images of every kind, with the row numbers of the broken ones."""
    import nibabel as nib

    good_png = tmp_path / "good.png"
    _write_png(good_png)
    trunc_png = tmp_path / "trunc.png"
    _write_png(trunc_png, seed=1)
    trunc_png.write_bytes(trunc_png.read_bytes()[:-40])
    good_dcm = _testdata("CT_small.dcm")
    trunc_dcm = tmp_path / "trunc.dcm"
    blob = Path(good_dcm).read_bytes()
    trunc_dcm.write_bytes(blob[: len(blob) // 2])
    vol = nib.Nifti1Image(np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8), np.eye(4))
    good_gz = tmp_path / "good.nii.gz"
    nib.save(vol, good_gz)
    big = nib.Nifti1Image(np.random.default_rng(0).integers(0, 999, size=(24, 24, 24)).astype(np.int16), np.eye(4))
    blob_gz = gzip.compress(big.to_bytes())
    trunc_gz = tmp_path / "trunc.nii.gz"  # cut in the middle of the data: the header still parses
    trunc_gz.write_bytes(blob_gz[: len(blob_gz) // 2])
    cut_gz = tmp_path / "cut_header.nii.gz"  # cut inside the header
    cut_gz.write_bytes(blob_gz[:100])
    trunc_nii = tmp_path / "trunc.nii"
    trunc_nii.write_bytes(vol.to_bytes()[:-100])
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not an image" * 20)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    rows = [
        ("good.png", "ok"),
        ("missing.png", "file not found"),
        ("trunc.png", "unreadable image"),
        (good_dcm, "ok"),
        ("trunc.dcm", "truncated DICOM"),
        ("good.nii.gz", "ok"),
        ("trunc.nii.gz", "truncated NIfTI"),
        ("cut_header.nii.gz", "unreadable NIfTI"),
        ("trunc.nii", "truncated NIfTI"),
        ("garbage.nii.gz", "unreadable NIfTI"),
        ("empty.png", "empty file"),
    ]
    df = pd.DataFrame({"image": [r[0] for r in rows], "patient_id": [f"p{i}" for i in range(len(rows))]})
    df.index = [10 * i for i in range(len(rows))]  # index labels differ from positions on purpose
    expected = {10 * i: why for i, (_, why) in enumerate(rows) if why != "ok"}
    return tmp_path, df, expected


def test_check_images_reports_each_broken_file(mixed_manifest):
    root, df, expected = mixed_manifest
    ok, report = check_images(df, root=root)
    assert list(report.columns) == list(CHECK_REPORT_COLUMNS)
    assert sorted(report["row"]) == sorted(expected)
    for r in report.itertuples():
        assert r.reason.startswith(expected[r.row]), (r.row, r.reason)
        assert r.image == df.loc[r.row, "image"] and r.path.endswith(Path(r.image).name)
    assert sorted(ok.index) == sorted(set(df.index) - set(expected))
    # every image that passed is really readable by the loader
    t = load_image_transforms(modality="2d", intensity=None)
    for p in ok["image"]:
        full = p if os.path.isabs(p) else str(root / p)
        if full.endswith(".png"):
            assert t({"image": full})["image"].numel() > 0


def test_check_images_full_level_decodes(tmp_path):
    from PIL import Image

    arr = np.random.default_rng(3).integers(0, 256, size=(64, 64)).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.jpg", quality=95)
    blob = (tmp_path / "x.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(blob[: len(blob) // 2])  # JPEG headers survive; the scan data do not
    df = pd.DataFrame({"image": ["x.jpg", "cut.jpg"], "patient_id": ["a", "b"]})
    _, header_report = check_images(df, root=tmp_path)
    assert len(header_report) == 0  # a header check cannot see a cut JPEG scan
    ok, full_report = check_images(df, root=tmp_path, level="full")
    assert list(full_report["row"]) == [1] and full_report["reason"].iloc[0].startswith("cannot be decoded")
    assert list(ok.index) == [0]


def test_on_error_raise_names_row_and_file(mixed_manifest):
    root, df, expected = mixed_manifest
    with pytest.raises(ValueError) as err:
        manifest_to_dataset(df, root=root, on_error="raise")
    message = str(err.value)
    assert f"{len(expected)} image(s)" in message
    assert "row 10 (image 'missing.png'" in message and "file not found" in message
    assert "trunc.png" in message


def test_on_error_skip_drops_and_reports(mixed_manifest, tmp_path):
    root, df, expected = mixed_manifest
    report_path = tmp_path / "reports" / "skipped.csv"
    with pytest.warns(UserWarning, match=f"skipped {len(expected)} of {len(df)} rows"):
        ds = manifest_to_dataset(df, root=root, on_error="skip", report_path=report_path)
    assert len(ds) == len(df) - len(expected)
    assert sorted(ds.report["row"]) == sorted(expected)
    written = pd.read_csv(report_path)
    assert sorted(written["row"]) == sorted(expected)
    kept = {Path(item["image"]).name for item in ds}
    assert kept == {"good.png", "CT_small.dcm", "good.nii.gz"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unchecked = manifest_to_dataset(df, root=root, check=False)  # no check: every row, no warning
    assert len(unchecked) == len(df)


def test_check_image_file_agrees_with_check_images(mixed_manifest):
    root, df, expected = mixed_manifest
    for row, image in df["image"].items():
        reason = check_image_file(image if os.path.isabs(image) else root / image)
        if row in expected:
            assert reason is not None and reason.startswith(expected[row]), (row, reason)
        else:
            assert reason is None, (row, reason)
    with pytest.raises(ValueError, match="level"):
        check_image_file(root / "good.png", level="deep")


# ---------------------------------------------------------------------------------------------------------------
# images the pipeline cannot use: each names its file (issue "Trust: every bad input names itself")
# ---------------------------------------------------------------------------------------------------------------


def _unusable(excinfo) -> UnusableImageError:
    """The UnusableImageError in the cause chain of what a Compose raised (MONAI wraps it in a RuntimeError)."""
    err = excinfo.value
    while err is not None and not isinstance(err, UnusableImageError):
        err = err.__cause__
    assert err is not None, f"no UnusableImageError behind {excinfo.value!r}"
    return err


def _nifti(path: Path, data: np.ndarray) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


@pytest.fixture
def odd_images(tmp_path):
    """Real files of every shape and value problem, plus good ones: {name: path}."""
    import nibabel as nib
    from PIL import Image

    rng = np.random.default_rng(11)
    files = {}
    files["grey.png"] = tmp_path / "grey.png"
    Image.fromarray(rng.integers(0, 256, size=(48, 64)).astype(np.uint8)).save(files["grey.png"])  # 64 wide, 48 high
    files["rgb.png"] = tmp_path / "rgb.png"
    Image.fromarray(rng.integers(0, 256, size=(40, 56, 3)).astype(np.uint8), mode="RGB").save(files["rgb.png"])
    files["good.nii.gz"] = _nifti(tmp_path / "good.nii.gz", rng.random((12, 14, 10)).astype(np.float32))
    one_frame = rng.random((12, 14, 10, 1)).astype(np.float32)  # a 4D file with one volume: a 3D image
    files["one_frame_4d.nii.gz"] = _nifti(tmp_path / "one_frame_4d.nii.gz", one_frame)
    files["2d.nii.gz"] = _nifti(tmp_path / "2d.nii.gz", rng.random((20, 24)).astype(np.float32))
    files["4d.nii.gz"] = _nifti(tmp_path / "4d.nii.gz", rng.random((12, 14, 10, 2)).astype(np.float32))
    nan = rng.random((12, 14, 10)).astype(np.float32)
    nan[3, 4, 5] = np.nan
    nan[0, 0, 0:2] = np.nan
    files["nan.nii.gz"] = _nifti(tmp_path / "nan.nii.gz", nan)
    inf = rng.random((12, 14, 10)).astype(np.float32)
    inf[1, 1, 1] = np.inf
    files["inf.nii.gz"] = _nifti(tmp_path / "inf.nii.gz", inf)
    files["zero.nii.gz"] = tmp_path / "zero.nii.gz"
    files["zero.nii.gz"].write_bytes(b"")
    # header corrupted: the datatype code (bytes 70-71) set to 4096, which no NIfTI datatype has
    header = bytearray(nib.Nifti1Image(rng.random((6, 7, 8)).astype(np.float32), np.eye(4)).to_bytes())
    header[70:72] = (4096).to_bytes(2, "little")
    files["bad_header.nii.gz"] = tmp_path / "bad_header.nii.gz"
    files["bad_header.nii.gz"].write_bytes(gzip.compress(bytes(header)))
    # header corrupted: a negative size along y (dim[2], bytes 44-45); nibabel opens it, MONAI's reader fails
    negative = bytearray(nib.Nifti1Image(rng.random((6, 7, 8)).astype(np.float32), np.eye(4)).to_bytes())
    negative[44:46] = (-7).to_bytes(2, "little", signed=True)
    files["negative_dim.nii"] = tmp_path / "negative_dim.nii"
    files["negative_dim.nii"].write_bytes(bytes(negative))
    return files


def _expected_wrong_shapes(files) -> dict[str, tuple[str, str]]:
    """{name: (modality, reason)}, shapes from nibabel's and PIL's own reads."""
    import nibabel as nib
    from PIL import Image

    with Image.open(files["grey.png"]) as im:
        png = (1, im.width, im.height)
    two = nib.load(files["2d.nii.gz"]).shape
    four = nib.load(files["4d.nii.gz"]).shape
    vol = nib.load(files["good.nii.gz"]).shape
    return {
        "grey.png": ("3d", f"has 2 spatial dimensions (shape {png}), the 3d pipeline expects 3: a 2D image in a 3D "
                           "manifest?"),
        "2d.nii.gz": ("3d", f"has 2 spatial dimensions (shape {(1, *two)}), the 3d pipeline expects 3: a 2D image in "
                            "a 3D manifest?"),
        "4d.nii.gz": ("3d", f"has {four[3]} channels (shape {(four[3], *four[:3])}); a 4D volume? the 3d pipeline "
                            "expects one channel"),
        "good.nii.gz": ("2d", f"has 3 spatial dimensions (shape {(1, *vol)}), the 2d pipeline expects 2: a 3D volume "
                              "in a 2D manifest?"),
    }


def test_wrong_dimensionality_raises_naming_file_shape_and_expectation(odd_images):
    for name, (modality, reason) in _expected_wrong_shapes(odd_images).items():
        path = str(odd_images[name])
        with pytest.raises(RuntimeError) as info:
            load_image_transforms(modality=modality, spatial_size=8)({"image": path})
        err = _unusable(info)
        assert isinstance(err, ValueError) and (err.path, err.reason) == (path, reason)
        assert str(err) == f"image {path} {reason}"
        # the header check of the same pipeline finds it without decoding, with the same words
        assert check_image_file(path, modality=modality) == reason
        assert check_image_file(path) is None  # no pipeline named: any shape


def test_nan_and_inf_volumes_are_refused_naming_the_file(odd_images):
    t = load_image_transforms(modality="3d", spatial_size=8)
    for name, what in [("nan.nii.gz", "NaN"), ("inf.nii.gz", "inf")]:
        import nibabel as nib

        data = np.asarray(nib.load(odd_images[name]).dataobj)
        count = int(np.isnan(data).sum() if what == "NaN" else np.isinf(data).sum())
        with pytest.raises(RuntimeError) as info:
            t({"image": str(odd_images[name])})
        assert str(_unusable(info)) == f"image {odd_images[name]} holds {what} values ({count} of {data.size} values)"
        # the header cannot see values; the full check decodes and can
        assert check_image_file(odd_images[name], modality="3d") is None
        assert check_image_file(odd_images[name], level="full", modality="3d") == (
            f"holds {what} values ({count} of {data.size} values)"
        )


def test_empty_and_broken_nifti_name_the_file(odd_images):
    t = load_image_transforms(modality="3d", spatial_size=8)
    expected = {
        "zero.nii.gz": "empty file",
        "bad_header.nii.gz": "unreadable NIfTI (HeaderDataError: data code 4096 not recognized)",
        "negative_dim.nii": (
            "unreadable NIfTI (broken header: dim [3, 6, -7, 8, 1, 1, 1, 1] gives data shape (6, -7, 8))"
        ),
    }
    for name, reason in expected.items():
        path = str(odd_images[name])
        assert check_image_file(path, modality="3d") == reason
        with pytest.raises(RuntimeError) as info:  # the loader alone: the error names the file too
            t({"image": path})
        err = _unusable(info)
        assert err.path == path and str(err).startswith(f"image {path} cannot be decoded (")


def test_good_images_still_load_as_their_readers_read_them(odd_images):
    import nibabel as nib
    from PIL import Image

    t3 = load_image_transforms(modality="3d", intensity=None)
    for name in ("good.nii.gz", "one_frame_4d.nii.gz"):
        raw = np.asarray(nib.load(odd_images[name]).dataobj)
        out = t3({"image": str(odd_images[name])})["image"]
        assert tuple(out.shape) == (1, *raw.shape[:3])
        np.testing.assert_array_equal(out[0].numpy(), raw.reshape(raw.shape[:3]))
    t2 = load_image_transforms(modality="2d", intensity=None)
    with Image.open(odd_images["grey.png"]) as im:
        grey = np.asarray(im, dtype=np.float32)  # (height, width)
    out = t2({"image": str(odd_images["grey.png"])})["image"]
    assert tuple(out.shape) == (1, grey.shape[1], grey.shape[0])
    np.testing.assert_array_equal(out[0].numpy().T, grey)
    with Image.open(odd_images["rgb.png"]) as im:  # RGB still collapses to one grey channel
        rgb = np.asarray(im, dtype=np.float32)
    out = t2({"image": str(odd_images["rgb.png"])})["image"]
    assert tuple(out.shape) == (1, rgb.shape[1], rgb.shape[0])
    np.testing.assert_allclose(out[0].numpy().T, rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32), atol=1e-3)


def _odd_manifest(files, names) -> pd.DataFrame:
    df = pd.DataFrame({"image": [str(files[n]) for n in names], "patient_id": [f"p{i}" for i in range(len(names))]})
    df.index = [100 + i for i in range(len(names))]
    return df


def test_on_error_skip_reports_wrong_shapes_and_broken_files_by_row(odd_images, tmp_path):
    wrong = {n: r for n, (m, r) in _expected_wrong_shapes(odd_images).items() if m == "3d"}
    broken = {"zero.nii.gz": "empty file", "bad_header.nii.gz": "unreadable NIfTI (HeaderDataError"}
    names = ["good.nii.gz", *wrong, "one_frame_4d.nii.gz", *broken]
    df = _odd_manifest(odd_images, names)
    t = load_image_transforms(modality="3d", spatial_size=8)
    report_path = tmp_path / "reports" / "skipped.csv"
    with pytest.warns(UserWarning, match=f"skipped {len(wrong) + len(broken)} of {len(names)} rows"):
        ds = manifest_to_dataset(df, transform=t, on_error="skip", report_path=report_path)
    assert [Path(item["image"]).name for item in ds.data] == ["good.nii.gz", "one_frame_4d.nii.gz"]
    for report in (ds.report, pd.read_csv(report_path)):
        reasons = {Path(p).name: (row, why) for row, p, why in zip(report["row"], report["path"], report["reason"])}
        assert set(reasons) == set(wrong) | set(broken)
        for name, (row, why) in reasons.items():
            assert row == 100 + names.index(name)
            assert why == wrong[name] if name in wrong else why.startswith(broken[name])
    assert all(tuple(item["image"].shape) == (1, 8, 8, 8) for item in ds)

    with pytest.raises(ValueError) as info:
        manifest_to_dataset(df, transform=t, on_error="raise")
    message = str(info.value)
    n_bad = len(wrong) + len(broken)
    assert message.startswith(f"manifest DataFrame: {n_bad} image(s) missing, unreadable or unusable")
    for name in [*wrong, *broken]:
        row = 100 + names.index(name)
        assert f"row {row} (image '{odd_images[name]}' -> {odd_images[name]}): " in message
    # one bad image: one line
    one = _odd_manifest(odd_images, ["good.nii.gz", "grey.png"])
    with pytest.raises(ValueError) as info:
        manifest_to_dataset(one, transform=t, source="brain.csv")
    png = odd_images["grey.png"]
    assert str(info.value) == (
        f"manifest brain.csv: 1 image(s) missing, unreadable or unusable: row 101 (image '{png}' -> {png}): "
        f"{wrong['grey.png']}"
    )


def test_nan_volume_is_skipped_or_raised_when_cached(odd_images, tmp_path):
    names = ["good.nii.gz", "nan.nii.gz", "2d.nii.gz", "one_frame_4d.nii.gz"]
    df = _odd_manifest(odd_images, names)
    t = load_image_transforms(modality="3d", spatial_size=8)
    report_path = tmp_path / "skipped.csv"
    with pytest.warns(UserWarning) as caught:
        ds = manifest_to_dataset(df, transform=t, cache=True, on_error="skip", report_path=report_path)
    messages = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert any("skipped 1 of 4 rows with missing, unreadable or unusable images" in m for m in messages)
    assert any("skipped 1 of 4 rows whose images cannot be used once loaded" in m for m in messages)
    assert [item["image"].meta["filename_or_obj"] for item in ds] == [
        str(odd_images["good.nii.gz"]), str(odd_images["one_frame_4d.nii.gz"])
    ]
    written = pd.read_csv(report_path)
    assert sorted(written["row"]) == [101, 102]
    assert written.set_index("row").loc[101, "reason"].startswith("holds NaN values (3 of ")
    fresh = t({"image": str(odd_images["good.nii.gz"])})["image"]
    np.testing.assert_array_equal(ds[0]["image"].numpy(), fresh.numpy())

    with pytest.raises(ValueError) as info:
        manifest_to_dataset(df.loc[[100, 101]], transform=t, cache=True, on_error="raise")
    nan = odd_images["nan.nii.gz"]
    assert str(info.value) == (
        f"manifest DataFrame: 1 image(s) cannot be used: row 101 (image '{nan}' -> {nan}): holds NaN values (3 of "
        f"{12 * 14 * 10} values)"
    )
    # without a cache the NaN volume is only seen when loaded: it raises then, naming the file
    lazy = manifest_to_dataset(df.loc[[100, 101]], transform=t, on_error="skip")
    with pytest.raises(RuntimeError) as info:
        lazy[1]
    assert _unusable(info).path == str(nan)


def test_decode_once_cache_skips_unusable_images(odd_images, tmp_path):
    from monai_du.data.cache import build_image_cache, cached_load_transforms

    names = ["good.nii.gz", "grey.png", "4d.nii.gz", "nan.nii.gz"]
    df = _odd_manifest(odd_images, names)
    with pytest.warns(UserWarning, match="skipped 3 of 4 images"):
        result = build_image_cache(df, tmp_path / "c", modality="3d", spatial_size=8)
    wrong = _expected_wrong_shapes(odd_images)
    reasons = dict(zip(result.skipped["row"], result.skipped["reason"]))
    assert reasons[101] == wrong["grey.png"][1] and reasons[102] == wrong["4d.nii.gz"][1]
    assert reasons[103].startswith("holds NaN values")
    # a dataset on the cache refuses the wrong shapes from the headers, as the pipeline would
    t = cached_load_transforms(tmp_path / "c", modality="3d", spatial_size=8, on_miss="raise")
    with pytest.warns(UserWarning, match="skipped 2 of 3 rows"):
        ds = manifest_to_dataset(df.loc[[100, 101, 102]], transform=t, on_error="skip")
    assert list(ds.report["row"]) == [101, 102] and len(ds) == 1
    assert tuple(ds[0]["image"].shape) == (1, 8, 8, 8)
