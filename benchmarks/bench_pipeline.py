"""Benchmark of the image pipeline: DataLoader images/s from DICOM, from PNG and from the decode-once cache, against
the forward plus backward of the CXR pretrain network on the same batch. The loaders here are built by hand; for the
loader, model step and epochs that a pretrain bundle really runs (its own ``train#dataloader``, ``network``, ``loss``
and ``train#trainer`` from its train.yaml), see ``benchmarks/bench_bundle_pipeline.py --bundle cxr``.

Run: ``python benchmarks/bench_pipeline.py [--n 192] [--source-size 2048] [--sizes 64 224] [--batch-sizes 32 64]
[--workers 0 1 2] [--work DIR]``

0. Generates ``n`` synthetic 16-bit chest-X-ray-like images of ``source-size`` px (half stored as MONOCHROME1
   DICOM, half MONOCHROME2), as uncompressed DICOM (pydicom) and as 16-bit PNG, in ``--work`` (kept for reruns).
1. Builds the cache (``monai_du.data.cache.build_image_cache``, 2 workers) at each training size and times reads of
   one cached image from the stores considered for it: one ``.npy`` per image (what the cache uses), one big
   memmap, ``.npz`` with the affine, MONAI's ``PersistentDataset`` and, when ``lmdb`` is installed, ``LMDBDataset``;
   beside the per-image cost of the augmentations that follow (2 views of ``cxr_augmentations``).
2. Times one ``monai.data.DataLoader`` per source, batch size and worker count: the bundle's per-item pipeline
   (load or cache read, then ``MultiViewd`` with 2 views of ``cxr_augmentations``), images/s from the creation of the
   iterator (worker start included) to the ``k``-th batch, ``k = max(1, workers)`` batches for DICOM and PNG (each
   worker makes whole batches) and ``4 max(1, workers)`` for the cache; median of ``--repeats`` runs (DICOM and PNG
   once unless ``--slow-repeats``). All files are in the page cache: disk reads are not part of any timing. The
   cache loader is also timed with MONAI's metadata tracking off (``set_track_meta(False)``), which the
   augmentations do not need.
3. Times the model step: ``ContrastiveEncoder("resnet10", spatial_dims=2, in_channels=1, projection_dim=128,
   backbone_kwargs={"widen_factor": 0.25})``, placed by ``monai_du.networks.to_device`` as the bundle places it, on
   ``(B, 2, 1, S, S)``, ``DecoupledUniformityLoss()``, forward plus
   backward, median of 6 steps (3 before and 3 after the loaders of that batch size) with 1 thread and with all
   threads, the faster of the two (on shared cores, 2 threads stall when one is descheduled). A loader "keeps up"
   when its images/s is at least the model's.
4. End to end (``--e2e``): 2-worker loaders from DICOM and from the cache feeding the model step at the largest
   batch size (6 steps timed after a warm-up step); the workers and the model share the CPU cores here.

Timings are printed, never asserted. Other processes on the machine add noise: rerun when the numbers jump.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from monai.data import DataLoader, Dataset  # noqa: E402
from monai.transforms import Compose  # noqa: E402

from monai_du.data.cache import DecodedImageCache, build_image_cache, cached_load_transforms  # noqa: E402
from monai_du.data.loading import load_image_transforms  # noqa: E402
from monai_du.transforms import MultiViewd, cxr_augmentations  # noqa: E402

warnings.filterwarnings("ignore", message=".*ImageOrientationPatient.*")
warnings.filterwarnings("ignore", message=".*nvImageCodec.*")


# ---------------------------------------------------------------------------------------------------------------
# 0. sources
# ---------------------------------------------------------------------------------------------------------------

_BASE: dict[int, np.ndarray] = {}


def _base_field(size: int) -> np.ndarray:
    """A chest-like brightness field in [0, 1] (two dark lung fields, bright mediastinum, ribs), computed once."""
    if size not in _BASE:
        y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
        lungs = np.exp(-(((x - 0.3) / 0.16) ** 2 + ((y - 0.5) / 0.3) ** 2)) + np.exp(
            -(((x - 0.7) / 0.16) ** 2 + ((y - 0.5) / 0.3) ** 2)
        )
        ribs = 0.08 * np.sin(60 * y + 8 * np.abs(x - 0.5)) * (lungs > 0.2)
        _BASE[size] = np.clip(0.85 - 0.55 * lungs + ribs, 0, 1).astype(np.float32)
    return _BASE[size]


def _make_pair(args: tuple[int, int, str]) -> tuple[str, str]:
    """Write image ``i`` as DICOM (MONOCHROME1 for odd i) and PNG; returns the two relative paths."""
    import pydicom
    from PIL import Image
    from pydicom.dataset import Dataset as DicomDataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    i, size, work = args
    rng = np.random.default_rng(i)
    field = _base_field(size) * rng.uniform(0.8, 1.1) + rng.uniform(-0.05, 0.05)
    field = field + 0.02 * rng.standard_normal(field.shape, dtype=np.float32)
    display = np.clip(field * 60000, 0, 65535).astype(np.uint16)  # larger is brighter
    monochrome1 = i % 2 == 1
    stored = (65535 - display) if monochrome1 else display
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = DicomDataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = f"p{i:04d}", "DX"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.ascontiguousarray(stored.T).tobytes()  # rows = y
    dcm, png = f"dicom/{i:04d}.dcm", f"png/{i:04d}.png"
    ds.save_as(os.path.join(work, dcm), enforce_file_format=True)
    Image.fromarray(np.ascontiguousarray(display.T)).save(os.path.join(work, png), compress_level=1)
    assert pydicom.misc.is_dicom(os.path.join(work, dcm))
    return dcm, png


def make_sources(work: Path, n: int, size: int) -> dict[str, list[str]]:
    """The DICOM and PNG paths of ``n`` generated images (reused when ``work`` already holds them)."""
    marker = work / "sources.json"
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("n") == n and done.get("size") == size:
            return {k: [str(work / p) for p in done[k]] for k in ("dicom", "png")}
    for sub in ("dicom", "png"):
        shutil.rmtree(work / sub, ignore_errors=True)
        (work / sub).mkdir(parents=True)
    start = time.perf_counter()
    with get_context("fork").Pool(min(2, os.cpu_count() or 1)) as pool:
        pairs = pool.map(_make_pair, [(i, size, str(work)) for i in range(n)], chunksize=4)
    done = {"n": n, "size": size, "dicom": [d for d, _ in pairs], "png": [p for _, p in pairs]}
    marker.write_text(json.dumps(done))
    mb = sum((work / d).stat().st_size + (work / p).stat().st_size for d, p in pairs) / 2**20
    seconds = time.perf_counter() - start
    print(f"generated {n} DICOM + {n} PNG of {size}x{size} 16-bit ({mb:.0f} MiB) in {seconds:.0f} s")
    return {k: [str(work / p) for p in done[k]] for k in ("dicom", "png")}


def write_manifest(work: Path, paths: list[str]) -> Path:
    import pandas as pd

    path = work / "manifest_dicom.csv"
    pd.DataFrame({"image": [os.path.relpath(p, work) for p in paths], "patient_id": range(len(paths))}).to_csv(
        path, index=False
    )
    return path


# ---------------------------------------------------------------------------------------------------------------
# 1. cache build and stores
# ---------------------------------------------------------------------------------------------------------------


def _median_us(fn, items, passes: int = 5) -> float:
    per = []
    for r in range(passes):
        order = np.random.default_rng(r).permutation(len(items))
        start = time.perf_counter()
        for i in order:
            fn(items[int(i)])
        per.append((time.perf_counter() - start) / len(items) * 1e6)
    return statistics.median(per)


def bench_stores(cache: DecodedImageCache, paths: list[str], work: Path, size: int) -> None:
    from monai.data import LMDBDataset, MetaTensor, PersistentDataset

    paths = paths[:128]
    arrays = [cache.read(p) for p in paths]
    store = work / f"stores_{size}"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    shape = (len(paths), *arrays[0].shape)
    big = np.lib.format.open_memmap(store / "big.npy", mode="w+", dtype=np.float32, shape=shape)
    for i, a in enumerate(arrays):
        big[i] = a
        np.savez(store / f"{i}.npz", image=a, affine=np.eye(3))
    big.flush()
    big = np.load(store / "big.npy", mmap_mode="r")
    index = {p: i for i, p in enumerate(paths)}

    class _FromArrays:  # what the loading pipeline hands to MONAI's caching datasets
        def __call__(self, d):
            i = index[d["image"]]
            image = MetaTensor(torch.from_numpy(arrays[i]), affine=torch.eye(3), meta={"filename_or_obj": d["image"]})
            return {"image": image}

    records = [{"image": p} for p in paths]
    persistent = PersistentDataset(records, transform=_FromArrays(), cache_dir=store / "persistent")
    for i in range(len(records)):
        persistent[i]
    candidates = {
        "one .npy per image (cache.read)": lambda i: cache.read(paths[i]),
        "one big memmap": lambda i: np.array(big[i]),
        ".npz per image (image + affine)": lambda i: np.load(store / f"{i}.npz")["image"],
        "MONAI PersistentDataset": lambda i: persistent[i]["image"],
    }
    try:
        import lmdb  # noqa: F401

        lmdb_ds = LMDBDataset(records, transform=_FromArrays(), cache_dir=store / "lmdb", progress=False)
        for i in range(len(records)):
            lmdb_ds[i]
        candidates["MONAI LMDBDataset"] = lambda i: lmdb_ds[i]["image"]
    except ImportError:
        print("  (lmdb not installed: LMDBDataset not measured)")
    views = MultiViewd(keys="image", transform=cxr_augmentations((size, size)), num_views=2)
    views.set_random_state(0)
    tensors = [torch.from_numpy(a) for a in arrays[:32]]
    augment_us = _median_us(lambda t: views({"image": t}), tensors, passes=3)
    items = list(range(len(paths)))
    base = _median_us(candidates["one .npy per image (cache.read)"], items)
    print(f"  read one cached {tuple(arrays[0].shape)} float32 image, warm page cache, median of 5 passes over "
          f"{len(paths)} (augmentations, 2 views: {augment_us / 1000:.2f} ms/image)")
    for name, fn in candidates.items():
        us = base if name.startswith("one .npy") else _median_us(fn, items)
        print(f"    {name:34s} {us:8.1f} us  x{us / base:5.2f} of .npy  {100 * us / augment_us:5.1f}% of augmentation")
    shutil.rmtree(store, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# 2. loaders, 3. model
# ---------------------------------------------------------------------------------------------------------------


def make_loader(first, paths: list[str], size: int, batch: int, workers: int, n_items: int, seed: int) -> DataLoader:
    transform = Compose([first, MultiViewd(keys="image", transform=cxr_augmentations((size, size)), num_views=2)])
    records = [{"image": paths[i % len(paths)]} for i in range(n_items)]
    return DataLoader(
        Dataset(records, transform=transform), batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
    )


def time_loader(first, paths, size, batch, workers, k, repeats, track_meta: bool = True) -> float:
    """Median images/s from iterator creation to the k-th batch (``track_meta=False``: MONAI's metadata tracking
    off in this process and the workers it forks)."""
    from monai.data import get_track_meta, set_track_meta

    before = get_track_meta()
    set_track_meta(track_meta)
    try:
        return _time_loader(first, paths, size, batch, workers, k, repeats)
    finally:
        set_track_meta(before)


def _time_loader(first, paths, size, batch, workers, k, repeats) -> float:
    rates = []
    for r in range(repeats):
        loader = make_loader(first, paths, size, batch, workers, n_items=k * batch, seed=r)
        start = time.perf_counter()
        got = 0
        for b in loader:
            assert tuple(b["image"].shape) == (batch, 2, 1, size, size)
            got += 1
            if got == k:
                break
        rates.append(k * batch / (time.perf_counter() - start))
        del loader
    return statistics.median(rates)


def make_model_step(size: int, batch: int):
    from monai_du.losses import DecoupledUniformityLoss
    from monai_du.networks import ContrastiveEncoder, to_device

    torch.manual_seed(0)
    net = ContrastiveEncoder(
        "resnet10", spatial_dims=2, in_channels=1, projection_dim=128, backbone_kwargs={"widen_factor": 0.25}
    )
    net = to_device(net, "cpu")  # the layout the bundle trains in (channels last on a CPU)
    loss_fn = DecoupledUniformityLoss()

    def step(x: torch.Tensor) -> None:
        net.zero_grad(set_to_none=True)
        loss_fn(net(x)).backward()

    return step


def time_model_steps(size: int, batch: int, repeats: int = 5) -> list[float]:
    """Seconds of ``repeats`` forward plus backward steps on (batch, 2, 1, size, size), after one warm-up step."""
    step = make_model_step(size, batch)
    x = torch.rand(batch, 2, 1, size, size)
    step(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(x)
        times.append(time.perf_counter() - start)
    return times


def _steps_at(threads: int, size: int, batch: int, repeats: int = 3) -> list[float]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return time_model_steps(size, batch, repeats)
    finally:
        torch.set_num_threads(before)


def time_end_to_end(first, paths, size, batch, k: int = 6) -> float:
    """images/s of training steps fed by a 2-worker loader: ``k`` steps timed after one warm-up step (worker start)."""
    step = make_model_step(size, batch)
    loader = make_loader(first, paths, size, batch, 2, n_items=(k + 1) * batch, seed=0)
    start = None
    for b in loader:
        step(b["image"])
        if start is None:
            start = time.perf_counter()
    return k * batch / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=192, help="generated images (DICOM and PNG each)")
    parser.add_argument("--source-size", type=int, default=2048, help="side of the generated images")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224], help="training sizes")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="runs per cache loader measurement")
    parser.add_argument("--slow-repeats", type=int, default=1, help="runs per DICOM / PNG loader measurement")
    parser.add_argument("--e2e", action="store_true", help="also time loader + model together")
    parser.add_argument("--work", default=None, help="folder of the generated sources (default: a temp folder)")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    thread_counts = sorted({1, threads})
    work = Path(args.work) if args.work else Path(tempfile.gettempdir()) / "monai_du_bench_pipeline"
    work.mkdir(parents=True, exist_ok=True)
    print(f"== 0. sources ({os.cpu_count()} CPU cores, torch {torch.__version__}, {threads} threads) ==")
    sources = make_sources(work, args.n, args.source_size)
    manifest = write_manifest(work, sources["dicom"])
    rows = []
    for size in args.sizes:
        cache_dir = work / "cache"
        print(f"\n== 1. cache at {size} px ==")
        shutil.rmtree(cache_dir, ignore_errors=True)
        torch.set_num_threads(1)
        result = build_image_cache(manifest, cache_dir, spatial_size=size, num_workers=2)
        print(f"  decode-once build from DICOM: {result.n_built} images in {result.seconds:.1f} s with 2 workers "
              f"({result.n_built / result.seconds:.1f} images/s), {len(result.skipped)} skipped")
        cache = DecodedImageCache(cache_dir, spatial_size=size)
        bench_stores(cache, sources["dicom"], work, size)
        firsts = {
            "dicom": (load_image_transforms(spatial_size=size), sources["dicom"], args.slow_repeats, 1),
            "png": (load_image_transforms(spatial_size=size), sources["png"], args.slow_repeats, 1),
            "cache": (cached_load_transforms(cache_dir, spatial_size=size, on_miss="raise"), sources["dicom"],
                      args.repeats, 4),
        }
        print(f"\n== 2./3. loaders and model at {size} px ==")
        for batch in args.batch_sizes:
            steps = {t: _steps_at(t, size, batch) for t in thread_counts}
            torch.set_num_threads(1)
            block = []
            for workers in args.workers:
                rate = {}
                for name, (first, paths, repeats, per_worker) in firsts.items():
                    k = per_worker * max(1, workers)
                    rate[name] = time_loader(first, paths, size, batch, workers, k, repeats)
                first, paths, repeats, per_worker = firsts["cache"]
                rate["cache_nometa"] = time_loader(
                    first, paths, size, batch, workers, per_worker * max(1, workers), repeats, track_meta=False
                )
                block.append([size, batch, workers, rate["dicom"], rate["png"], rate["cache"], rate["cache_nometa"]])
                print(f"  {size:4d} px B={batch:3d} workers={workers}: dicom {rate['dicom']:7.1f}  "
                      f"png {rate['png']:7.1f}  cache {rate['cache']:7.1f}  cache, meta off {rate['cache_nometa']:7.1f}"
                      " images/s", flush=True)
            for t in thread_counts:  # before and after the loaders: contention drifts
                steps[t] += _steps_at(t, size, batch)
            best = min(thread_counts, key=lambda t: statistics.median(steps[t]))
            model = batch / statistics.median(steps[best])
            print(f"  {size:4d} px B={batch:3d} model step: {model:6.1f} images/s (" + ", ".join(
                f"{t} thread(s): median {statistics.median(v):.3f} s of {len(v)}, {min(v):.3f}-{max(v):.3f}"
                for t, v in steps.items()) + ")", flush=True)
            rows += [(*r, model) for r in block]
        if args.e2e:
            batch = max(args.batch_sizes)
            first_steps = {t: _steps_at(t, size, batch) for t in thread_counts}
            best = min(thread_counts, key=lambda t: statistics.median(first_steps[t]))
            torch.set_num_threads(best)
            e2e = {name: time_end_to_end(firsts[name][0], firsts[name][1], size, batch) for name in ("cache", "dicom")}
            steps = first_steps[best] + time_model_steps(size, batch, 3)
            model = batch / statistics.median(steps)
            for name, rate in e2e.items():
                print(f"  end to end, {name} loader with 2 workers + model step ({best} thread(s)), B={batch}: "
                      f"{rate:.1f} images/s (model alone {model:.1f}, x{rate / model:.2f})")
    print("\n== summary: images/s (median), ratios measured side by side in this run ==")
    header = (f"{'size':>4} {'B':>3} {'wkr':>3} | {'DICOM':>7} {'PNG':>7} {'cache':>7} {'nometa':>7} | {'model':>6} | "
              f"{'cache/DICOM':>11} {'cache/PNG':>9} {'cache/model':>11} {'nometa/model':>12} {'DICOM/model':>11}")
    print(header)
    print("-" * len(header))
    for size, batch, workers, dcm, png, cached, nometa, model in rows:
        print(f"{size:4d} {batch:3d} {workers:3d} | {dcm:7.1f} {png:7.1f} {cached:7.1f} {nometa:7.1f} | {model:6.1f} | "
              f"{cached / dcm:11.1f} {cached / png:9.1f} {cached / model:11.2f} {nometa / model:12.2f} "
              f"{dcm / model:11.2f}")
    print("\nkeeps up = cache/model >= 1. Model: forward + backward of ContrastiveEncoder(resnet10, widen 0.25) with "
          f"DecoupledUniformityLoss on (B, 2, 1, S, S), the faster of {thread_counts} threads. "
          "Loaders: 1 thread in the main process. "
          "nometa: the cache loader with monai.data.set_track_meta(False) (no MetaTensor in the augmentations).")


if __name__ == "__main__":
    main()
