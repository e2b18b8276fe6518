"""Pure metric functions (segmentation, image quality, fusion) and file-to-file evaluation."""

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
    "dice",
    "ensemble_variance",
    "fuse_majority_vote",
    "fuse_mean_threshold",
    "fuse_staple",
    "hd95",
    "image_metrics",
    "nmse",
    "predictive_entropy",
    "psnr",
    "segmentation_metrics",
    "ssim",
    "staple",
]
