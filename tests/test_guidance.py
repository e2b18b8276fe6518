"""Hooks and operators are exact on synthetic cases, in 2D and 3D."""

import pytest
import torch

from medidiff.core.guidance import (
    ClassifierFreeGuidance,
    DownsampleConsistency,
    GradientStep,
    KSpaceConsistency,
    clamp_hook,
    compose_hooks,
    drop_condition,
)
from medidiff.core.operators import (
    downsample,
    from_kspace,
    kspace_mask,
    to_kspace,
    undersample,
    upsample_nearest,
)

SHAPES = {"2d": (2, 1, 32, 24), "3d": (2, 1, 8, 16, 12)}
PATTERNS = ["random", "equispaced", "variable_density"]


def _image(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("dims", SHAPES)
def test_fft_round_trip_is_exact(dims):
    x = _image(SHAPES[dims])
    assert torch.allclose(from_kspace(to_kspace(x)), x, atol=1e-12)
    assert torch.allclose(from_kspace(to_kspace(x, dims=2), dims=2), x, atol=1e-12)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("acceleration", [4, 8])
def test_masks_keep_about_one_over_r_and_the_centre(pattern, acceleration):
    mask = kspace_mask((128, 96), acceleration, 0.08, pattern, torch.Generator().manual_seed(0))
    assert mask.shape == (128, 96) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask[64, 48] == 1
    assert abs(mask.mean().item() * acceleration - 1) < 0.45


@pytest.mark.parametrize("pattern", PATTERNS)
def test_undersampled_real_image_stays_real(pattern):
    """Masks are symmetric in k-space, so zero filling a real image gives a real image."""
    x = _image(SHAPES["2d"])
    mask = kspace_mask(x.shape[-2:], 4, 0.08, pattern, torch.Generator().manual_seed(1))
    k = to_kspace(x) * mask
    assert from_kspace(k, real=False).imag.abs().max() < 1e-10


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_hard_kspace_projection_matches_the_measurement_exactly(dims, pattern):
    truth, estimate = _image(SHAPES[dims], 0), _image(SHAPES[dims], 1)
    mask = kspace_mask(truth.shape[-2:], 4, 0.08, pattern, torch.Generator().manual_seed(2))
    _, measured = undersample(truth, mask, dims=2)
    projected = KSpaceConsistency(measured, mask, dims=2)(estimate, torch.ones(2), estimate)
    k = to_kspace(projected, dims=2)
    assert torch.allclose(k * mask, measured, atol=1e-10)
    # unsampled k-space is the estimate's own
    assert torch.allclose(k * (1 - mask), to_kspace(estimate, dims=2) * (1 - mask), atol=1e-10)


def test_soft_kspace_consistency_moves_part_of_the_way():
    truth, estimate = _image(SHAPES["2d"], 0), _image(SHAPES["2d"], 1)
    mask = kspace_mask(truth.shape[-2:], 4, pattern="equispaced")
    _, measured = undersample(truth, mask)
    soft = KSpaceConsistency(measured, mask, weight=0.25)(estimate, torch.ones(2), estimate)
    gap_before = (to_kspace(estimate) * mask - measured).abs()
    gap_after = (to_kspace(soft) * mask - measured).abs()
    assert torch.allclose(gap_after, 0.75 * gap_before, atol=1e-10)
    with pytest.raises(ValueError, match="weight"):
        KSpaceConsistency(measured, mask, weight=0.0)


@pytest.mark.parametrize("factors", [(2, 2), (4, 1), (1, 1, 4), (2, 2, 2)])
def test_downsample_consistency_makes_the_estimate_agree_with_the_low_resolution_input(factors):
    shape = (2, 1, 16, 24) if len(factors) == 2 else (2, 1, 8, 16, 12)
    truth, estimate = _image(shape, 0), _image(shape, 1)
    lowres = downsample(truth, factors)
    projected = DownsampleConsistency(lowres, factors)(estimate, torch.ones(2), estimate)
    assert torch.allclose(downsample(projected, factors), lowres, atol=1e-12)
    # the detail the down-sampling cannot see (its null space) is the estimate's own
    detail = lambda x: x - upsample_nearest(downsample(x, factors), factors)  # noqa: E731
    assert torch.allclose(detail(projected), detail(estimate), atol=1e-12)
    assert not torch.allclose(projected, truth)


def test_gradient_step_reduces_the_data_misfit():
    truth, estimate = _image(SHAPES["3d"], 0), _image(SHAPES["3d"], 1)
    operator = lambda x: downsample(x, (1, 2, 2))  # noqa: E731
    hook = GradientStep(operator, operator(truth), step_size=0.5)
    stepped = hook(estimate, torch.ones(2), estimate)
    misfit = lambda x: (operator(x) - operator(truth)).flatten(1).norm(dim=1)  # noqa: E731
    assert (misfit(stepped) < misfit(estimate)).all()
    inactive = GradientStep(operator, operator(truth), 0.5, min_sigma=2.0)(estimate, torch.ones(2), estimate)
    assert torch.equal(inactive, estimate)


def test_compose_and_clamp():
    x = torch.linspace(-3, 3, 12).reshape(1, 1, 3, 4)
    double = lambda x0, s, x: 2 * x0  # noqa: E731
    hook = compose_hooks(None, double, clamp_hook(-1, 1))
    assert hook(x, torch.ones(1), x).abs().max() == 1
    assert compose_hooks(None, None) is None


def test_classifier_free_guidance_combines_both_halves_in_one_call():
    calls = []

    def denoiser(x, sigma, cond):
        calls.append(x.shape[0])
        return x + cond

    x, cond, sigma = torch.ones(2, 1, 4, 4), torch.full((2, 1, 4, 4), 3.0), torch.ones(2)
    guided = ClassifierFreeGuidance(denoiser, scale=2.5)(x, sigma, cond=cond)
    # unconditional = x, conditional = x + 3  ->  x + 2.5 * 3
    assert torch.allclose(guided, x + 7.5) and calls == [4]
    assert torch.allclose(ClassifierFreeGuidance(denoiser, 1.0)(x, sigma, cond=cond), x + 3) and calls[-1] == 2


def test_drop_condition_zeroes_whole_samples():
    cond = torch.ones(1000, 1, 2, 2)
    dropped = drop_condition(cond, 0.3, torch.Generator().manual_seed(0))
    per_sample = dropped.flatten(1).mean(1)
    assert set(per_sample.unique().tolist()) == {0.0, 1.0}
    assert abs((per_sample == 0).float().mean().item() - 0.3) < 0.05
    assert drop_condition(cond, 0.0) is cond


def test_downsample_consistency_on_sizes_that_are_not_multiples_of_the_factor():
    """Edge-replicated padding makes the projection exact on the image's own voxels too (box model)."""
    truth, estimate = _image((1, 1, 10, 9, 7), 0), _image((1, 1, 10, 9, 7), 1)
    factors = (1, 2, 4)
    lowres = downsample(truth, factors)
    assert lowres.shape == (1, 1, 10, 5, 2)
    projected = DownsampleConsistency(lowres, factors)(estimate, torch.ones(1), estimate)
    assert projected.shape == estimate.shape
    # every low-resolution voxel made only of real voxels is matched exactly
    assert torch.allclose(downsample(projected, factors)[..., :4, :1], lowres[..., :4, :1], atol=1e-12)
