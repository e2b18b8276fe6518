"""Sliding-window diffusion: sample volumes larger than the network was trained on, in bounded memory.

The window split happens inside the *denoiser*, at every step: each step's x0 estimate is stitched from
overlapping windows with Gaussian weights (MONAI's ``sliding_window_inference``) and the sampler then
updates the whole volume at once. Because windows are re-cut from one consistent state at every step,
neighbouring windows agree where they overlap and no seam survives to the end.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference
from torch import Tensor


class SlidingWindowDenoiser:
    """Wrap ``denoiser(x, sigma, cond=None) -> x0_hat`` to run window by window.

    Args:
        denoiser: the full denoiser (e.g. :class:`medidiff.core.DiscreteDenoiser`).
        roi_size: window size, e.g. the training patch ``(64, 64, 32)``.
        overlap: fraction of overlap between windows.
        batch_size: windows evaluated per network call.
        mode: ``gaussian`` (smooth blending) or ``constant``.
    """

    def __init__(self, denoiser: Callable[..., Tensor], roi_size: Sequence[int], overlap: float = 0.25,
                 batch_size: int = 4, mode: str = "gaussian"):
        self.denoiser, self.roi_size, self.overlap = denoiser, tuple(int(r) for r in roi_size), overlap
        self.batch_size, self.mode = batch_size, mode

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        channels = x.shape[1]
        joined = x if cond is None else torch.cat([x, cond.to(x.dtype)], dim=1)

        def predict(window: Tensor) -> Tensor:
            # samplers give every batch element the same noise level, so one value serves all windows
            level = sigma[:1].expand(window.shape[0])
            window_cond = None if cond is None else window[:, channels:]
            return self.denoiser(window[:, :channels], level, cond=window_cond)

        return sliding_window_inference(joined, self.roi_size, self.batch_size, predict, overlap=self.overlap,
                                        mode=self.mode)
