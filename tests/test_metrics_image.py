"""Image-quality metrics: closed forms, agreement with scikit-image in 2D and 3D, masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from medidiff.metrics.image import image_metrics, nmse, psnr, ssim


@pytest.fixture(params=[(24, 24), (12, 12, 12)], ids=["2d", "3d"])
def pair(request):
    rng = np.random.default_rng(0)
    ref = rng.random(request.param)
    return ref + 0.05 * rng.standard_normal(request.param), ref


def test_psnr_closed_form():
    ref = np.zeros((8, 8))
    pred = ref + 0.1  # MSE = 0.01
    assert psnr(pred, ref, data_range=1.0) == pytest.approx(20.0)
    assert psnr(pred, ref, data_range=10.0) == pytest.approx(40.0)
    assert psnr(ref, ref, data_range=1.0) == math.inf


def test_nmse_closed_form():
    ref = np.full((4, 4, 4), 2.0)
    assert nmse(ref * 1.1, ref) == pytest.approx(0.01)
    assert nmse(ref, ref) == 0.0
    assert nmse(np.zeros((2, 2)), np.zeros((2, 2))) == 0.0


def test_psnr_and_ssim_agree_with_skimage(pair):
    pred, ref = pair
    expected_psnr = peak_signal_noise_ratio(ref, pred, data_range=1.0)
    assert psnr(pred, ref, data_range=1.0) == pytest.approx(expected_psnr)
    assert ssim(pred, ref, data_range=1.0) == pytest.approx(structural_similarity(ref, pred, data_range=1.0))
    assert ssim(ref, ref, data_range=1.0) == pytest.approx(1.0)


def test_ssim_depends_on_the_data_range_given(pair):
    pred, ref = pair
    # a larger declared range makes the same error look smaller
    assert ssim(pred, ref, data_range=10.0) > ssim(pred, ref, data_range=1.0)


def test_metrics_get_worse_with_more_noise(pair):
    _, ref = pair
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(ref.shape)
    small, large = (image_metrics(ref + s * noise, ref, data_range=1.0) for s in (0.02, 0.2))
    assert small["psnr"] > large["psnr"] and small["ssim"] > large["ssim"] and small["nmse"] < large["nmse"]


def test_mask_scores_only_inside():
    ref = np.zeros((16, 16))
    ref[:, :8] = 1.0
    pred = ref.copy()
    pred[:, 8:] += 0.5  # all error lies outside the mask
    mask = np.zeros_like(ref, bool)
    mask[:, :4] = True
    assert psnr(pred, ref, data_range=1.0, mask=mask) == math.inf
    assert nmse(pred, ref, mask=mask) == 0.0
    assert ssim(pred, ref, data_range=1.0, mask=mask) == pytest.approx(1.0)
    assert ssim(pred, ref, data_range=1.0) < 1.0


def test_unknown_metric_and_shape_mismatch_raise():
    with pytest.raises(ValueError, match="unknown"):
        image_metrics(np.zeros((8, 8)), np.zeros((8, 8)), data_range=1.0, metrics=("lpips",))
    with pytest.raises(ValueError, match="shape"):
        psnr(np.zeros((8, 8)), np.zeros((8, 9)), data_range=1.0)
