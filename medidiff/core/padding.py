"""Spatial padding for networks that take sizes of some multiple, and hooks that act on the unpadded region or on
one ensemble member at a time. Dimension-agnostic: ``(B, C, *spatial)`` in 2D and 3D."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medidiff.core.guidance import Hook


def spatial_padding(spatial: Sequence[int], multiple: int) -> list[int]:
    """``F.pad`` amounts (last axis first, before/after) that bring each size up to a multiple of ``multiple``."""
    pad: list[int] = []
    for size in reversed(spatial):
        extra = (-size) % multiple
        pad += [extra // 2, extra - extra // 2]
    return pad


def pad_to_multiple(x: Tensor, multiple: int) -> tuple[Tensor, list[int]]:
    """Replicate-pad the spatial axes of ``(B, C, *spatial)`` up to multiples of ``multiple``."""
    pad = spatial_padding(x.shape[2:], multiple)
    if not any(pad):
        return x, pad
    return F.pad(x, pad, mode="replicate"), pad


def stride_multiple(net: nn.Module) -> int:
    """Spatial sizes a plain network (``config["strides"]``, e.g. MONAI ``UNet``) takes are multiples of this."""
    return math.prod(getattr(net, "config", {}).get("strides", [1]))


def level_multiple(net: nn.Module) -> int:
    """Spatial sizes a UNet of ``config["channels"]`` levels takes are multiples of this (2 ** down-samplings)."""
    levels = len(getattr(net, "config", {}).get("channels", (0,)))
    return 2 ** max(levels - 1, 0)


def crop(x: Tensor, pad: list[int]) -> Tensor:
    """Undo :func:`pad_to_multiple`."""
    return x[(slice(None), slice(None)) + _inner_slices(x, pad)] if any(pad) else x


def per_member_hook(hook: Hook | None, members: int) -> Hook | None:
    """Apply a hook built for one ensemble member ``(B, ...)`` to each member of ``(N*B, ...)`` in turn."""
    if hook is None or members == 1:
        return hook

    def wrapped(x0_hat: Tensor, sigma: Tensor, x: Tensor) -> Tensor:
        parts = zip(x0_hat.chunk(members), sigma.chunk(members), x.chunk(members))
        return torch.cat([hook(*part) for part in parts])

    return wrapped


def unpadded_hook(hook: Hook | None, pad: list[int]) -> Hook | None:
    """Run ``hook`` on the unpadded region only, so measurements keep the input's own shape."""
    if hook is None or not any(pad):
        return hook

    def wrapped(x0_hat: Tensor, sigma: Tensor, x: Tensor) -> Tensor:
        inner = crop(x0_hat, pad)
        fixed = hook(inner.contiguous(), sigma, crop(x, pad).contiguous())
        out = x0_hat.clone()
        out[(slice(None), slice(None)) + _inner_slices(x0_hat, pad)] = fixed
        return out

    return wrapped


def _inner_slices(x: Tensor, pad: list[int]) -> tuple[slice, ...]:
    spatial = x.ndim - 2
    return tuple(slice(pad[2 * (spatial - 1 - a)], x.shape[a + 2] - pad[2 * (spatial - 1 - a) + 1])
                 for a in range(spatial))

