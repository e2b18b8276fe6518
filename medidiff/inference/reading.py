"""Reading one case for a model: every source read, checked against the model's contract (dimensions, channels,
modality, intensities) and preprocessed exactly as in training, from the contract alone.

A misfit is one :class:`~medidiff.errors.MedidiffError` naming the file, what the model expects and the ``--allow``
value or option that overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai.transforms import Compose

from medidiff import io
from medidiff.data import transforms as T
from medidiff.data.cards import InputSpec
from medidiff.data.custom import like, rgb_to_ycbcr
from medidiff.errors import MedidiffError
from medidiff.inference.contract import check_intensities, expectation
from medidiff.inference.model import Model
from medidiff.tasks import Case, Task

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
            image, how = like(raw, rgb_to_ycbcr(raw.as_tensor().float())[:1]), "luma of RGB"
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
