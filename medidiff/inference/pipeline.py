"""File-level inference for every task: scans in, outputs on each scan's own grid out, with provenance.

One loop, :func:`infer`: list and pair the cases, then for each case

1. read every source (:func:`medidiff.io.read`) and check it against the model's contract
   (:mod:`medidiff.inference.contract`): dimensions, channels, modality, intensities;
2. preprocess it exactly as in training (:func:`medidiff.data.transforms.standardise`, built from the contract);
3. move every tensor to the model's device, in one place (:func:`to_device`), predict
   (:func:`medidiff.inference.model.predict_case`) and let the task turn predictions into outputs;
4. map the outputs back onto the source's grid and units, write them atomically, and write the provenance last:
   its presence with the same settings marks a finished case, so an interrupted run resumes, and a re-run with
   other settings into the same folder is refused instead of skipped.

A folder run goes on past a bad case, reports it, and fails at the end naming every case that failed.
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import monai
import torch
from monai.transforms import Compose

import medidiff
from medidiff import io
from medidiff.core import nfe_of
from medidiff.data import transforms as T
from medidiff.errors import MedidiffError
from medidiff.inference.model import Model, predict_case
from medidiff.inference.reading import InputOptions, read_case
from medidiff.inference.run_folder import (
    _png_main,
    check_output_dir,
    finished,
    folder_lock,
    input_digest,
    list_cases,
    write_case,
)
from medidiff.tasks import Case, Output, Task

__all__ = ["InputOptions", "infer", "list_cases", "run_case"]

Report = Callable[[str], None]
ProgressFactory = Callable[[str], Callable[[int, int], None]]


def to_device(tensors: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor a case gives the model, as plain tensors on the model's device: the one place inputs move."""
    return {key: (value.as_tensor() if hasattr(value, "as_tensor") else value).to(device)
            for key, value in tensors.items() if isinstance(value, torch.Tensor)}


def run_case(model: Model, case: Case, options: InputOptions = InputOptions(),
             progress: Callable[[int, int], None] | None = None) -> dict[str, Output]:
    """Read, check and preprocess one case, predict, and map the task's outputs back onto the case's first source
    (its grid and units): ``{name: Output}`` whose ``array`` is ready for :func:`medidiff.io.write`."""
    pipeline = read_case(case, model, options)
    tensors = to_device({**case.images, **model.task.extras(case, model.options)}, model.device)
    with torch.no_grad():
        predictions = predict_case(model, tensors, case, progress)
        outputs = model.task.outputs(predictions, tensors, case, model.options)
    getattr(progress, "finish", lambda: None)()
    return {name: Output(restore(out, case, model, pipeline), out.kind, out.spacing)
            for name, out in outputs.items()}


def restore(output: Output, case: Case, model: Model, pipeline: Compose) -> torch.Tensor:
    """An output on the preprocessed grid back onto the source's grid, in its units; labels as integers."""
    task = model.task
    role = task.roles[0]
    array = output.array.detach().float().cpu()
    if not bool(torch.isfinite(array).all()):
        raise MedidiffError("the model produced NaN or infinite values for this case; nothing was written",
                            case.sources[role])
    if task.resample:
        array = T.invert(array, case.images[role], pipeline, nearest=output.kind == "label").as_tensor()
    if output.kind == "image" and not _png_main(task, case):
        array = denormalise(array, task.output_bounds(case, model.contract))
    if case.raw[role].meta.get("single_slice_volume") and array.ndim == 3:
        array = array[..., None]  # back onto the file's (X, Y, 1) grid
    return array.round().to(torch.int16) if output.kind == "label" else array


def denormalise(x: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """``(C, *spatial)`` in [0, 1] back to intensities, with :class:`IntensityBoundsd`'s ``(C, 2)`` bounds
    (one row serves every channel when there is one)."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    low, high = (bounds[:, i].to(torch.float32).reshape(shape).to(x.device) for i in (0, 1))
    return x * (high - low) + low


def _progress(factory: ProgressFactory | None, name: str) -> Callable[[int, int], None] | None:
    """The case's progress report; one that the model never fed (a deterministic network takes no steps) is
    completed when the case is, instead of standing at "0/None"."""
    if factory is None:
        return None
    report, fed = factory(name), []

    def progress(done: int, total: int) -> None:
        fed.append(done)
        report(done, total)

    progress.finish = lambda: fed or report(1, 1)  # type: ignore[attr-defined]
    return progress


def _clipping_note(task: Task, case: Case) -> str:
    """Said where an image output holds input voxels at the bounds of the model's intensity scale."""
    counts = [((case.record.get(role) or {}).get("intensity") or {}).get("clipped_voxels") or 0
              for role in task.roles]
    if not task.keeps_units or not sum(counts):
        return ""
    return (f"; {sum(counts)} input voxel(s) lay beyond the model's intensity scale and are held at its bounds in "
            "the output (provenance: checks, intensity)")


def infer(model: Model, inputs: Mapping[str, str | os.PathLike], output: str | os.PathLike, *,
          options: InputOptions = InputOptions(), report: Report = print,
          progress_factory: ProgressFactory | None = None) -> list[Path]:
    """Run a task over a file, a DICOM folder or a folder of scans (fusion: pairs); returns the files written.

    Args:
        model: the model and its task (:func:`medidiff.inference.from_checkpoint`).
        inputs: one source per role of the task (``{"image": path}``, fusion ``source_a`` and ``source_b``).
        output: folder for the results (see :func:`write_case`).
        options: how inputs may differ from the training data.
    """
    output, cases = Path(output), list_cases(inputs)
    check_output_dir(output, [p for case in cases for p in case.sources.values()] + [Path(p) for p in inputs.values()])
    with folder_lock(output):
        for stale in io.clear_partial_writes(output):
            report(f"removed {stale.name}, a partial file of an interrupted run")
        return _run_cases(model, cases, output, run_settings(model, options), options, report, progress_factory)


def _run_cases(model: Model, cases: list[Case], output: Path, settings: dict[str, Any],
               options: InputOptions, report: Report, progress_factory: ProgressFactory | None) -> list[Path]:
    pending = [case for case in cases if not finished(output, case, settings)]
    if len(pending) < len(cases):
        report(f"{len(cases) - len(pending)} case(s) finished with these settings on the same inputs before: "
               "skipped")
    written, failed = [], []
    for case in pending:
        start = time.perf_counter()
        try:
            outputs = run_case(model, case, options, _progress(progress_factory, case.name))
        except MedidiffError as error:
            if len(cases) == 1:
                raise
            failed.append(case.name)
            report(f"{case.name}: error: {error}")
            continue
        info = provenance(model, case, settings, time.perf_counter() - start)
        if model.contract.get("labels") and not written:  # the class names of the label maps, for evaluate
            written.append(io.write_json(output / "labels.json", model.contract["labels"]))
        written += write_case(model.task, case, outputs, output, info)
        report(f"{case.name}: done in {info['seconds']:.1f} s{_clipping_note(model.task, case)}")
    if failed:
        raise MedidiffError(f"{len(failed)} of {len(cases)} case(s) failed ({', '.join(failed)}); the others were "
                            f"written to {output}")
    return written


def provenance(model: Model, case: Case, settings: dict[str, Any], seconds: float) -> dict[str, Any]:

    sampling = settings.get("sampler") and {"nfe": nfe_of(settings["sampler"], settings["steps"])}
    return {"case": case.name, "inputs": {role: str(p) for role, p in case.sources.items()},
            "input_sha256": input_digest(case.sources), "settings": settings,
            **(sampling or {}), "labels": model.contract.get("labels") or None, "checks": case.record,
            "seconds": round(seconds, 3), "medidiff": medidiff.__version__, "torch": torch.__version__,
            "monai": monai.__version__, "machine": platform.machine()}


def run_settings(model: Model, options: InputOptions) -> dict[str, Any]:
    """Everything that decides a result: compared with a finished case's provenance before it is skipped."""
    settings = model.settings() | options.settings()
    checkpoint = settings.get("checkpoint")
    if checkpoint and Path(checkpoint).is_file():
        settings["checkpoint_sha256"] = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
    return settings
