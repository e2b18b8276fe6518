"""Seeded degradation simulation for restoration and super-resolution, on torchio.

A *spec* is an ordered mapping ``name -> options``; the degradations are applied in that order::

    {"blur": {"std": [0.5, 1.0]}, "downsample": {"factor": [1, 1, 4]}, "noise": {"std": [0.01, 0.03]}}

========== ================================================================================================
name       options (ranges ``[lo, hi]`` are drawn uniformly; torchio's argument meanings)
========== ================================================================================================
noise      Gaussian noise, :class:`torchio.RandomNoise` (``mean``, ``std``)
rician     Rician noise ``|x + n1 + i n2|``, ``n ~ N(0, std)`` (``std``: number or range) — MR magnitude
blur       Gaussian blur in mm, :class:`torchio.RandomBlur` (``std``)
motion     rigid motion artefact, :class:`torchio.RandomMotion` (``degrees``, ``translation``, ``num_transforms``)
ghosting   ghosting artefact, :class:`torchio.RandomGhosting` (``num_ghosts``, ``axes``, ``intensity``)
bias_field MR bias field, :class:`torchio.RandomBiasField` (``coefficients``, ``order``)
downsample low-resolution acquisition: ``factor`` (number: every spatial axis; list: per axis, e.g.
           ``[1, 1, 4]`` through-plane), ``interpolation`` (``linear``): Gaussian slice profile (FWHM = low-res
           voxel), :class:`torchio.Resample` to the coarse grid, then interpolated back onto the original grid
kspace     Cartesian k-space undersampling, zero-filled (:mod:`medidiff.core.operators`): ``acceleration``,
           ``center_fraction``, ``pattern`` (random | equispaced | variable_density), ``dims`` (trailing
           axes transformed; default all spatial axes)
========== ================================================================================================

The same ``(image, spec, seed)`` always gives the same result, whatever the global random state.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torchio as tio
from monai.data import MetaTensor

from medidiff.core.operators import downsample, kspace_mask, undersample
from medidiff.errors import MedidiffError

__all__ = ["degrade", "degrade_with_extras", "degrade_batch", "interpolate_back", "DEGRADATIONS"]


def degrade(image: torch.Tensor, spec: Mapping[str, Any], seed: int) -> torch.Tensor:
    """Degrade one image.

    Args:
        image: ``(C, *spatial)`` (2D or 3D), intensities ideally in [0, 1]; a ``MetaTensor``'s spacing
            makes blur and motion physical (mm).
        spec: ordered ``{name: options}``; see the module docstring.
        seed: the only source of randomness.

    Returns:
        the degraded image on the same grid, ``(C, *spatial)``, same type and metadata as ``image``.
    """
    return degrade_with_extras(image, spec, seed)[0]


def degrade_batch(images: torch.Tensor, spec: Mapping[str, Any], seeds: Sequence[int]) -> torch.Tensor:
    """:func:`degrade` over a batch ``(B, C, *spatial)`` with one seed per item."""
    if len(seeds) != images.shape[0]:
        raise ValueError(f"need one seed per batch item: {len(seeds)} seeds for {images.shape[0]} images")
    return torch.stack([degrade(image, spec, seed) for image, seed in zip(images, seeds)])


def degrade_with_extras(image: torch.Tensor, spec: Mapping[str, Any], seed: int) -> tuple[torch.Tensor, dict]:
    """:func:`degrade`, also returning what a data-consistency step needs.

    Returns:
        ``(degraded, extras)``; ``extras["kspace_mask"]`` ``(1, *spatial)`` for k-space undersampling and
        ``extras["low_res"]`` (the image before interpolation back, ``(C, *low_res_spatial)``) for down-sampling.
    """
    _check_spec(spec)
    spatial = image.ndim - 1
    if spatial not in (2, 3):
        raise ValueError(f"degrade needs (C, H, W) or (C, H, W, D), got shape {tuple(image.shape)}")
    x = torch.as_tensor(image).detach().float().cpu()
    x = x.as_tensor() if isinstance(x, MetaTensor) else x
    affine = _affine(image, spatial)
    extras: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        for name, options in spec.items():
            x = DEGRADATIONS[name](x, dict(options or {}), affine, generator, extras)
    if isinstance(image, MetaTensor):
        x = MetaTensor(x, meta=dict(image.meta), applied_operations=list(image.applied_operations))
    return x, extras


# --------------------------------------------------------------------------------- the degradations


def _torchio(transform_cls: type, defaults: Mapping[str, Any] | None = None) -> Callable:
    """Run a torchio random transform on ``(C, *spatial)``; 2D images become ``(C, H, W, 1)``."""

    def run(x: torch.Tensor, options: dict, affine: np.ndarray, generator, extras) -> torch.Tensor:
        kwargs = {**(defaults or {}), **{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}}
        out = transform_cls(**kwargs)(_as_tio(x, affine)).data
        return out[..., 0] if x.ndim == 3 else out

    return run


def _rician(x: torch.Tensor, options: dict, affine, generator: torch.Generator, extras) -> torch.Tensor:
    std = _draw(options.get("std", 0.05), generator)
    real = x + std * torch.randn(x.shape, generator=generator)
    imag = std * torch.randn(x.shape, generator=generator)
    return torch.sqrt(real**2 + imag**2)


def _downsample(x: torch.Tensor, options: dict, affine: np.ndarray, generator, extras) -> torch.Tensor:
    spatial = x.ndim - 1
    factor = options.get("factor", 2)
    factors = [float(factor)] * spatial if np.isscalar(factor) else [float(f) for f in factor]
    if len(factors) != spatial or min(factors) < 1:
        raise MedidiffError(f"degradation 'downsample': factor must be >= 1, one per spatial axis "
                            f"({spatial}), got {factor}")
    if options.get("model", "gaussian") == "average":
        return _downsample_average(x, factors, options, extras)
    image = _as_tio(x, affine)
    factors3 = np.array(factors + [1.0] * (3 - spatial))
    # Slice-profile model: the low-resolution voxel's point-spread function is a Gaussian whose FWHM is the
    # low-resolution voxel size (FWHM = 2.3548 sigma). torchio's own antialias needs >= 4 voxels per axis.
    sigmas = np.where(factors3 > 1, factors3 * np.array(image.spacing) / 2.3548, 0.0)
    low = tio.Resample(tuple(np.array(image.spacing) * factors3))(tio.Blur(tuple(sigmas))(image))
    interpolation = options.get("interpolation", "linear")
    back = tio.Resample((image.spatial_shape, image.affine), image_interpolation=interpolation)(low)
    extras["low_res"] = low.data[..., 0] if spatial == 2 else low.data
    return back.data[..., 0] if spatial == 2 else back.data


def _downsample_average(x: torch.Tensor, factors: list[float], options: dict, extras) -> torch.Tensor:
    """Box slice profile: each low-resolution voxel is the mean of the voxels it covers.

    This is exactly the forward model of :class:`medidiff.core.guidance.DownsampleConsistency`, so the
    super-resolution data-consistency step can hold ``downsample(estimate) == low_res`` exactly.
    """
    if any(f != int(f) for f in factors):
        raise MedidiffError(f"degradation 'downsample' with model 'average' needs integer factors, got {factors}")
    low = downsample(x[None], [int(f) for f in factors])
    extras["low_res"] = low[0]
    back = interpolate_back(low[0], factors, options.get("interpolation", "linear"))
    return back[(slice(None),) + tuple(slice(0, n) for n in x.shape[1:])]


def interpolate_back(low: torch.Tensor, factors: Sequence[float], interpolation: str = "linear") -> torch.Tensor:
    """A low-resolution image ``(C, *spatial)`` interpolated onto the grid ``factors`` times finer, as the
    ``downsample`` degradation (``model: average``) builds the condition in training; super-resolution
    inference builds its condition with this same function."""
    mode = {"linear": "bilinear" if low.ndim == 3 else "trilinear", "nearest": "nearest"}[interpolation]
    return torch.nn.functional.interpolate(low[None].float(), scale_factor=[float(f) for f in factors],
                                           mode=mode)[0]


def _kspace(x: torch.Tensor, options: dict, affine, generator: torch.Generator, extras) -> torch.Tensor:
    dims = options.get("dims") or (x.ndim - 1)
    mask = kspace_mask(tuple(x.shape[-dims:]), float(options.get("acceleration", 4)),
                       float(options.get("center_fraction", 0.08)), options.get("pattern", "random"),
                       generator=generator)
    zero_filled, _ = undersample(x[None], mask, dims)
    extras["kspace_mask"] = mask.expand(1, *x.shape[1:]).clone()
    return zero_filled[0]


DEGRADATIONS: dict[str, Callable] = {
    "noise": _torchio(tio.RandomNoise),
    "rician": _rician,
    "blur": _torchio(tio.RandomBlur),
    "motion": _torchio(tio.RandomMotion),
    "ghosting": _torchio(tio.RandomGhosting),
    "bias_field": _torchio(tio.RandomBiasField),
    "downsample": _downsample,
    "kspace": _kspace,
}


# ------------------------------------------------------------------------------------------ helpers


def _check_spec(spec: Mapping[str, Any]) -> None:
    if not isinstance(spec, Mapping):
        raise MedidiffError(f"degradation spec must be a mapping name -> options, got {type(spec).__name__}")
    for name, options in spec.items():
        if name not in DEGRADATIONS:
            hint = difflib.get_close_matches(str(name), list(DEGRADATIONS), n=1)
            raise MedidiffError(f"unknown degradation '{name}'" + (f"; did you mean '{hint[0]}'?" if hint else "")
                                + f" (known: {', '.join(DEGRADATIONS)})")
        if options is not None and not isinstance(options, Mapping):
            raise MedidiffError(f"degradation '{name}': options must be a mapping, got {options!r}")


def _affine(image: torch.Tensor, spatial: int) -> np.ndarray:
    """A diagonal affine with the image's voxel size, so torchio's mm-based options mean mm."""
    spacing = [1.0] * spatial
    if isinstance(image, MetaTensor) and image.affine is not None:
        a = np.asarray(image.affine, dtype=np.float64)
        spacing = list(np.sqrt((a[:spatial, :spatial] ** 2).sum(axis=0)))
    return np.diag([*spacing, *([1.0] * (3 - spatial)), 1.0])


def _as_tio(x: torch.Tensor, affine: np.ndarray) -> tio.ScalarImage:
    return tio.ScalarImage(tensor=x[..., None] if x.ndim == 3 else x, affine=affine)


def _draw(value: float | Sequence[float], generator: torch.Generator) -> float:
    if np.isscalar(value):
        return float(value)
    lo, hi = value
    return float(lo + (hi - lo) * torch.rand((), generator=generator))
