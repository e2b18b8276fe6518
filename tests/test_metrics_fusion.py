"""Fusion metrics on hand-built images with known values, plus symmetry and monotonicity."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

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


def _texture(seed: int, shape=(64, 64)) -> np.ndarray:
    """Smooth random structure on [20, 230] (8-bit scale), integer-valued like a PNG."""
    x = gaussian_filter(np.random.default_rng(seed).standard_normal(shape), 2.0)
    return np.round(20 + 210 * (x - x.min()) / (x.max() - x.min()))


def _noisy(img: np.ndarray, sigma: float, seed: int = 7) -> np.ndarray:
    return np.clip(img + sigma * np.random.default_rng(seed).standard_normal(img.shape), 0, 255)


@pytest.fixture
def sources():
    return _texture(0), _texture(1)


# --------------------------------------------------------------------------- EN, SD, SF


def test_entropy_known_values():
    two = np.zeros((8, 8))
    two[:, 4:] = 200  # two equally frequent levels
    assert entropy(two) == pytest.approx(1.0)
    assert entropy(np.full((8, 8), 77.0)) == 0.0
    assert entropy(np.arange(256.0).reshape(16, 16)) == pytest.approx(8.0)  # every level once


def test_standard_deviation_known_value():
    img = np.zeros((10, 10))
    img[:5] = 100
    assert standard_deviation(img) == pytest.approx(50.0)


def test_spatial_frequency_known_values():
    assert spatial_frequency(np.full((9, 9), 128.0)) == 0.0
    stripes = np.zeros((8, 8))
    stripes[:, ::2] = 30  # every horizontal neighbour differs by 30, no vertical change
    assert spatial_frequency(stripes) == pytest.approx(30.0)
    assert spatial_frequency(stripes.T) == pytest.approx(30.0)


# --------------------------------------------------------------------------- MI, SSIM


def test_mutual_information_of_an_image_with_itself_is_its_entropy(sources):
    a, b = sources
    assert mutual_information(a, a, base=2) == pytest.approx(entropy(a))
    assert mutual_information(a, a) == pytest.approx(entropy(a) * math.log(2))  # nats by default
    assert mutual_information(a, b) == pytest.approx(mutual_information(b, a))
    assert mutual_information(a, np.full_like(a, 5.0)) == pytest.approx(0.0, abs=1e-12)
    assert mi_fusion(a, a, a, base=2) == pytest.approx(2 * entropy(a))


def test_mutual_information_falls_with_noise(sources):
    a, _ = sources
    assert mutual_information(_noisy(a, 5), a) > mutual_information(_noisy(a, 40), a)


def test_ssim_sum_is_two_for_identical_images(sources):
    a, b = sources
    assert ssim_fusion(a, a, a) == pytest.approx(2.0)
    assert ssim_fusion(a, a, b) == pytest.approx(ssim_fusion(a, b, a))
    assert ssim_fusion(a, a, b) < 2.0


# --------------------------------------------------------------------------- Qabf


def test_qabf_maximum_when_fused_equals_both_sources(sources):
    a, _ = sources
    assert QABF_MAX == pytest.approx(0.9748, abs=1e-4)
    assert qabf(a, a, a) == pytest.approx(QABF_MAX)


def test_qabf_properties(sources):
    a, b = sources
    fused = (a + b) / 2
    assert qabf(fused, a, b) == pytest.approx(qabf(fused, b, a))  # symmetric in the sources
    assert 0 < qabf(fused, a, b) < QABF_MAX
    assert qabf(np.full_like(a, 100.0), a, b) < 0.01  # a flat fusion keeps no edges
    assert qabf(_noisy(fused, 5), a, b) > qabf(_noisy(fused, 40), a, b)
    assert math.isnan(qabf(a, np.zeros_like(a), np.zeros_like(a)))  # no source edges: undefined


# --------------------------------------------------------------------------- VIF


def test_vif_of_identical_images_is_one(sources):
    a, _ = sources
    assert vif(a, a) == pytest.approx(1.0, abs=1e-6)
    assert vif_fusion(a, a, a) == pytest.approx(2.0, abs=1e-6)
    assert vif_fusion(a, a, a, reduction="mean") == pytest.approx(1.0, abs=1e-6)


def test_vif_falls_with_noise_and_blur(sources):
    a, _ = sources
    assert 1.0 > vif(a, _noisy(a, 5)) > vif(a, _noisy(a, 20)) > vif(a, _noisy(a, 60)) > 0
    assert vif(a, gaussian_filter(a, 2.0)) < vif(a, gaussian_filter(a, 0.7)) < 1.0


def test_vif_fusion_sum_is_the_sum_over_sources(sources):
    a, b = sources
    fused = (a + b) / 2
    assert vif_fusion(fused, a, b) == pytest.approx(vif(a, fused) + vif(b, fused))
    assert vif_fusion(fused, a, b) == pytest.approx(vif_fusion(fused, b, a))


# --------------------------------------------------------------------------- inputs


def test_all_metrics_and_input_checks(sources):
    a, b = sources
    m = fusion_metrics((a + b) / 2, a, b)
    assert set(m) == {"en", "sd", "sf", "mi", "ssim", "qabf", "vif"}
    assert all(np.isfinite(v) for v in m.values())
    with pytest.raises(ValueError, match="8-bit"):
        entropy(a / 255 - 0.5)
    with pytest.raises(ValueError, match="2D"):
        entropy(np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="shapes differ"):
        qabf(a, b, b[:, :32])
