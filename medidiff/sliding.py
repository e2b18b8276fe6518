"""Sliding-window diffusion: sample volumes larger than the network was trained on, in bounded memory.

The window split happens inside the *denoiser*, at every step: each step's x0 estimate is stitched from
overlapping windows with Gaussian weights (MONAI's ``sliding_window_inference``) and the sampler then
updates the whole volume at once.

A network is least accurate near its input's borders, so windows can leave seams on the planes where they meet
(``benchmarks/bench_sliding_window.py`` measures them; see benchmarks/RESULTS.md). The window weights are
MONAI's Gaussian *without* its floor of 1e-3: with the floor, voxels far from every window centre took equal
parts of all windows, edge errors included, and neighbour differences on window borders were 1.9-3.3x those
elsewhere; without it they match a whole-volume sample's. The opt-in ``shift`` moves the grid by a seeded
random offset at every step, so border errors fall on different planes from step to step.

Memory: on Linux with glibc, freed volume-sized tensors can leave holes in the heap that the process keeps; with
``MALLOC_MMAP_THRESHOLD_=1048576`` in the environment they go back to the system and the peak follows the live
tensors (1.19x from 64³ to 192³ against 1.27-1.41x, benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from torch import Tensor

from medidiff.core.padding import crop, pad_to_multiple, stride_multiple


class SlidingWindowDenoiser:
    """Wrap ``denoiser(x, sigma, cond=None) -> x0_hat`` to run window by window.

    Args:
        denoiser: the full denoiser (e.g. :class:`medidiff.core.DiscreteDenoiser`).
        roi_size: window size, e.g. the training patch ``(64, 64, 32)``.
        overlap: fraction of overlap between windows.
        batch_size: windows evaluated per network call.
        mode: ``gaussian`` (smooth blending) or ``constant``.
        sigma_scale: Gaussian width as a fraction of the window (MONAI's default, 0.125).
        shift: move the window grid by a random offset (less than one window stride) at every call.
        seed: seed of those offsets.
    """

    def __init__(self, denoiser: Callable[..., Tensor], roi_size: Sequence[int], overlap: float = 0.25,
                 batch_size: int = 4, mode: str = "gaussian", sigma_scale: float = 0.125, shift: bool = False,
                 seed: int = 0):
        self.denoiser, self.roi_size, self.overlap = denoiser, tuple(int(r) for r in roi_size), overlap
        self.sigma_scale = sigma_scale
        self.batch_size, self.mode, self.shift = batch_size, mode, shift
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        # MONAI windows the condition beside the input: no volume-sized concatenation of the two per step
        extra = {} if cond is None else {"condition": cond.to(x.dtype)}
        offsets = self._offsets(x.shape[2:])
        if any(offsets):
            pad = [amount for offset in reversed(offsets) for amount in (offset, 0)]
            x = F.pad(x, pad, mode="replicate")
            extra = {key: F.pad(value, pad, mode="replicate") for key, value in extra.items()}

        def predict(window: Tensor, condition: Tensor | None = None) -> Tensor:
            # samplers give every batch element the same noise level, so one value serves all windows
            level = sigma[:1].expand(window.shape[0])
            return self.denoiser(window, level, cond=condition)

        stitched = window_inference(x, self.roi_size, self.batch_size, predict, overlap=self.overlap,
                                    mode=self.mode, sigma_scale=self.sigma_scale, **extra)
        return stitched[(slice(None), slice(None)) + tuple(slice(o, None) for o in offsets)]

    def _offsets(self, spatial: Sequence[int]) -> list[int]:
        """Per-axis shift of the window grid; none on axes that fit in one window."""
        if not self.shift:
            return [0] * len(spatial)
        strides = [max(int(r * (1 - self.overlap)), 1) if s > r else 1 for s, r in zip(spatial, self.roi_size)]
        return [int(torch.randint(0, stride, (1,), generator=self.generator)) for stride in strides]


def window_inference(inputs: Tensor, roi_size: Sequence[int], batch_size: int, predictor: Callable[..., Tensor],
                     *, overlap: float = 0.25, mode: str = "gaussian", sigma_scale: float = 0.125,
                     **kwargs: Tensor) -> Tensor:
    """MONAI's ``sliding_window_inference`` as every medidiff model windows: windows no larger than the volume
    (:func:`fitted_roi`) and, for ``mode="gaussian"``, the floorless weights of :func:`window_weights`.
    ``kwargs`` are windowed beside the input (MONAI's ``condition=``)."""
    roi = fitted_roi(roi_size, inputs.shape[2:])
    return sliding_window_inference(inputs, roi, batch_size, predictor, overlap=overlap, mode=mode,
                                    roi_weight_map=window_weights(roi, mode, sigma_scale, inputs.device), **kwargs)


def window_weights(roi_size: Sequence[int], mode: str, sigma_scale: float = 0.125,
                   device: torch.device | None = None) -> Tensor | None:
    """Weights to pass MONAI for ``mode``: :func:`gaussian_window_weights`, or None (MONAI's own) otherwise."""
    return gaussian_window_weights(roi_size, sigma_scale, device) if mode == "gaussian" else None


def fitted_roi(roi_size: Sequence[int], spatial: Sequence[int]) -> tuple[int, ...]:
    """The window shrunk to the volume on axes where the volume is smaller. MONAI would pad those axes with
    zeros, i.e. mid-grey in ``[-1, 1]`` space, next to the volume's edge: on a 24-slice MNI slab under a 32-slice
    window that made the edge slabs' error 2-4x the others'. A fully convolutional network takes the smaller
    window as it is (sizes stay multiples of the network's, as the volume's are)."""
    return tuple(min(int(r), int(s)) for r, s in zip(roi_size, spatial))


def gaussian_window_weights(roi_size: Sequence[int], sigma_scale: float = 0.125,
                            device: torch.device | None = None) -> Tensor:
    """Gaussian window weights ``(1, 1, *roi_size)`` (MONAI's sigma) *without* MONAI's floor of 1e-3: with the
    floor, voxels far from every window centre got equal weight from all windows, edge errors included.
    Pass as ``roi_weight_map`` to ``monai.inferers.sliding_window_inference``."""
    profiles = [torch.exp(-0.5 * ((torch.arange(r, device=device) - (r - 1) / 2) / (sigma_scale * r)) ** 2)
                for r in roi_size]
    weights = profiles[0]
    for profile in profiles[1:]:
        weights = weights[..., None] * profile
    return weights[None, None]


def network_logits(net: torch.nn.Module, image: Tensor, roi: Sequence[int] | None) -> Tensor:
    """``net(image)`` over the whole image, or with sliding windows of ``roi`` (no larger than the image)."""
    # sizes the network's strides must divide, for the whole image as for each window
    padded, pad = pad_to_multiple(image, stride_multiple(net))
    logits = net(padded) if not roi else window_inference(padded, roi, 8, net, mode="constant")
    return crop(logits, pad)
