"""Pictures of what the network sees: the augmented views of a few training images, saved as PNG.

A 3D volume is shown by its three middle slices (axial, coronal, sagittal; one picture per plane), read in RAS
order (axis 0 left to right, axis 1 posterior to anterior, axis 2 inferior to superior, as the bundles' loading
reorients them) and drawn with superior or anterior at the top. A 2D image is drawn as it is (x across, y down).
Each picture has one row per image and one column per view, values in [0, 1] mapped to grey levels (clipped).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from monai_du.io import atomic_write

__all__ = ["PLANES", "view_grid", "save_view_pictures"]

#: The planes of a 3D volume's pictures, with the axis each one cuts across (RAS order).
PLANES: dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}


def _plane(volume: np.ndarray, axis: int) -> np.ndarray:
    """The middle slice of a (X, Y, Z) volume across ``axis``, as an image with superior / anterior at the top."""
    cut = np.take(volume, volume.shape[axis] // 2, axis=axis)
    return cut.T[::-1]


def view_grid(views: torch.Tensor | np.ndarray, plane: str | None = None, gap: int = 2) -> np.ndarray:
    """One uint8 picture of the views: rows are images, columns are views.

    Args:
        views: ``(B, V, C, *spatial)`` views of B images (the first channel is drawn); 2 or 3 spatial dims.
        plane: for 3D views, "axial", "coronal" or "sagittal"; None for 2D views.
        gap: pixels of black between the tiles.

    Returns:
        (H, W) uint8 array.
    """
    array = np.asarray(views.detach().float().cpu() if isinstance(views, torch.Tensor) else views, dtype=np.float32)
    if array.ndim not in (5, 6):
        raise ValueError(f"views must be (B, V, C, *spatial) with 2 or 3 spatial dims, got shape {array.shape}.")
    spatial_dims = array.ndim - 3
    if spatial_dims == 3 and plane not in PLANES:
        raise ValueError(f"plane must be one of {list(PLANES)} for 3D views, got {plane!r}.")
    if spatial_dims == 2 and plane is not None:
        raise ValueError(f"2D views have no plane; got plane={plane!r}.")
    tiles = [[_plane(v[0], PLANES[plane]) if spatial_dims == 3 else v[0].T for v in image] for image in array]
    h, w = tiles[0][0].shape
    grid = np.zeros((len(tiles) * (h + gap) - gap, len(tiles[0]) * (w + gap) - gap), dtype=np.float32)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            grid[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tile
    return (np.clip(grid, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_view_pictures(views: torch.Tensor | np.ndarray, folder: str | os.PathLike, max_images: int = 4,
                       scale: int = 4) -> list[Path]:
    """Save the views of the first ``max_images`` images: ``views_<plane>.png`` per plane (3D) or ``views.png`` (2D).

    Args:
        views: ``(B, V, C, *spatial)``.
        folder: where the pictures go (created).
        max_images: images (rows) per picture.
        scale: each voxel is drawn as ``scale x scale`` pixels (nearest neighbour).

    Returns:
        the written files.
    """
    views = views[:max_images]
    spatial_dims = len(views.shape) - 3
    planes = list(PLANES) if spatial_dims == 3 else [None]
    written = []
    for plane in planes:
        grid = view_grid(views, plane)
        picture = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
        path = Path(folder) / ("views.png" if plane is None else f"views_{plane}.png")
        with atomic_write(path) as tmp:
            picture.save(tmp, format="PNG")
        written.append(path)
    return written
