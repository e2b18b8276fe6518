"""File-level fusion: a pair of registered files, or two folders paired by file name, in; fused images out.

- 2D images (PNG, TIF, ...) are read on their 8-bit scale; volumes (NIfTI, ITK, DICOM) are scaled to [0, 1]
  between their 0.5 and 99.5 percentiles, and the fused volume is mapped back onto the first source's scale.
- Both sources must share their spatial shape and affine (within 1e-3 mm); otherwise a
  :class:`~medidiff.errors.MedidiffError` names both files.
- A colour source (RGB colour-mapped PET / SPECT) is fused on its luma and its chroma restored, as in the
  fusion literature; when both are colour, source B's chroma is kept.
- Outputs carry the first source's metadata: ``<output>/<case>.png`` for 2D image files, else
  ``<output>/<case>.nii.gz`` written with ``like=source_a`` (its affine). ``<output>/provenance/<case>.json``
  (method, seed, steps, NFE, time, versions) is written last and marks a finished case, so an interrupted
  folder run resumes, as :mod:`medidiff.inference` does for segmentation.
- A 2D diffusion model fuses a 3D volume slice by slice along its last axis; classical methods are
  dimension-agnostic.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from medidiff import io
from medidiff.data.custom import rgb_to_ycbcr
from medidiff.errors import MedidiffError
from medidiff.fusion_classical import CLASSICAL_FUSION
from medidiff.inference import SamplingOptions, check_output_dir
from medidiff.lit.fusion import restore_colour
from medidiff.metrics.evaluate import case_name

Fuser = Callable[[Tensor, Tensor], Tensor]  # (B, 1, *spatial) x 2 in [0, 1] -> (B, 1, *spatial)


def load_source(path: Path) -> tuple[object, Tensor, Tensor | None, tuple[float, float]]:
    """Read one source: ``(image, luma (1, *spatial) in [0, 1], chroma (2, *spatial) | None, range)``."""
    image = io.read(path)
    data = image.as_tensor().float() if hasattr(image, "as_tensor") else torch.as_tensor(image).float()
    if data.shape[0] not in (1, 3):
        raise MedidiffError(f"has {data.shape[0]} channels; fusion takes grey (1) or colour (3) images", path)
    if path.name.lower().endswith(io.IMAGE_2D_SUFFIXES):
        low, high = 0.0, 255.0 if float(data.max()) <= 255 else float(data.max())
    else:
        low, high = (float(q) for q in torch.quantile(data.flatten()[:: max(data.numel() // 2**22, 1)],
                                                      torch.tensor([0.005, 0.995])))
    scaled = ((data - low) / max(high - low, 1e-6)).clamp(0, 1)
    if scaled.shape[0] == 1:
        return image, scaled, None, (low, high)
    ycbcr = rgb_to_ycbcr(scaled, channel_dim=0)
    return image, ycbcr[:1], ycbcr[1:], (low, high)


def check_registered(a: object, b: object, path_a: Path, path_b: Path, atol: float = 1e-3) -> None:
    """Raise a :class:`MedidiffError` naming both files when their grids (spatial shape, affine) differ."""
    shape_a, shape_b = tuple(a.shape[1:]), tuple(b.shape[1:])
    if shape_a != shape_b:
        raise MedidiffError(f"sources are not registered: {path_a} has spatial shape {shape_a} but {path_b} "
                            f"has {shape_b}; resample one onto the other's grid first")
    affine_a = np.asarray(getattr(a, "affine", np.eye(4)), dtype=np.float64)
    affine_b = np.asarray(getattr(b, "affine", np.eye(4)), dtype=np.float64)
    if not np.allclose(affine_a, affine_b, atol=atol):
        raise MedidiffError(f"sources are not registered: the affines of {path_a} and {path_b} differ\n"
                            f"{np.round(affine_a, 4)}\nvs\n{np.round(affine_b, 4)}")


def classical_fuser(method: str) -> Fuser:
    """One of :data:`medidiff.fusion_classical.CLASSICAL_FUSION`, clipped to ``[0, 1]``."""
    if method not in CLASSICAL_FUSION:
        raise MedidiffError(f"unknown fusion method '{method}'; choose diffusion or one of "
                            f"{', '.join(CLASSICAL_FUSION)}")
    return lambda a, b: CLASSICAL_FUSION[method](a, b).clamp(0, 1)


def diffusion_fuser(module, options: SamplingOptions, slice_batch: int = 8) -> Fuser:
    """Fusion by a :class:`~medidiff.lit.fusion.FusionDiffusion`, ensemble mean; 2D nets go slice-wise."""
    kwargs = dict(sampler=options.sampler, steps=options.steps, grid=options.grid, ensemble=options.ensemble,
                  seed=options.seed)

    def fuse(a: Tensor, b: Tensor) -> Tensor:
        device = module.device
        if a.ndim - 2 == module.net.spatial_dims:
            return module.fuse(a.to(device), b.to(device), **kwargs).mean(0).cpu()
        if a.ndim != 5 or module.net.spatial_dims != 2:
            raise MedidiffError(f"a {module.net.spatial_dims}D model cannot fuse {a.ndim - 2}D images")
        parts = []
        for start in range(0, a.shape[-1], slice_batch):  # (1, 1, H, W, D) -> (S, 1, H, W)
            pa, pb = (x[0, ..., start:start + slice_batch].movedim(-1, 0).to(device) for x in (a, b))
            parts.append(module.fuse(pa, pb, **kwargs).mean(0).cpu())
        return torch.cat(parts).movedim(0, -1)[None]

    return fuse


def fuse_files(path_a: Path, path_b: Path, output: Path, fuser: Fuser, info: dict) -> list[Path]:
    """Fuse one registered pair and write the result and its provenance (see the module docstring)."""
    start = time.perf_counter()
    image_a, luma_a, chroma_a, (low, high) = load_source(path_a)
    image_b, luma_b, chroma_b, _ = load_source(path_b)
    check_registered(image_a, image_b, path_a, path_b)
    fused = fuser(luma_a[None], luma_b[None])[0].clamp(0, 1)  # (1, *spatial)
    chroma = chroma_b if chroma_b is not None else chroma_a
    result = fused if chroma is None else restore_colour(fused, chroma, channel_dim=0)
    case = case_name(path_a.name) or path_a.name
    if path_a.name.lower().endswith(io.IMAGE_2D_SUFFIXES) and result.ndim == 3:
        written = io.write_png(result, output / f"{case}.png", value_range=(0.0, 1.0))
    else:
        written = io.write(result * (high - low) + low, output / f"{case}.nii.gz", like=path_a)
    record = {**info, "case": case, "source_a": str(path_a), "source_b": str(path_b), "output": str(written),
              "colour_from": None if chroma is None else ("source_b" if chroma_b is not None else "source_a"),
              "seconds": round(time.perf_counter() - start, 3)}
    info_path = output / "provenance" / f"{case}.json"
    info_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = info_path.with_name(f".{info_path.name}.partial")
    temporary.write_text(json.dumps(record, indent=1))
    os.replace(temporary, info_path)
    return [written, info_path]


def pair_inputs(input_a: Path, input_b: Path) -> list[tuple[Path, Path]]:
    """Two files, or two folders whose image files pair by case name (every file needs its partner)."""
    if input_a.is_file() and input_b.is_file():
        return [(input_a, input_b)]
    if not (input_a.is_dir() and input_b.is_dir()):
        raise MedidiffError(f"give two files or two folders, got {input_a} and {input_b}")
    index = [{case_name(p.name): p for p in sorted(d.iterdir()) if p.is_file() and case_name(p.name)}
             for d in (input_a, input_b)]
    for mine, other, folder in ((index[0], index[1], input_b), (index[1], index[0], input_a)):
        missing = sorted(set(mine) - set(other))
        if missing:
            raise MedidiffError(f"{mine[missing[0]]} has no partner named '{missing[0]}.*' in {folder}")
    if not index[0]:
        raise MedidiffError("folder holds no image files", input_a)
    return [(index[0][name], index[1][name]) for name in sorted(index[0])]


def provenance(method: str, options: SamplingOptions, checkpoint: str | None) -> dict:
    """Settings and versions recorded beside every fused output."""
    import monai

    import medidiff
    from medidiff.core import nfe_of

    sampling = {k: v for k, v in asdict(options).items() if k != "fusion"} if method == "diffusion" else {}
    sampling = {**sampling, "nfe": nfe_of(options.sampler, options.steps)} if sampling else {}
    return {"method": method, "checkpoint": checkpoint, **sampling, "medidiff": medidiff.__version__,
            "torch": torch.__version__, "monai": monai.__version__, "machine": platform.machine()}


def fusion_infer(input_a: str | os.PathLike, input_b: str | os.PathLike, output: str | os.PathLike, *,
                 module=None, method: str = "diffusion", options: SamplingOptions | None = None,
                 checkpoint: str | None = None, report: Callable[[str], None] = print) -> list[Path]:
    """Fuse a pair of files or two folders of pairs; returns the files written.

    Args:
        input_a, input_b: registered sources (files, or folders paired by case name).
        output: folder for the fused images and ``provenance/``.
        module: a trained :class:`~medidiff.lit.fusion.FusionDiffusion` (needed for ``method="diffusion"``).
        method: ``diffusion`` or a classical baseline (``average``, ``max_abs``, ``laplacian``).
        options: sampler, steps, grid, ensemble and seed of the diffusion fusion.
    """
    options = options or SamplingOptions()
    pairs, output = pair_inputs(Path(input_a), Path(input_b)), Path(output)
    check_output_dir(output, [Path(input_a), Path(input_b)])
    if method == "diffusion":
        if module is None:
            raise MedidiffError("diffusion fusion needs a trained module (a fusion checkpoint)")
        fuser = diffusion_fuser(module, options)
    else:
        fuser = classical_fuser(method)
    info = provenance(method, options, checkpoint)
    written: list[Path] = []
    for path_a, path_b in pairs:
        case = case_name(path_a.name) or path_a.name
        if (output / "provenance" / f"{case}.json").exists():
            report(f"{case}: outputs exist, skipped")
            continue
        with torch.no_grad():
            written += fuse_files(path_a, path_b, output, fuser, info)
        report(f"{case}: fused ({method})")
    return written


def infer_command(args) -> None:
    """``medidiff infer --task fusion --ckpt C --input A --input-b B --output O``."""
    from medidiff.checkpoint import load_module

    if not args.input_b:
        raise MedidiffError("fusion needs two sources: --input (source A) and --input-b (source B)")
    module, _ = load_module(args.ckpt, task="fusion")
    module.to(torch.device(args.device))
    hp = module.hparams
    options = SamplingOptions(sampler=args.sampler or hp.sampler, steps=args.steps or hp.steps,
                              grid=args.grid or hp.grid, ensemble=args.ensemble, seed=args.seed)
    written = fusion_infer(args.input, args.input_b, args.output, module=module, options=options,
                           checkpoint=str(args.ckpt))
    print(f"wrote {len(written)} files to {args.output}")
