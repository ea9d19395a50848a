"""monai_du: decoupled uniformity and kernel priors for contrastive pretraining, as a MONAI plugin.

Importing this package makes its components resolvable by short name in MONAI bundle configs: MONAI's
``ComponentLocator`` scans every loaded module whose name starts with ``monai``, ``monai_du.*`` included.
"""

from __future__ import annotations

from monai_du.distributed import gather_no_grad, gather_with_grad, is_distributed
from monai_du.kernels import (
    CategoricalKernel,
    CosineKernel,
    PriorKernel,
    ProductKernel,
    RBFKernel,
    ScaledKernel,
    SumKernel,
    kernel_from_dict,
    kernel_summary,
    nystrom_features,
    patient_time_kernel,
)
from monai_du.losses import (
    DecoupledUniformityLoss,
    InfoNCELoss,
    YAwareInfoNCELoss,
    alignment,
    conditional_mean_centroids,
    uniformity,
    view_centroids,
)

from monai_du.networks import ContrastiveEncoder, ProbeClassifier, ProjectionHead, build_encoder, encoder_state_dict
from monai_du.prior_encoder import PriorEncoder
from monai_du.transforms import AssemblePriord, MultiViewd, brain_augmentations, cxr_augmentations
from monai_du import bundles, data, encoders, engines, evaluation, handlers, prior_autoencoder, priors  # noqa: E402  (loads their components for bundle configs)

__version__ = "0.2.0"
