"""Classical fusion baselines: average, max-abs and Laplacian-pyramid fusion.

All take two registered single-channel images ``(B, 1, *spatial)`` (2D or 3D, any intensity scale; the
fusion task uses ``[0, 1]``) and return the fused image of the same shape. They are the reference points
the diffusion fusion of :mod:`medidiff.lit.fusion` is measured against (``benchmarks/bench_fusion.py``).

- :func:`fuse_average`: the pixel mean; keeps both sources but halves the contrast where only one has it.
- :func:`fuse_max_abs`: per pixel the value of larger magnitude (for non-negative images: the maximum).
- :func:`fuse_laplacian`: Burt & Adelson's Laplacian pyramid (IEEE Trans. Commun. 1983) with the
  fusion rule of Burt & Kolczynski (ICCV 1993) in its simplest form: detail coefficients chosen by
  larger magnitude at every level, the coarsest (low-pass) level averaged.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from medidiff.errors import MedidiffError

__all__ = ["CLASSICAL_FUSION", "fuse_average", "fuse_max_abs", "fuse_laplacian", "laplacian_pyramid",
           "collapse_pyramid"]

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16  # Burt & Adelson's 5-tap generating kernel, a = 0.4


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"fusion needs two images of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim not in (4, 5):
        raise ValueError(f"expected (B, C, H, W) or (B, C, H, W, D), got shape {tuple(a.shape)}")


def fuse_average(a: Tensor, b: Tensor) -> Tensor:
    """``(a + b) / 2``.

    Args:
        a, b: ``(B, C, *spatial)``.
    """
    _check_pair(a, b)
    return (a + b) / 2


def fuse_max_abs(a: Tensor, b: Tensor) -> Tensor:
    """Per element, the value of larger magnitude (ties go to ``a``).

    Args:
        a, b: ``(B, C, *spatial)``.
    """
    _check_pair(a, b)
    return torch.where(b.abs() > a.abs(), b, a)


def _blur(x: Tensor) -> Tensor:
    """Separable binomial blur along every spatial axis, reflect-padded (needs size >= 3 per axis)."""
    spatial = x.ndim - 2
    kernel = _BINOMIAL.to(x)
    conv = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    channels = x.shape[1]
    for axis in range(spatial):
        shape = [1] * spatial
        shape[axis] = 5
        weight = kernel.view(1, 1, *shape).repeat(channels, 1, *([1] * spatial))
        pad = [0, 0] * spatial
        pad[2 * (spatial - 1 - axis)] = pad[2 * (spatial - 1 - axis) + 1] = 2
        x = conv(F.pad(x, pad, mode="reflect" if x.shape[2 + axis] > 2 else "replicate"), weight,
                 groups=channels)
    return x


def _expand(x: Tensor, size: tuple[int, ...]) -> Tensor:
    mode = "bilinear" if x.ndim == 4 else "trilinear"
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def laplacian_pyramid(x: Tensor, levels: int) -> list[Tensor]:
    """Laplacian pyramid: ``levels - 1`` band-pass images then the low-pass residual.

    Every band is ``G_i - expand(G_{i+1})``, so :func:`collapse_pyramid` reconstructs ``x`` exactly
    whatever the expand operator; levels stop early when an axis would drop below 4 voxels.

    Args:
        x: ``(B, C, *spatial)``.
        levels: number of pyramid levels including the low-pass one.
    """
    pyramid, current = [], x
    for _ in range(levels - 1):
        if min(current.shape[2:]) < 8:
            break
        reduced = F.avg_pool2d(_blur(current), 2, ceil_mode=True) if x.ndim == 4 else \
            F.avg_pool3d(_blur(current), 2, ceil_mode=True)
        pyramid.append(current - _expand(reduced, tuple(current.shape[2:])))
        current = reduced
    return pyramid + [current]


def collapse_pyramid(pyramid: list[Tensor]) -> Tensor:
    """Inverse of :func:`laplacian_pyramid`."""
    image = pyramid[-1]
    for band in reversed(pyramid[:-1]):
        image = band + _expand(image, tuple(band.shape[2:]))
    return image


def fuse_laplacian(a: Tensor, b: Tensor, levels: int = 4) -> Tensor:
    """Laplacian-pyramid fusion: band-pass coefficients by max-abs, the low-pass level averaged.

    Averaging the low-pass keeps the overall brightness of both sources; max-abs on the bands keeps the
    stronger local contrast (edges, texture) of either source at every scale.

    Args:
        a, b: ``(B, C, *spatial)``, at least 8 voxels along every spatial axis for one band level.
        levels: pyramid levels including the low-pass one (4 on 256² images: bands at 256, 128, 64).
    """
    _check_pair(a, b)
    pa, pb = laplacian_pyramid(a, levels), laplacian_pyramid(b, levels)
    bands = [torch.where(y.abs() > x.abs(), y, x) for x, y in zip(pa[:-1], pb[:-1])]
    return collapse_pyramid(bands + [(pa[-1] + pb[-1]) / 2])


CLASSICAL_FUSION: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "average": fuse_average,
    "max_abs": fuse_max_abs,
    "laplacian": fuse_laplacian,
}


class ClassicalFusion:
    """A classical method in the place of a trained system: ``predict(inputs) -> (1, B, 1, *spatial)`` of the
    sources ``source_a`` / ``source_b`` ``(B, 1, *spatial)`` in ``[0, 1]``; sampler settings are ignored."""

    iterative = False
    stochastic = False
    spatial_dims = None  # whole images or volumes, never slice by slice

    def __init__(self, method: str):
        if method not in CLASSICAL_FUSION:
            raise MedidiffError(f"unknown fusion method '{method}'; choose one of {', '.join(CLASSICAL_FUSION)}")
        self.method, self.fuser = method, CLASSICAL_FUSION[method]

    def predict(self, inputs: dict[str, Tensor], **sampling: object) -> Tensor:
        return self.fuser(inputs["source_a"], inputs["source_b"]).clamp(0, 1)[None]
