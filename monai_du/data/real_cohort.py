"""The real embedded cohort: 498 NIH ChestX-ray14 chest X-rays (64 px PNG, 140 patients) shipped in the package.

The images are real frontal radiographs from NIH ChestX-ray14, downsampled to 64 x 64 8-bit grayscale, half of them
``No Finding``. Their manifest (``nih_cxr_dev/manifest.csv``) holds only these 498 rows, built from NIH's
``Data_Entry_2017_v2020.csv`` with the package's own ``nih_cxr14`` adapter (:func:`build_nih_cxr_dev_manifest`):
patient, age, sex, view, ``follow_up`` (NIH's ``Follow-up #``) and the 15 labels.

Licence and attribution: the NIH Clinical Center released ChestX-ray14 for unrestricted use; cite Wang et al.,
"ChestX-ray8: Hospital-scale Chest X-ray Database and Benchmarks on Weakly-Supervised Classification and
Localization of Common Thorax Diseases", CVPR 2017, and acknowledge the NIH Clinical Center.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from monai_du.data.manifest import write_manifest
from monai_du.data.tables import manifest_from_table

__all__ = ["NIH_CXR_DEV_DIR", "nih_cxr_dev_manifest", "build_nih_cxr_dev_manifest"]

#: Folder of the embedded real cohort inside the installed package (``images/`` and ``manifest.csv``).
NIH_CXR_DEV_DIR: Path = Path(__file__).resolve().parent / "nih_cxr_dev"


def nih_cxr_dev_manifest() -> Path:
    """Path of the embedded real cohort's ``manifest.csv``; its ``image`` paths are relative to its folder.

    Raises:
        FileNotFoundError: when the package was installed without its data files.
    """
    manifest = NIH_CXR_DEV_DIR / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(
            f"the embedded NIH chest X-ray cohort is missing ({manifest}); reinstall monai_du with its package data."
        )
    return manifest


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


if __name__ == "__main__":  # python -m monai_du.data.real_cohort NIH_TABLE IMAGE_DIR: rebuild the shipped manifest
    import sys

    print(build_nih_cxr_dev_manifest(sys.argv[1], sys.argv[2], NIH_CXR_DEV_DIR / "manifest.csv"))
