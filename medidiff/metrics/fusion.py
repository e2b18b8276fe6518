"""No-reference image-fusion metrics: EN, SD, SF, MI, SSIM, Qabf, VIF.

Fusion has no ground truth, so the metrics score the fused image F alone (EN, SD, SF) or against both
sources A and B (MI, SSIM, Qabf, VIF).

Conventions (those of the medical/infrared fusion literature, in particular the evaluator of Zhao et al. used
for CDDFuse and DDFM, whose Harvard numbers medidiff compares with):

* Inputs are 2D grey images on the **8-bit scale [0, 255]** (float or integer). Images in [0, 1] must be
  multiplied by 255 first; values outside [0, 255] raise. Colour images are compared on their luminance.
* EN: Shannon entropy in **bits** of the 256-bin histogram of the image rounded to integers.
* SD: population standard deviation of the intensities (8-bit scale).
* SF: ``sqrt(mean(row differences²) + mean(column differences²))`` over neighbouring pixels.
* MI: ``MI(F, A) + MI(F, B)`` from 256 x 256 joint histograms of the rounded images, in **nats** by default
  (the evaluator behind the published DDFM numbers uses ``sklearn.metrics.mutual_info_score``, natural log);
  ``base=2`` gives bits, and then ``MI(X, X) = EN(X)``.
* SSIM: ``SSIM(F, A) + SSIM(F, B)``, scikit-image with ``data_range=255`` (7x7 uniform window).
* Qabf: Xydeas & Petrović (Electronics Letters 2000): Sobel edges, edge strength and orientation
  preservation through sigmoids with Γg = 0.9994, κg = -15, σg = 0.5, Γα = 0.9879, κα = -22,
  σα = 0.8, weights ``w = g^L`` with L = 1. With these constants its maximum (F keeps every edge exactly) is
  :data:`QABF_MAX` ≈ 0.9748, not 1. Where the two edge strengths are equal (flat included) the strength
  ratio is 1 (the reference MATLAB/Python code puts the strength itself there, a known quirk), and borders
  are mirrored rather than zero-padded (zero padding credits a flat fused image with the border "edges"); on
  images with black surroundings, like the Harvard set, neither choice changes the value.
* VIF: Sheikh & Bovik (IEEE TIP 2006) pixel-domain VIF on four scales (Gaussian windows 17, 9, 5, 3; noise
  variance σn² = 2), with the source as reference and F as the distorted image. ``vif_fusion`` **sums**
  ``VIF(A, F) + VIF(B, F)`` by default — the published DDFM/CDDFuse evaluator does so, so DDFM's Harvard
  VIF of 0.76 is a sum (≈ 0.38 per source); ``reduction="mean"`` halves it. VIF(X, X) = 1.

Sanity check on 20 Harvard pairs with plain averaging as the fusion: VIF sum 0.49 (CT-MRI) / 0.74 (PET-MRI),
i.e. ≈ 0.24-0.54 per source, so DDFM's 0.76 is plausible only as a sum; MI 2.5 / 2.7 nats (3.6 / 3.9 bits),
so DDFM's 1.99 reads as nats.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from scipy.signal import convolve2d, fftconvolve
from skimage.metrics import structural_similarity

__all__ = [
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

_TG, _KG, _DG = 0.9994, -15.0, 0.5  # edge-strength sigmoid (Xydeas & Petrović 2000)
_TA, _KA, _DA = 0.9879, -22.0, 0.8  # edge-orientation sigmoid
QABF_MAX = _TG / (1 + math.exp(_KG * (1 - _DG))) * _TA / (1 + math.exp(_KA * (1 - _DA)))
_SOBEL_X = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
_SOBEL_Y = _SOBEL_X.T


def _grey(img: np.ndarray, name: str = "image") -> np.ndarray:
    x = np.asarray(img, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name}: fusion metrics take 2D grey images, got shape {x.shape}")
    if x.size and (x.min() < -1e-6 or x.max() > 255 + 1e-6):
        raise ValueError(f"{name}: values must lie on the 8-bit scale [0, 255], got [{x.min()}, {x.max()}]")
    return x


def _grey_triplet(fused, a, b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    f, a, b = _grey(fused, "fused"), _grey(a, "source A"), _grey(b, "source B")
    if not f.shape == a.shape == b.shape:
        raise ValueError(f"shapes differ: fused {f.shape}, source A {a.shape}, source B {b.shape}")
    return f, a, b


def _levels(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), 0, 255).astype(np.int64).ravel()


def entropy(img: np.ndarray) -> float:
    """EN: Shannon entropy (bits) of the 256-bin grey-level histogram.

    Args:
        img: ``(H, W)`` on [0, 255].
    """
    p = np.bincount(_levels(_grey(img)), minlength=256) / img.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def standard_deviation(img: np.ndarray) -> float:
    """SD: standard deviation of the intensities (contrast).

    Args:
        img: ``(H, W)`` on [0, 255].
    """
    return float(np.std(_grey(img)))


def spatial_frequency(img: np.ndarray) -> float:
    """SF: root of the summed mean squared horizontal and vertical neighbour differences.

    Args:
        img: ``(H, W)`` on [0, 255].
    """
    x = _grey(img)
    return float(np.sqrt(np.mean(np.diff(x, axis=1) ** 2) + np.mean(np.diff(x, axis=0) ** 2)))


def mutual_information(x: np.ndarray, y: np.ndarray, *, base: float = math.e) -> float:
    """Histogram mutual information of two images (256 grey levels each).

    Args:
        x, y: ``(H, W)`` on [0, 255].
        base: logarithm base (e: nats, 2: bits).
    """
    x, y = _grey(x), _grey(y)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} and {y.shape}")
    joint = np.bincount(_levels(x) * 256 + _levels(y), minlength=256 * 256).reshape(256, 256) / x.size
    px, py = joint.sum(axis=1, keepdims=True), joint.sum(axis=0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (px @ py)[nz])).sum() / math.log(base))


def mi_fusion(fused: np.ndarray, a: np.ndarray, b: np.ndarray, *, base: float = math.e) -> float:
    """MI: ``MI(F, A) + MI(F, B)`` (nats by default).

    Args:
        fused, a, b: ``(H, W)`` on [0, 255].
        base: logarithm base.
    """
    f, a, b = _grey_triplet(fused, a, b)
    return mutual_information(f, a, base=base) + mutual_information(f, b, base=base)


def ssim_fusion(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """SSIM: ``SSIM(F, A) + SSIM(F, B)`` with ``data_range=255`` (maximum 2).

    Args:
        fused, a, b: ``(H, W)`` on [0, 255].
    """
    f, a, b = _grey_triplet(fused, a, b)
    return float(sum(structural_similarity(f, src, data_range=255.0) for src in (a, b)))


def _sobel(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edge strength and orientation in (-pi/2, pi/2] (polarity-free, as in the paper)."""
    # mirrored borders: the zero padding of the reference code invents edges along the image border
    sx = convolve2d(x, _SOBEL_X, mode="same", boundary="symm")
    sy = convolve2d(x, _SOBEL_Y, mode="same", boundary="symm")
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = np.where(sx == 0, math.pi / 2, np.arctan(sy / sx))
    return np.hypot(sx, sy), alpha


def _edge_preservation(g_src: np.ndarray, a_src: np.ndarray, g_f: np.ndarray, a_f: np.ndarray) -> np.ndarray:
    """Q^{XF}: per-pixel product of the strength and orientation preservation sigmoids."""
    with np.errstate(divide="ignore", invalid="ignore"):
        strength = np.where(g_src > g_f, g_f / g_src, np.where(g_src < g_f, g_src / g_f, 1.0))
    orientation = 1 - np.abs(a_src - a_f) / (math.pi / 2)
    q_g = _TG / (1 + np.exp(_KG * (strength - _DG)))
    q_a = _TA / (1 + np.exp(_KA * (orientation - _DA)))
    return q_g * q_a


def qabf(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Qabf (Q^{AB/F}): edge information of A and B preserved in F, in [0, QABF_MAX]; NaN if A, B are flat.

    Args:
        fused, a, b: ``(H, W)`` on [0, 255].
    """
    f, a, b = _grey_triplet(fused, a, b)
    (g_f, a_f), (g_a, a_a), (g_b, a_b) = _sobel(f), _sobel(a), _sobel(b)
    weight = float((g_a + g_b).sum())
    if weight == 0.0:
        return float("nan")
    kept = _edge_preservation(g_a, a_a, g_f, a_f) * g_a + _edge_preservation(g_b, a_b, g_f, a_f) * g_b
    return float(kept.sum() / weight)


def _gaussian_window(n: int) -> np.ndarray:
    """MATLAB ``fspecial('gaussian', n, n / 5)``."""
    r = np.arange(n) - (n - 1) / 2
    h = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * (n / 5) ** 2))
    return h / h.sum()


def vif(ref: np.ndarray, dist: np.ndarray, *, sigma_nsq: float = 2.0) -> float:
    """Pixel-domain visual information fidelity (Sheikh & Bovik 2006), four scales.

    The ratio of the information ``dist`` preserves about ``ref`` to the information in ``ref``; 1 when
    identical, lower with blur or noise, possibly above 1 with contrast enhancement. NaN for a flat ``ref``.

    Args:
        ref: reference ``(H, W)`` on [0, 255] (a source image, for fusion).
        dist: distorted ``(H, W)`` on [0, 255] (the fused image); H, W >= 17 for the finest window.
        sigma_nsq: variance of the visual noise, on the 8-bit scale.
    """
    ref, dist = _grey(ref, "reference"), _grey(dist, "distorted")
    if ref.shape != dist.shape:
        raise ValueError(f"shapes differ: {ref.shape} and {dist.shape}")
    eps, num, den = 1e-10, 0.0, 0.0
    for scale in range(4):
        win = _gaussian_window(2 ** (4 - scale) + 1)
        filt = lambda x, win=win: fftconvolve(x, win, mode="valid")  # noqa: E731 (the window is symmetric)
        if scale > 0:  # low-pass then decimate to the next scale
            ref, dist = filt(ref)[::2, ::2], filt(dist)[::2, ::2]
        mu1, mu2 = filt(ref), filt(dist)
        s1 = np.maximum(filt(ref * ref) - mu1**2, 0)
        s2 = np.maximum(filt(dist * dist) - mu2**2, 0)
        s12 = filt(ref * dist) - mu1 * mu2
        g = s12 / (s1 + eps)
        sv = s2 - g * s12
        # degenerate windows, handled as in the authors' code: no signal in ref / in dist / negative gain
        flat1, flat2 = s1 < eps, s2 < eps
        g[flat1], sv[flat1], s1[flat1] = 0, s2[flat1], 0
        g[flat2], sv[flat2] = 0, 0
        neg = g < 0
        sv[neg], g[neg] = s2[neg], 0
        sv = np.maximum(sv, eps)
        num += np.log10(1 + g * g * s1 / (sv + sigma_nsq)).sum()
        den += np.log10(1 + s1 / sigma_nsq).sum()
    return float(num / den) if den > 0 else float("nan")


def vif_fusion(
    fused: np.ndarray, a: np.ndarray, b: np.ndarray, *, reduction: Literal["sum", "mean"] = "sum"
) -> float:
    """VIF of the fused image against each source: ``VIF(A, F) + VIF(B, F)`` (or their mean).

    Args:
        fused, a, b: ``(H, W)`` on [0, 255].
        reduction: "sum" (the published DDFM/CDDFuse convention) or "mean".
    """
    f, a, b = _grey_triplet(fused, a, b)
    total = vif(a, f) + vif(b, f)
    return total if reduction == "sum" else total / 2


def fusion_metrics(fused: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """All seven metrics with the module's conventions, keyed ``en, sd, sf, mi, ssim, qabf, vif``.

    Args:
        fused, a, b: ``(H, W)`` on [0, 255].
    """
    f, a, b = _grey_triplet(fused, a, b)
    return {
        "en": entropy(f),
        "sd": standard_deviation(f),
        "sf": spatial_frequency(f),
        "mi": mi_fusion(f, a, b),
        "ssim": ssim_fusion(f, a, b),
        "qabf": qabf(f, a, b),
        "vif": vif_fusion(f, a, b),
    }
