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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from monai.transforms import Compose

from medidiff import io
from medidiff.data import transforms as T
from medidiff.data.cards import InputSpec
from medidiff.data.custom import rgb_to_ycbcr
from medidiff.errors import MedidiffError
from medidiff.inference.contract import check_intensities, expectation
from medidiff.inference.model import Model, predict_case
from medidiff.inference.run_folder import folder_lock, input_digest
from medidiff.tasks import Case, Output, Task

Report = Callable[[str], None]
ProgressFactory = Callable[[str], Callable[[int, int], None]]
MODALITY_CODES = {"CT": "CT", "MR": "MR", "MRI": "MR", "PT": "PT", "PET": "PT", "NM": "NM", "SPECT": "NM"}


@dataclass(frozen=True)
class InputOptions:
    """How inputs may differ from what the model was trained on.

    ``allow``: checks to skip (``intensity``, ``clipping``, ``modality``, ``degradation``); ``channel``: take this
    channel of a multi-channel file; ``luma``: take the luma of a colour file.
    """

    allow: frozenset[str] = frozenset()
    channel: int | None = None
    luma: bool = False

    def settings(self) -> dict[str, Any]:
        return {"allow": sorted(self.allow), "channel": self.channel, "luma": self.luma}


# ------------------------------------------------------------------------------------------------ cases


def list_cases(inputs: Mapping[str, str | os.PathLike]) -> list[Case]:
    """Cases from one source per role: a file, a DICOM series folder (one case), or a folder of scans (one
    case per file); with two roles (fusion), two files or two folders whose files pair by case name."""
    listed = {role: _sources(Path(path)) for role, path in inputs.items()}
    first, *others = listed
    for role in others:
        for mine, theirs, folder in ((listed[first], listed[role], inputs[role]),
                                     (listed[role], listed[first], inputs[first])):
            missing = sorted(set(mine) - set(theirs))
            if missing and len(mine) + len(theirs) > 2:
                raise MedidiffError(f"has no partner named '{missing[0]}.*' in {folder}", mine[missing[0]])
    if len(listed[first]) == 1 and all(len(listed[r]) == 1 for r in others):
        return [Case(next(iter(listed[first])), {role: next(iter(s.values())) for role, s in listed.items()})]
    return [Case(name, {role: listed[role][name] for role in listed}) for name in sorted(listed[first])]


def _sources(path: Path) -> dict[str, Path]:
    """``{case name: file}``; a case name is the file name without its image extension (nothing else
    stripped, so ``case1.nii.gz`` and ``case1_seg.nii.gz`` are two cases)."""
    if not path.exists():
        raise MedidiffError("input not found", path)
    if not (path.is_file() or path.is_dir()):
        raise MedidiffError("is not a regular file or folder (a FIFO, socket or device?); give a scan file or a "
                            "folder of scans", path)
    if path.is_file() or io.is_dicom_folder(path):
        return {case_of(path.resolve()): path}  # resolved: `--input .` names the case after the folder
    found: dict[str, Path] = {}
    for file in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
        name = case_of(file)
        if name in found:
            raise MedidiffError(f"two inputs make one case '{name}': {found[name].name} and {file.name}", path)
        found[name] = file
    if not found:
        raise MedidiffError("folder holds no input files", path)
    return found


def case_of(path: Path) -> str:
    from medidiff.metrics.evaluate import case_name

    return case_name(path.name, suffixes=()) or path.name


def check_output_dir(output: Path, sources: list[Path]) -> None:
    """Create the output folder after refusing one that is an input, lies inside a DICOM input or holds the
    inputs (results there could overwrite an input, and a later run would take them for inputs)."""
    target = output.resolve()
    for path in sources:
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


# ---------------------------------------------------------------------------------------------- reading


def read_case(case: Case, model: Model, options: InputOptions) -> Compose:
    """Read and check every source of ``case`` and preprocess them; fills ``case.images`` and ``case.record``
    and returns the pipeline (to invert outputs with)."""
    contract, task, data, specs = model.contract, model.task, {}, {}
    for role in task.roles:
        data[role], specs[role], case.record[role] = read_source(case.sources[role], role, contract, task, options)
        case.raw[role] = data[role]
    first = data[task.roles[0]]
    case.record["spacing"] = list(first.meta["spacing"])
    spacing = training_spacing(contract, first, task.resample)
    case.record["resampled_to"] = spacing
    pipeline = Compose(T.standardise(specs, spatial_dims=first.ndim - 1, orientation=contract["orientation"],
                                     spacing=spacing, slice_axis=contract["slice_axis"], resample=task.resample,
                                     record_bounds=True, luma=task.luma))
    case.images = T.apply(pipeline, data)
    return pipeline


def read_source(path: Path, role: str, contract: dict[str, Any], task: Task,
                options: InputOptions) -> tuple[Any, InputSpec, dict[str, Any]]:
    """One source read and checked against the contract: ``(image, spec, record)`` with the channels the
    network takes; a misfit is a :class:`MedidiffError` naming the file, the expectation and the override."""
    entry = contract["inputs"][role]
    raw = _read(path, contract, task)
    entry = entry | {"normalise": _normalisation(entry["normalise"], path, raw)}
    image, spec, how = take_channels(raw, entry, path, options, any_colour=task.luma)
    _check_modality(raw, entry, contract, path, options.allow)
    profile_fits = len(spec.channels) == len(entry["use"])
    intensity = check_intensities(image.as_tensor(), entry, path, options.allow, task.keeps_units) \
        if profile_fits else {"checked": False, "why": "channel layout differs from training"}
    return image, spec, {"file": str(path), "channels": how, "intensity": intensity,
                         "spacing": list(raw.meta["spacing"]), "orientation": raw.meta["orientation"]}


def _normalisation(normalise: dict[str, Any], path: Path, raw: Any) -> dict[str, Any]:
    """``auto`` (classical fusion): 8-bit image files on their 0..255 scale, others by their percentiles."""
    if normalise.get("method") != "auto":
        return normalise
    if path.name.lower().endswith(io.IMAGE_2D_SUFFIXES) and float(raw.max()) <= 255:
        return {"method": "window", "low": 0.0, "high": 255.0}
    return {"method": "percentile", "lower": 0.5, "upper": 99.5}


def _read(path: Path, contract: dict[str, Any], task: Task) -> Any:
    """Read a source and check its dimension against the model's (a task modelling colour inputs on their luma
    runs 2D models over volumes and whole volumes alike)."""
    raw = io.read(path)
    model, data = contract["spatial_dims"], contract["data_dims"]
    if raw.ndim == 4 and raw.shape[-1] == 1 and model == 2:
        raw = io.read(path, expected_ndim=2)  # a single-slice volume is a 2D image
        raw.meta["single_slice_volume"] = True  # outputs get the slice axis back (see restore)
    dims = raw.ndim - 1
    if task.luma:
        return raw
    if model == 3 and dims != 3:
        raise MedidiffError(f"is a {dims}D image but the model takes 3D volumes ({_trained_on(contract)})", path)
    if model == 2 and data == 2 and dims == 3:
        raise MedidiffError(f"is a 3D volume but the model was trained on 2D images ({_trained_on(contract)}); "
                            "give 2D images (PNG, TIF, JPEG or a single-slice NIfTI)", path)
    return raw


def _trained_on(contract: dict[str, Any]) -> str:
    return f"trained on '{(contract.get('card') or {}).get('name', '?')}'"


def take_channels(raw: Any, entry: dict[str, Any], path: Path, options: InputOptions,
                  any_colour: bool = False) -> tuple[Any, InputSpec, str]:
    """The channels the network takes, from a file: ``(image, spec, how)``. A file with another channel count is
    refused naming what the model takes, unless ``--channel`` / ``--luma`` say how to take one channel, or
    (``any_colour``, fusion) the task works on luma anyway."""
    count, wanted, use = raw.shape[0], entry["channels"], entry["use"]
    norm, modality = entry["normalise"], entry.get("modality")
    if options.luma or options.channel is not None:
        if len(use) != 1:
            raise MedidiffError(f"--channel and --luma give one channel, but the model takes {len(use)} "
                                f"({', '.join(use)})", path)
        if options.luma:
            if count != 3:
                raise MedidiffError(f"--luma needs a colour (3-channel) image; this one has {count}", path)
            image, how = _like(raw, rgb_to_ycbcr(raw.as_tensor().float())[:1]), "luma of RGB"
        else:
            if not 0 <= options.channel < count:
                raise MedidiffError(f"--channel {options.channel} is not one of its {count} channel(s)", path)
            image, how = raw[options.channel:options.channel + 1], f"channel {options.channel}"
        return image, InputSpec((how,), (how,), norm, modality), how
    if any_colour and count in (1, 3):
        names = ("red", "green", "blue") if count == 3 else ("grey",)
        return raw, InputSpec(names, names, norm, modality), "colour (fused on its luma)" if count == 3 else "grey"
    if count != len(wanted):
        kind = " (RGB)" if count == 3 else ""
        hint = (f"take one with --channel 0..{count - 1} or --luma" if len(use) == 1 and count > 1 else
                f"give images with {len(wanted)} channel(s) ({', '.join(wanted)})")
        raise MedidiffError(f"has {count} channel(s){kind} but the model takes {expectation(entry)}; {hint}", path)
    indices = [wanted.index(name) for name in use]
    image = raw if indices == list(range(count)) else raw[indices]
    return image, InputSpec(tuple(use), tuple(use), norm, modality), ", ".join(use)


def _like(reference: Any, values: torch.Tensor) -> Any:
    from medidiff.data.custom import like

    return like(reference, values)


def _check_modality(raw: Any, entry: dict[str, Any], contract: dict[str, Any], path: Path, allow) -> None:
    """A modality the file states (DICOM) must be the one the model was trained on."""
    stated = MODALITY_CODES.get(str(raw.meta.get("modality", "")).upper())
    trained = entry.get("modality") or (contract.get("card") or {}).get("modality") or ""
    codes = {MODALITY_CODES[w] for w in str(trained).upper().replace("+", " ").replace("/", " ").split()
             if w in MODALITY_CODES}
    if stated and codes and stated not in codes and "modality" not in allow:
        raise MedidiffError(f"is a {stated} scan (DICOM Modality) but the model was trained on {trained}; run it "
                            "anyway with --allow modality", path)


def training_spacing(contract: dict[str, Any], image: Any, resample: bool) -> list[float] | None:
    """The voxel size a case is resampled to: the training spacing (in-plane for 2D images), or None when the
    task keeps the native grid, the card had none, or the file records no physical spacing (PNG, JPEG)."""
    spacing = contract.get("spacing")
    if not resample or spacing is None or not image.meta.get("spacing_known", True):
        return None
    if image.ndim - 1 == 2 and len(spacing) == 3:
        spacing = [s for axis, s in enumerate(spacing) if axis != contract["slice_axis"]]
    return list(spacing)


# ---------------------------------------------------------------------------------------------- running


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
    return {name: Output(restore(out, case, model.task, pipeline), out.kind, out.spacing)
            for name, out in outputs.items()}


def restore(output: Output, case: Case, task: Task, pipeline: Compose) -> torch.Tensor:
    """An output on the preprocessed grid back onto the source's grid, in its units; labels as integers."""
    role = task.roles[0]
    array = output.array.detach().float().cpu()
    if not bool(torch.isfinite(array).all()):
        raise MedidiffError("the model produced NaN or infinite values for this case; nothing was written",
                            case.sources[role])
    if task.resample:
        array = T.invert(array, case.images[role], pipeline, nearest=output.kind == "label").as_tensor()
    if output.kind == "image" and not _png_main(task, case):
        array = denormalise(array, case.images[f"{role}_bounds"])
    if case.raw[role].meta.get("single_slice_volume") and array.ndim == 3:
        array = array[..., None]  # back onto the file's (X, Y, 1) grid
    return array.round().to(torch.int16) if output.kind == "label" else array


def denormalise(x: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """``(C, *spatial)`` in [0, 1] back to intensities, with :class:`IntensityBoundsd`'s ``(C, 2)`` bounds
    (one row serves every channel when there is one)."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    low, high = (bounds[:, i].to(torch.float32).reshape(shape).to(x.device) for i in (0, 1))
    return x * (high - low) + low


def _png_main(task: Task, case: Case) -> bool:
    return task.png_main and case.sources[task.roles[0]].name.lower().endswith(io.IMAGE_2D_SUFFIXES)


# ---------------------------------------------------------------------------------------------- writing


def write_case(task: Task, case: Case, outputs: dict[str, Output], output: Path,
               info: dict[str, Any]) -> list[Path]:
    """Write a case's outputs, then its provenance; an interruption removes what the case had written.

    Layout: the main output is ``<output>/<case>.nii.gz`` (``.png`` for fused 2D image files), so the folder can
    be given to ``medidiff evaluate`` as is; the others ``<output>/<name>/<case>.nii.gz``, PNG previews of 2D
    inputs ``<output>/png/<case>_<name>.png``, and ``<output>/provenance/<case>.json`` last.
    """
    source = case.sources[task.roles[0]]
    # a DICOM series has no file to copy the geometry from: the scan as read carries it (not the resampled one)
    like = source if source.is_file() else case.raw[task.roles[0]]
    written: list[Path] = []
    try:
        for index, (name, out) in enumerate(outputs.items()):
            if index == 0 and _png_main(task, case):
                written.append(io.write_png(out.array, output / f"{case.name}.png", value_range=(0.0, 1.0)))
                continue
            folder = output if index == 0 else output / name
            written.append(io.write(out.array, folder / f"{case.name}.nii.gz", like=like, spacing=out.spacing))
            if out.array.ndim == 3 and not task.png_main:
                # a PNG holds one or three channels: the first three of a map with more, the first of two
                shown = out.array[:3] if out.array.shape[0] >= 3 else out.array[:1]
                written.append(io.write_png(shown.float(), output / "png" / f"{case.name}_{name}.png",
                                            value_range=_preview_range(out, name)))
        info = info | {"outputs": [str(p) for p in written]}
        written.append(io.write_json(provenance_path(output, case.name), info))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def _preview_range(out: Output, name: str) -> tuple[float, float] | None:
    if out.kind == "label":
        return 0.0, float(max(int(out.array.max()), 1))
    return (0.0, 1.0) if name == "prob" else None


def provenance_path(output: Path, case: str) -> Path:
    return output / "provenance" / f"{case}.json"


def provenance(model: Model, case: Case, settings: dict[str, Any], seconds: float) -> dict[str, Any]:
    import monai

    import medidiff
    from medidiff.core import nfe_of

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


def finished(output: Path, case: Case, settings: dict[str, Any]) -> bool:
    """True for a case finished with these settings on these very inputs (same content, not only the same
    name); a case finished with other settings is refused."""
    earlier = _provenance(output, case)
    if earlier is None:
        return False
    if earlier.get("settings") != io._strict_json(settings):
        differ = sorted(k for k in set(settings) | set(earlier.get("settings") or {})
                        if (earlier.get("settings") or {}).get(k) != settings.get(k))
        raise MedidiffError(f"holds results of a run with other settings ({', '.join(differ)} differ); write this "
                            "run to another --output folder", output)
    return earlier.get("input_sha256") == input_digest(case.sources)


def _provenance(output: Path, case: Case) -> dict[str, Any] | None:
    import json

    path = provenance_path(output, case.name)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # an unreadable record: the case is done again
    return record if isinstance(record, dict) else None


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
