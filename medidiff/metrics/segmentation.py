"""Segmentation metrics, ensemble fusion and ensemble uncertainty.

Metrics take label maps ``(*spatial)`` of integers (2D or 3D) and delegate the arithmetic to MONAI
(:func:`monai.metrics.compute_dice`, :func:`monai.metrics.compute_hausdorff_distance`); what lives here is
the convention around them:

* **Both masks empty for a class** (the class is absent from reference and prediction): Dice and HD95 are
  ``NaN`` — nothing to score — and are skipped by the foreground mean (``nanmean``), as in nnU-Net.
* **Exactly one side empty** (a missed or hallucinated structure): Dice is 0 and HD95 is ``inf`` (the
  distance to an empty set). MONAI itself returns NaN here, which would silently drop the worst cases from a
  mean; we do not. The JSON written by :mod:`medidiff.metrics.evaluate` stores NaN and ``inf`` as ``null``;
  the Dice of the same case and class (NaN vs 0) tells the two apart, and the summary counts them apart.
* **Region** (e.g. the DRIVE field of view): voxels outside ``region`` are set to background in both masks
  before scoring, so nothing outside the region counts for either metric.
* HD95 is the symmetric 95th-percentile Hausdorff distance between mask surfaces, in the units of
  ``spacing`` (millimetres for scans), one value per spatial axis in array order.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

__all__ = [
    "dice",
    "hd95",
    "normalised_surface_dice",
    "segmentation_metrics",
    "fuse_mean_threshold",
    "fuse_majority_vote",
    "staple",
    "fuse_staple",
    "ensemble_variance",
    "predictive_entropy",
    "with_background",
]

Labels = Mapping[str, int] | Sequence[int]


def _label_dict(labels: Labels) -> dict[str, int]:
    return dict(labels) if isinstance(labels, Mapping) else {str(int(v)): int(v) for v in labels}


def _binary_pair(pred: np.ndarray, ref: np.ndarray, value: int, region: np.ndarray | None):
    """Both masks of one class as ``(1, 1, *spatial)`` tensors (MONAI's batch-first one-hot layout)."""
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    p, r = np.asarray(pred) == value, np.asarray(ref) == value
    if region is not None:
        if region.shape != ref.shape:
            raise ValueError(f"region shape {region.shape} differs from reference shape {ref.shape}")
        inside = np.asarray(region).astype(bool)
        p, r = p & inside, r & inside
    return torch.from_numpy(p)[None, None], torch.from_numpy(r)[None, None]


def dice(pred: np.ndarray, ref: np.ndarray, value: int = 1, *, region: np.ndarray | None = None) -> float:
    """Dice of one class; NaN when the class is absent from both masks.

    Args:
        pred, ref: label maps ``(*spatial)``.
        value: the label of the class.
        region: optional boolean mask ``(*spatial)``; only voxels inside it are scored.
    """
    p, r = _binary_pair(pred, ref, value, region)
    if not (p.any() or r.any()):
        return float("nan")
    return float(compute_dice(p.float(), r.float(), include_background=True, ignore_empty=False))


def hd95(
    pred: np.ndarray,
    ref: np.ndarray,
    value: int = 1,
    *,
    spacing: Sequence[float] | None = None,
    region: np.ndarray | None = None,
) -> float:
    """Symmetric 95th-percentile Hausdorff distance of one class, in the units of ``spacing``.

    NaN when the class is absent from both masks, ``inf`` when it is absent from exactly one.

    Args:
        pred, ref: label maps ``(*spatial)``.
        value: the label of the class.
        spacing: voxel size per spatial axis in array order (default 1 for every axis).
        region: optional boolean mask ``(*spatial)``; only voxels inside it are scored.
    """
    p, r = _binary_pair(pred, ref, value, region)
    if not (p.any() or r.any()):
        return float("nan")
    if not (p.any() and r.any()):
        return float("inf")
    spacing = [1.0] * (p.ndim - 2) if spacing is None else [float(s) for s in spacing]
    if len(spacing) != p.ndim - 2:
        raise ValueError(f"spacing {spacing} has {len(spacing)} values for {p.ndim - 2} spatial axes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's deprecation noise inside get_mask_edges
        hd = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=spacing)
    return float(hd)


def normalised_surface_dice(
    pred: np.ndarray,
    ref: np.ndarray,
    value: int = 1,
    *,
    tolerance: float = 1.0,
    spacing: Sequence[float] | None = None,
    region: np.ndarray | None = None,
) -> float:
    """Normalised surface Dice of one class (MONAI's ``compute_surface_dice``): the share of both boundaries within
    ``tolerance`` (units of ``spacing``) of the other. NaN when the class is absent from both, 0 from one."""
    p, r = _binary_pair(pred, ref, value, region)
    if not (p.any() or r.any()):
        return float("nan")
    if not (p.any() and r.any()):
        return 0.0
    spacing = [1.0] * (p.ndim - 2) if spacing is None else [float(s) for s in spacing]
    both = [with_background(m.float(), axis=1) for m in (p, r)]  # background + class, the one-hot MONAI expects
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = compute_surface_dice(both[0], both[1], [float(tolerance)], spacing=spacing)
    return float(value)


def segmentation_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    labels: Labels,
    *,
    spacing: Sequence[float] | None = None,
    region: np.ndarray | None = None,
    nsd_tolerance: float | None = None,
) -> dict[str, float]:
    """Per-class Dice and HD95 (and NSD at ``nsd_tolerance``, units of ``spacing``) plus their foreground means.

    Args:
        pred, ref: label maps ``(*spatial)``.
        labels: foreground classes, ``{name: value}`` or a list of values (named by their value).
            Background (0) is not scored unless listed.
        spacing: voxel size per spatial axis, see :func:`hd95`.
        region: optional boolean mask ``(*spatial)``.

    Returns:
        ``{"dice_<name>", "hd95_<name>" for each class, "dice_mean", "hd95_mean"}``; the means are nanmeans
        over classes (NaN only if every class is absent from both masks; ``inf`` if any HD95 is ``inf``).
    """
    out: dict[str, float] = {}
    for name, value in _label_dict(labels).items():
        out[f"dice_{name}"] = dice(pred, ref, value, region=region)
        out[f"hd95_{name}"] = hd95(pred, ref, value, spacing=spacing, region=region)
        if nsd_tolerance is not None:
            out[f"nsd_{name}"] = normalised_surface_dice(pred, ref, value, tolerance=nsd_tolerance,
                                                         spacing=spacing, region=region)
    for metric in ("dice", "hd95", "nsd"):
        if not any(k.startswith(f"{metric}_") for k in out):
            continue
        values = np.array([v for k, v in out.items() if k.startswith(f"{metric}_")], dtype=float)
        out[f"{metric}_mean"] = float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")
    return out


# --------------------------------------------------------------------------- ensemble fusion


def fuse_mean_threshold(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Average the members' probabilities, then decide.

    Args:
        probs: ``(N, K, *spatial)`` probabilities of N ensemble members. ``K == 1`` is a binary foreground
            probability (thresholded); ``K > 1`` are class probabilities (argmax of the mean, ``threshold``
            unused).
        threshold: foreground threshold for ``K == 1``.

    Returns:
        Label map ``(*spatial)`` int64.
    """
    mean = np.asarray(probs, dtype=np.float64).mean(axis=0)
    if mean.shape[0] == 1:
        return (mean[0] > threshold).astype(np.int64)
    return mean.argmax(axis=0).astype(np.int64)


def fuse_majority_vote(label_maps: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Per-voxel most frequent label; ties go to the lowest label (so to background first).

    Args:
        label_maps: ``(N, *spatial)`` non-negative integer label maps of N members.
        num_classes: number of labels (default ``max + 1``).

    Returns:
        Label map ``(*spatial)`` int64.
    """
    maps = np.asarray(label_maps).astype(np.int64)
    k = int(maps.max()) + 1 if num_classes is None else num_classes
    votes = np.stack([(maps == c).sum(axis=0) for c in range(k)])
    return votes.argmax(axis=0).astype(np.int64)  # argmax returns the first maximum: lowest label wins ties


def staple(
    binary_masks: np.ndarray, *, max_iterations: int = 1000
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SimpleITK's STAPLE (Warfield et al., IEEE TMI 2004) on binary raters.

    The EM algorithm estimates each rater's sensitivity and specificity jointly with the hidden true
    segmentation, so an unreliable rater is down-weighted everywhere, unlike a vote.

    Args:
        binary_masks: ``(N, *spatial)`` masks of N raters (non-zero = foreground), N >= 2.
        max_iterations: bound on EM iterations (it normally stops earlier on convergence).

    Returns:
        ``(probability (*spatial) float64, sensitivity (N,), specificity (N,))``.
    """
    masks = np.asarray(binary_masks)
    if masks.ndim < 2 or masks.shape[0] < 2:
        raise ValueError(f"STAPLE needs (N >= 2, *spatial) masks, got shape {masks.shape}")
    f = sitk.STAPLEImageFilter()
    f.SetForegroundValue(1.0)
    f.SetMaximumIterations(max_iterations)
    prob = f.Execute([sitk.GetImageFromArray((m != 0).astype(np.uint8)) for m in masks])
    probability = sitk.GetArrayFromImage(prob).astype(np.float64)
    return probability, np.array(f.GetSensitivity()), np.array(f.GetSpecificity())


def fuse_staple(label_maps: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """STAPLE fusion of label maps: binary STAPLE per class (background included), then argmax.

    For two classes (background/foreground) this is the usual STAPLE probability > 0.5 (ties at exactly 0.5
    go to background). A class on which every rater agrees everywhere is taken as is.

    Args:
        label_maps: ``(N, *spatial)`` non-negative integer label maps of N raters/members.
        num_classes: number of labels (default ``max + 1``).

    Returns:
        Label map ``(*spatial)`` int64.
    """
    maps = np.asarray(label_maps).astype(np.int64)
    k = int(maps.max()) + 1 if num_classes is None else num_classes
    probs = []
    for c in range(max(k, 2)):
        masks = maps == c
        if (masks == masks[0]).all():  # unanimous: STAPLE's estimates are degenerate, the answer is not
            probs.append(masks[0].astype(np.float64))
        else:
            probs.append(staple(masks)[0])
    return np.stack(probs).argmax(axis=0).astype(np.int64)


# --------------------------------------------------------------------------- uncertainty


def with_background(probs: np.ndarray | torch.Tensor, axis: int = 0) -> np.ndarray | torch.Tensor:
    """A binary foreground probability ``p`` (one channel along ``axis``) as two class probabilities ``[1 - p, p]``
    (background first) along ``axis``: a numpy array for an array, a tensor for a tensor.

    ``1 - p`` is computed in ``p``'s own dtype (float32 stays float32), so the result equals
    ``np.concatenate([1 - p, p], axis=axis)`` (``torch.cat`` for a tensor) bit for bit.
    """
    if isinstance(probs, torch.Tensor):
        return torch.cat([1 - probs, probs], dim=axis)
    p = np.asarray(probs)
    return np.concatenate([1 - p, p], axis=axis)


def _class_probs(probs: np.ndarray) -> np.ndarray:
    """``(N, K, *spatial)`` -> ``(N, K', *spatial)`` float64 with a background channel added when ``K == 1``."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim < 3:
        raise ValueError(f"expected ensemble probabilities (N, K, *spatial), got shape {p.shape}")
    return with_background(p, axis=1) if p.shape[1] == 1 else p


def ensemble_variance(probs: np.ndarray) -> np.ndarray:
    """Per-voxel variance of each class probability over the N members (population variance).

    Args:
        probs: ``(N, K, *spatial)``.

    Returns:
        ``(K, *spatial)`` float64.
    """
    return np.asarray(probs, dtype=np.float64).var(axis=0)


def predictive_entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy (nats) of the ensemble-mean class distribution, per voxel: ``-sum_k pbar_k ln pbar_k``.

    It is 0 where all members are certain of the same class and ``ln K`` at a uniform mean.

    Args:
        probs: ``(N, K, *spatial)``; ``K == 1`` is read as a foreground probability (background ``1 - p``).

    Returns:
        ``(*spatial)`` float64.
    """
    mean = _class_probs(probs).mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(mean > 0, mean * np.log(mean), 0.0)
    return -terms.sum(axis=0)
