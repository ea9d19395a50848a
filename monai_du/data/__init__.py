"""Manifests, builders, patient-level splits, attribute-conditioned samplers and demo cohorts."""

from __future__ import annotations

from monai_du.data.samplers import AttributeBatchSampler
