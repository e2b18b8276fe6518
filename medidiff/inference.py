"""File-level inference: scans in, predictions out on the scans' own grid, with provenance beside them.

One case at a time: read and preprocess exactly as in training (the data card stored in the checkpoint),
draw the ensemble as one batch through the task module, map the result back onto the original scan and
write NIfTI (plus PNG for 2D inputs) with the input's metadata, atomically. A case whose outputs all exist
is skipped, so an interrupted run over a folder resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from monai.transforms import Compose

from medidiff import io
from medidiff.data import transforms as T
from medidiff.data.cards import load_card
from medidiff.errors import MedidiffError
from medidiff.metrics.evaluate import case_name
from medidiff.metrics.segmentation import (
    ensemble_variance,
    fuse_majority_vote,
    fuse_mean_threshold,
    fuse_staple,
    predictive_entropy,
)
from medidiff.sliding import SlidingWindowDenoiser


@dataclass
class SamplingOptions:
    sampler: str = "dpmpp_2m"
    steps: int = 10
    grid: str = "exponential"
    ensemble: int = 1
    seed: int = 0
    fusion: str = "mean"  # segmentation ensembles: mean | vote | staple
    slice_batch: int = 8


def list_inputs(path: str | os.PathLike) -> list[Path]:
    """A file, a DICOM folder (one case), or a folder of scans (one case per file)."""
    path = Path(path)
    if not path.exists():
        raise MedidiffError("input not found", path)
    if path.is_file() or any(p.suffix.lower() == ".dcm" or p.name.startswith("CT.") for p in path.iterdir()):
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise MedidiffError("folder holds no input files", path)
    return files


def check_output_dir(output: Path, inputs: list[Path]) -> None:
    """Create the output folder after refusing one that is an input, lies inside a DICOM input or holds the
    input scans (results there could overwrite an input, and a later run over the folder would take them for
    inputs), or that cannot be a writable folder."""
    target = output.resolve()
    for path in inputs:
        source = path.resolve()
        if target == source or (path.is_dir() and target.is_relative_to(source)):
            raise MedidiffError(f"output folder must not be an input or inside one (input {path})", output)
        if path.is_file() and target == source.parent:
            raise MedidiffError(f"output folder holds the input {path.name}; choose a separate folder so that no "
                                "input can be overwritten", output)
    if output.exists() and not output.is_dir():
        raise MedidiffError("output must be a folder, but a file of that name exists", output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MedidiffError(f"cannot create the output folder ({err.strerror})", output) from None
    if not os.access(output, os.W_OK):
        raise MedidiffError("output folder is not writable", output)


def preprocess_case(card_name: str, path: Path) -> tuple[dict[str, Any], Compose]:
    """Read one scan and bring it onto the card's grid and intensity scale, as in training."""
    card = load_card(card_name, check_files=False)
    pipeline = Compose(T.preprocess(card, inputs={"image": card.inputs["image"]}, with_labels=False))
    return T.apply(pipeline, {"id": case_name(path.name) or path.name, "image": str(path)}), pipeline


def sample_probabilities(module, image: torch.Tensor, options: SamplingOptions, patch_size, progress=None):
    """Ensemble of decoded samples ``(N, C, *spatial)`` for one preprocessed image ``(C_in, *spatial)``."""
    spatial_dims = module.net.spatial_dims
    kwargs = dict(sampler=options.sampler, steps=options.steps, grid=options.grid, ensemble=options.ensemble,
                  seed=options.seed)
    if image.ndim - 1 == spatial_dims:
        denoiser = None
        # deterministic baselines have no denoiser: they window themselves (their roi_size)
        if spatial_dims == 3 and patch_size and hasattr(module, "denoiser") and \
                any(s > p for s, p in zip(image.shape[1:], patch_size)):
            denoiser = SlidingWindowDenoiser(module.denoiser, patch_size)
        out = module.predict_probabilities(image[None].float(), denoiser=denoiser, **kwargs)[:, 0]
        if progress:
            progress(1, 1)
        return out
    return _slice_wise(module, image, kwargs, options.slice_batch, progress)


def _slice_wise(module, volume: torch.Tensor, kwargs: dict, chunk: int, progress) -> torch.Tensor:
    """A 2D model over a 3D volume: slices along the last axis, ``chunk`` slices per sampler call."""
    depth = volume.shape[-1]
    parts = []
    for start in range(0, depth, chunk):
        slices = volume[..., start:start + chunk].movedim(-1, 0).float()  # (S, C, H, W)
        parts.append(module.predict_probabilities(slices, **kwargs))  # (N, S, C, H, W)
        if progress:
            progress(min(start + chunk, depth), depth)
    return torch.cat(parts, dim=1).movedim(1, -1)  # (N, C, H, W, D)


def segmentation_outputs(module, probs: torch.Tensor, fusion: str) -> dict[str, np.ndarray]:
    """Label map, ensemble-mean probability and uncertainty maps from ``(N, C, *spatial)`` probabilities."""
    p = probs.cpu().numpy()
    binary = module.hparams.num_classes == 2
    members = module.label_map(probs).cpu().numpy()[:, 0]  # (N, *spatial)
    if fusion == "mean":
        labels = fuse_mean_threshold(p, module.hparams.threshold) if binary else p.mean(0).argmax(0)
    elif fusion == "vote":
        labels = fuse_majority_vote(members, module.hparams.num_classes)
    elif fusion == "staple":
        labels = fuse_staple(members, module.hparams.num_classes)
    else:
        raise MedidiffError(f"unknown ensemble fusion '{fusion}'; choose mean, vote or staple")
    class_probs = np.concatenate([1 - p, p], axis=1) if binary else p
    return {"seg": np.asarray(labels)[None].astype(np.int16), "prob": p.mean(0).astype(np.float32),
            "entropy": predictive_entropy(class_probs)[None].astype(np.float32),
            "variance": ensemble_variance(class_probs).sum(0, keepdims=True).astype(np.float32)}


def provenance(options: SamplingOptions, checkpoint: Path, seconds: float, extra: dict | None = None) -> dict:
    import monai

    import medidiff

    from medidiff.core import nfe_of

    return {"checkpoint": str(checkpoint), **asdict(options), "nfe": nfe_of(options.sampler, options.steps),
            "seconds": round(seconds, 3), "medidiff": medidiff.__version__, "torch": torch.__version__,
            "monai": monai.__version__, "machine": platform.machine(), **(extra or {})}


def write_case(outputs: dict[str, np.ndarray], reference: dict[str, Any], pipeline: Compose, source: Path,
               output: Path, case: str, info: dict) -> list[Path]:
    """Map each output back onto the source scan and write it, then the provenance JSON.

    Layout: the label map (or the task's main output) is ``<output>/<case>.nii.gz`` so that the folder can be
    passed to ``medidiff evaluate`` as is; the other maps go to ``<output>/<kind>/<case>.nii.gz``, PNG previews
    of 2D inputs to ``<output>/png/``, and ``<output>/provenance/<case>.json`` is written last: its presence
    marks a complete case.
    """
    written = []
    two_d = reference["image"].ndim == 3
    like = source if source.is_file() else reference["image"]
    for index, (name, array) in enumerate(outputs.items()):
        restored = T.invert(torch.as_tensor(array), reference["image"], pipeline, nearest=name == "seg")
        folder = output if index == 0 else output / name
        written.append(io.write(restored, folder / f"{case}.nii.gz", like=like))
        if two_d:
            image = restored[0].numpy().astype(np.float32)
            value_range = {"seg": (0.0, float(max(image.max(), 1))), "prob": (0.0, 1.0)}.get(name)
            written.append(io.write_png(image, output / "png" / f"{case}_{name}.png", value_range=value_range))
    return written + [write_provenance(output / "provenance" / f"{case}.json", info)]


def write_provenance(path: Path, info: dict) -> Path:
    """Write a case's provenance JSON atomically; written last, its presence marks a complete case."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial")
    try:
        temporary.write_text(json.dumps(info, indent=1))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def pending_cases(input_path: str | os.PathLike, output: Path, report: Callable[[str], None]):
    """Check the inputs and the output folder, then yield ``(source, case)`` for every case not yet complete
    (a case is complete once its provenance JSON exists), so that an interrupted run resumes."""
    inputs = list_inputs(input_path)
    check_output_dir(output, inputs)
    for source in inputs:
        case = case_name(source.name) or source.name
        if (output / "provenance" / f"{case}.json").exists():
            report(f"{case}: outputs exist, skipped")
            continue
        yield source, case


def infer(module, data_hparams: dict, input_path: str | os.PathLike, output: str | os.PathLike,
          options: SamplingOptions, checkpoint: Path, report: Callable[[str], None] = print,
          progress_factory: Callable[[str], Callable] | None = None) -> list[Path]:
    """Run a segmentation checkpoint over a file or folder; returns the files written."""
    output = Path(output)
    written: list[Path] = []
    for source, case in pending_cases(input_path, output, report):
        start = time.perf_counter()
        reference, pipeline = preprocess_case(data_hparams["card"], source)
        progress = progress_factory(case) if progress_factory else None
        probs = sample_probabilities(module, reference["image"], options, data_hparams.get("patch_size"), progress)
        outputs = segmentation_outputs(module, probs, options.fusion)
        info = provenance(options, checkpoint, time.perf_counter() - start, {"case": case, "input": str(source)})
        written += write_case(outputs, reference, pipeline, source, output, case, info)
        report(f"{case}: done in {info['seconds']:.1f} s")
    return written
