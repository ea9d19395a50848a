"""Manifests, builders, loading, the decode cache, patient-level splits, attribute-conditioned samplers and the
real NIH cohort."""

from __future__ import annotations

from monai_du.data import cache  # noqa: F401  (monai_du.data.cache in bundle configs)
from monai_du.data.adapters import adapter_names
from monai_du.data.bids import manifest_from_bids
from monai_du.data.dicom import manifest_from_dicom, parse_dicom_age, pseudonymize
from monai_du.data.loading import (
    CollapseColorChannelsd,
    InvertMonochrome1d,
    check_images,
    load_image_transforms,
    manifest_to_dataset,
)
from monai_du.data.manifest import (
    RESOLVED_IMAGE_COLUMN,
    ManifestBuildResult,
    find_phi_columns,
    normalize_sex,
    read_manifest,
    validate_manifest,
    write_manifest,
)
from monai_du.data.real_cohort import nih_cxr_dev_manifest
from monai_du.data.samplers import AttributeBatchSampler
from monai_du.data.splits import patient_split
from monai_du.data.tables import load_adapter, manifest_from_table
