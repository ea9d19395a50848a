"""Decode-once cache of training-size images: each image is decoded, normalised and resized once by
:func:`~monai_du.data.loading.load_image_transforms`, stored, and read back every epoch in front of the random
augmentations (``MultiViewd``), which still run per epoch.

Layout on disk::

    <cache_dir>/<settings key>/settings.json              the settings that the key hashes
    <cache_dir>/<settings key>/images/<ab>/<path key>.npy  one float array (C, *spatial) per image
    <cache_dir>/<settings key>/skipped.csv                images the last build could not use: row, image, path, reason

- The **settings key** is the first 16 hex digits of the SHA-256 of the canonical JSON of the preprocessing settings:
  the arguments of ``load_image_transforms`` (modality as its number of spatial dimensions, spatial size per axis,
  size mode, intensity normalisation, orientation as resolved axis codes, MONOCHROME1 inversion, colour collapse,
  interpolation), the stored dtype, the cache format, and the monai_du and MONAI versions. Any change of these is a
  new folder, so a changed setting is never served from an old one.
- The **path key** names the source file as it is now: the first 32 hex digits of the SHA-256 of its absolute path
  (``os.path.abspath``), a dash, and 16 hex digits of the SHA-256 of its size and modification time (``st_size``,
  ``st_mtime_ns``). A file replaced under the same path has another key, so it is decoded again, never served from the
  old entry; the next build removes the old entry. (A replacement with the same size within the file system's
  timestamp resolution is not detected: rebuild with ``overwrite=True``.)

Storage: one ``.npy`` per image, chosen from ``benchmarks/bench_pipeline.py`` (section 1: read time of one cached
224 px float32 image, warm page cache, median of 5 passes over 128, on 2 shared cores): one ``.npy`` 166 us, MONAI
``LMDBDataset`` 293 us (x1.8), ``PersistentDataset`` 368 us (x2.2), ``.npz`` with the affine 369 us (x2.2), one big
memmap 13 us (x0.08). The memmap reads fastest, but the ``.npy`` read is 1.8 % of the 9.4 ms per image of the two
augmented views that follow, so the loader's speed hardly depends on the store; and the file-per-image store is
the only one of these in which every image is written atomically on its own
(:func:`monai_du.io.atomic_write`), by any number of worker processes without a lock (LMDB has one writer; a memmap
needs the image count and one shape up front and cannot grow with the manifest), and where a restarted build only has
to look for the files that exist.

Cached images carry no spatial metadata (the affine is not stored): they come back as plain float32
``torch.Tensor`` ``(C, *spatial)``. The augmentations drop metadata anyway (``MultiViewd`` returns plain tensors).

Command line: ``monai-du cache --manifest M --out C --spatial-size 256 [--modality 2d|3d] [--num-workers N]``.
In a bundle, replace ``load_image_transforms(...)`` in the preprocessing by :func:`cached_load_transforms` with the
same arguments plus ``cache_dir``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.config import KeysCollection
from monai.transforms import Compose, MapTransform
from monai.utils import convert_to_numpy

from monai_du.data.loading import (
    _DIMS,
    CHECK_REPORT_COLUMNS,
    _decode_reason,
    _resolved_paths,
    check_image_file,
    load_image_transforms,
)
from monai_du.data.manifest import read_manifest, validate_manifest
from monai_du.io import atomic_write, package_version

__all__ = [
    "CACHE_FORMAT",
    "CacheBuildResult",
    "DecodedImageCache",
    "LoadCachedImaged",
    "build_image_cache",
    "cache_settings",
    "cached_load_transforms",
    "path_key",
    "settings_key",
]

CACHE_FORMAT = 2
"""Version of the on-disk layout; part of the settings key. 2: path keys include the source file's size and mtime."""

_STORE_DTYPES = ("float32", "float16")
_ON_MISS = ("build", "decode", "raise")
_STALE_TMP_S = 3600.0  # temporary files older than this are left-overs of a killed build


def cache_settings(
    modality: str = "2d",
    spatial_size: int | Sequence[int] | None = None,
    size_mode: str = "resize",
    intensity: str | None = "minmax",
    orientation: str | None = "auto",
    invert_monochrome1: bool = True,
    grayscale: bool = True,
    interp_mode: str = "area",
    store_dtype: str = "float32",
) -> dict:
    """The canonical preprocessing settings that key a cache folder (arguments as in ``load_image_transforms``).

    Equivalent spellings give equal settings: modality aliases map to the number of spatial dimensions, an int
    spatial size to one value per axis, ``orientation="auto"`` to the axis codes it means ("RAS" in 3D, none in 2D).

    Args:
        modality, spatial_size, size_mode, intensity, orientation, invert_monochrome1, grayscale, interp_mode: as in
            :func:`~monai_du.data.loading.load_image_transforms`.
        store_dtype: dtype of the stored arrays, "float32" (exact) or "float16" (half the disk, ~1e-3 relative
            rounding); reads always return float32.

    Returns:
        a JSON-serialisable dict, including the cache format and the monai_du and MONAI versions.

    Raises:
        ValueError: an invalid setting (the message of ``load_image_transforms``), or an unknown ``store_dtype``.
    """
    import monai

    if store_dtype not in _STORE_DTYPES:
        raise ValueError(f"store_dtype must be one of {_STORE_DTYPES}, got {store_dtype!r}.")
    if not isinstance(modality, str):
        raise ValueError(f"modality must be a string such as '2d' or '3d', got {modality!r}.")
    # validates every argument with load_image_transforms' own messages
    load_image_transforms(
        modality=modality, spatial_size=spatial_size, size_mode=size_mode, intensity=intensity,
        orientation=orientation, invert_monochrome1=invert_monochrome1, grayscale=grayscale, interp_mode=interp_mode,
    )
    dims = _DIMS[modality.lower()]
    size = None
    if spatial_size is not None:
        size = [int(spatial_size)] * dims if np.ndim(spatial_size) == 0 else [int(s) for s in spatial_size]
    axcodes = ("RAS" if dims == 3 else None) if orientation == "auto" else orientation
    return {
        "format": CACHE_FORMAT,
        "monai_du": package_version(),
        "monai": str(monai.__version__),
        "spatial_dims": dims,
        "spatial_size": size,
        "size_mode": size_mode,
        "intensity": intensity,
        "orientation": axcodes,
        "invert_monochrome1": bool(invert_monochrome1),
        "grayscale": bool(grayscale),
        "interp_mode": interp_mode,
        "store_dtype": store_dtype,
    }


def settings_key(settings: Mapping) -> str:
    """First 16 hex digits of the SHA-256 of the canonical JSON (sorted keys) of ``settings``."""
    text = json.dumps(dict(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _path_hash(path: str | os.PathLike) -> str:
    return hashlib.sha256(os.path.abspath(os.fspath(path)).encode("utf-8")).hexdigest()[:32]


def path_key(path: str | os.PathLike) -> str:
    """The cache key of an image file as it is now: ``<path hash>-<stamp hash>``.

    The path hash is the first 32 hex digits of the SHA-256 of the absolute, normalised path; the stamp hash the first
    16 of the SHA-256 of the file's ``st_size`` and ``st_mtime_ns`` (of "missing" when the file does not exist), so a
    file replaced under the same path gets a new key.
    """
    try:
        st = os.stat(path)
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        stamp = "missing"
    return f"{_path_hash(path)}-{hashlib.sha256(stamp.encode('utf-8')).hexdigest()[:16]}"


def _decode_failure(err: BaseException) -> str:
    # an UnusableImageError's own reason ("holds NaN values ..."), else "cannot be decoded (<innermost cause>)"
    return _decode_reason(err)


@dataclass
class CacheBuildResult:
    """What :meth:`DecodedImageCache.build` did.

    Attributes:
        folder: the settings folder ``<cache_dir>/<key>``.
        key: the settings key.
        n_images: distinct image paths asked for.
        n_built: images decoded and written by this build.
        n_existing: images already in the cache (not decoded again).
        skipped: one row per image that could not be used, columns ``row``, ``image``, ``path``, ``reason``.
        report_path: where the skip report was written (always ``<folder>/skipped.csv``, plus any copy asked for).
        seconds: wall time of the build.
        n_rebuilt: of ``n_built``, images whose cache entry was made from an earlier file at the same path (replaced
            or modified since: another size or modification time); that entry is removed.
    """

    folder: Path
    key: str
    n_images: int
    n_built: int
    n_existing: int
    skipped: pd.DataFrame
    report_path: Path
    seconds: float
    n_rebuilt: int = 0

    @property
    def n_cached(self) -> int:
        """Images in the cache after the build."""
        return self.n_built + self.n_existing


class DecodedImageCache:
    """A decode-once store of preprocessed images for one set of preprocessing settings.

    ``cache.get(path)`` returns the image as ``load_image_transforms(**settings)`` would, as a float32 array
    ``(C, *spatial)``, decoding and storing it first when it is not cached yet.

    Args:
        cache_dir: root folder of the cache; the images live in ``cache_dir/<settings key>/``.
        modality, spatial_size, size_mode, intensity, orientation, invert_monochrome1, grayscale, interp_mode: the
            preprocessing, as in :func:`~monai_du.data.loading.load_image_transforms`.
        store_dtype: "float32" or "float16" on disk (see :func:`cache_settings`).

    Example::

        cache = DecodedImageCache("cache", modality="2d", spatial_size=256)
        result = cache.build(paths, num_workers=2)   # restartable; unreadable files go to result.skipped
        image = cache.read(paths[0])                 # (1, 256, 256) float32
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        modality: str = "2d",
        spatial_size: int | Sequence[int] | None = None,
        size_mode: str = "resize",
        intensity: str | None = "minmax",
        orientation: str | None = "auto",
        invert_monochrome1: bool = True,
        grayscale: bool = True,
        interp_mode: str = "area",
        store_dtype: str = "float32",
    ) -> None:
        self._init_kwargs = {
            "modality": modality, "spatial_size": spatial_size, "size_mode": size_mode, "intensity": intensity,
            "orientation": orientation, "invert_monochrome1": invert_monochrome1, "grayscale": grayscale,
            "interp_mode": interp_mode, "store_dtype": store_dtype,
        }
        self.cache_dir = Path(cache_dir).expanduser()
        self.settings = cache_settings(**self._init_kwargs)
        self.key = settings_key(self.settings)
        self.folder = self.cache_dir / self.key
        self._transform: Compose | None = None
        self._settings_written = False

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"DecodedImageCache('{self.cache_dir}', key={self.key}, {s['spatial_dims']}d, "
            f"spatial_size={s['spatial_size']}, intensity={s['intensity']!r}, store_dtype={s['store_dtype']!r})"
        )

    def __getstate__(self) -> dict:  # DataLoader workers get the settings, not a built transform
        state = dict(self.__dict__)
        state["_transform"] = None
        return state

    @property
    def report_path(self) -> Path:
        """The skip report of the last build, ``<folder>/skipped.csv``."""
        return self.folder / "skipped.csv"

    def load_kwargs(self) -> dict:
        """Keyword arguments of ``load_image_transforms`` that reproduce the cached preprocessing."""
        s = self.settings
        return {
            "modality": "3d" if s["spatial_dims"] == 3 else "2d",
            "spatial_size": None if s["spatial_size"] is None else tuple(s["spatial_size"]),
            "size_mode": s["size_mode"],
            "intensity": s["intensity"],
            "orientation": s["orientation"],
            "invert_monochrome1": s["invert_monochrome1"],
            "grayscale": s["grayscale"],
            "interp_mode": s["interp_mode"],
        }

    def file_for(self, path: str | os.PathLike) -> Path:
        """The cache file of an image file as it is now (see :func:`path_key`), whether or not it exists."""
        return self._file_of_key(path_key(path))

    def _file_of_key(self, key: str) -> Path:
        return self.folder / "images" / key[:2] / f"{key}.npy"

    def __contains__(self, path: str | os.PathLike) -> bool:
        return self.file_for(path).is_file()

    def decode(self, path: str | os.PathLike) -> np.ndarray:
        """Run the preprocessing on one image, without the cache.

        Returns:
            array ``(C, *spatial)`` of ``store_dtype``.
        """
        if self._transform is None:
            self._transform = load_image_transforms(keys="image", **self.load_kwargs())
        image = self._transform({"image": os.fspath(path)})["image"]
        return np.ascontiguousarray(convert_to_numpy(image), dtype=self.settings["store_dtype"])

    def _write_settings(self) -> None:
        if self._settings_written:
            return
        target = self.folder / "settings.json"
        if not target.is_file():
            with atomic_write(target) as tmp:
                tmp.write_text(json.dumps(self.settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        self._settings_written = True

    def write(self, path: str | os.PathLike, array: np.ndarray) -> Path:
        """Store ``array`` ``(C, *spatial)`` as the cached image of ``path``, atomically; returns the cache file."""
        array = np.asarray(array)
        dims = self.settings["spatial_dims"]
        if array.ndim != dims + 1:
            raise ValueError(
                f"{path}: cached image must be (C, *spatial) with {dims} spatial dims, got shape {array.shape}."
            )
        return self._store(self.file_for(path), array)

    def _store(self, file: Path, array: np.ndarray) -> Path:
        self._write_settings()
        with atomic_write(file) as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array, dtype=self.settings["store_dtype"]))
        return file

    def read(self, path: str | os.PathLike) -> np.ndarray:
        """The cached image of ``path`` as float32 ``(C, *spatial)``.

        Raises:
            LookupError: the image is not in this cache (naming the path, the folder and the command that fills it).
        """
        return self._load(path, self.file_for(path))

    def _load(self, path: str | os.PathLike, file: Path) -> np.ndarray:
        try:
            array = np.load(file)
        except FileNotFoundError:
            raise LookupError(
                f"{path}: not in the image cache {self.folder} (settings key {self.key}); fill it with "
                f"`monai-du cache --out {self.cache_dir} ...` using the same preprocessing settings, or use "
                "on_miss='build'."
            ) from None
        return array.astype(np.float32, copy=False)

    def get(self, path: str | os.PathLike, on_miss: str = "build") -> np.ndarray:
        """The cached image of ``path`` (float32 ``(C, *spatial)``); on a miss: ``"build"`` decodes and stores it,
        ``"decode"`` decodes without storing, ``"raise"`` raises ``LookupError``."""
        if on_miss not in _ON_MISS:
            raise ValueError(f"on_miss must be one of {_ON_MISS}, got {on_miss!r}.")
        file = self.file_for(path)  # keyed on the file as it is before decoding
        try:
            return self._load(path, file)
        except LookupError:
            if on_miss == "raise":
                raise
        array = self.decode(path)
        if on_miss == "build":
            self._store(file, array)
        return array.astype(np.float32, copy=False)

    def _remove_stale_tmp(self) -> None:
        images = self.folder / "images"
        if not images.is_dir():
            return
        cutoff = time.time() - _STALE_TMP_S
        for tmp in images.glob("*/.*.tmp"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
            except FileNotFoundError:
                pass

    def _existing_keys(self, shards: set[str]) -> dict[str, list[str]]:
        """The keys stored in these shard folders (``images/<ab>``), grouped by path hash."""
        found: dict[str, list[str]] = {}
        for shard in shards:
            try:
                with os.scandir(self.folder / "images" / shard) as entries:
                    for entry in entries:
                        if entry.name.endswith(".npy") and not entry.name.startswith("."):
                            key = entry.name[: -len(".npy")]
                            found.setdefault(key.split("-", 1)[0], []).append(key)
            except FileNotFoundError:
                pass
        return found

    def _build_one(self, path: str, key: str | None = None) -> str | None:
        """Decode and store one image under ``key`` (default: its key now, taken before decoding); returns why it was
        skipped, or None. Write errors propagate."""
        file = self._file_of_key(key if key is not None else path_key(path))
        # the header check also refuses shapes that the preprocessing cannot use (a 2D image in a 3D cache)
        reason = check_image_file(path, modality=self.load_kwargs()["modality"], grayscale=self.settings["grayscale"])
        if reason is not None:
            return reason
        try:
            array = self.decode(path)
        except Exception as err:  # noqa: BLE001 - any decoding failure is a reason to skip and report
            return _decode_failure(err)
        self._store(file, array)
        return None

    def build(
        self,
        paths: Sequence[str | os.PathLike],
        num_workers: int = 0,
        overwrite: bool = False,
        report_path: str | os.PathLike | None = None,
        progress: bool = False,
        rows: Sequence[Hashable] | None = None,
        images: Sequence[str] | None = None,
        mp_context: str | None = None,
    ) -> CacheBuildResult:
        """Decode every image not cached yet, in worker processes, and report the ones that cannot be used.

        Restartable: images already stored are not decoded again, and every image is written atomically, so a killed
        build leaves only complete files and the next build continues with the rest. An image whose file was replaced
        or modified since it was cached (another size or modification time) is decoded again and counted in
        ``n_rebuilt``; its old entry is removed. Each image is first checked
        like :func:`~monai_du.data.loading.check_images` (header level), then decoded; a failure of either skips the
        image (others are still cached) and adds a report row. The report is written to ``<folder>/skipped.csv``
        (also when empty, replacing an older one) and to ``report_path`` when given, and a warning says how many
        images were skipped.

        Args:
            paths: image paths (relative ones are taken from the current directory, as the loader does).
            num_workers: worker processes (0: in this process).
            overwrite: decode and store every image again.
            report_path: extra copy of the skip report (CSV).
            progress: show a tqdm progress bar.
            rows, images: manifest row labels and ``image`` values for the report (default: positions and paths).
            mp_context: multiprocessing start method ("fork", "spawn", "forkserver"; default: the platform's).

        Returns:
            a :class:`CacheBuildResult`.
        """
        start = time.perf_counter()
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        paths = [os.fspath(p) for p in paths]
        rows = list(range(len(paths))) if rows is None else list(rows)
        images = list(paths) if images is None else [str(i) for i in images]
        if len(rows) != len(paths) or len(images) != len(paths):
            raise ValueError(f"rows ({len(rows)}) and images ({len(images)}) must match paths ({len(paths)}).")
        unique = list(dict.fromkeys(paths))
        self._write_settings()
        self._remove_stale_tmp()
        keys = {p: path_key(p) for p in unique}  # taken before decoding: a file changed meanwhile is rebuilt next time
        existing = self._existing_keys({k[:2] for k in keys.values()})
        stored = {p: existing.get(k.split("-", 1)[0], []) for p, k in keys.items()}
        todo = unique if overwrite else [p for p in unique if keys[p] not in stored[p]]
        outdated = {p: [k for k in stored[p] if k != keys[p]] for p in unique}
        reasons: dict[str, str] = {}
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc=f"caching images ({self.key})", unit="img")
        try:
            if num_workers == 0 or len(todo) <= 1:
                for p in todo:
                    reason = self._build_one(p, keys[p])
                    if reason is not None:
                        reasons[p] = reason
                    if bar is not None:
                        bar.update()
            else:
                ctx = multiprocessing.get_context(mp_context)
                chunksize = max(1, min(16, len(todo) // (4 * int(num_workers))))
                with ctx.Pool(
                    int(num_workers), initializer=_init_worker, initargs=(os.fspath(self.cache_dir), self._init_kwargs)
                ) as pool:
                    jobs = [(p, keys[p]) for p in todo]
                    for p, reason in pool.imap_unordered(_worker_build_one, jobs, chunksize=chunksize):
                        if reason is not None:
                            reasons[p] = reason
                        if bar is not None:
                            bar.update()
        finally:
            if bar is not None:
                bar.close()
        for old in (k for p in unique for k in outdated[p]):  # entries of earlier files at these paths
            self._file_of_key(old).unlink(missing_ok=True)
        skipped = pd.DataFrame(
            [(r, i, p, reasons[p]) for r, i, p in zip(rows, images, paths) if p in reasons],
            columns=list(CHECK_REPORT_COLUMNS),
        )
        targets = [self.report_path] + ([Path(report_path)] if report_path is not None else [])
        for target in targets:
            with atomic_write(target) as tmp:
                skipped.to_csv(tmp, index=False)
        if len(skipped):
            extra = f" and {report_path}" if report_path is not None else ""
            warnings.warn(
                f"image cache {self.folder}: skipped {len(skipped)} of {len(paths)} images (missing or unreadable); "
                f"report written to {self.report_path}{extra}",
                stacklevel=2,
            )
        n_built = len(todo) - len(reasons)
        return CacheBuildResult(
            folder=self.folder, key=self.key, n_images=len(unique), n_built=n_built,
            n_existing=len(unique) - len(todo), skipped=skipped, report_path=self.report_path,
            seconds=time.perf_counter() - start, n_rebuilt=sum(1 for p in todo if outdated[p] and p not in reasons),
        )


_WORKER_CACHE: DecodedImageCache | None = None


def _init_worker(cache_dir: str, init_kwargs: dict) -> None:
    global _WORKER_CACHE
    torch.set_num_threads(1)
    _WORKER_CACHE = DecodedImageCache(cache_dir, **init_kwargs)
    _WORKER_CACHE._settings_written = True  # the parent wrote it


def _worker_build_one(job: tuple[str, str]) -> tuple[str, str | None]:
    assert _WORKER_CACHE is not None
    path, key = job
    return path, _WORKER_CACHE._build_one(path, key)


def _manifest_paths(
    manifest: pd.DataFrame | str | os.PathLike, root: str | os.PathLike | None
) -> tuple[list[str], list, list[str]]:
    if isinstance(manifest, pd.DataFrame):
        df = validate_manifest(manifest, source="manifest DataFrame")
        paths = _resolved_paths(df, root, "image")
    else:
        df = read_manifest(manifest, root=root)
        paths = _resolved_paths(df, None, "image")
    return paths, list(df.index), [str(i) for i in df["image"]]


def build_image_cache(
    manifest: pd.DataFrame | str | os.PathLike,
    cache_dir: str | os.PathLike,
    root: str | os.PathLike | None = None,
    modality: str = "2d",
    spatial_size: int | Sequence[int] | None = None,
    size_mode: str = "resize",
    intensity: str | None = "minmax",
    orientation: str | None = "auto",
    invert_monochrome1: bool = True,
    grayscale: bool = True,
    interp_mode: str = "area",
    store_dtype: str = "float32",
    num_workers: int = 0,
    overwrite: bool = False,
    report_path: str | os.PathLike | None = None,
    progress: bool = False,
) -> CacheBuildResult:
    """Decode every image of a manifest once into the cache (what ``monai-du cache`` runs).

    Paths resolve as in :func:`~monai_du.data.loading.manifest_to_dataset`: against ``root`` or the manifest file's
    folder (a DataFrame: ``root``, its ``image_path`` column, or the current directory), so the keys match the paths
    a training dataset built from the same manifest and root asks for.

    Args:
        manifest: manifest file or DataFrame.
        cache_dir: cache root folder.
        root: folder of relative image paths.
        modality, spatial_size, size_mode, intensity, orientation, invert_monochrome1, grayscale, interp_mode,
            store_dtype: the preprocessing (see :class:`DecodedImageCache`).
        num_workers, overwrite, report_path, progress: see :meth:`DecodedImageCache.build`.

    Returns:
        a :class:`CacheBuildResult`; skipped images are in its ``skipped`` report, named by manifest row.
    """
    paths, rows, images = _manifest_paths(manifest, root)
    cache = DecodedImageCache(
        cache_dir, modality=modality, spatial_size=spatial_size, size_mode=size_mode, intensity=intensity,
        orientation=orientation, invert_monochrome1=invert_monochrome1, grayscale=grayscale, interp_mode=interp_mode,
        store_dtype=store_dtype,
    )
    return cache.build(
        paths, num_workers=num_workers, overwrite=overwrite, report_path=report_path, progress=progress, rows=rows,
        images=images,
    )


class LoadCachedImaged(MapTransform):
    """Replace image paths by their cached, preprocessed images (float32 ``torch.Tensor`` ``(C, *spatial)``).

    Args:
        keys: keys holding image paths.
        cache: the :class:`DecodedImageCache` to read.
        on_miss: an image not in the cache: "build" (decode, store, return; safe from DataLoader workers),
            "decode" (decode without storing) or "raise" (``LookupError`` naming the path and the cache).
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        cache: DecodedImageCache,
        on_miss: str = "build",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not isinstance(cache, DecodedImageCache):
            raise ValueError(f"LoadCachedImaged: cache must be a DecodedImageCache, got {type(cache).__name__}.")
        if on_miss not in _ON_MISS:
            raise ValueError(f"LoadCachedImaged: on_miss must be one of {_ON_MISS}, got {on_miss!r}.")
        self.cache = cache
        self.on_miss = on_miss

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            if not isinstance(path, (str, os.PathLike)):
                raise ValueError(
                    f"LoadCachedImaged: '{key}' must hold an image path, got {type(path).__name__}; put it before "
                    "any transform that loads the image."
                )
            d[key] = torch.from_numpy(self.cache.get(path, on_miss=self.on_miss))
        return d


def _no_cache(cache_dir) -> bool:
    return cache_dir is None or (isinstance(cache_dir, str) and cache_dir.strip().lower() in ("", "none", "null"))


def cached_load_transforms(
    cache_dir: str | os.PathLike | None = None,
    keys: KeysCollection = "image",
    modality: str = "2d",
    spatial_size: int | Sequence[int] | None = None,
    size_mode: str = "resize",
    intensity: str | None = "minmax",
    orientation: str | None = "auto",
    invert_monochrome1: bool = True,
    grayscale: bool = True,
    interp_mode: str = "area",
    store_dtype: str = "float32",
    on_miss: str = "build",
    allow_missing_keys: bool = False,
) -> Compose:
    """``load_image_transforms`` with a decode-once cache: a drop-in for it in a bundle's preprocessing.

    With ``cache_dir`` None (or "", "none", "null"), this is exactly
    :func:`~monai_du.data.loading.load_image_transforms` with the same arguments. Otherwise images come from the
    :class:`DecodedImageCache` for these settings under ``cache_dir`` (fill it with ``monai-du cache`` or
    :func:`build_image_cache`; with ``on_miss="build"`` the first epoch fills it as it goes).

    Args:
        cache_dir: cache root folder, or None for no cache.
        keys, modality, spatial_size, size_mode, intensity, orientation, invert_monochrome1, grayscale, interp_mode,
            allow_missing_keys: as in ``load_image_transforms``.
        store_dtype: "float32" or "float16" on disk.
        on_miss: see :class:`LoadCachedImaged`.

    Returns:
        a ``Compose`` mapping ``{"image": path, ...}`` to ``{"image": (C, *spatial) float32, ...}`` (a
        ``MetaTensor`` without a cache, a plain tensor from the cache).
    """
    if _no_cache(cache_dir):
        return load_image_transforms(
            keys, modality=modality, spatial_size=spatial_size, size_mode=size_mode, intensity=intensity,
            orientation=orientation, invert_monochrome1=invert_monochrome1, grayscale=grayscale,
            interp_mode=interp_mode, allow_missing_keys=allow_missing_keys,
        )
    cache = DecodedImageCache(
        cache_dir, modality=modality, spatial_size=spatial_size, size_mode=size_mode, intensity=intensity,
        orientation=orientation, invert_monochrome1=invert_monochrome1, grayscale=grayscale, interp_mode=interp_mode,
        store_dtype=store_dtype,
    )
    return Compose([LoadCachedImaged(keys, cache, on_miss=on_miss, allow_missing_keys=allow_missing_keys)])
