"""Tests of the decode-once image cache (monai_du.data.cache): cached images against a fresh run of
``load_image_transforms`` (PNG, pydicom-data's MONOCHROME1 radiograph, nibabel's anatomical.nii), settings keys,
a build killed with SIGKILL and resumed, unreadable files, parallel against serial builds, and the training path."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from monai_du.data.cache import (
    CACHE_FORMAT,
    DecodedImageCache,
    LoadCachedImaged,
    build_image_cache,
    cache_settings,
    cached_load_transforms,
    path_key,
    settings_key,
)
from monai_du.data.loading import CHECK_REPORT_COLUMNS, load_image_transforms, manifest_to_dataset

torch.set_num_threads(1)


def _fresh(path, **kwargs) -> np.ndarray:
    return load_image_transforms(**kwargs)({"image": str(path)})["image"].numpy()


def _png16(path: Path, shape=(40, 52), seed: int = 0) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 65536, size=shape).astype(np.uint16)).save(path)
    return path


def _npy_files(cache: DecodedImageCache) -> list[Path]:
    return sorted((cache.folder / "images").glob("*/*.npy"))


def test_png_cached_equals_fresh(tmp_path):
    paths = [_png16(tmp_path / f"{i}.png", seed=i) for i in range(3)]
    cache = DecodedImageCache(tmp_path / "c", spatial_size=24)
    result = cache.build(paths)
    assert (result.n_built, result.n_existing, len(result.skipped)) == (3, 0, 0)
    for p in paths:
        fresh = _fresh(p, spatial_size=24)
        cached = cache.read(p)
        assert cached.dtype == np.float32 and cached.shape == fresh.shape == (1, 24, 24)
        np.testing.assert_allclose(cached, fresh, rtol=0, atol=1e-6)
    # through the drop-in transform; with no cache it is exactly the plain pipeline
    out = cached_load_transforms(tmp_path / "c", spatial_size=24, on_miss="raise")({"image": str(paths[1])})
    assert isinstance(out["image"], torch.Tensor)
    np.testing.assert_allclose(out["image"].numpy(), _fresh(paths[1], spatial_size=24), atol=1e-6)
    plain = cached_load_transforms(None, spatial_size=24)({"image": str(paths[1])})["image"]
    np.testing.assert_array_equal(plain.numpy(), _fresh(paths[1], spatial_size=24))
    # float16 storage: another key, values within half-precision rounding of [0, 1] values
    half = DecodedImageCache(tmp_path / "c", spatial_size=24, store_dtype="float16")
    assert half.key != cache.key
    np.testing.assert_allclose(half.get(paths[0]), _fresh(paths[0], spatial_size=24), atol=5e-4)
    assert np.load(half.file_for(paths[0])).dtype == np.float16


def test_dicom_monochrome1_radiograph(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCR.dcm", download=False)
    if path is None:
        pytest.skip("pydicom-data's RG1_UNCR.dcm is not installed")
    cache = DecodedImageCache(tmp_path / "c", modality="cxr", spatial_size=32)
    assert cache.build([path]).n_built == 1
    cached = cache.read(path)
    np.testing.assert_allclose(cached, _fresh(path, spatial_size=32), rtol=0, atol=1e-6)
    # independent of the pipeline: the stored pixels, block-averaged to 32 x 32, are the inverse of the cached image
    raw = pydicom.dcmread(path).pixel_array.astype(np.float64).T  # (x, y) like MONAI's readers
    xs = np.array_split(np.arange(raw.shape[0]), 32)
    ys = np.array_split(np.arange(raw.shape[1]), 32)
    blocks = np.array([[raw[np.ix_(bx, by)].mean() for by in ys] for bx in xs])
    assert np.corrcoef(blocks.ravel(), cached[0].ravel().astype(np.float64))[0, 1] < -0.99
    assert float(cached.min()) >= 0.0 and float(cached.max()) <= 1.0 + 1e-6


def test_nifti_cached_equals_fresh(tmp_path):
    import nibabel

    path = Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"
    if not path.is_file():
        pytest.skip("nibabel's tests/data/anatomical.nii is not installed")
    kwargs = {"modality": "3d", "spatial_size": (12, 14, 10), "intensity": "percentile"}
    cache = DecodedImageCache(tmp_path / "c", **kwargs)
    cache.build([path])
    cached = cache.read(path)
    assert cached.shape == (1, 12, 14, 10)
    np.testing.assert_allclose(cached, _fresh(path, **kwargs), rtol=0, atol=1e-6)


def test_settings_key_changes_with_every_setting_and_is_never_stale(tmp_path, monkeypatch):
    png = _png16(tmp_path / "a.png")
    small = DecodedImageCache(tmp_path / "c", spatial_size=16)
    small.build([png])
    larger = DecodedImageCache(tmp_path / "c", spatial_size=20)
    assert larger.key != small.key and larger.folder != small.folder and png not in larger and png in small
    with pytest.raises(LookupError, match=r"a\.png: not in the image cache"):
        larger.read(png)
    assert larger.get(png, on_miss="decode").shape == (1, 20, 20) and png not in larger
    assert larger.get(png).shape == (1, 20, 20) and png in larger
    assert small.read(png).shape == (1, 16, 16)
    # the key is the hash of the canonical settings: equal spellings share it, every change makes a new one
    base = cache_settings(modality="2d", spatial_size=16)
    assert base["format"] == CACHE_FORMAT and base["spatial_size"] == [16, 16]
    assert settings_key(cache_settings(modality="cxr", spatial_size=(16, 16), orientation=None)) == small.key
    changed = [
        {"spatial_size": (16, 17)}, {"modality": "3d", "spatial_size": 16}, {"intensity": "percentile"},
        {"intensity": None}, {"size_mode": "longest"}, {"interp_mode": "bilinear"}, {"invert_monochrome1": False},
        {"grayscale": False}, {"store_dtype": "float16"},
    ]
    keys = {settings_key(cache_settings(**{"spatial_size": 16, **c})) for c in changed}
    assert len(keys) == len(changed) and small.key not in keys
    import monai_du

    monkeypatch.setattr(monai_du, "__version__", "999.0")
    assert DecodedImageCache(tmp_path / "c", spatial_size=16).key != small.key
    # path keys: one per absolute path
    assert path_key(png) == path_key(os.path.relpath(png)) != path_key(tmp_path / "b.png")
    with pytest.raises(ValueError, match="spatial_size"):
        DecodedImageCache(tmp_path / "c", modality="2d", spatial_size=(8, 8, 8))
    with pytest.raises(ValueError, match="store_dtype"):
        DecodedImageCache(tmp_path / "c", store_dtype="int8")


def _replace(path: Path, seed: int) -> None:
    """Write other pixels at ``path`` and move its modification time 5 s on, so that the change is never hidden by a
    coarse file-system clock."""
    before = path.stat().st_mtime_ns
    _png16(path, seed=seed)
    os.utime(path, ns=(before + 5_000_000_000, before + 5_000_000_000))


def test_replaced_file_is_decoded_again(tmp_path):
    root = tmp_path / "img"
    paths = [_png16(root / f"{i}.png", seed=i) for i in range(2)]
    df = pd.DataFrame({"image": [p.name for p in paths], "patient_id": ["p0", "p1"]})
    cache = DecodedImageCache(tmp_path / "c", spatial_size=16)
    first = build_image_cache(df, tmp_path / "c", root=root, spatial_size=16)
    assert (first.n_built, first.n_existing, first.n_rebuilt) == (2, 0, 0)
    old = cache.read(paths[0])
    # the same path, other pixels: the build decodes it again, reports it rebuilt and drops the old entry
    _replace(paths[0], seed=7)
    fresh = _fresh(paths[0], spatial_size=16)
    assert np.abs(old - fresh).max() > 0.1
    assert paths[0] not in cache and paths[1] in cache
    second = build_image_cache(df, tmp_path / "c", root=root, spatial_size=16)
    assert (second.n_built, second.n_existing, second.n_rebuilt, len(second.skipped)) == (1, 1, 1, 0)
    np.testing.assert_allclose(cache.read(paths[0]), fresh, rtol=0, atol=1e-6)
    assert len(_npy_files(cache)) == 2
    # replaced again, read by training: never the stale entry; on_miss="build" decodes and stores the new file
    _replace(paths[0], seed=8)
    fresh = _fresh(paths[0], spatial_size=16)
    with pytest.raises(LookupError, match="not in the image cache"):
        LoadCachedImaged("image", cache, on_miss="raise")({"image": str(paths[0])})
    out = cached_load_transforms(tmp_path / "c", spatial_size=16)({"image": str(paths[0])})["image"]
    np.testing.assert_allclose(out.numpy(), fresh, rtol=0, atol=1e-6)
    out = LoadCachedImaged("image", cache, on_miss="raise")({"image": str(paths[0])})["image"]
    np.testing.assert_allclose(out.numpy(), fresh, rtol=0, atol=1e-6)
    # that entry is current: the next build decodes nothing and removes the entry of the earlier file
    third = build_image_cache(df, tmp_path / "c", root=root, spatial_size=16)
    assert (third.n_built, third.n_existing, third.n_rebuilt) == (0, 2, 0) and len(_npy_files(cache)) == 2


def _slow_build(cache_dir: str, paths: list[str]) -> None:
    """Child process: a build whose decoding takes 0.1 s an image, so that the parent can kill it midway."""
    torch.set_num_threads(1)
    cache = DecodedImageCache(cache_dir, spatial_size=16)
    decode = cache.decode

    def slow(path):
        time.sleep(0.1)
        return decode(path)

    cache.decode = slow
    cache.build(paths)


def test_killed_build_resumes_and_completes(tmp_path):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the fork start method")
    paths = [str(_png16(tmp_path / f"{i:02d}.png", shape=(30, 30), seed=i)) for i in range(20)]
    cache = DecodedImageCache(tmp_path / "c", spatial_size=16)
    proc = multiprocessing.get_context("fork").Process(target=_slow_build, args=(str(tmp_path / "c"), paths))
    proc.start()
    deadline = time.time() + 30
    while len(_npy_files(cache)) < 4 and time.time() < deadline and proc.is_alive():
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    before = {f: f.stat().st_mtime_ns for f in _npy_files(cache)}
    assert 4 <= len(before) < len(paths)
    for f in before:  # every file that exists is complete
        assert np.load(f).shape == (1, 16, 16)
    result = cache.build(paths)
    assert (result.n_existing, result.n_built, len(result.skipped)) == (len(before), len(paths) - len(before), 0)
    assert all(f.stat().st_mtime_ns == t for f, t in before.items())  # not decoded again
    for p in paths:
        np.testing.assert_allclose(cache.read(p), _fresh(p, spatial_size=16), atol=1e-6)
    assert len(_npy_files(cache)) == len(paths)


@pytest.fixture
def broken_manifest(tmp_path):
    """Good PNGs and four unusable files, as a manifest DataFrame with relative paths, and the expected reasons."""
    from PIL import Image

    for i in range(4):
        _png16(tmp_path / "img" / f"good{i}.png", seed=i)
    trunc = _png16(tmp_path / "img" / "trunc.png", seed=9)
    trunc.write_bytes(trunc.read_bytes()[:-40])
    (tmp_path / "img" / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"not a dataset" * 10)
    rgb = np.random.default_rng(5).integers(0, 256, size=(64, 64)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "img" / "cut.jpg", quality=95)
    blob = (tmp_path / "img" / "cut.jpg").read_bytes()
    (tmp_path / "img" / "cut.jpg").write_bytes(blob[: len(blob) // 2])  # headers survive; decoding fails
    rows = [
        ("good0.png", None), ("missing.png", "file not found"), ("good1.png", None), ("trunc.png", "unreadable image"),
        ("garbage.dcm", "DICOM without pixel data"), ("good2.png", None), ("cut.jpg", "cannot be decoded"),
        ("good3.png", None),
    ]
    df = pd.DataFrame({"image": [r for r, _ in rows], "patient_id": [f"p{i}" for i in range(len(rows))]})
    df.index = [100 + i for i in range(len(rows))]
    expected = {100 + i: why for i, (_, why) in enumerate(rows) if why is not None}
    return tmp_path / "img", df, expected


def test_unreadable_files_reported_and_the_rest_cached(broken_manifest, tmp_path):
    root, df, expected = broken_manifest
    report = tmp_path / "reports" / "skipped.csv"
    with pytest.warns(UserWarning, match=f"skipped {len(expected)} of {len(df)} images"):
        result = build_image_cache(df, tmp_path / "c", root=root, spatial_size=16, report_path=report)
    assert list(result.skipped.columns) == list(CHECK_REPORT_COLUMNS)
    assert (result.n_built, result.n_cached) == (len(df) - len(expected),) * 2
    for written in (pd.read_csv(report), pd.read_csv(result.report_path)):
        assert sorted(written["row"]) == sorted(expected)
        for r in written.itertuples():
            assert r.reason.startswith(expected[r.row]), (r.row, r.reason)
            assert r.image == df.loc[r.row, "image"] and r.path == str(root / r.image)
    cache = DecodedImageCache(tmp_path / "c", spatial_size=16)
    for image in df["image"]:
        path = root / image
        if image.startswith("good"):
            np.testing.assert_allclose(cache.read(path), _fresh(path, spatial_size=16), atol=1e-6)
        else:
            assert path not in cache
    assert not list((cache.folder / "images").glob("*/.*.tmp"))  # atomic writes leave no temporary file


def test_parallel_build_equals_serial(broken_manifest, tmp_path):
    root, df, expected = broken_manifest
    df = pd.concat([df, pd.DataFrame({"image": [f"extra{i}.png" for i in range(6)], "patient_id": "q"})])
    df.index = range(len(df))
    for i in range(6):
        _png16(root / f"extra{i}.png", shape=(33, 47), seed=20 + i)
    with pytest.warns(UserWarning):
        serial = build_image_cache(df, tmp_path / "serial", root=root, spatial_size=(16, 20), num_workers=0)
    with pytest.warns(UserWarning):
        parallel = build_image_cache(df, tmp_path / "parallel", root=root, spatial_size=(16, 20), num_workers=2)
    assert serial.key == parallel.key and serial.n_built == parallel.n_built == len(df) - len(expected)
    pd.testing.assert_frame_equal(serial.skipped, parallel.skipped)
    a = DecodedImageCache(tmp_path / "serial", spatial_size=(16, 20))
    b = DecodedImageCache(tmp_path / "parallel", spatial_size=(16, 20))
    names = sorted(f.name for f in _npy_files(a))
    assert names == sorted(f.name for f in _npy_files(b)) and len(names) == serial.n_built
    for image in df["image"]:
        if (root / image) in a:
            np.testing.assert_array_equal(a.read(root / image), b.read(root / image))


def test_training_pipeline_reads_the_cache(tmp_path):
    from monai.data import DataLoader
    from monai.transforms import Compose

    from monai_du.transforms import MultiViewd, cxr_augmentations

    paths = [_png16(tmp_path / "img" / f"{i}.png", seed=i) for i in range(8)]
    df = pd.DataFrame({"image": [p.name for p in paths], "patient_id": [f"p{i}" for i in range(8)], "age": 50.0})
    views = MultiViewd(keys="image", transform=cxr_augmentations((16, 16)), num_views=2)
    # empty cache, on_miss="build": DataLoader workers fill it during the first epoch
    transform = Compose([cached_load_transforms(tmp_path / "c", spatial_size=24), views])
    ds = manifest_to_dataset(df, root=tmp_path / "img", transform=transform, columns=["age"])
    batches = list(DataLoader(ds, batch_size=4, num_workers=2))
    assert [tuple(b["image"].shape) for b in batches] == [(4, 2, 1, 16, 16)] * 2
    cache = DecodedImageCache(tmp_path / "c", spatial_size=24)
    assert all(p in cache for p in paths)
    # the next epochs read it (on_miss="raise" proves nothing is decoded)
    strict = Compose([cached_load_transforms(tmp_path / "c", spatial_size=24, on_miss="raise"), views])
    item = manifest_to_dataset(df, root=tmp_path / "img", transform=strict, columns=["age"])[0]
    assert tuple(item["image"].shape) == (2, 1, 16, 16) and item["age"] == 50.0
    with pytest.raises(ValueError, match="must hold an image path"):
        LoadCachedImaged("image", cache)({"image": torch.zeros(1, 4, 4)})
    with pytest.raises(ValueError, match="on_miss"):
        cached_load_transforms(tmp_path / "c", spatial_size=24, on_miss="skip")


def test_cli_cache_command(broken_manifest, tmp_path, capsys):
    from monai_du.cli import main

    root, df, expected = broken_manifest
    manifest = tmp_path / "manifest.csv"
    df.to_csv(manifest, index=False)
    argv = ["cache", "--manifest", str(manifest), "--out", str(tmp_path / "c"), "--spatial-size", "16",
            "--root", str(root), "--num-workers", "2"]
    with pytest.warns(UserWarning, match="skipped"):
        assert main(argv) == 0
    out = capsys.readouterr().out
    cache = DecodedImageCache(tmp_path / "c", spatial_size=16)
    assert cache.key in out and f"skipped {len(expected)}" in out
    assert len(_npy_files(cache)) == len(df) - len(expected)
    assert len(pd.read_csv(cache.report_path)) == len(expected)
    with pytest.warns(UserWarning):
        assert main(argv) == 0  # a second run decodes nothing
    assert f"{len(df) - len(expected)} already cached" in capsys.readouterr().out
