"""From a manifest to a MONAI ``Dataset`` of dicts, and the transforms that load and normalise its images.

- :func:`manifest_to_dataset` turns each manifest row into ``{"image": absolute path, <metadata columns>...}``,
  after :func:`check_images` has opened every image's header, so that a missing or truncated file is found before
  training, named by its manifest row, and either raised or skipped with a report.
- :func:`load_image_transforms` builds the loading pipeline: ``LoadImaged`` with MONAI's readers chosen by file
  type (``PydicomReader`` for DICOM, ``PILReader`` for PNG/JPEG/BMP, ``NibabelReader`` for NIfTI),
  ``EnsureChannelFirstd``, MONOCHROME1 inversion, colour collapse, orientation, intensity scaling to [0, 1] and
  resizing or padding.
- :func:`load_images` loads every image of a manifest with that pipeline into one array ``(N, 1, *spatial)``.

MONAI's ``PydicomReader`` returns the stored pixel values (after RescaleSlope/Intercept) and does not look at
``PhotometricInterpretation``: a MONOCHROME1 radiograph (low values bright, as CR systems often store them) comes
out inverted. :class:`InvertMonochrome1d` fixes that from the DICOM header kept in the image's metadata.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Hashable, Mapping, Sequence
from copy import deepcopy
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.config import KeysCollection
from monai.data import CacheDataset, Dataset, MetaTensor, PersistentDataset
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImage,
    LoadImaged,
    MapTransform,
    Orientationd,
    Resized,
    ResizeWithPadOrCropd,
    ScaleIntensityd,
    ScaleIntensityRangePercentilesd,
)
from monai.transforms.transform import RandomizableTrait, Transform
from monai.transforms.utils import convert_to_contiguous

from monai_du.data.manifest import (
    RESOLVED_IMAGE_COLUMN,
    read_manifest,
    validate_manifest,
)

__all__ = [
    "manifest_to_dataset",
    "check_images",
    "check_image_file",
    "load_image_transforms",
    "load_images",
    "InvertMonochrome1d",
    "CollapseColorChannelsd",
    "CheckSpatialDimsd",
    "UnusableImageError",
    "CHECK_REPORT_COLUMNS",
]

CHECK_REPORT_COLUMNS: tuple[str, ...] = ("row", "image", "path", "reason")
"""Columns of :func:`check_images`' report: manifest row (index label), ``image`` as written, resolved path, why."""

_DIMS = {"2d": 2, "cxr": 2, "xray": 2, "dx": 2, "cr": 2, "3d": 3, "mri": 3, "mr": 3, "brain": 3, "ct": 3}
_PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_NIFTI_SUFFIXES = (".nii", ".nii.gz", ".img", ".hdr")
_DICOM_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
# uncompressed transfer syntaxes, whose pixel data size is known from the header
_NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}


# ---------------------------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------------------------


def _meta_of(d: Mapping, key: Hashable) -> dict:
    img = d[key]
    if isinstance(img, MetaTensor):
        return img.meta
    return d.get(f"{key}_meta_dict", {})


def _dicom_value(meta: Mapping, tag: str, keyword: str):
    """First value of a DICOM attribute in MONAI metadata: PydicomReader's JSON form ``{"00280004": {"Value":
    [...]}}``, or a plain ``keyword`` entry (other readers)."""
    item = meta.get(tag)
    if isinstance(item, Mapping):
        values = item.get("Value")
        if values:
            return values[0]
        return None
    if item is not None:
        return item
    return meta.get(keyword)


class UnusableImageError(ValueError):
    """An image file that the pipeline cannot use, named: ``str(err)`` is ``"image <path> <reason>"``.

    Attributes:
        path: the image file (``filename_or_obj`` of its metadata), or None when unknown.
        reason: why, without the path (the ``reason`` of skip reports), e.g. ``"holds NaN values (3 of 512 values)"``.
    """

    def __init__(self, path: object, reason: str) -> None:
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"image {self.path if self.path is not None else '(file unknown)'} {reason}")

    def __reduce__(self):  # picklable with its two arguments (DataLoader workers send errors back)
        return (type(self), (self.path, self.reason))


def _unusable_in(err: BaseException | None) -> UnusableImageError | None:
    """The first :class:`UnusableImageError` in an exception's cause chain (MONAI's ``Compose`` wraps errors in
    ``RuntimeError("applying transform ...")``), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UnusableImageError):
            return err
        seen.add(id(err))
        err = err.__cause__
    return None


def _decode_reason(err: BaseException) -> str:
    """Skip-report reason for an exception raised while loading an image."""
    unusable = _unusable_in(err)
    if unusable is not None:
        return unusable.reason
    cause = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    text = str(cause).splitlines()[0] if str(cause) else ""
    return f"cannot be decoded ({type(cause).__name__}: {text})"


def _shape_text(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _shape_problem(shape: Sequence[int], spatial_dims: int | None, max_channels: int | None) -> str | None:
    """Why a channel-first shape ``(C, *spatial)`` does not suit a pipeline of ``spatial_dims`` spatial dimensions
    whose images may have at most ``max_channels`` channels (None: any), or None."""
    shape = tuple(int(s) for s in shape)
    n = len(shape) - 1
    if any(s == 0 for s in shape):
        return f"has no pixels (shape {_shape_text(shape)})"
    if spatial_dims is not None and n != spatial_dims:
        what = "image" if n < 3 else "volume"
        return (
            f"has {n} spatial dimension{'s' if n != 1 else ''} (shape {_shape_text(shape)}), the {spatial_dims}d "
            f"pipeline expects {spatial_dims}: a {n}D {what} in a {spatial_dims}D manifest?"
        )
    if max_channels is not None and shape and shape[0] > max_channels:
        if max_channels == 1:
            hint = f"; a {n + 1}D volume? the {n}d pipeline expects one channel" if n >= 3 else (
                f"; the {n}d pipeline expects one channel"
            )
        else:
            hint = f"; the {n}d pipeline expects 1 (grey) to {max_channels} (RGBA) channels"
        return f"has {shape[0]} channels (shape {_shape_text(shape)}){hint}"
    return None


def _nonfinite_problem(img) -> str | None:
    """Why an image's values cannot be used (NaN or infinite values), or None."""
    t = torch.as_tensor(img)
    if not torch.is_floating_point(t) and not torch.is_complex(t):
        return None
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    if not nan and not inf:
        return None
    total = t.numel()
    if nan and inf:
        return f"holds NaN and inf values ({nan} NaN and {inf} inf of {total} values)"
    return f"holds {'NaN' if nan else 'inf'} values ({nan or inf} of {total} values)"


def _expectation(modality: str | None, grayscale: bool = True) -> tuple[int | None, int | None]:
    """``(spatial_dims, max_channels)`` of the images that ``load_image_transforms(modality=..., grayscale=...)``
    can use: one channel in 3D, up to 4 in 2D when colour is collapsed to grey (RGBA), any otherwise."""
    if modality is None:
        return None, None
    key = str(modality).lower()
    if key not in _DIMS:
        raise ValueError(f"modality must be one of {sorted(_DIMS)}, got {modality!r}.")
    dims = _DIMS[key]
    return dims, (1 if dims == 3 else (4 if grayscale else None))


class CheckSpatialDimsd(MapTransform):
    """Refuse a loaded, channel-first image that the pipeline cannot use, naming its file.

    Put it right after ``EnsureChannelFirstd`` (:func:`load_image_transforms` does). It raises
    :class:`UnusableImageError` (a ``ValueError``) ``"image <file> <reason>"``, the file taken from the image's
    metadata (``filename_or_obj``), when the image

    - has another number of spatial dimensions than ``spatial_dims`` (a 2D PNG in a 3D manifest, which ``Resized``
      would otherwise blow up silently into a volume; a 3D volume in the 2D pipeline);
    - has more than ``max_channels`` channels (a 4D NIfTI, e.g. a time series, in the 3D pipeline);
    - has a spatial size of 0;
    - holds NaN or infinite values (with ``finite``): min-max or percentile scaling would make the whole image NaN.

    Args:
        keys: keys of channel-first images, (C, *spatial).
        spatial_dims: expected number of spatial dimensions (2 or 3), or None for any.
        max_channels: largest channel count accepted, or None for any.
        finite: refuse NaN and infinite values.
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_dims: int | None = None,
        max_channels: int | None = None,
        finite: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = None if spatial_dims is None else int(spatial_dims)
        self.max_channels = None if max_channels is None else int(max_channels)
        self.finite = finite

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            reason = _shape_problem(tuple(img.shape), self.spatial_dims, self.max_channels)
            if reason is None and self.finite:
                reason = _nonfinite_problem(img)
            if reason is not None:
                raise UnusableImageError(_meta_of(d, key).get("filename_or_obj"), reason)
        return d


class InvertMonochrome1d(MapTransform):
    """Invert MONOCHROME1 images so that, as for MONOCHROME2, larger values are brighter.

    Reads ``PhotometricInterpretation`` (0028,0004) from the image's metadata (load DICOM with
    ``PydicomReader(prune_metadata=False)``, as :func:`load_image_transforms` does). The inversion maps the stored
    value range onto itself: ``x' = lo + hi - x`` with ``[lo, hi]`` the range allowed by BitsStored (0028,0101) and
    PixelRepresentation (0028,0103), after RescaleSlope and RescaleIntercept; when BitsStored is absent, the image's
    own minimum and maximum. Images of other photometric interpretations, and non-DICOM images, pass unchanged.
    Afterwards the metadata say MONOCHROME2, so applying the transform twice inverts once.

    Args:
        keys: keys of the images, channel-first or not, any spatial shape.
        drop_dicom_tags: remove the raw DICOM attributes (keys of 8 hex digits) from the metadata after use, so
            that DICOM files with different tag sets still collate into one batch. The affine and spacing that
            MONAI derived from them stay.
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(self, keys: KeysCollection, drop_dicom_tags: bool = True, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.drop_dicom_tags = drop_dicom_tags

    @staticmethod
    def value_range(meta: Mapping) -> tuple[float, float] | None:
        """Range of (rescaled) values allowed by the DICOM header, or None when BitsStored is absent."""
        bits = _dicom_value(meta, "00280101", "BitsStored")
        if bits is None:
            return None
        bits = int(bits)
        signed = int(_dicom_value(meta, "00280103", "PixelRepresentation") or 0) == 1
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        slope = float(_dicom_value(meta, "00281053", "RescaleSlope") or 1.0)
        intercept = float(_dicom_value(meta, "00281052", "RescaleIntercept") or 0.0)
        a, b = slope * lo + intercept, slope * hi + intercept
        return (min(a, b), max(a, b))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            meta = _meta_of(d, key)
            photometric = _dicom_value(meta, "00280004", "PhotometricInterpretation")
            if isinstance(photometric, str) and photometric.strip().upper() == "MONOCHROME1":
                img = d[key]
                vrange = self.value_range(meta)
                if vrange is None:
                    lo, hi = float(img.min()), float(img.max())
                else:
                    lo, hi = vrange
                if isinstance(img, torch.Tensor) and not torch.is_floating_point(img):
                    img = img.float()
                elif isinstance(img, np.ndarray) and not np.issubdtype(img.dtype, np.floating):
                    img = img.astype(np.float32)
                d[key] = (lo + hi) - img
                meta = _meta_of(d, key)
                meta["00280004"] = {"vr": "CS", "Value": ["MONOCHROME2"]}
                meta["monochrome1_inverted"] = True
            if self.drop_dicom_tags:
                for tag in [k for k in meta if isinstance(k, str) and _DICOM_TAG.match(k)]:
                    del meta[tag]
        return d


class CollapseColorChannelsd(MapTransform):
    """Collapse a channel-first colour image to one grey channel; grey images pass unchanged.

    RGB and RGBA (C = 3 or 4, alpha dropped) become the luma ``0.299 R + 0.587 G + 0.114 B``; grey + alpha (C = 2)
    keeps the grey channel. Chest X-rays saved as colour PNG or JPEG hold the same value in every channel, so this
    loses nothing for them.

    Args:
        keys: keys of channel-first images, (C, *spatial).
        allow_missing_keys: don't raise for missing keys.
    """

    _LUMA = (0.299, 0.587, 0.114)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            channels = img.shape[0]
            if channels == 2:
                d[key] = img[:1]
            elif channels in (3, 4):
                weights = torch.as_tensor(self._LUMA, dtype=torch.float32).reshape(3, *([1] * (img.ndim - 1)))
                rgb = torch.as_tensor(img[:3]).float()
                grey = (rgb * weights).sum(0, keepdim=True)
                d[key] = MetaTensor(grey, meta=img.meta) if isinstance(img, MetaTensor) else grey
        return d


def _register_readers(loader: LoadImaged) -> LoadImaged:
    """Register PydicomReader (header kept), PILReader and NibabelReader so that they are tried first, by suffix."""
    from monai.data import NibabelReader, PILReader, PydicomReader

    loader.register(PydicomReader(prune_metadata=False))
    loader.register(PILReader())
    loader.register(NibabelReader())
    return loader


class _LoadImageNamingFile(LoadImage):
    """``LoadImage`` whose failures are :class:`UnusableImageError` naming the file (nibabel's "data code 4096 not
    recognized" does not)."""

    def __call__(self, filename, reader=None):
        try:
            return super().__call__(filename, reader)
        except Exception as err:  # noqa: BLE001 - any reader failure: the file cannot be used
            raise UnusableImageError(filename, _decode_reason(err)) from err


def _image_loader(keys: KeysCollection, dtype=np.float32, allow_missing_keys: bool = False) -> LoadImaged:
    # MONAI makes every reader it supports, its optional GPU DICOM reader too, which warns (a warning and a log line)
    # that nvImageCodec is absent, once per loader and worker: quiet both while the loader is made
    plugin_log = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = plugin_log.level
    plugin_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*NvImgCodec.*")
            warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
            loader = LoadImaged(keys, reader=None, image_only=True, dtype=dtype, allow_missing_keys=allow_missing_keys)
            loader._loader = _LoadImageNamingFile(reader=None, image_only=True, dtype=dtype)
    finally:
        plugin_log.setLevel(level)
    return _register_readers(loader)


def load_image_transforms(
    keys: KeysCollection = "image",
    modality: str = "2d",
    spatial_size: int | Sequence[int] | None = None,
    size_mode: str = "resize",
    intensity: str | None = "minmax",
    orientation: str | None = "auto",
    invert_monochrome1: bool = True,
    grayscale: bool = True,
    interp_mode: str = "area",
    dtype=np.float32,
    allow_missing_keys: bool = False,
) -> Compose:
    """The MONAI pipeline that loads manifest images and brings them to a common form.

    Steps, in order:

    1. ``LoadImaged`` with readers chosen by file type: ``PydicomReader`` (``.dcm``, or any DICOM file, or a DICOM
       series folder), ``PILReader`` (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``), ``NibabelReader`` (``.nii``,
       ``.nii.gz``). 2D arrays come out as (W, H), i.e. x then y, as MONAI's readers do.
    2. ``EnsureChannelFirstd``: (C, *spatial).
    3. :class:`CheckSpatialDimsd`: an image with another number of spatial dimensions than the modality's (a 2D
       PNG in a 3D manifest, a 3D volume in the 2D pipeline), more than one channel in 3D (a 4D NIfTI) or more
       than 4 in 2D (with ``grayscale``), or NaN / infinite values raises :class:`UnusableImageError` (a
       ``ValueError``) naming the file, its shape and what was expected. A file that cannot be read raises it too.
    4. :class:`InvertMonochrome1d` (when ``invert_monochrome1``).
    5. 2D only, when ``grayscale``: :class:`CollapseColorChannelsd` (RGB/RGBA -> 1 channel).
    6. 3D only: ``Orientationd`` to ``orientation`` ("auto" means RAS for 3D, nothing for 2D; None skips it).
    7. Intensity: ``"minmax"`` (``ScaleIntensityd`` to [0, 1] per image), ``"percentile"`` (0.5-99.5 percentiles to
       [0, 1], clipped; robust to burned-in text and hot pixels) or None.
    8. Size, when ``spatial_size`` is given: ``"resize"`` (``Resized`` to exactly that size), ``"longest"`` (resize
       the longest side to the largest requested size, keeping the aspect ratio, then centre-pad or crop with
       zeros to ``spatial_size``) or ``"pad_crop"`` (``ResizeWithPadOrCropd``, no interpolation).

    Args:
        keys: image keys.
        modality: "2d" (aliases "cxr", "xray", "dx", "cr") or "3d" (aliases "mri", "mr", "brain", "ct"); sets the
            number of spatial dimensions.
        spatial_size: output spatial size, an int (same for every axis) or one value per axis; None keeps the size.
        size_mode: "resize", "longest" or "pad_crop".
        intensity: "minmax", "percentile" or None.
        orientation: axis codes for 3D images, "auto" (RAS) or None.
        invert_monochrome1: invert MONOCHROME1 DICOM images.
        grayscale: collapse colour 2D images to one channel.
        interp_mode: interpolation of ``Resized`` ("area", "bilinear", "trilinear", "nearest", ...).
        dtype: dtype of the loaded arrays.
        allow_missing_keys: don't raise for missing keys.

    Returns:
        a ``Compose`` mapping ``{"image": path, ...}`` to ``{"image": MetaTensor (C, *spatial), ...}``.
    """
    if modality.lower() not in _DIMS:
        raise ValueError(f"modality must be one of {sorted(_DIMS)}, got {modality!r}.")
    dims = _DIMS[modality.lower()]
    if size_mode not in ("resize", "longest", "pad_crop"):
        raise ValueError(f"size_mode must be 'resize', 'longest' or 'pad_crop', got {size_mode!r}.")
    if intensity not in ("minmax", "percentile", None):
        raise ValueError(f"intensity must be 'minmax', 'percentile' or None, got {intensity!r}.")
    size: tuple[int, ...] | None = None
    if spatial_size is not None:
        if isinstance(spatial_size, (int, np.integer)):
            size = (int(spatial_size),) * dims
        else:
            size = tuple(int(s) for s in spatial_size)
        if len(size) != dims or min(size) < 1:
            raise ValueError(
                f"spatial_size {spatial_size} must be a positive int or {dims} positive ints for {modality!r}."
            )
    kw = {"allow_missing_keys": allow_missing_keys}
    _, max_channels = _expectation(modality, grayscale)
    steps: list = [
        _image_loader(keys, dtype=dtype, **kw),
        EnsureChannelFirstd(keys, **kw),
        CheckSpatialDimsd(keys, spatial_dims=dims, max_channels=max_channels, **kw),
    ]
    if invert_monochrome1:
        steps.append(InvertMonochrome1d(keys, **kw))
    if dims == 2 and grayscale:
        steps.append(CollapseColorChannelsd(keys, **kw))
    axcodes = ("RAS" if dims == 3 else None) if orientation == "auto" else orientation
    if axcodes:
        steps.append(Orientationd(keys, axcodes=axcodes, labels=None, **kw))
    if intensity == "minmax":
        steps.append(ScaleIntensityd(keys, minv=0.0, maxv=1.0, **kw))
    elif intensity == "percentile":
        steps.append(
            ScaleIntensityRangePercentilesd(keys, lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True, **kw)
        )
    if size is not None:
        if size_mode == "resize":
            steps.append(Resized(keys, spatial_size=size, mode=interp_mode, **kw))
        elif size_mode == "longest":
            steps.append(Resized(keys, spatial_size=max(size), size_mode="longest", mode=interp_mode, **kw))
            steps.append(ResizeWithPadOrCropd(keys, spatial_size=size, **kw))
        else:
            steps.append(ResizeWithPadOrCropd(keys, spatial_size=size, **kw))
    return Compose(steps)


# ---------------------------------------------------------------------------------------------------------------
# image checks
# ---------------------------------------------------------------------------------------------------------------


def _suffix(path: str) -> str:
    name = path.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]


def _check_dicom(path: str) -> str | None:
    import pydicom

    size = os.path.getsize(path)
    try:
        ds = pydicom.dcmread(path, defer_size=1024)
    except Exception as e:  # noqa: BLE001 - any parse failure is a reason to report
        return f"unreadable DICOM ({type(e).__name__}: {e})"
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return "DICOM without pixel data (truncated, or not an image)"
    for keyword in ("Rows", "Columns"):
        if keyword not in ds:
            return f"DICOM without {keyword}"
    elem = ds.get_item(0x7FE00010, keep_deferred=True)
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "1.2.840.10008.1.2.1"))
    if elem is None or syntax not in _NATIVE_SYNTAXES:
        return None  # encapsulated (compressed) pixel data: sizes are not known from the header
    bits = int(ds.get("BitsAllocated", 16))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    n_values = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * frames
    expected = (n_values + 7) // 8 if bits == 1 else n_values * bits // 8
    if getattr(elem, "value", None) is not None:
        available = len(elem.value)
    else:
        available = max(size - int(elem.value_tell), 0)
        if elem.length not in (None, 0xFFFFFFFF):
            available = min(available, int(elem.length))
    if available < expected:
        return f"truncated DICOM: pixel data needs {expected} bytes, file holds {available}"
    return None


def _check_pil(path: str) -> tuple[str | None, tuple[int, ...] | None]:
    """``(reason or None, channel-first shape as the loader gives it: (bands, width, height))``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            shape = (len(im.getbands()), *im.size)
            im.verify()  # walks the chunks and their checksums without decoding the pixels
    except Exception as e:  # noqa: BLE001
        return f"unreadable image ({type(e).__name__}: {e})", None
    return None, shape


def _nifti_channel_first(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape that ``NibabelReader`` + ``EnsureChannelFirstd`` give a NIfTI of this data shape: up to 3 axes are
    spatial, with one channel in front; a 4th (and later) axis ends as the last, which becomes the channel axis."""
    return (1, *shape) if len(shape) <= 3 else (shape[-1], *shape[:-1])


def _check_nifti(path: str) -> tuple[str | None, tuple[int, ...] | None]:
    """``(reason or None, channel-first shape as the loader gives it)``."""
    import nibabel as nib

    try:
        img = nib.load(path)
        header = img.header
        shape = tuple(int(s) for s in header.get_data_shape())
        offset = int(getattr(img.dataobj, "offset", header.get_data_offset()))
        expected = offset + int(np.prod(shape)) * np.dtype(header.get_data_dtype()).itemsize
    except Exception as e:  # noqa: BLE001
        return f"unreadable NIfTI ({type(e).__name__}: {e})", None
    if not shape or min(shape) < 1:
        dims = [int(v) for v in header["dim"]]
        return f"unreadable NIfTI (broken header: dim {dims} gives data shape {shape})", None
    data_file = path
    if path.lower().endswith(".hdr"):
        data_file = path[:-4] + ".img"
    if path.lower().endswith(".nii.gz"):
        # the gzip trailer holds the uncompressed size mod 2**32: a header-cost check of a complete file
        with open(path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            isize = int.from_bytes(fh.read(4), "little")
        if isize != expected % 2**32:
            return (
                f"truncated NIfTI: gzip trailer gives {isize} bytes, header implies {expected} "
                "(truncated, or not a single-member gzip file)"
            ), None
        return None, _nifti_channel_first(shape)
    if not os.path.isfile(data_file):
        return f"NIfTI data file missing: {data_file}", None
    have = os.path.getsize(data_file)
    if have < expected:
        return f"truncated NIfTI: data needs {expected} bytes, file holds {have}", None
    return None, _nifti_channel_first(shape)


_Expectation = tuple[int | None, int | None]  # (spatial_dims, max_channels) of CheckSpatialDimsd; (None, None): any


def _check_one(path: str, level: str, loader, expect: _Expectation = (None, None)) -> str | None:
    if not os.path.exists(path):
        return "file not found"
    shape = None
    if os.path.isdir(path):
        if not any(os.scandir(path)):
            return "empty folder"
        reason = None
    elif os.path.getsize(path) == 0:
        return "empty file"
    else:
        suffix = _suffix(path)
        if suffix == ".dcm":
            reason = _check_dicom(path)
        elif suffix in _PIL_SUFFIXES:
            reason, shape = _check_pil(path)
        elif suffix in _NIFTI_SUFFIXES:
            reason, shape = _check_nifti(path)
        else:
            import pydicom

            reason = _check_dicom(path) if pydicom.misc.is_dicom(path) else None
    if reason is None and shape is not None:
        reason = _shape_problem(shape, *expect)
    if reason is None and level == "full":
        try:
            loader({"image": path})
        except Exception as e:  # noqa: BLE001
            reason = _decode_reason(e)
    return reason


def _full_loader(expect: _Expectation) -> Compose:
    """What ``level="full"`` decodes with: the reader, channel-first, and :class:`CheckSpatialDimsd`."""
    return Compose(
        [
            _image_loader("image"),
            EnsureChannelFirstd("image"),
            CheckSpatialDimsd("image", spatial_dims=expect[0], max_channels=expect[1]),
        ]
    )


def check_image_file(
    path: str | os.PathLike, level: str = "header", modality: str | None = None, grayscale: bool = True
) -> str | None:
    """Why one image file cannot be used, or None when it passes: the per-file check of :func:`check_images`.

    Args:
        path: the image file (or DICOM series folder).
        level: "header" (a few reads, no pixels) or "full" (also decodes it with the loader of
            :func:`load_image_transforms` and :class:`CheckSpatialDimsd`, which also refuses NaN and inf values).
        modality, grayscale: as in :func:`load_image_transforms`: also refuse an image whose number of spatial
            dimensions or channels that pipeline cannot use (from the PNG/JPEG or NIfTI header; DICOM only at
            ``level="full"``). None: any.

    Returns:
        the reason (e.g. ``"file not found"``, ``"truncated DICOM: ..."``), or None.
    """
    if level not in ("header", "full"):
        raise ValueError(f"level must be 'header' or 'full', got {level!r}.")
    expect = _expectation(modality, grayscale)
    return _check_one(os.fspath(path), level, _full_loader(expect) if level == "full" else None, expect)


def _resolved_paths(df: pd.DataFrame, root: str | os.PathLike | None, image_column: str) -> list[str]:
    if image_column not in df.columns:
        raise ValueError(f"manifest has no '{image_column}' column; columns present: {list(df.columns)}")
    if image_column == "image" and RESOLVED_IMAGE_COLUMN in df.columns and root is None:
        return [str(p) for p in df[RESOLVED_IMAGE_COLUMN]]
    base = Path(root).expanduser() if root is not None else None
    out = []
    for p in df[image_column]:
        p = os.path.expanduser(str(p))
        out.append(p if base is None or os.path.isabs(p) else str(base / p))
    return out


def check_images(
    df: pd.DataFrame,
    root: str | os.PathLike | None = None,
    image_column: str = "image",
    level: str = "header",
    progress: bool = False,
    modality: str | None = None,
    grayscale: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Open the header of every manifest image and report the rows whose image is missing or unreadable.

    Header checks (``level="header"``) cost a few reads per file and load no pixels:

    - missing path, empty file, empty folder;
    - DICOM (``.dcm`` or a DICOM preamble): parsed with pydicom, pixel data deferred; reports files that do not
      parse, have no pixel data or Rows/Columns, or whose uncompressed pixel data is shorter than
      Rows x Columns x SamplesPerPixel x NumberOfFrames x BitsAllocated / 8 (a truncated file);
    - PNG/JPEG/BMP/TIFF: ``PIL.Image.open`` + ``verify`` (chunk checksums; catches truncated PNG);
    - NIfTI: the nibabel header (a header whose dimensions give no data is refused); ``.nii`` must hold offset +
      data bytes; ``.nii.gz`` must have a gzip trailer size equal to that (a truncated gzip stream does not end
      with it);
    - with ``modality``: PNG/JPEG/BMP/TIFF and NIfTI images whose shape the pipeline of
      :func:`load_image_transforms` cannot use (the message of :class:`CheckSpatialDimsd`: a 2D image in a 3D
      manifest, a 3D volume in a 2D one, a 4D NIfTI in 3D);
    - other suffixes only need to exist and be non-empty.

    ``level="full"`` also decodes every image with the loader of :func:`load_image_transforms` and
    :class:`CheckSpatialDimsd` (slow): it also finds images that do not decode, DICOM of the wrong
    dimensionality, and images holding NaN or infinite values.

    Args:
        df: manifest (rows are reported by their index label).
        root: folder that relative paths are relative to; default: the ``image_path`` column that
            :func:`~monai_du.data.manifest.read_manifest` adds, or else the current directory.
        image_column: column with the paths.
        level: "header" or "full".
        progress: show a tqdm progress bar.
        modality, grayscale: the pipeline the images are for, as in :func:`load_image_transforms`; None: any shape.

    Returns:
        ``(ok_df, report_df)``: the rows whose image passed, and one row per failed image with columns
        :data:`CHECK_REPORT_COLUMNS` (``row``, ``image``, ``path``, ``reason``).
    """
    if level not in ("header", "full"):
        raise ValueError(f"level must be 'header' or 'full', got {level!r}.")
    return _check_images(df, root, image_column, level, progress, _expectation(modality, grayscale))


def _check_images(
    df: pd.DataFrame, root, image_column: str, level: str, progress: bool, expect: _Expectation
) -> tuple[pd.DataFrame, pd.DataFrame]:
    paths = _resolved_paths(df, root, image_column)
    loader = _full_loader(expect) if level == "full" else None
    iterator = zip(df.index, df[image_column], paths)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(paths), desc="checking images", unit="img")
    bad_rows, report = [], []
    for row, image, path in iterator:
        reason = _check_one(path, level, loader, expect)
        if reason is not None:
            bad_rows.append(row)
            report.append((row, image, path, reason))
    ok = df.drop(index=bad_rows) if bad_rows else df.copy()
    return ok, pd.DataFrame(report, columns=list(CHECK_REPORT_COLUMNS))


def _format_report(report: pd.DataFrame, limit: int = 5) -> str:
    lines = [f"row {r.row!r} (image '{r.image}' -> {r.path}): {r.reason}" for r in report.head(limit).itertuples()]
    if len(report) == 1:  # one bad image: one line
        return " " + lines[0]
    more = f"\n  ... and {len(report) - limit} more" if len(report) > limit else ""
    return "\n  " + "\n  ".join(lines) + more


# ---------------------------------------------------------------------------------------------------------------
# dataset
# ---------------------------------------------------------------------------------------------------------------


def _python_value(v):
    """numpy scalars -> Python scalars; missing (None, pd.NA, NaT, NaN) -> float('nan'); strings stay str."""
    if isinstance(v, str):
        return v
    if v is None or v is pd.NA or v is pd.NaT:
        return float("nan")
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and np.isnan(v):
        return float("nan")
    return v


def _expectation_of(transform) -> _Expectation:
    """The image shape that a dataset's transform can use: from the first :class:`CheckSpatialDimsd` in it (nested
    ``Compose`` included), or from the settings of a decode-once cache loader
    (:class:`~monai_du.data.cache.LoadCachedImaged`); ``(None, None)`` when neither is there."""
    if isinstance(transform, CheckSpatialDimsd):
        return transform.spatial_dims, transform.max_channels
    settings = getattr(getattr(transform, "cache", None), "settings", None)
    if isinstance(settings, Mapping) and settings.get("spatial_dims") in (2, 3):
        dims = int(settings["spatial_dims"])
        return dims, (1 if dims == 3 else (4 if settings.get("grayscale", True) else None))
    for inner in getattr(transform, "transforms", None) or ():
        found = _expectation_of(inner)
        if found != (None, None):
            return found
    return None, None


class _Unusable:
    """Placeholder kept in a ``CacheDataset``'s cache for an item whose image could not be used."""

    def __init__(self, error: UnusableImageError) -> None:
        self.error = error


def _runs_per_access(transform) -> bool:
    """Whether a transform of a cached dataset runs at every access rather than once, into the cache: MONAI's rule
    (random, or not a MONAI ``Transform``), except that a nested plain ``Compose`` is random only when one of its
    transforms is. MONAI counts every ``Compose`` as random (it is ``Randomizable``): by its rule, a loading pipeline
    nested in a bundle's preprocessing (``cached_load_transforms(...)`` as its first step) would never be cached, the
    images would be decoded again every epoch, and a volume holding NaN values would stop the run in its first epoch
    instead of being reported when the cache is built."""
    if type(transform) is Compose:
        return any(_runs_per_access(inner) for inner in transform.transforms)
    return isinstance(transform, RandomizableTrait) or not isinstance(transform, Transform)


class _CheckedCacheDataset(CacheDataset):
    """``CacheDataset`` that keeps an :class:`UnusableImageError` raised while caching an item (an image that
    decodes to NaN values, a DICOM of the wrong dimensionality, ...) as a placeholder, for
    :func:`manifest_to_dataset` to report and drop, instead of failing the whole cache.

    It caches every transform before the first one that :func:`_runs_per_access` (MONAI's ``CacheDataset`` stops at
    the first nested ``Compose``); the cache is complete and positional, as :func:`manifest_to_dataset` builds it."""

    def _first_per_access(self) -> int | None:
        return self.transform.get_index_of_first(_runs_per_access)

    def _load_cache_item(self, idx: int):
        try:
            item = self.transform(self.data[idx], end=self._first_per_access(), threading=True)
            if self.as_contiguous:
                item = convert_to_contiguous(item, memory_format=torch.contiguous_format)
            return item
        except Exception as err:
            unusable = _unusable_in(err)
            if unusable is None:
                raise
            return _Unusable(unusable)

    def _transform(self, index: int):
        data = self._cache[index]
        first = self._first_per_access()
        if first is None:
            return data
        return self.transform(deepcopy(data) if self.copy_cache is True else data, start=first)


def _drop_unusable(ds: _CheckedCacheDataset, rows: list, images: list, on_error: str, source: str) -> pd.DataFrame:
    """Report the cached items that hold an :class:`_Unusable`, raise for them (``on_error="raise"``) or drop them
    from the dataset; the report has :data:`CHECK_REPORT_COLUMNS`."""
    cached = ds._cache
    bad = [i for i, item in enumerate(cached) if isinstance(item, _Unusable)]
    report = pd.DataFrame(
        [(rows[i], images[i], ds.data[i]["image"], cached[i].error.reason) for i in bad],
        columns=list(CHECK_REPORT_COLUMNS),
    )
    if not bad:
        return report
    if on_error == "raise":
        first = cached[bad[0]].error
        raise ValueError(f"{source}: {len(bad)} image(s) cannot be used:{_format_report(report)}") from first
    if len(cached) != len(ds.data):  # only a complete, positional cache can be filtered (the default)
        raise RuntimeError(f"{source}: cannot drop unusable images from a partial cache:{_format_report(report)}")
    dropped = set(bad)
    keep = [i for i in range(len(cached)) if i not in dropped]
    ds.data = [ds.data[i] for i in keep]
    ds._cache = [cached[i] for i in keep]
    ds.cache_num = len(ds._cache)
    return report


def manifest_to_dataset(
    df_or_path: pd.DataFrame | str | os.PathLike,
    root: str | os.PathLike | None = None,
    transform=None,
    cache: bool = False,
    on_error: str = "raise",
    check: bool = True,
    columns: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_num_workers: int = 0,
    report_path: str | os.PathLike | None = None,
    progress: bool = False,
    source: str | os.PathLike | None = None,
) -> Dataset:
    """A MONAI dataset of dicts, one per manifest row: ``image`` (absolute path) plus the metadata columns.

    Values keep their manifest types as Python scalars: strings as ``str``, numbers as ``float``/``int``, missing
    values as ``float('nan')``. String columns with missing values cannot be collated by a ``DataLoader`` as they
    are; turn them into prior vectors (``monai_du.transforms``) or leave them out with ``columns``.

    Args:
        df_or_path: a manifest file (read and validated by :func:`~monai_du.data.manifest.read_manifest`, relative
            paths resolved against ``root`` or the file's folder) or a DataFrame (validated; relative paths
            resolved against ``root`` or, with no root, its ``image_path`` column or the current directory).
        root: folder that relative image paths are relative to.
        transform: MONAI transform applied to each dict (e.g. :func:`load_image_transforms`); None returns the
            dicts as they are.
        cache: use ``CacheDataset`` (transformed items kept in memory).
        on_error: what to do with rows whose image fails :func:`check_images`: "raise" (a ValueError naming the
            rows and files) or "skip" (drop them, warn, and keep the report). With ``cache``, an image that fails
            when it is loaded into the cache with an :class:`UnusableImageError` (NaN or infinite values, a DICOM
            of the wrong dimensionality, a file that does not decode) is raised or skipped and reported the same
            way. Without ``cache`` such an image raises its ``UnusableImageError`` when it is loaded.
        check: run :func:`check_images` first (header level), with the expected image shape taken from
            ``transform`` (its :class:`CheckSpatialDimsd`, as in :func:`load_image_transforms`, or its decode-once
            cache's settings), so that a 2D image in a 3D manifest or a 4D volume is skipped or raised here.
        columns: metadata columns to include (default: all); ``image`` is always included.
        cache_dir: use ``PersistentDataset`` caching to this folder (ignored when ``cache`` is True). For a
            decode-once cache shared by runs and keyed by the preprocessing settings, replace
            :func:`load_image_transforms` in ``transform`` by :func:`monai_du.data.cache.cached_load_transforms`.
        cache_num_workers: workers of ``CacheDataset``'s initial caching.
        report_path: where to write the skip report as CSV (only written when rows were skipped).
        progress: progress bars for checking and caching.
        source: name of the manifest in error messages when ``df_or_path`` is a DataFrame (e.g. the file it was
            read from; bundles pass their ``manifest``).

    Returns:
        the dataset; its attribute ``report`` is the DataFrame of skipped rows (empty when none).

    Raises:
        ValueError: invalid manifest, unknown column, invalid ``on_error``, or (``on_error="raise"``) unreadable
            images, naming the manifest rows and files.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
    if isinstance(df_or_path, pd.DataFrame):
        source = "manifest DataFrame" if source is None else f"manifest {os.fspath(source)}"
        df = validate_manifest(df_or_path, source=source)
    else:
        df = read_manifest(df_or_path, root=root)
        source = str(df_or_path)
        root = None  # read_manifest resolved the paths into image_path
    df = df.copy()
    df[RESOLVED_IMAGE_COLUMN] = _resolved_paths(df, root, "image")
    if columns is not None:
        unknown = [c for c in columns if c not in df.columns]
        if unknown:
            raise ValueError(f"{source}: columns {unknown} not in the manifest; present: {list(df.columns)}")
        df = df[["image", RESOLVED_IMAGE_COLUMN] + [c for c in columns if c not in ("image", RESOLVED_IMAGE_COLUMN)]]

    report = pd.DataFrame(columns=list(CHECK_REPORT_COLUMNS))
    if check:
        # paths from image_path, names from image; shapes that the transform's pipeline cannot use are refused too
        df, report = _check_images(df, None, "image", "header", progress, _expectation_of(transform))
        if len(report):
            if on_error == "raise":
                raise ValueError(
                    f"{source}: {len(report)} image(s) missing, unreadable or unusable:{_format_report(report)}"
                )
            where = _write_report(report, report_path)
            warnings.warn(
                f"{source}: skipped {len(report)} of {len(report) + len(df)} rows with missing, unreadable or "
                f"unusable images{where}:{_format_report(report)}",
                stacklevel=2,
            )

    n_rows = len(report) + len(df)
    rows, images = list(df.index), [str(i) for i in df["image"]]
    df = df.assign(image=df[RESOLVED_IMAGE_COLUMN]).drop(columns=[RESOLVED_IMAGE_COLUMN])
    records = [{k: _python_value(v) for k, v in rec.items()} for rec in df.to_dict("records")]
    if cache:
        ds = _CheckedCacheDataset(records, transform=transform, num_workers=cache_num_workers, progress=progress)
        dropped = _drop_unusable(ds, rows, images, on_error, source)
        if len(dropped):
            report = pd.concat([report, dropped], ignore_index=True) if len(report) else dropped
            where = _write_report(report, report_path)
            warnings.warn(
                f"{source}: skipped {len(dropped)} of {n_rows} rows whose images cannot be used once loaded"
                f"{where}:{_format_report(dropped)}",
                stacklevel=2,
            )
    elif cache_dir is not None:
        ds = PersistentDataset(records, transform=transform, cache_dir=cache_dir)
    else:
        ds = Dataset(records, transform=transform)
    ds.report = report
    return ds


def _write_report(report: pd.DataFrame, report_path: str | os.PathLike | None) -> str:
    """Write the skip report (when a path is given); returns the words that say where, for the warning."""
    if report_path is None:
        return ""
    Path(report_path).parent.mkdir(parents=True, exist_ok=True)
    report.to_csv(report_path, index=False)
    return f"; report written to {report_path}"


def load_images(
    df: pd.DataFrame,
    modality: str = "2d",
    image_size: int | Sequence[int] = 32,
    root: str | os.PathLike | None = None,
    intensity: str | None = "minmax",
    size_mode: str = "resize",
) -> np.ndarray:
    """Load every manifest image with :func:`load_image_transforms`, resized, in row order, into one array.

    Args:
        df: manifest rows (``image``, resolved against ``root``, or the ``image_path`` column of ``read_manifest``).
        modality: "2d" / "cxr" or "3d" / "brain" (see ``load_image_transforms``).
        image_size: size of the resized images: a side (int) or one value per axis.
        root: folder of relative image paths.
        intensity: intensity scaling of ``load_image_transforms`` ("minmax", "percentile" or None).
        size_mode: how images reach ``image_size`` ("resize", "longest" or "pad_crop", as in
            ``load_image_transforms``).

    Returns:
        float32 array (N, 1, *spatial), scaled to [0, 1] per image (with "minmax" or "percentile").

    Raises:
        ValueError: images that are missing, unreadable or of another shape (from their headers), or that cannot be
            used once loaded (NaN or infinite values, a file that does not decode), naming every such row and file.
    """
    size = int(image_size) if isinstance(image_size, (int, np.integer)) else [int(s) for s in image_size]
    transform = load_image_transforms(
        keys="image", modality=modality, spatial_size=size, intensity=intensity, size_mode=size_mode
    )
    dataset = manifest_to_dataset(df, root=root, transform=transform, columns=[])
    images, failed = [], []
    for i, (row, image) in enumerate(zip(df.index, df["image"])):
        try:
            images.append(np.asarray(dataset[i]["image"], dtype=np.float32))
        except Exception as err:  # noqa: BLE001 - an unusable image is reported with the others; other errors raise
            unusable = _unusable_in(err)
            if unusable is None:
                raise
            failed.append((row, str(image), dataset.data[i]["image"], unusable))
    if failed:
        report = pd.DataFrame([(*f[:3], f[3].reason) for f in failed], columns=list(CHECK_REPORT_COLUMNS))
        raise ValueError(
            f"manifest DataFrame: {len(report)} image(s) cannot be used once loaded:{_format_report(report)}"
        ) from failed[0][3]
    return np.stack(images)
