"""File-level restoration and super-resolution: degraded scans in, restored scans out, on their own grid.

Image tasks work on the input's native voxel grid (only the card's intensity normalisation is applied, and
undone on the way out), so the output lines up with the input voxel for voxel. Super-resolution writes a
finer grid: the same field of view and direction, the voxel size divided by the model's factors.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from medidiff import io
from medidiff.data.cards import load_card
from medidiff.errors import MedidiffError
from medidiff.inference import SamplingOptions, pending_cases, provenance, write_provenance


def normalise(image: torch.Tensor, spec: dict) -> tuple[torch.Tensor, tuple[float, float]]:
    """Card normalisation to [0, 1]; returns the ``(low, high)`` intensities that map to 0 and 1."""
    if spec["method"] == "window":
        low, high = float(spec["low"]), float(spec["high"])
    else:
        low, high = (float(v) for v in np.percentile(image.numpy(), [spec["lower"], spec["upper"]]))
    return ((image - low) / max(high - low, 1e-8)).clamp(0, 1), (low, high)


def _sampling(options: SamplingOptions) -> dict:
    return dict(sampler=options.sampler, steps=options.steps, grid=options.grid, ensemble=options.ensemble,
                seed=options.seed)


def restore(module, image: torch.Tensor, options: SamplingOptions, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Restore ``image`` ``(C, *spatial)`` in [0, 1]; a 2D model runs slice by slice over a 3D volume.

    Args:
        mask: k-space sampling mask over the last two axes ``(H, W)`` (or per slice ``(H, W, D)``); when given,
            every sampler step is made consistent with the input's measured k-space.
    """
    if module.net.spatial_dims == image.ndim - 1:
        return _restore_batch(module, image[None], options, None if mask is None else mask[None, None])[0]
    slices = image.movedim(-1, 0)  # (D, C, H, W)
    if mask is not None and mask.ndim == 3:
        mask = mask.movedim(-1, 0)[:, None]  # (D, 1, H, W)
    elif mask is not None:
        mask = mask[None, None]
    return _restore_batch(module, slices, options, mask).movedim(0, -1)


def _restore_batch(module, images: torch.Tensor, options: SamplingOptions, mask: torch.Tensor | None):
    # the module builds its own consistency step, from a batch shaped like its training batches
    batch = {"condition": images.float()} | ({} if mask is None else {"kspace_mask": mask})
    return module.estimate(module.condition(batch), hook=module.measurement_hook(batch), **_sampling(options))


def super_resolve(module, lowres: torch.Tensor, options: SamplingOptions, patch_size=None) -> torch.Tensor:
    """Super-resolve ``lowres`` ``(C, *spatial)`` in [0, 1] by the model's factors; returns the fine grid."""
    factors = [int(f) for f in module.hparams.factors]
    if len(factors) != lowres.ndim - 1:
        raise MedidiffError(f"the model up-samples {len(factors)}D images but the input is {lowres.ndim - 1}D")
    mode = "bilinear" if lowres.ndim == 3 else "trilinear"
    cond = F.interpolate(lowres[None].float(), scale_factor=[float(f) for f in factors], mode=mode) * 2 - 1
    hook = module.measurement_hook({"low_res": lowres[None].float()})
    return module.estimate(cond, hook=hook, patch_size=patch_size, **_sampling(options))[0]


def infer_image(module, data_hparams: dict, input_path, output, options: SamplingOptions, checkpoint: Path,
                mask_path: str | os.PathLike | None = None, report: Callable[[str], None] = print) -> list[Path]:
    """Run a restoration or super-resolution checkpoint over a file or folder; returns the files written."""
    output = Path(output)
    spec = load_card(data_hparams["card"], check_files=False).inputs["image"]
    mask = None if mask_path is None else io.read(mask_path)[0].float()
    if mask is not None and not bool((mask > 0).any()):
        raise MedidiffError("the k-space mask samples nothing (all zeros); expected 1 where k-space was measured",
                            mask_path)
    written = []
    for source, case in pending_cases(input_path, output, report):
        start = time.perf_counter()
        scan = io.read(source, channels=len(spec.channels))
        image, (low, high) = normalise(scan.as_tensor()[spec.use_indices] if spec.use != spec.channels
                                       else scan.as_tensor(), spec.normalise)
        if module.task == "superres":
            result, spacing = super_resolve(module, image, options, data_hparams.get("patch_size")), _finer(scan, module)
        else:
            if mask is not None and mask.shape[:2] != image.shape[1:3]:
                raise MedidiffError(f"k-space mask of shape {tuple(mask.shape)} does not fit the scan "
                                    f"{tuple(image.shape[1:])}", mask_path)
            result, spacing = restore(module, image, options, mask), None
        restored = result * (high - low) + low
        written.append(io.write(restored, output / f"{case}.nii.gz", like=source if source.is_file() else scan,
                                spacing=spacing))
        info = provenance(options, checkpoint, time.perf_counter() - start,
                          {"case": case, "input": str(source), "intensity_range": [low, high],
                           "mask": None if mask_path is None else str(mask_path),
                           "consistency": bool(module.hparams.get("consistency", True))})
        written.append(write_provenance(output / "provenance" / f"{case}.json", info))
        report(f"{case}: done in {info['seconds']:.1f} s")
    return written


def _finer(scan, module) -> tuple[float, ...]:
    spacing = [float(s) for s in scan.meta["spacing"]]
    return tuple(s / int(f) for s, f in zip(spacing, module.hparams.factors))
