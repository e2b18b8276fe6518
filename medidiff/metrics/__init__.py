"""Pure metric functions (segmentation, image quality, fusion) and file-to-file evaluation."""

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
    "predictive_entropy",
    "segmentation_metrics",
    "staple",
]
