"""Multi-view dictionary transforms, prior-vector assembly and augmentation recipes.

The data flow of a pretraining pipeline::

    LoadImaged -> EnsureChannelFirstd -> ScaleIntensityd -> Resized          # deterministic, cacheable
    -> AssemblePriord(encoder=PriorEncoder fitted on the training manifest)   # deterministic, cacheable
    -> MultiViewd(keys="image", transform=cxr_augmentations((64, 64)), num_views=2)  # random

``MultiViewd`` is :class:`~monai.transforms.Randomizable`, so :class:`monai.data.CacheDataset` caches everything
before it and re-runs it every epoch. Put ``AssemblePriord`` before it so that the prior is cached too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    EnsureType,
    MapTransform,
    RandAdjustContrast,
    RandAffine,
    RandBiasField,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    Randomizable,
    RandomizableTransform,
    RandScaleCrop,
    RandScaleIntensity,
    Resize,
)
from monai.utils import MAX_SEED

from monai_du.prior_encoder import PriorEncoder

__all__ = [
    "MultiViewd",
    "AssemblePriord",
    "RandCropRotate",
    "cxr_augmentations",
    "brain_augmentations",
]



# --------------------------------------------------------------------------------------------------------------------
# Multi-view transform
# --------------------------------------------------------------------------------------------------------------------


class MultiViewd(MapTransform, Randomizable):
    """Turn one image ``(C, *spatial)`` into ``V`` independently augmented views stacked as ``(V, C, *spatial)``.

    The per-view ``transform`` is an *array* transform (or a :class:`~monai.transforms.Compose` of array transforms,
    such as :func:`cxr_augmentations` or :func:`brain_augmentations`). It is called ``num_views`` times on the same
    input, and every call draws fresh random parameters, so the views differ. All views must come out with the same
    shape; end the recipe with a fixed-size crop or resize.

    Randomness follows MONAI's rules: :meth:`set_random_state` seeds this transform and, through it, the per-view
    transform, so a seeded pipeline is reproducible. :class:`monai.data.DataLoader` does this for you from the torch
    seed (``monai.utils.set_determinism``); outside a data loader call :meth:`set_random_state` yourself
    (``set_determinism`` alone does not reseed MONAI's random transforms).

    The views are returned as a plain ``torch.Tensor`` (no ``MetaTensor``): a stack of differently cropped and
    rotated views has no single affine, and none of the per-view operations is invertible as a whole. All keys not
    listed in ``keys`` are left untouched.

    Args:
        keys: keys of the images to expand into views. Each key is augmented independently of the others.
        transform: per-view array transform (callable on ``(C, *spatial)``). ``None`` repeats the input unchanged.
        num_views: number of views ``V`` (>= 1; the contrastive losses need >= 2).
        allow_missing_keys: do not raise if a key is absent.

    Example::

        views = MultiViewd(keys="image", transform=cxr_augmentations((64, 64)), num_views=2)
        views.set_random_state(seed=0)
        out = views({"image": torch.rand(1, 80, 80), "age": 63.0})
        out["image"].shape  # torch.Size([2, 1, 64, 64])
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        transform: Callable[[Any], Any] | None = None,
        num_views: int = 2,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if isinstance(num_views, bool) or not isinstance(num_views, (int, np.integer)) or num_views < 1:
            raise ValueError(f"MultiViewd: num_views must be an integer >= 1, got {num_views!r}.")
        if transform is not None and not callable(transform):
            raise ValueError(f"MultiViewd: transform must be callable or None, got {type(transform).__name__}.")
        self.transform = transform
        self.num_views = int(num_views)

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> MultiViewd:
        """Seed this transform and the per-view transform (which gets a seed drawn from this one's state)."""
        super().set_random_state(seed=seed, state=state)
        if isinstance(self.transform, Randomizable) or hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed=int(self.R.randint(MAX_SEED, dtype="uint32")))  # type: ignore
        return self

    def randomize(self, data: Any = None) -> None:
        """No-op: each view's randomness is drawn by the per-view transform when it is called."""

    def _one_view(self, image: Any) -> torch.Tensor:
        if hasattr(image, "as_tensor"):  # MetaTensor -> plain tensor: the views carry no metadata
            image = image.as_tensor()
        if self.transform is None:
            return torch.as_tensor(image)
        # MONAI's metadata tracking off inside the per-view transform: about 4x faster on 64 px CXR views
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            view = self.transform(image)
        finally:
            set_track_meta(tracking)
        return torch.as_tensor(view.as_tensor() if hasattr(view, "as_tensor") else view)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Args:
            data: dictionary whose ``keys`` hold ``(C, *spatial)`` arrays or tensors.

        Returns:
            a shallow copy of ``data`` in which each key holds a ``(V, C, *spatial')`` tensor.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if getattr(image, "ndim", 0) < 2:
                raise ValueError(
                    f"MultiViewd: key {key!r} must hold a channel-first array (C, *spatial), "
                    f"got shape {tuple(getattr(image, 'shape', ()))}."
                )
            views = [self._one_view(image) for _ in range(self.num_views)]
            shapes = {tuple(v.shape) for v in views}
            if len(shapes) != 1:
                raise ValueError(
                    f"MultiViewd: the views of key {key!r} have different shapes {sorted(shapes)}; "
                    "end the per-view transform with a fixed-size crop or resize."
                )
            d[key] = torch.stack(views, dim=0)
        return d


class AssemblePriord(MapTransform):
    """Read metadata keys from a data dictionary and write the prior vector as a float32 tensor ``(P,)``.

    Missing values and unknown categories become NaN (the kernels handle them). Deterministic, so it can sit before
    the random transforms and be cached.

    Args:
        keys: metadata keys to read. They must be the encoder's attribute names (any order); ``None`` means all of
            them. The vector order always follows the encoder (:attr:`PriorEncoder.columns`).
        encoder: a fitted :class:`PriorEncoder`, its :meth:`~PriorEncoder.to_dict` output, or the path to its JSON.
        prior_key: key under which the prior tensor is written.
        allow_missing_keys: encode an absent metadata key as NaN instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection | None = None,
        encoder: PriorEncoder | Mapping[str, Any] | str | os.PathLike | None = None,
        prior_key: str = "prior",
        allow_missing_keys: bool = False,
    ) -> None:
        if encoder is None:
            raise ValueError("AssemblePriord: give encoder= (a fitted PriorEncoder or the path to its JSON).")
        if isinstance(encoder, (str, os.PathLike)):
            encoder = PriorEncoder.load(encoder)
        elif isinstance(encoder, Mapping):
            encoder = PriorEncoder.from_dict(encoder)
        if not isinstance(encoder, PriorEncoder):
            raise ValueError(f"AssemblePriord: encoder must be a PriorEncoder, got {type(encoder).__name__}.")
        encoder._require_fitted()
        super().__init__(encoder.attributes if keys is None else keys, allow_missing_keys)
        unknown = [k for k in self.keys if k not in encoder.attributes]
        absent = [a for a in encoder.attributes if a not in self.keys]
        if unknown or absent:
            raise ValueError(
                f"AssemblePriord: keys must be the encoder's attributes {encoder.attributes}; "
                f"unknown key(s) {unknown}, missing attribute(s) {absent}."
            )
        self.encoder = encoder
        self.prior_key = prior_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        row = {k: d[k] for k in self.keys if k in d}
        try:
            prior = self.encoder.transform_row(row, allow_missing_keys=self.allow_missing_keys)  # type: ignore
        except ValueError as err:
            source = d.get("image") if isinstance(d.get("image"), (str, os.PathLike)) else None
            where = f" (image {str(source)!r})" if source is not None else ""
            raise ValueError(f"AssemblePriord: {err}{where}") from None
        d[self.prior_key] = torch.from_numpy(prior)
        return d


# --------------------------------------------------------------------------------------------------------------------
# Augmentation recipes (array transforms, applied per view inside MultiViewd)
# --------------------------------------------------------------------------------------------------------------------


def _check_size(spatial_size: Sequence[int], ndim: int, where: str) -> tuple[int, ...]:
    size = tuple(int(s) for s in spatial_size)
    if len(size) != ndim or any(s < 1 for s in size):
        raise ValueError(f"{where}: spatial_size must be {ndim} positive integers, got {tuple(spatial_size)}.")
    return size


def _check_range(value: Sequence[float], where: str, name: str) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"{where}: {name} must satisfy 0 < low <= high <= 1, got {tuple(value)}.")
    return lo, hi


class RandCropRotate(RandomizableTransform):
    """Random crop of a 2D image, resized to ``spatial_size`` and rotated, in one bilinear resampling.

    The views of ``RandScaleCrop -> Resize -> RandRotate``, in one ``grid_sample`` instead of two interpolations:
    the crop keeps an integer number of pixels in ``[ceil(lo n), ceil(hi n)]`` of each side ``n`` (drawn per side,
    ``crop_scale = (lo, hi)``) at a uniformly drawn integer position; with probability ``rotate_prob`` the resized
    crop is rotated by ``U(-rotate_degrees, rotate_degrees)`` about its centre, in the sense of
    :class:`monai.transforms.Rotate`, with zeros where the rotated window leaves the crop. At 64 px it costs about a
    third of the three transforms (``benchmarks/bench_pipeline.py``).

    Input ``(C, H, W)`` tensor or array; output a float32 tensor ``(C, *spatial_size)``.
    """

    backend = ["torch"]

    def __init__(
        self,
        spatial_size: Sequence[int],
        crop_scale: Sequence[float] = (0.85, 1.0),
        rotate_degrees: float = 10.0,
        rotate_prob: float = 0.5,
    ) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        self.spatial_size = _check_size(spatial_size, 2, "RandCropRotate")
        self.crop_scale = _check_range(crop_scale, "RandCropRotate", "crop_scale")
        self.rotate_radians = math.radians(float(rotate_degrees))
        self.rotate_prob = float(rotate_prob)
        self.box: tuple[int, int, int, int] | None = None  # (top, left, height, width) of the last crop
        self.angle = 0.0

    def randomize(self, in_size: Sequence[int]) -> None:
        """Draw the crop box inside an image of ``in_size`` ``(H, W)`` pixels, and the angle."""
        lo, hi = self.crop_scale
        sizes = [min(n, int(self.R.randint(math.ceil(lo * n), math.ceil(hi * n) + 1))) for n in in_size]
        starts = [int(self.R.randint(0, n - size + 1)) for n, size in zip(in_size, sizes)]
        self.box = (starts[0], starts[1], sizes[0], sizes[1])
        rotate = self.R.random_sample() < self.rotate_prob
        self.angle = float(self.R.uniform(-self.rotate_radians, self.rotate_radians)) if rotate else 0.0

    def theta(self) -> torch.Tensor:
        """The (2, 3) ``affine_grid`` matrix of the drawn angle: output (x, y) in [-1, 1] to crop (x, y) in [-1, 1]
        (the crop's size does not enter: ``[-1, 1]`` spans the whole crop)."""
        h_out, w_out = self.spatial_size
        cos, sin = math.cos(self.angle), -math.sin(self.angle)  # the sense of monai.transforms.Rotate
        # rotation in output pixels (x right, y down), then crop pixels per output pixel, in [-1, 1] units
        return torch.tensor([[cos, -sin * h_out / w_out, 0.0], [sin * w_out / h_out, cos, 0.0]], dtype=torch.float32)

    def __call__(self, img: Any, randomize: bool = True) -> torch.Tensor:
        x = torch.as_tensor(img, dtype=torch.float32)
        if x.ndim != 3:
            raise ValueError(f"RandCropRotate needs a (C, H, W) image, got shape {tuple(x.shape)}.")
        if randomize or self.box is None:
            self.randomize(x.shape[1:])
        top, left, height, width = self.box
        crop = x[None, :, top : top + height, left : left + width]
        if self.angle == 0.0:  # no rotation: a plain bilinear resize
            return F.interpolate(crop, size=self.spatial_size, mode="bilinear", align_corners=False)[0]
        grid = F.affine_grid(self.theta()[None], [1, x.shape[0], *self.spatial_size], align_corners=False)
        return F.grid_sample(crop, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def cxr_augmentations(
    spatial_size: Sequence[int] = (64, 64),
    crop_scale: Sequence[float] = (0.85, 1.0),
    rotate_degrees: float = 10.0,
    rotate_prob: float = 0.5,
    intensity_factor: float = 0.2,
    intensity_prob: float = 0.8,
    contrast_gamma: Sequence[float] = (0.7, 1.5),
    contrast_prob: float = 0.5,
    noise_std: float = 0.05,
    noise_prob: float = 0.5,
) -> Compose:
    """Per-view augmentations for 2D chest X-rays, on a ``(C, H, W)`` image scaled to about [0, 1].

    Random resized crop (each side ``crop_scale`` of the input, independently, resized to ``spatial_size``) and
    rotation within ``±rotate_degrees``, in one resampling (:class:`RandCropRotate`), then intensity scaling
    ``x * (1 + U(-f, f))``, gamma contrast, and Gaussian noise. The output is a float32 tensor ``(C, *spatial_size)``.

    Args:
        spatial_size: output ``(H, W)``.
        crop_scale: ``(low, high)`` fraction of each side kept by the random crop. The default keeps >= 85 %: at
            0.6 the crop often cut off the costophrenic angles, where effusion shows (linear-probe AUC 0.72 against
            0.82 on the phantom cohort at 8 epochs).
        rotate_degrees: maximum absolute in-plane rotation.
        rotate_prob, intensity_prob, contrast_prob, noise_prob: probability of each random transform.
        intensity_factor: range of the multiplicative intensity jitter.
        contrast_gamma: range of the gamma of the contrast adjustment.
        noise_std: maximum standard deviation of the additive Gaussian noise.

    Returns:
        a :class:`~monai.transforms.Compose` of array transforms, to pass to :class:`MultiViewd`.
    """
    where = "cxr_augmentations"
    size = _check_size(spatial_size, 2, where)
    lo, hi = _check_range(crop_scale, where, "crop_scale")
    return Compose(
        [
            RandCropRotate(size, crop_scale=(lo, hi), rotate_degrees=rotate_degrees, rotate_prob=rotate_prob),
            RandScaleIntensity(factors=intensity_factor, prob=intensity_prob),
            RandAdjustContrast(prob=contrast_prob, gamma=tuple(contrast_gamma)),
            RandGaussianNoise(prob=noise_prob, mean=0.0, std=noise_std),
            EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )


def brain_augmentations(
    spatial_size: Sequence[int] = (64, 64, 64),
    crop_scale: Sequence[float] = (0.8, 1.0),
    affine_prob: float = 0.5,
    rotate_degrees: float = 10.0,
    scale_range: float = 0.1,
    flip_prob: float = 0.5,
    flip_axes: Sequence[int] = (0,),
    blur_prob: float = 0.2,
    blur_sigma: Sequence[float] = (0.5, 1.0),
    noise_prob: float = 0.5,
    noise_std: float = 0.05,
    bias_field_prob: float = 0.3,
    bias_field_coeff: Sequence[float] = (0.0, 0.1),
) -> Compose:
    """Per-view augmentations for 3D brain MRI, on a ``(C, H, W, D)`` volume scaled to about [0, 1].

    Random crop (each side ``crop_scale`` of the input, then resized to ``spatial_size``), a small random affine
    (rotation within ``±rotate_degrees`` per axis, isotropic-range scaling ``±scale_range``, size kept), a flip along
    each of ``flip_axes`` with probability ``flip_prob``, a polynomial bias field, Gaussian blur and Gaussian noise.
    The output is a float32 tensor ``(C, *spatial_size)``.

    Args:
        spatial_size: output ``(H, W, D)``.
        crop_scale: ``(low, high)`` fraction of each side kept by the random crop.
        affine_prob, flip_prob, blur_prob, noise_prob, bias_field_prob: probability of each random transform.
        flip_axes: the axes a flip may reverse. Default: axis 0 only, left-right of a RAS volume (the bundles reorient
            to RAS): a brain is nearly symmetric left to right, while an upside-down or back-to-front head is not an
            image a scanner makes.
        rotate_degrees: maximum absolute rotation about each axis in the affine.
        scale_range: the affine scales each axis by ``1 + U(-scale_range, scale_range)``.
        blur_sigma: ``(low, high)`` range of the Gaussian blur sigma (voxels), per axis.
        noise_std: maximum standard deviation of the additive Gaussian noise.
        bias_field_coeff: coefficient range of the degree-3 bias field.

    Returns:
        a :class:`~monai.transforms.Compose` of array transforms, to pass to :class:`MultiViewd`.
    """
    where = "brain_augmentations"
    size = _check_size(spatial_size, 3, where)
    if any(isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < 3 for a in flip_axes):
        raise ValueError(f"{where}: flip_axes must hold spatial axes 0, 1 or 2, got {list(flip_axes)}.")
    lo, hi = _check_range(crop_scale, where, "crop_scale")
    angle = math.radians(rotate_degrees)
    sigma = tuple(float(s) for s in blur_sigma)
    return Compose(
        [
            RandScaleCrop(roi_scale=lo, max_roi_scale=hi, random_center=True, random_size=True),
            Resize(spatial_size=size, mode="trilinear", align_corners=False),
            RandAffine(
                prob=affine_prob,
                rotate_range=(angle, angle, angle),
                scale_range=(scale_range, scale_range, scale_range),
                padding_mode="zeros",
                mode="bilinear",
            ),
            *[RandFlip(prob=flip_prob, spatial_axis=int(axis)) for axis in flip_axes],
            RandBiasField(degree=3, coeff_range=tuple(bias_field_coeff), prob=bias_field_prob),
            RandGaussianSmooth(sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=blur_prob),
            RandGaussianNoise(prob=noise_prob, mean=0.0, std=noise_std),
            EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )
