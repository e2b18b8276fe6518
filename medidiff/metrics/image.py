"""Full-reference image quality: PSNR, SSIM (scikit-image), NMSE and MAE, for 2D and 3D, with an optional mask.

Conventions:

* ``data_range`` is always explicit (max - min of the intensity scale the card declares, e.g. 1.0 for images
  normalised to [0, 1], 255 for 8-bit). scikit-image would otherwise guess it from the dtype, and for float
  images that guess (2.0, for [-1, 1]) silently changes SSIM.
* SSIM uses scikit-image's defaults otherwise: a 7-voxel uniform window in every spatial axis (2D or 3D),
  K1 = 0.01, K2 = 0.03. Every spatial axis must be at least 7 long.
* NMSE = ||x - ref||² / ||ref||² (fastMRI's definition); it needs no data range.
* MAE = mean |x - ref| in the images' own units (HU for CT: the figure synthetic-CT work reports).
* ``mask`` (boolean, same shape): PSNR and NMSE use only voxels inside it; SSIM averages the full SSIM map
  over voxels inside it (the windows still see their neighbours outside, which keeps the map defined).
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

__all__ = ["psnr", "ssim", "nmse", "mae", "image_metrics"]


def _check(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if mask is not None and np.shape(mask) != ref.shape:
        raise ValueError(f"mask shape {np.shape(mask)} differs from reference shape {ref.shape}")
    return pred, ref


def _masked(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Both images as float64, checked, and reduced to the voxels inside ``mask`` when one is given."""
    pred, ref = _check(pred, ref, mask)
    if mask is None:
        return pred, ref
    inside = np.asarray(mask, bool)
    return pred[inside], ref[inside]


def psnr(pred: np.ndarray, ref: np.ndarray, *, data_range: float, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range² / MSE)``; ``inf`` when identical.

    Args:
        pred, ref: images ``(*spatial)`` (any number of axes).
        data_range: intensity range of the scale (max - min).
        mask: optional boolean ``(*spatial)``.
    """
    pred, ref = _masked(pred, ref, mask)
    if np.array_equal(pred, ref):
        return float("inf")  # skimage would divide by zero and warn
    return float(peak_signal_noise_ratio(ref, pred, data_range=data_range))


def ssim(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    data_range: float,
    mask: np.ndarray | None = None,
    channel_axis: int | None = None,
) -> float:
    """Mean structural similarity (Wang et al., IEEE TIP 2004) through scikit-image, 2D or 3D.

    Args:
        pred, ref: images ``(*spatial)``, or with a channel axis given by ``channel_axis``.
        data_range: intensity range of the scale (max - min).
        mask: optional boolean mask of the spatial shape (without the channel axis).
        channel_axis: axis holding channels, if any (SSIM is averaged over channels).
    """
    pred, ref = _check(pred, ref, None)
    if mask is None:
        return float(structural_similarity(ref, pred, data_range=data_range, channel_axis=channel_axis))
    _, smap = structural_similarity(ref, pred, data_range=data_range, channel_axis=channel_axis, full=True)
    if channel_axis is not None:
        smap = np.moveaxis(smap, channel_axis, 0).mean(axis=0)
    mask = np.asarray(mask, bool)
    if mask.shape != smap.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the spatial shape {smap.shape}")
    return float(smap[mask].mean())


def nmse(pred: np.ndarray, ref: np.ndarray, *, mask: np.ndarray | None = None) -> float:
    """Normalised mean squared error ``||pred - ref||² / ||ref||²`` (0 is perfect; ``inf`` if ref is 0).

    Args:
        pred, ref: images ``(*spatial)``.
        mask: optional boolean ``(*spatial)``.
    """
    pred, ref = _masked(pred, ref, mask)
    err, norm = float(np.sum((pred - ref) ** 2)), float(np.sum(ref**2))
    if norm == 0.0:
        return 0.0 if err == 0.0 else float("inf")
    return err / norm


def mae(pred: np.ndarray, ref: np.ndarray, *, mask: np.ndarray | None = None) -> float:
    """Mean absolute error ``mean |pred - ref|``, in the images' units.

    Args:
        pred, ref: images ``(*spatial)``.
        mask: optional boolean ``(*spatial)``.
    """
    pred, ref = _masked(pred, ref, mask)
    return float(np.abs(pred - ref).mean())


def image_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    data_range: float,
    metrics: tuple[str, ...] = ("psnr", "ssim", "nmse"),
    mask: np.ndarray | None = None,
) -> dict[str, float]:
    """Several of :func:`psnr`, :func:`ssim`, :func:`nmse`, :func:`mae` at once, keyed by name.

    Args:
        pred, ref: images ``(*spatial)``.
        data_range: intensity range of the scale (max - min).
        metrics: names to compute, in order.
        mask: optional boolean ``(*spatial)``.
    """
    table = {
        "psnr": lambda: psnr(pred, ref, data_range=data_range, mask=mask),
        "ssim": lambda: ssim(pred, ref, data_range=data_range, mask=mask),
        "nmse": lambda: nmse(pred, ref, mask=mask),
        "mae": lambda: mae(pred, ref, mask=mask),
    }
    unknown = [m for m in metrics if m not in table]
    if unknown:
        raise ValueError(f"unknown image metric(s) {unknown}; choose from {sorted(table)}")
    return {m: table[m]() for m in metrics}
