"""Benchmark of a pretrain bundle's own pipeline: the loader that the brain MRI (3D) or the chest X-ray (2D) pretrain
bundle runs (images/s from the files, from the decode-once cache and from its in-memory cache) against its model
step, and the bundle's time per epoch end to end.

Run: ``python benchmarks/bench_bundle_pipeline.py [--bundle brain|cxr] [--n N] [--sizes 32 96] [--workers 0 2]
[--repeats 3] [--model-steps N] [--batch-size B] [--manifest M.csv --dataset-dir DIR] [--e2e-workers W] [--work DIR]``;
``python benchmarks/bench_bundle_pipeline.py [--bundle cxr] --quick`` is a smoke run of about a minute on 2 cores (n 8,
one repeat, one model step, the bundle's default size only unless ``--sizes`` is given; 96^3 adds minutes on a CPU).
Example: ``python benchmarks/bench_bundle_pipeline.py --bundle cxr --n 1024 --sizes 64 --batch-size 64 --workers 0 2``.

Bundles (``--bundle``, default ``brain``): ``brain`` = ``bundles/brain_mri_du_pretrain`` (3D: a size is the side of a
cube, views ``(B, 2, 1, S, S, S)``; default ``--n 64``; default sizes: its ``spatial_size`` and 96, the GPU size);
``cxr`` = ``bundles/cxr_du_pretrain`` (2D: a size is the side of a square, views ``(B, 2, 1, S, S)``; default
``--n 1024``; default sizes: its ``spatial_size`` and 224, the GPU size).

Data: the first ``n`` rows of ``--manifest``, written to a manifest in ``--work`` with ``split = train`` on every row,
so that the bundle pretrains on exactly these ``n`` images. Default per bundle: ``brain``, the real IXI T1 dev cohort
at ``/work/shared/data/ixi_t1_hh/manifest.csv`` with ``images/`` when present, else the shipped 6 mm cohort
``monai_du.data.real_cohort.ixi_t1_dev_manifest()``; ``cxr``, the real 64 px pool of 6,450 chest X-rays at
``/work/shared/data/cxr_pool/manifest.csv`` with ``images/`` when present (its first rows are NIH images, then
Guangzhou), else the shipped NIH cohort ``monai_du.data.real_cohort.nih_cxr_dev_manifest()``. Every object timed is the
bundle's own: its ``configs/train.yaml`` read by ``monai.bundle.ConfigParser`` with the overrides ``manifest``,
``dataset_dir``, ``bundle_root`` (a temp folder), ``spatial_size`` ``[S] * dims``, ``batch_size``, ``num_workers``,
``image_cache``, ``cache_images`` (and ``max_epochs 2`` end to end); its ``initialize`` runs first
(``torch.set_num_threads(@num_threads)``: the bundle's own thread count for that ``num_workers``, and the seeds).

Per size:

0. The decode-once cache (``monai_du.data.cache.build_image_cache``, 2 workers) is built in ``--work`` with the
   bundle's ``image_loading`` and ``spatial_size`` (what its ``cached_load_transforms`` looks up), and checked to hold
   every image, so no timed epoch decodes into it.
1. Loader: ``train#dataloader`` (``EpochSeededDataset`` over ``train#dataset``, ``EpochBatchSampler``, persistent
   workers) in three settings, for each of ``--workers``:
   ``files`` = ``cache_images false, image_cache null`` (decode the NIfTI or PNG, reorient, normalise and resize every
   image every epoch); ``disk cache`` = ``cache_images false, image_cache DIR`` (read the decode-once ``.npy``);
   ``in-memory`` = ``cache_images true, image_cache null`` (the bundle default: ``CacheDataset`` filled on the main
   process when ``train#dataset`` is built; that fill, header checks included, is printed as ``build s``).
   Each epoch is one full pass (``k`` = all ``n // B`` batches), timed from the creation of the iterator to its last
   batch, with the bundle's ``SamplerEpochHandler`` called before it as the trainer would. Epoch 1 includes the start
   of the worker processes (column ``1st``); the table's ``img/s`` is the median of epochs 2 .. ``repeats + 1``
   (persistent workers already up, as in the bundle's epochs after the first).
2. Model step: the bundle's ``network``, ``loss`` and ``optimizer`` (AdamW) on random views ``(B, 2, 1, *spatial)``
   with the priors of a real batch: zero_grad, forward, loss, backward, optimizer step. One warm-up step, then
   ``--model-steps`` timed steps (default 16 for 2D up to 64 px, 4 for up to 64^3 voxels per image, else 2), once
   before the loaders and once after the end to end run, with 1 thread and with all threads; the faster thread
   count's median is reported.
3. End to end: the bundle's ``train#trainer`` (handlers, checkpoints, TensorBoard and view pictures included) for 2
   epochs on the ``n`` images with the bundle's default settings (in-memory cache, ``num_workers`` and
   ``num_threads`` as the bundle picks them on this machine; ``--e2e-workers`` overrides ``num_workers``). The 2nd
   epoch's seconds (from the end of epoch 1 to the end of epoch 2, its handlers included) and images/s.

Units: **img/s counts images** (a 3D volume is one image), everywhere (loader, model step, end to end). Each image
gives 2 augmented views, so a batch of ``B`` images holds ``2 B`` views: multiply by 2 for views/s. A loader "keeps
up" when its img/s is at least the model step's (``/model`` >= 1). All files are read once before timing (page cache
warm): disk reads are not timed. The loaders are timed alone; end to end, the workers and the model step share the
CPU cores.

Timings are printed, never asserted. Other processes on the machine add noise: rerun when the numbers jump.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ignite.engine import Events  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402

from monai_du.data.cache import DecodedImageCache, build_image_cache  # noqa: E402
from monai_du.data.manifest import read_manifest  # noqa: E402
from monai_du.handlers import SamplerEpochHandler  # noqa: E402

REAL_IXI = Path("/work/shared/data/ixi_t1_hh")
REAL_CXR_POOL = Path("/work/shared/data/cxr_pool")


@dataclass(frozen=True)
class Bundle:
    """A pretrain bundle: its train.yaml, its spatial dims, its GPU training size and the default ``--n``."""

    name: str
    train_yaml: Path
    dims: int
    gpu_size: int
    default_n: int


BUNDLES = {
    "brain": Bundle("brain", REPO / "bundles" / "brain_mri_du_pretrain" / "configs" / "train.yaml", 3, 96, 64),
    "cxr": Bundle("cxr", REPO / "bundles" / "cxr_du_pretrain" / "configs" / "train.yaml", 2, 224, 1024),
}

logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)  # "not available", per process
warnings.filterwarnings("ignore", message=".*TensorBoard.*")

# (name, cache_images, uses the disk cache)
SETTINGS = [("files", False, False), ("disk cache", False, True), ("in-memory", True, False)]


# ---------------------------------------------------------------------------------------------------------------------
# data and the bundle's objects
# ---------------------------------------------------------------------------------------------------------------------
def default_data(bundle: Bundle) -> tuple[Path, Path]:
    """The bundle's real data when this machine has it (brain: the IXI T1 dev cohort; cxr: the 6,450-image pool),
    else its shipped cohort (brain: IXI T1 at 6 mm; cxr: the NIH dev cohort)."""
    from monai_du.data import real_cohort

    real, shipped = ((REAL_IXI, real_cohort.ixi_t1_dev_manifest) if bundle.name == "brain"
                     else (REAL_CXR_POOL, real_cohort.nih_cxr_dev_manifest))
    if (real / "manifest.csv").is_file() and (real / "images").is_dir():
        return real / "manifest.csv", real / "images"
    manifest = Path(shipped())
    return manifest, manifest.parent


def write_subset(manifest: Path, dataset_dir: Path, n: int, work: Path) -> tuple[Path, int]:
    """The first ``n`` rows of ``manifest`` as a manifest in ``work``, every row in the ``train`` split."""
    df = pd.read_csv(manifest)
    if n > len(df):
        print(f"  (--n {n} > {len(df)} rows of {manifest}: using {len(df)})")
    df = df.head(n).copy()
    df["split"] = "train"
    path = work / f"manifest_{len(df)}.csv"
    df.to_csv(path, index=False)
    read_manifest(path, root=dataset_dir)  # fails here, naming the problem, rather than inside the bundle
    return path, len(df)


def bundle_parser(overrides: dict) -> ConfigParser:
    """The bundle's train.yaml with ``overrides`` (ids to values; ``train_yaml`` names the file and is not an
    override), as ``monai.bundle run`` would read it."""
    overrides = dict(overrides)
    train_yaml = overrides.pop("train_yaml")
    parser = ConfigParser()
    parser.read_config(str(train_yaml))
    parser.update(overrides)
    return parser


def initialize(parser: ConfigParser) -> int:
    """Run the bundle's ``initialize`` (its thread count, the seeds); returns the thread count it set."""
    parser.get_parsed_content("initialize")
    return torch.get_num_threads()


def _shutdown(loader) -> None:
    iterator = getattr(loader, "_iterator", None)  # persistent workers stay up until the iterator goes
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None


# ---------------------------------------------------------------------------------------------------------------------
# 0. decode-once cache, 1. loaders
# ---------------------------------------------------------------------------------------------------------------------
def build_cache(base: dict, cache_dir: Path) -> tuple[float, int]:
    """Build the decode-once cache as ``monai-du cache`` would for the bundle (its ``image_loading`` and
    ``spatial_size``); returns (seconds, images built). Raises when an image the bundle will ask for is missing."""
    parser = bundle_parser({**base, "image_cache": str(cache_dir), "cache_images": False})
    loading = parser.get_parsed_content("image_loading")
    size = parser.get_parsed_content("spatial_size")
    torch.set_num_threads(1)
    result = build_image_cache(base["manifest"], cache_dir, root=base["dataset_dir"], spatial_size=size,
                               num_workers=2, **loading)
    cache = DecodedImageCache(cache_dir, spatial_size=size, **loading)
    records = parser.get_parsed_content("train#dataset").data
    missing = [r["image"] for r in records if r["image"] not in cache]
    if missing:
        raise RuntimeError(f"the decode-once cache misses {len(missing)} of the bundle's images, e.g. {missing[0]}")
    return result.seconds, result.n_built


def time_loader(base: dict, name: str, cache_images: bool, cache_dir: Path | None, workers: int,
                repeats: int) -> dict:
    """Epochs of the bundle's ``train#dataloader`` in one setting: images/s of epoch 1 and of epochs 2.."""
    overrides = {**base, "num_workers": workers, "cache_images": cache_images,
                 "image_cache": str(cache_dir) if cache_dir is not None else None}
    parser = bundle_parser(overrides)
    threads = initialize(parser)
    start = time.perf_counter()
    parser.get_parsed_content("train#dataset")
    build_s = time.perf_counter() - start
    loader = parser.get_parsed_content("train#dataloader")
    epoch_handler = SamplerEpochHandler(data_loader=loader)
    spatial, batch = tuple(base["spatial_size"]), base["batch_size"]
    rates, prior = [], None
    try:
        for epoch in range(1 + repeats):
            epoch_handler(types.SimpleNamespace(state=types.SimpleNamespace(epoch=epoch + 1)))
            start = time.perf_counter()
            got = 0
            for b in loader:  # the whole epoch: k = n // B batches
                shape = tuple(b["image"].shape)
                assert shape == (batch, 2, 1, *spatial), shape
                got += shape[0]
                prior = b["prior"]
            rates.append(got / (time.perf_counter() - start))
    finally:
        _shutdown(loader)
    out = {"name": name, "workers": workers, "threads": threads, "build_s": build_s, "first": rates[0],
           "steady": statistics.median(rates[1:]), "all": rates, "batches": len(loader), "prior": prior}
    print(f"  {name:10s} workers={workers} ({threads} thread(s)): build {build_s:5.1f} s, epoch 1 {rates[0]:6.1f}, "
          f"epochs 2..: " + " ".join(f"{r:.1f}" for r in rates[1:]) + " images/s", flush=True)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# 2. model step
# ---------------------------------------------------------------------------------------------------------------------
def time_model_steps(base: dict, prior: torch.Tensor, steps: int, threads: int) -> list[float]:
    """Seconds of ``steps`` training steps of the bundle's network, loss and optimizer, after one warm-up step."""
    parser = bundle_parser({**base, "cache_images": False, "image_cache": None})
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        net = parser.get_parsed_content("network")
        loss_fn = parser.get_parsed_content("loss")
        optimizer = parser.get_parsed_content("optimizer")
        device = next(net.parameters()).device
        x = torch.rand(base["batch_size"], 2, 1, *base["spatial_size"], device=device)
        target = None if prior is None else prior.to(device)
        net.train()

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(net(x), target).backward()
            optimizer.step()

        step()
        times = []
        for _ in range(steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return times
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------------------
# 3. end to end
# ---------------------------------------------------------------------------------------------------------------------
def time_end_to_end(base: dict, bundle_root: Path, workers: int | None) -> dict:
    """The bundle's ``train#trainer`` for 2 epochs with its default data settings; the 2nd epoch's seconds."""
    overrides = {**base, "bundle_root": str(bundle_root), "max_epochs": 2}
    if workers is not None:
        overrides["num_workers"] = workers
    parser = bundle_parser(overrides)
    threads = initialize(parser)
    start = time.perf_counter()
    trainer = parser.get_parsed_content("train#trainer")
    build_s = time.perf_counter() - start
    marks = {0: time.perf_counter()}
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: marks.__setitem__(e.state.epoch, time.perf_counter()))
    level = logging.root.manager.disable
    logging.disable(logging.INFO)  # the per-iteration loss lines
    try:
        marks[0] = time.perf_counter()
        trainer.run()
    finally:
        logging.disable(level)
        _shutdown(trainer.data_loader)
    images = len(trainer.data_loader) * base["batch_size"]
    seconds = marks[2] - marks[1]
    return {"workers": parser.get_parsed_content("num_workers"), "threads": threads, "build_s": build_s,
            "epoch1_s": marks[1] - marks[0], "epoch2_s": seconds, "rate": images / seconds,
            "cache_images": parser.get_parsed_content("cache_images"),
            "image_cache": parser.get_parsed_content("image_cache")}


# ---------------------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", choices=sorted(BUNDLES), default="brain",
                        help="pretrain bundle: brain (3D MRI) or cxr (2D chest X-ray)")
    parser.add_argument("--manifest", type=Path, default=None,
                        help="manifest CSV (default: brain, the IXI dev cohort; cxr, the CXR pool)")
    parser.add_argument("--dataset-dir", type=Path, default=None, help="folder of the manifest's relative paths")
    parser.add_argument("--n", type=int, default=None,
                        help="images (the first n rows of the manifest; default: brain 64, cxr 1024)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="sides of the cube (brain) or square (cxr) (default: the bundle's spatial_size and "
                             "its GPU size, brain 96, cxr 224)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the bundle's batch_size (<= n)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=3, help="timed loader epochs after the first")
    parser.add_argument("--model-steps", type=int, default=None, help="timed model steps (default 16, 4 or 2 by size)")
    parser.add_argument("--e2e-workers", type=int, default=None, help="num_workers end to end (default: bundle's)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder, removed)")
    parser.add_argument("--quick", action="store_true", help="smoke run: n 8, one repeat, one model step")
    args = parser.parse_args()
    bundle = BUNDLES[args.bundle]
    args.n = args.n or bundle.default_n
    if args.quick:
        args.n, args.repeats, args.model_steps = min(args.n, 8), 1, 1

    defaults = bundle_parser({"train_yaml": bundle.train_yaml})
    default_size = int(defaults.get_parsed_content("spatial_size")[0])
    sizes = args.sizes or ([default_size] if args.quick else [default_size, bundle.gpu_size])
    manifest, dataset_dir = (args.manifest, args.dataset_dir)
    if manifest is None:
        manifest, default_dir = default_data(bundle)
        dataset_dir = dataset_dir or default_dir
    dataset_dir = (dataset_dir or manifest.parent).resolve()
    all_threads = torch.get_num_threads()
    thread_counts = sorted({1, all_threads})

    scratch = args.work or Path(tempfile.mkdtemp(prefix=f"monai_du_bench_{bundle.name}_"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        subset, n = write_subset(manifest.resolve(), dataset_dir, args.n, scratch)
        batch = min(args.batch_size or int(defaults.get_parsed_content("batch_size")), n)
        print(f"== {bundle.name} bundle ({bundle.train_yaml.parent.parent.name}): {n} images of {manifest} "
              f"({dataset_dir}), B={batch}, {n // batch} batches per epoch; "
              f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {all_threads} threads ==")
        if n // batch < max(args.workers):
            print(f"  note: {n // batch} batch(es) per epoch for {max(args.workers)} workers: each worker makes whole "
                  "batches, so some workers stay idle (the bundle does the same with these n and B)")
        for path in read_manifest(subset, root=dataset_dir)["image_path"]:
            Path(path).read_bytes()  # page cache warm: no timing below reads the disk
        for size in sizes:
            base = {"train_yaml": bundle.train_yaml, "manifest": str(subset), "dataset_dir": str(dataset_dir),
                    "spatial_size": [size] * bundle.dims, "batch_size": batch,
                    "bundle_root": str(scratch / "bundle_root")}
            voxels = size ** bundle.dims
            steps = args.model_steps or (16 if voxels <= 64 ** 2 else 4 if voxels <= 64 ** 3 else 2)
            shape = "x".join([str(size)] * bundle.dims)
            cache_dir = scratch / "image_cache"
            shutil.rmtree(cache_dir, ignore_errors=True)
            print(f"\n== {shape} ==")
            build_s, built = build_cache(base, cache_dir)
            print(f"  decode-once cache: {built} images in {build_s:.1f} s with 2 workers "
                  f"({built / build_s:.1f} images/s)", flush=True)

            loaders = []
            prior = None
            for workers in args.workers:
                for name, cache_images, disk in SETTINGS:
                    r = time_loader(base, name, cache_images, cache_dir if disk else None, workers, args.repeats)
                    prior = r["prior"] if prior is None else prior
                    loaders.append(r)
            model_times = {t: time_model_steps(base, prior, steps, t) for t in thread_counts}

            e2e = time_end_to_end(base, scratch / f"e2e_{size}", args.e2e_workers)
            for t in thread_counts:  # before and after: the load beside drifts
                model_times[t] += time_model_steps(base, prior, steps, t)
            best = min(thread_counts, key=lambda t: statistics.median(model_times[t]))
            model = batch / statistics.median(model_times[best])
            print("  model step: " + ", ".join(
                f"{t} thread(s) median {statistics.median(v):.3f} s of {len(v)} ({min(v):.3f}-{max(v):.3f})"
                for t, v in model_times.items()), flush=True)

            print(f"\n  -- {bundle.name} {shape}, B={batch}, n={n}: images/s (1 image = 2 views), median of "
                  f"{args.repeats} epoch(s) after the 1st --")
            header = (f"  {'loader':12s} {'wkr':>3} {'thr':>3} {'build s':>7} {'1st':>7} {'img/s':>7} "
                      f"{'/model':>7}  keeps up")
            print(header)
            print("  " + "-" * (len(header) - 2))
            for r in loaders:
                ratio = r["steady"] / model
                print(f"  {r['name']:12s} {r['workers']:3d} {r['threads']:3d} {r['build_s']:7.1f} {r['first']:7.1f} "
                      f"{r['steady']:7.1f} {ratio:7.2f}  {'yes' if ratio >= 1 else 'NO'}")
            print(f"  {'model step':12s} {'':3s} {best:3d} {'':7s} {'':7s} {model:7.1f} {1:7.2f}  "
                  f"(bundle network + loss + AdamW, {statistics.median(model_times[best]):.3f} s/step)")
            print(f"  {'end to end':12s} {e2e['workers']:3d} {e2e['threads']:3d} {e2e['build_s']:7.1f} "
                  f"{batch * (n // batch) / e2e['epoch1_s']:7.1f} {e2e['rate']:7.1f} {e2e['rate'] / model:7.2f}  "
                  f"(train#trainer: epoch 2 {e2e['epoch2_s']:.1f} s, epoch 1 {e2e['epoch1_s']:.1f} s; "
                  f"cache_images {e2e['cache_images']}, image_cache {e2e['image_cache']})", flush=True)
        print("\nbuild s: building train#dataset (header checks; in-memory: the CacheDataset fill) or, end to end, "
              "train#trainer. 1st: epoch 1 (worker start). img/s: epochs 2.. . thr: torch threads of the main process "
              "(the bundle's num_threads for that num_workers; model step: the faster of "
              f"{thread_counts}). /model: img/s over the model step's img/s.")
    finally:
        if args.work is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
