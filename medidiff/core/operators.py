"""Forward operators of the inverse problems medidiff solves: k-space sampling and down-sampling.

Every operator works on ``(B, C, *spatial)`` tensors in 2D and 3D. ``dims`` selects the axes an
operator acts on, counted from the end (``dims=2``: the last two axes, i.e. in-plane for a 3D volume).
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

MaskPattern = Literal["random", "equispaced", "variable_density"]


def _axes(x: Tensor, dims: int | None) -> tuple[int, ...]:
    spatial = x.ndim - 2
    dims = spatial if dims is None else dims
    if not 1 <= dims <= spatial:
        raise ValueError(f"dims must be in [1, {spatial}] for a tensor of shape {tuple(x.shape)}, got {dims}")
    return tuple(range(x.ndim - dims, x.ndim))


def to_kspace(x: Tensor, dims: int | None = None) -> Tensor:
    """Centred, orthonormal FFT over the last ``dims`` axes (all spatial axes by default); complex output."""
    axes = _axes(x, dims)
    shifted = torch.fft.ifftshift(x, dim=axes)
    return torch.fft.fftshift(torch.fft.fftn(shifted, dim=axes, norm="ortho"), dim=axes)


def from_kspace(k: Tensor, dims: int | None = None, real: bool = True) -> Tensor:
    """Inverse of :func:`to_kspace`; returns the real part unless ``real=False``."""
    axes = _axes(k, dims)
    shifted = torch.fft.ifftshift(k, dim=axes)
    image = torch.fft.fftshift(torch.fft.ifftn(shifted, dim=axes, norm="ortho"), dim=axes)
    return image.real if real else image


def kspace_mask(
    shape: Sequence[int],
    acceleration: float,
    center_fraction: float = 0.08,
    pattern: MaskPattern = "random",
    generator: torch.Generator | None = None,
) -> Tensor:
    """A k-space sampling mask over the last axes of an image, centred like :func:`to_kspace`.

    Args:
        shape: the in-plane shape ``(H, W)`` (or ``(D, H, W)`` for variable density in 3D).
        acceleration: undersampling factor R; about ``1/R`` of k-space is kept.
        center_fraction: fraction of the central lines (or radius, for variable density) always kept.
        pattern: ``random`` or ``equispaced`` phase-encoding lines along the last axis, fully sampled along
            the others (fastMRI convention); ``variable_density``: points drawn with probability decaying
            with distance from the centre, over every axis.
        generator: makes the mask reproducible.

    Returns:
        float tensor of ``shape`` with values 0/1.
    """
    if acceleration < 1:
        raise ValueError(f"acceleration must be >= 1, got {acceleration}")
    if pattern == "variable_density":
        return _variable_density_mask(shape, acceleration, center_fraction, generator)
    lines = _line_mask(shape[-1], acceleration, center_fraction, pattern, generator)
    return lines.expand(*shape).clone()


def _line_mask(n: int, acceleration: float, center_fraction: float, pattern: str, generator) -> Tensor:
    freq = _centred_frequencies(n)
    num_center = max(1, round(n * center_fraction))
    mask = (freq.abs() <= num_center // 2).float()
    if pattern == "random":
        # probability chosen so that the expected total is n / acceleration
        prob = (n / acceleration - mask.sum().item()) / max(n - mask.sum().item(), 1)
        mask = torch.maximum(mask, _symmetric_bernoulli((n,), torch.full((n,), prob), generator))
    elif pattern == "equispaced":
        # spacing chosen so that centre plus lines total about n / acceleration (fastMRI's convention)
        kept = mask.sum().item()
        spacing = max(1, round((n - kept) / max(n / acceleration - kept, 1)))
        mask[freq.remainder(spacing) == 0] = 1
    else:
        raise ValueError(f"unknown k-space mask pattern {pattern!r}; choose random, equispaced or variable_density")
    return mask


def _variable_density_mask(shape, acceleration: float, center_fraction: float, generator) -> Tensor:
    grids = torch.meshgrid(*[_centred_frequencies(n) / (n / 2) for n in shape], indexing="ij")
    radius = torch.stack(grids).pow(2).sum(0).sqrt() / len(shape) ** 0.5
    density = (1 - radius).clamp(min=0) ** 4
    density = (density * (math.prod(shape) / acceleration) / density.sum()).clamp(max=1)
    mask = _symmetric_bernoulli(tuple(shape), density, generator)
    return torch.maximum(mask, (radius <= center_fraction).float())


def _centred_frequencies(n: int) -> Tensor:
    """Integer frequency of each index after ``fftshift``: DC sits at index ``n // 2``."""
    return torch.arange(n) - n // 2


def _symmetric_bernoulli(shape: tuple[int, ...], prob: Tensor, generator) -> Tensor:
    """0/1 draws that are symmetric under ``k -> -k``, each kept with probability ``prob``.

    A mask symmetric in k-space keeps the k-space of a real image Hermitian, so that a data-consistency
    projection of a real estimate stays real and matches the measurement exactly.
    """
    uniform = torch.rand(shape, generator=generator)
    mirrored = uniform
    for axis, n in enumerate(shape):
        mirrored = mirrored.index_select(axis, (2 * (n // 2) - torch.arange(n)) % n)
    # min of two uniforms is below p' with probability 1 - (1 - p')**2 = prob
    return (torch.minimum(uniform, mirrored) < 1 - (1 - prob.clamp(0, 1)).sqrt()).float()


def undersample(image: Tensor, mask: Tensor, dims: int | None = None) -> tuple[Tensor, Tensor]:
    """Simulate an undersampled acquisition.

    Args:
        image: ``(B, C, *spatial)``.
        mask: 0/1, broadcastable to the k-space of ``image`` over the last ``dims`` axes.

    Returns:
        ``(zero_filled_image, measured_kspace)``: the inverse FFT of the masked k-space (real part), and the
        masked k-space itself (complex).
    """
    measured = to_kspace(image, dims) * mask
    return from_kspace(measured, dims), measured


def downsample(x: Tensor, factors: Sequence[int]) -> Tensor:
    """Average-pool each spatial axis by its integer factor: a thick-slice or low-resolution acquisition.

    Axes whose size is not a multiple of their factor are first padded at the end by edge replication, so
    every low-resolution voxel averages exactly ``prod(factors)`` voxels.
    """
    factors = tuple(int(f) for f in factors)
    if len(factors) != x.ndim - 2:
        raise ValueError(f"need one factor per spatial axis of {tuple(x.shape)}, got {factors}")
    x = _pad_to_factors(x, factors)
    pool = F.avg_pool2d if x.ndim == 4 else F.avg_pool3d
    return pool(x, kernel_size=factors, stride=factors)


def upsample_nearest(x: Tensor, factors: Sequence[int], size: Sequence[int] | None = None) -> Tensor:
    """Replicate voxels by integer factors (the right inverse of :func:`downsample`), cropped to ``size``."""
    for axis, factor in enumerate(factors, start=2):
        x = x.repeat_interleave(int(factor), dim=axis)
    if size is not None:
        x = x[(slice(None), slice(None)) + tuple(slice(0, int(n)) for n in size)]
    return x


def _pad_to_factors(x: Tensor, factors: Sequence[int]) -> Tensor:
    pad: list[int] = []
    for size, factor in zip(reversed(x.shape[2:]), reversed(factors)):
        pad += [0, (-size) % factor]
    if not any(pad):
        return x
    mode = "replicate" if x.ndim in (4, 5) else "constant"
    return F.pad(x, pad, mode=mode)
