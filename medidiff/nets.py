"""Networks: MONAI's ``DiffusionModelUNet``, conditioned by channel concatenation, sized for the task.

Every network here is called as ``net(x_t, t, cond=None)`` with ``x_t`` ``(B, C, *spatial)``, continuous
timesteps ``t`` ``(B,)`` and an optional condition ``(B, C_cond, *spatial)`` on the same grid; that is
the signature :class:`medidiff.core.DiscreteDenoiser` expects. Build them from YAML with
``class_path: medidiff.nets.ConditionalUNet``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.nets import DiffusionModelUNet, UNet
from torch import Tensor, nn


class ConditionalUNet(nn.Module):
    """A time-conditioned UNet whose condition is concatenated to its input channels.

    MONAI's ``DiffusionModelUNet`` always puts self-attention in its middle block, whatever
    ``attention_levels`` says. On whole images that block attends over every position of the
    coarsest feature map and ran out of 24 GB at 592x576 (see BASELINES.md); ``mid_attention=False``
    replaces it with the identity so memory grows linearly with the image, and sliding windows are not
    required for 2D images.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the diffused variable (1 for a binary mask or a grey image, K for K classes).
        cond_channels: channels of the condition (0 for an unconditional prior); ``null`` in a config is filled
            from the data card by ``medidiff fit``.
        out_channels: defaults to ``in_channels``.
        channels: feature channels per level.
        attention_levels: self-attention per level (keep False at fine levels on CPU).
        num_res_blocks: residual blocks per level.
        norm_num_groups: group-norm groups; must divide every entry of ``channels``.
        num_head_channels: channels per attention head.
        mid_attention: keep MONAI's middle self-attention block.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        cond_channels: int | None = 1,
        out_channels: int | None = None,
        channels: Sequence[int] = (32, 64, 64),
        attention_levels: Sequence[bool] | None = None,
        num_res_blocks: int = 1,
        norm_num_groups: int = 16,
        num_head_channels: int = 16,
        mid_attention: bool = False,
    ):
        super().__init__()
        self.config = {"spatial_dims": spatial_dims, "in_channels": in_channels, "cond_channels": cond_channels,
                       "out_channels": out_channels, "channels": list(channels),
                       "attention_levels": None if attention_levels is None else list(attention_levels),
                       "num_res_blocks": num_res_blocks, "norm_num_groups": norm_num_groups,
                       "num_head_channels": num_head_channels, "mid_attention": mid_attention}
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if cond_channels is None:
            raise ValueError("cond_channels is null: medidiff fit fills it from the data card; give a number here")
        self.spatial_dims, self.in_channels, self.cond_channels = spatial_dims, in_channels, cond_channels
        self.out_channels = out_channels or in_channels
        self.unet = DiffusionModelUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels + cond_channels,
            out_channels=self.out_channels,
            num_res_blocks=num_res_blocks,
            channels=tuple(channels),
            attention_levels=tuple(attention_levels or [False] * len(channels)),
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
        )
        if not mid_attention:
            self.unet.middle_block.attention = nn.Identity()

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if self.cond_channels:
            if cond is None or cond.shape[1] != self.cond_channels:
                got = None if cond is None else cond.shape[1]
                raise ValueError(f"network expects a condition with {self.cond_channels} channels, got {got}")
            x = torch.cat([x, cond.to(x.dtype)], dim=1)
        return self.unet(x, t)


class PlainUNet(nn.Module):
    """MONAI's ``UNet`` (residual units) for deterministic baselines, recording its arguments for checkpoints.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: classes (logits) or image channels (regression).
        channels, strides, num_res_units, dropout: as in ``monai.networks.nets.UNet`` (a dropout above 0 makes
            :class:`medidiff.lit.UNetSegmenter` draw its ensemble members with dropout on: MC dropout).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int | None = 1, out_channels: int = 2,
                 channels: Sequence[int] = (16, 32, 64, 128), strides: Sequence[int] = (2, 2, 2),
                 num_res_units: int = 2, dropout: float = 0.0):
        super().__init__()

        if in_channels is None:
            raise ValueError("in_channels is null: medidiff fit fills it from the data card; give a number here")
        self.config = {"spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": out_channels,
                       "channels": list(channels), "strides": list(strides), "num_res_units": num_res_units,
                       "dropout": float(dropout)}
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.unet = UNet(spatial_dims, in_channels, out_channels, tuple(channels), tuple(strides),
                         num_res_units=num_res_units, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.unet(x)
