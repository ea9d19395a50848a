"""Bad 3D inputs (brain MRI) through every entry point: each is refused with an error naming its file, or skipped
and listed in the skip report, and a run with ``on_error: skip`` goes on with the good volumes.

Cases: a 4D volume (8x8x8x3 NIfTI), a 2D image in the 3D manifest (a PNG, a 2D NIfTI), NIfTI headers that are
broken (a file cut inside its header, a corrupted magic), a zero-byte ``.nii.gz`` and a float32 volume holding NaN
values. Entry points: ``check_images``, ``manifest_to_dataset`` (raise / skip, with and without the in-memory cache),
the decode-once cache (``build_image_cache``), ``load_images`` (the probes of ``monai-du compare``) and the 3D
pretraining bundle. The expected reasons are built from the files as nibabel and PIL read them.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _bundle_helpers import check_fire, config, config_arg, env, failure
from monai.transforms import Compose, RandFlipd, RandGaussianNoised

from monai_du.data.cache import DecodedImageCache, build_image_cache
from monai_du.data.loading import (
    UnusableImageError,
    check_images,
    load_image_transforms,
    load_images,
    manifest_to_dataset,
)

CASES = ["4d", "2d_png", "2d_nifti", "cut_header", "bad_magic", "zero_byte", "nan"]
GOOD = ["good_f0.nii.gz", "good_u1.nii.gz", "good_f2.nii.gz", "good_u3.nii.gz", "good_f4.nii.gz"]
SIZE = 8


def _nifti_bytes(data: np.ndarray) -> bytes:
    import nibabel as nib

    return nib.Nifti1Image(data, np.eye(4)).to_bytes()


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """{"dir", "good": [names], "bad": {case: name}} with the files written in ``dir``."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("volumes")
    rng = np.random.default_rng(7)
    for name in GOOD:  # float32 and uint8 volumes
        if "_f" in name:
            data = rng.random((10, 11, 9)).astype(np.float32)
        else:
            data = rng.integers(0, 256, (10, 11, 9)).astype(np.uint8)
        (folder / name).write_bytes(gzip.compress(_nifti_bytes(data)))
    bad = {
        "4d": "series_4d.nii.gz",
        "2d_png": "slice.png",
        "2d_nifti": "slice_2d.nii.gz",
        "cut_header": "cut_header.nii",
        "bad_magic": "bad_magic.nii.gz",
        "zero_byte": "zero.nii.gz",
        "nan": "nan.nii.gz",
    }
    (folder / bad["4d"]).write_bytes(gzip.compress(_nifti_bytes(rng.random((8, 8, 8, 3)).astype(np.float32))))
    Image.fromarray(rng.integers(0, 256, (12, 14)).astype(np.uint8)).save(folder / bad["2d_png"])
    (folder / bad["2d_nifti"]).write_bytes(gzip.compress(_nifti_bytes(rng.random((12, 14)).astype(np.float32))))
    header = _nifti_bytes(rng.random((8, 8, 8)).astype(np.float32))
    (folder / bad["cut_header"]).write_bytes(header[:300])  # the NIfTI-1 header alone is 348 bytes
    magic = bytearray(header)
    assert bytes(magic[344:348]) == b"n+1\0"
    magic[344:348] = b"xyz\0"
    (folder / bad["bad_magic"]).write_bytes(gzip.compress(bytes(magic)))
    (folder / bad["zero_byte"]).write_bytes(b"")
    nan = rng.random((10, 11, 9)).astype(np.float32)
    nan[1, 2, 3] = nan[4, 5, 6] = np.nan
    (folder / bad["nan"]).write_bytes(gzip.compress(_nifti_bytes(nan)))
    return {"dir": folder, "good": list(GOOD), "bad": bad}


def _manifest(volumes, names: list[str]) -> pd.DataFrame:
    """Manifest rows with absolute paths, index labels 100, 101, ... (not positions)."""
    n = len(names)
    df = pd.DataFrame({
        "image": [str(volumes["dir"] / name) for name in names],
        "patient_id": [f"p{i}" for i in range(n)],
        "age": np.linspace(30.0, 70.0, n),
        "sex": [("F", "M")[i % 2] for i in range(n)],
        "site": [("a", "b", "c")[i % 3] for i in range(n)],
    })
    df.index = [100 + i for i in range(n)]
    return df


def _with(volumes, case: str) -> tuple[pd.DataFrame, int, str]:
    """Manifest of the good volumes with the bad one of ``case`` in the middle: (df, its row, its path)."""
    names = [*volumes["good"][:2], volumes["bad"][case], *volumes["good"][2:]]
    return _manifest(volumes, names), 102, str(volumes["dir"] / volumes["bad"][case])


def _check_reason(case: str, path: str, reason: str) -> None:
    """Assert that ``reason`` says what is wrong with the file of ``case``, as nibabel and PIL see it."""
    import nibabel as nib
    from PIL import Image

    if case == "4d":
        shape = nib.load(path).shape
        channel_first = (shape[3], *shape[:3])
        assert reason.startswith(f"has {shape[3]} channels (shape {channel_first});"), reason
        assert "4D volume" in reason and "expects one channel" in reason, reason
    elif case in ("2d_png", "2d_nifti"):
        if case == "2d_png":
            with Image.open(path) as im:
                shape = (1, im.width, im.height)
        else:
            shape = (1, *nib.load(path).shape)
        assert reason.startswith(f"has 2 spatial dimensions (shape {shape}), the 3d pipeline expects 3"), reason
    elif case in ("cut_header", "bad_magic"):
        with pytest.raises(Exception):  # noqa: B017 - nibabel itself cannot read it
            nib.load(path).get_fdata()
        assert reason.startswith("unreadable NIfTI ("), reason
    elif case == "zero_byte":
        assert Path(path).stat().st_size == 0 and reason == "empty file"
    elif case == "nan":
        data = np.asarray(nib.load(path).dataobj)
        assert reason == f"holds NaN values ({int(np.isnan(data).sum())} of {data.size} values)"
    else:  # pragma: no cover
        raise AssertionError(case)


def _loaded_fresh(path: str) -> torch.Tensor:
    return load_image_transforms(modality="3d", spatial_size=SIZE)({"image": path})["image"]


def _bundle_like(random_step) -> Compose:
    """A bundle's preprocessing: the loading pipeline nested as the first step, then a random transform."""
    return Compose([load_image_transforms(modality="3d", spatial_size=SIZE), random_step])


# ---------------------------------------------------------------------------------------------------------------
# one entry point at a time, every case
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_check_images_names_the_bad_volume(volumes, case):
    df, row, path = _with(volumes, case)
    for level in ("header", "full"):
        ok, report = check_images(df, modality="3d", level=level)
        if level == "header" and case == "nan":  # values are not in a header: only decoding finds them
            assert report.empty and len(ok) == len(df)
            continue
        assert list(report["row"]) == [row] and list(report["path"]) == [path], (level, report)
        _check_reason(case, path, report["reason"].iloc[0])
        assert sorted(ok.index) == sorted(set(df.index) - {row})


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("case", CASES)
def test_on_error_raise_names_row_file_and_reason(volumes, case, cache):
    df, row, path = _with(volumes, case)
    transform = _bundle_like(RandFlipd("image", prob=0.5, spatial_axis=0))
    if case == "nan" and not cache:
        # without the in-memory cache values are only seen when the volume is loaded: it raises then, naming the file
        ds = manifest_to_dataset(df, transform=transform, on_error="raise")
        assert len(ds) == len(df)
        with pytest.raises(RuntimeError) as info:
            ds[df.index.get_loc(row)]
        err = info.value
        while err is not None and not isinstance(err, UnusableImageError):
            err = err.__cause__
        assert err is not None and err.path == path
        _check_reason(case, path, err.reason)
        return
    with pytest.raises(ValueError) as info:
        manifest_to_dataset(df, transform=transform, cache=cache, on_error="raise", source="brain.csv")
    message = str(info.value)
    head = f"row {row} (image '{path}' -> {path}): "
    assert message.startswith("manifest brain.csv: 1 image(s)") and head in message, message
    _check_reason(case, path, message.split(head, 1)[1])


@pytest.mark.parametrize("case", CASES)
def test_on_error_skip_reports_the_file_and_keeps_the_rest(volumes, case, tmp_path):
    df, row, path = _with(volumes, case)
    report_path = tmp_path / "eval" / "skipped_images.csv"
    transform = _bundle_like(RandFlipd("image", prob=0.5, spatial_axis=0))
    with pytest.warns(UserWarning, match=f"skipped 1 of {len(df)} rows") as caught:
        ds = manifest_to_dataset(df, transform=transform, cache=True, on_error="skip", report_path=report_path)
    assert any(path in str(w.message) for w in caught)
    for report in (ds.report, pd.read_csv(report_path)):
        assert list(report["row"]) == [row] and list(report["path"]) == [path]
        _check_reason(case, path, report["reason"].iloc[0])
    assert [item["image"] for item in ds.data] == [p for p in df["image"] if p != path]
    for i in range(len(ds)):
        image = ds[i]["image"]
        assert tuple(image.shape) == (1, SIZE, SIZE, SIZE) and bool(torch.isfinite(image).all())


@pytest.mark.parametrize("case", CASES)
def test_decode_cache_build_skips_and_reports_the_file(volumes, case, tmp_path):
    df, row, path = _with(volumes, case)
    with pytest.warns(UserWarning, match=f"skipped 1 of {len(df)} images"):
        result = build_image_cache(df, tmp_path / "cache", modality="3d", spatial_size=SIZE)
    assert list(result.skipped["row"]) == [row] and list(result.skipped["path"]) == [path]
    _check_reason(case, path, result.skipped["reason"].iloc[0])
    written = pd.read_csv(result.report_path)
    assert list(written["path"]) == [path] and list(written["reason"]) == list(result.skipped["reason"])
    assert result.n_built == len(df) - 1
    cache = DecodedImageCache(tmp_path / "cache", modality="3d", spatial_size=SIZE)
    assert path not in cache
    for good in df["image"].drop(index=row):
        np.testing.assert_allclose(cache.read(good), _loaded_fresh(good).numpy(), atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_load_images_names_row_file_and_reason(volumes, case):
    df, row, path = _with(volumes, case)
    with pytest.raises(ValueError) as info:
        load_images(df, modality="3d", image_size=SIZE)
    message = str(info.value)
    head = f"row {row} (image '{path}' -> {path}): "
    assert message.startswith("manifest DataFrame: 1 image(s)") and head in message, message
    _check_reason(case, path, message.split(head, 1)[1])
    images = load_images(df.drop(index=row), modality="3d", image_size=SIZE)  # the good rows load, in order
    assert images.shape == (len(df) - 1, 1, SIZE, SIZE, SIZE) and np.isfinite(images).all()
    np.testing.assert_allclose(images[-1], _loaded_fresh(df["image"].iloc[-1]).numpy(), atol=1e-6)


def test_load_images_lists_every_volume_that_fails_once_loaded(volumes, tmp_path):
    import nibabel as nib

    second = tmp_path / "nan_too.nii.gz"
    data = np.asarray(nib.load(volumes["dir"] / volumes["bad"]["nan"]).dataobj).copy()
    data[0] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), second)
    df = _manifest(volumes, [volumes["good"][0], volumes["bad"]["nan"], volumes["good"][1], str(second)])
    with pytest.raises(ValueError) as info:
        load_images(df, modality="3d", image_size=SIZE)
    message = str(info.value)
    assert message.startswith("manifest DataFrame: 2 image(s) cannot be used once loaded")
    assert f"row 101 (image '{df.loc[101, 'image']}'" in message and f"row 103 (image '{second}'" in message
    assert isinstance(info.value.__cause__, UnusableImageError) and info.value.__cause__.path == df.loc[101, "image"]


# ---------------------------------------------------------------------------------------------------------------
# the in-memory cache of a bundle's preprocessing (the loading pipeline nested in a Compose)
# ---------------------------------------------------------------------------------------------------------------


def test_nested_loading_pipeline_is_cached_and_random_steps_run_per_access(volumes):
    df = _manifest(volumes, volumes["good"][:3])
    noise = RandGaussianNoised("image", prob=1.0, std=0.1)
    ds = manifest_to_dataset(df, transform=_bundle_like(noise), cache=True, columns=[])
    for i, path in enumerate(df["image"]):
        cached = ds._cache[i]["image"]  # decoded once, into the cache
        assert isinstance(cached, torch.Tensor) and tuple(cached.shape) == (1, SIZE, SIZE, SIZE)
        np.testing.assert_array_equal(np.asarray(cached), _loaded_fresh(path).numpy())
        first, second = ds[i]["image"], ds[i]["image"]  # the noise is drawn at every access, on a copy
        assert not torch.equal(torch.as_tensor(first), torch.as_tensor(second))
        assert not torch.equal(torch.as_tensor(first), torch.as_tensor(cached))
        np.testing.assert_array_equal(np.asarray(ds._cache[i]["image"]), np.asarray(cached))
    # a nested Compose holding a random transform is not cached: it runs at every access
    inner = Compose([load_image_transforms(modality="3d", spatial_size=SIZE), noise])
    lazy = manifest_to_dataset(df, transform=Compose([inner]), cache=True, columns=[])
    assert [item["image"] for item in lazy._cache] == list(df["image"])
    assert tuple(lazy[0]["image"].shape) == (1, SIZE, SIZE, SIZE)


# ---------------------------------------------------------------------------------------------------------------
# the 3D pretraining bundle, one epoch
# ---------------------------------------------------------------------------------------------------------------


def _bundle_cmd(manifest: Path, dataset_dir: Path, root: Path, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", config_arg(config("brain")),
        "--bundle_root", str(root), "--manifest", str(manifest), "--dataset_dir", str(dataset_dir),
        "--max_epochs", "1", "--spatial_size", "[16,16,16]", "--batch_size", "4", "--num_workers", "0", *overrides,
    ]


def _bundle_manifest(volumes, names: list[str], path: Path) -> Path:
    df = _manifest(volumes, names).reset_index(drop=True)
    df["image"] = [Path(p).name for p in df["image"]]  # relative to --dataset_dir
    df["split"] = "train"  # every row in the pretraining split
    df.to_csv(path, index=False)
    return path


def test_bundle_run_with_on_error_skip_goes_on_and_reports_every_bad_volume(volumes, tmp_path):
    check_fire()
    bad = [volumes["bad"][case] for case in CASES]
    names = [volumes["good"][0], *bad[:3], *volumes["good"][1:], *bad[3:]]
    manifest = _bundle_manifest(volumes, names, tmp_path / "manifest.csv")
    root = tmp_path / "bundle"
    proc = subprocess.run(_bundle_cmd(manifest, volumes["dir"], root, "--on_error", "skip"), cwd=tmp_path,
                          env=env(), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, failure(out)
    assert (root / "models" / "encoder.pt").is_file() and (root / "models" / "checkpoint_epoch=1.pt").is_file()
    report = pd.read_csv(root / "eval" / "skipped_images.csv")
    assert sorted(report["image"]) == sorted(bad)
    for case in CASES:
        name = volumes["bad"][case]
        line = report[report["image"] == name].iloc[0]
        assert line["row"] == names.index(name) and line["path"] == str(volumes["dir"] / name)
        _check_reason(case, line["path"], line["reason"])


def test_bundle_run_with_on_error_raise_stops_before_training_naming_the_nan_volume(volumes, tmp_path):
    check_fire()
    names = [*volumes["good"][:2], volumes["bad"]["nan"], *volumes["good"][2:]]
    manifest = _bundle_manifest(volumes, names, tmp_path / "manifest.csv")
    root = tmp_path / "bundle"
    proc = subprocess.run(_bundle_cmd(manifest, volumes["dir"], root), cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    path = volumes["dir"] / volumes["bad"]["nan"]
    head = f"ValueError: manifest {manifest}: 1 image(s) cannot be used: row 2 (image '{path.name}' -> {path}): "
    assert head in out, failure(out)
    _check_reason("nan", str(path), out.split(head, 1)[1].splitlines()[0])
    assert not list((root / "models").glob("checkpoint*"))  # it stopped before the first epoch
