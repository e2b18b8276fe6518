"""Pure metric functions (segmentation, image quality, fusion) and file-to-file evaluation.

Each submodule's docstring states its conventions (empty masks, data range, 8-bit fusion scale, VIF sum).
"""

from medidiff.metrics.fusion import (
    QABF_MAX,
    entropy,
    fusion_metrics,
    mi_fusion,
    mutual_information,
    qabf,
    spatial_frequency,
    ssim_fusion,
    standard_deviation,
    vif,
    vif_fusion,
)
from medidiff.metrics.image import image_metrics, nmse, psnr, ssim
from medidiff.metrics.segmentation import (
    dice,
    ensemble_variance,
    fuse_majority_vote,
    fuse_mean_threshold,
    fuse_staple,
    hd95,
    predictive_entropy,
    segmentation_metrics,
    staple,
)

__all__ = [
    # segmentation
    "dice",
    "hd95",
    "segmentation_metrics",
    "fuse_mean_threshold",
    "fuse_majority_vote",
    "fuse_staple",
    "staple",
    "ensemble_variance",
    "predictive_entropy",
    # image quality
    "psnr",
    "ssim",
    "nmse",
    "image_metrics",
    # fusion
    "QABF_MAX",
    "entropy",
    "standard_deviation",
    "spatial_frequency",
    "mutual_information",
    "mi_fusion",
    "ssim_fusion",
    "qabf",
    "vif",
    "vif_fusion",
    "fusion_metrics",
]
