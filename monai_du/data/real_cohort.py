"""The real embedded cohorts shipped in the package.

- ``nih_cxr_dev``: 498 NIH ChestX-ray14 chest X-rays (64 px PNG, 140 patients): the CXR bundles' default data.
- ``ixi_t1_dev``: 136 real T1-weighted brain MRIs of IXI (Hammersmith Hospital), downsampled to 6 mm: the brain MRI
  bundles' default data (:func:`ixi_t1_dev_manifest`, built by :func:`build_ixi_t1_dev`).

NIH ChestX-ray14:

The images are real frontal radiographs from NIH ChestX-ray14, downsampled to 64 x 64 8-bit grayscale, half of them
``No Finding``. Their manifest (``nih_cxr_dev/manifest.csv``) holds only these 498 rows, built from NIH's
``Data_Entry_2017_v2020.csv`` with the package's own ``nih_cxr14`` adapter (:func:`build_nih_cxr_dev_manifest`):
patient, age, sex, view, ``follow_up`` (NIH's ``Follow-up #``) and the 15 labels.

Licence and attribution: the NIH Clinical Center released ChestX-ray14 for unrestricted use; cite Wang et al.,
"ChestX-ray8: Hospital-scale Chest X-ray Database and Benchmarks on Weakly-Supervised Classification and
Localization of Common Thorax Diseases", CVPR 2017, and acknowledge the NIH Clinical Center.

IXI: the IXI dataset (brain-development.org), released under CC BY-SA 3.0; the shipped volumes are a derived work
(block-averaged from 2 mm volumes of the NiChart project's public test data) under the same licence
(``ixi_t1_dev/LICENSE.md``).
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from monai_du.data.manifest import write_manifest
from monai_du.data.tables import manifest_from_table

__all__ = ["NIH_CXR_DEV_DIR", "IXI_T1_DEV_DIR", "nih_cxr_dev_manifest", "build_nih_cxr_dev_manifest",
           "ixi_t1_dev_manifest", "build_ixi_t1_dev"]

#: Folder of the embedded real cohort inside the installed package (``images/`` and ``manifest.csv``).
NIH_CXR_DEV_DIR: Path = Path(__file__).resolve().parent / "nih_cxr_dev"
#: Folder of the embedded real brain MRI cohort (``images/*.nii.gz``, ``manifest.csv``, ``README.md``, ``LICENSE.md``).
IXI_T1_DEV_DIR: Path = Path(__file__).resolve().parent / "ixi_t1_dev"


def _shipped_manifest(folder: Path, what: str) -> Path:
    """``folder/manifest.csv`` of a shipped cohort, or FileNotFoundError naming it when the package data is missing."""
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(
            f"the embedded {what} cohort is missing ({manifest}); reinstall monai_du with its package data."
        )
    return manifest


def nih_cxr_dev_manifest() -> Path:
    """Path of the embedded real cohort's ``manifest.csv``; its ``image`` paths are relative to its folder.

    Raises:
        FileNotFoundError: when the package was installed without its data files.
    """
    return _shipped_manifest(NIH_CXR_DEV_DIR, "NIH chest X-ray")


def build_nih_cxr_dev_manifest(
    nih_table: str | os.PathLike, image_dir: str | os.PathLike, out: str | os.PathLike
) -> Path:
    """Build the embedded cohort's manifest: the NIH table through the ``nih_cxr14`` adapter, kept to the images of
    ``image_dir`` (PNG files named by NIH's ``Image Index``).

    Args:
        nih_table: NIH's ``Data_Entry_2017(_v2020).csv(.gz)``.
        image_dir: folder of the PNGs.
        out: destination manifest; ``image`` paths are written relative to its folder.

    Returns:
        the path written.

    Raises:
        ValueError: when an image of ``image_dir`` has no row in the table (naming it).
    """
    images = sorted(p.name for p in Path(image_dir).glob("*.png"))
    if not images:
        raise ValueError(f"no PNG image in {image_dir}.")
    manifest, _ = manifest_from_table(nih_table, adapter="nih_cxr14")
    manifest = manifest[manifest["image"].isin(set(images))]
    missing = sorted(set(images) - set(manifest["image"]))
    if missing:
        raise ValueError(f"{len(missing)} image(s) of {image_dir} have no row in {nih_table}: {missing[:5]}")
    out = Path(out)
    relative = Path(os.path.relpath(Path(image_dir).resolve(), out.parent.resolve()))
    manifest = manifest.assign(image=[(relative / name).as_posix() for name in manifest["image"]])
    manifest = manifest.sort_values("image", kind="stable").reset_index(drop=True)
    return write_manifest(pd.DataFrame(manifest), out)


def ixi_t1_dev_manifest() -> Path:
    """Path of the embedded IXI T1 cohort's ``manifest.csv`` (``image``, ``patient_id``, ``age``, ``sex``,
    ``site``); its ``image`` paths are relative to its folder.

    Raises:
        FileNotFoundError: when the package was installed without its data files.
    """
    return _shipped_manifest(IXI_T1_DEV_DIR, "IXI brain MRI")


def _block_mean(image: nib.Nifti1Image, factor: int) -> nib.Nifti1Image:
    """``image`` averaged over blocks of ``factor``^3 voxels (trailing voxels that fill no block dropped), with the
    affine of the block centres: the same head in the same world coordinates at ``factor`` times the voxel size.
    Stored as uint8 scaled to the volume's maximum (255); the bundles rescale every volume by its own percentiles,
    so a linear rescale changes nothing they see."""
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {data.shape}.")
    shape = [s // factor for s in data.shape]
    blocks = data[: shape[0] * factor, : shape[1] * factor, : shape[2] * factor]
    mean = blocks.reshape(shape[0], factor, shape[1], factor, shape[2], factor).mean(axis=(1, 3, 5))
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ np.full(3, (factor - 1) / 2.0) + image.affine[:3, 3]
    affine[:3, :3] = image.affine[:3, :3] * factor
    top = float(mean.max())
    scaled = mean * (255.0 / top) if top > 0 else mean
    out = nib.Nifti1Image(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), affine)
    out.header.set_xyzt_units("mm")
    return out


def build_ixi_t1_dev(
    source_manifest: str | os.PathLike, image_dir: str | os.PathLike, out: str | os.PathLike, factor: int = 3
) -> Path:
    """Build the embedded IXI cohort: every subject of ``source_manifest`` with a known age and sex, its volume
    averaged over ``factor``^3 blocks (2 mm -> 6 mm by default), and a manifest of ``image``, ``patient_id``,
    ``age``, ``sex``, ``site``.

    Args:
        source_manifest: the 2 mm cohort's manifest (``image`` relative to ``image_dir``).
        image_dir: folder of its volumes.
        out: destination folder (``images/`` and ``manifest.csv`` are written; README and LICENSE stay).
        factor: block size in voxels.

    Returns:
        the manifest written.
    """
    table = pd.read_csv(source_manifest)
    table = table.dropna(subset=["age", "sex"]).sort_values("image", kind="stable")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for _, row in table.iterrows():
        name = str(row["image"])
        nib.save(_block_mean(nib.load(Path(image_dir) / name), factor), out / "images" / name)
        rows.append({"image": f"images/{name}", "patient_id": row["patient_id"], "age": round(float(row["age"]), 2),
                     "sex": row["sex"], "site": row["site"]})
    return write_manifest(pd.DataFrame(rows), out / "manifest.csv")


if __name__ == "__main__":
    # python -m monai_du.data.real_cohort NIH_TABLE IMAGE_DIR: rebuild the shipped CXR manifest
    # python -m monai_du.data.real_cohort ixi SOURCE_MANIFEST IMAGE_DIR: rebuild the shipped IXI cohort
    import sys

    if sys.argv[1] == "ixi":
        print(build_ixi_t1_dev(sys.argv[2], sys.argv[3], IXI_T1_DEV_DIR))
    else:
        print(build_nih_cxr_dev_manifest(sys.argv[1], sys.argv[2], NIH_CXR_DEV_DIR / "manifest.csv"))
