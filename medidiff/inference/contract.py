"""The model-input contract: what a model takes, recorded in its checkpoint at training time and checked on
every input at inference.

A contract is a plain dict (checkpoints load with ``weights_only=True``), built by :func:`build_contract` from
the data module a model was trained with:

- ``task``, ``spatial_dims`` (the network's), ``data_dims`` and ``slice_axis`` (a 2D model trained on slices of
  3D volumes runs slice by slice along that axis), ``patch_size``;
- ``inputs``: per image key, the channels stored in a file and those the network takes (by name), modality,
  the card's intensity normalisation and the **intensity profile** seen in training (quantiles of the raw
  values, share clipped by a window, where intensity zero sits inside the percentile range);
- ``labels`` (name -> class id the model writes), ``spacing`` and ``orientation`` of the training grid;
- ``degradation`` and ``factors`` the image tasks were trained on;
- ``sampling``: sampler settings, and after validation with several step counts the one that scored best;
- ``card``: name, description, source, licence of the training data, for ``describe``.

:func:`check_intensities` compares an input with the profile; a misfit is a :class:`MedidiffError` naming the
file, what the model expects and the ``--allow`` value that overrides.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import torch

from medidiff import io
from medidiff.arguments import fits
from medidiff.data.transforms import intensity_bounds
from medidiff.errors import MedidiffError

PROFILE_QUANTILES = (0.1, 1.0, 5.0, 50.0, 95.0, 99.0, 99.9)
# Tolerances of the intensity check (see data_cards/README.md, "What a model checks on its inputs"):
# absolute units (window): the input's 1st percentile within a quarter of the window of training's, its 99th
# at most a quarter of the window above training's 99.9th;
# relative units (percentile): intensity zero within a quarter of the range of where it sat in training;
# a window may clip at most one percentage point more of the input than of the training images.
RANGE_TOLERANCE = 0.25
CLIP_TOLERANCE = 0.01
ALLOW = ("intensity", "clipping", "modality", "degradation")  # the checks `medidiff infer --allow` can skip
_MAX_SAMPLE = 2_000_000  # voxels per image kept for the profile: quantiles need no more


def build_contract(datamodule: Any, system: Any) -> dict[str, Any]:
    """The contract of a system trained on ``datamodule`` (a :class:`~medidiff.data.MedicalDataModule`)."""
    card, hp, task = datamodule.card, datamodule.hparams, system.task
    train_cases = card.splits["train"].cases[: hp.limit_cases]
    inputs = {key: input_entry(card.inputs[key], [case[key] for case in train_cases], card.spatial_dims)
              | {"modality": card.inputs[key].modality or card.modality} for key in task.roles}
    factors = task.config.get("factors")
    return {
        "version": 1, "task": task.name, "spatial_dims": int(system.net.spatial_dims),
        "data_dims": int(card.spatial_dims), "slice_axis": int(card.slice_axis),
        "patch_size": [int(p) for p in datamodule.patch_size], "inputs": inputs,
        "labels": task.contract_labels(card),
        "spacing": None if card.spacing is None else list(card.spacing), "orientation": card.orientation,
        "degradation": datamodule.degradation, "factors": None if factors is None else [int(f) for f in factors],
        "sampling": system.contract_sampling(), "card": card_summary(card),
    } | task.contract_extras(card)


def input_entry(spec: Any, files: Iterable[str], dims: int) -> dict[str, Any]:
    """Channels, modality, normalisation and the intensity profile of one image key."""
    images = []
    for file in files:
        image = io.read(file, channels=len(spec.channels)).as_tensor()
        images.append(image[spec.use_indices])
    return {"channels": list(spec.channels), "use": list(spec.use), "modality": spec.modality,
            "normalise": dict(spec.normalise), "spatial_dims": dims,
            "profile": intensity_profile(images, spec.normalise) if images else None}


def card_summary(card: Any) -> dict[str, Any]:
    return {"name": card.name, "description": card.description, "modality": card.modality,
            "source": card.source, "licence": card.licence}


# ------------------------------------------------------------------------------------------- profile


def intensity_profile(images: list[torch.Tensor], normalise: dict[str, Any]) -> dict[str, Any]:
    """Per-channel quantiles of the raw intensities of ``images`` (each ``(C, *spatial)``), the share a window
    clips at each end, and where intensity zero sits between each image's percentile bounds."""
    samples = torch.cat([_subsample(image) for image in images], dim=1).double()  # (C, N)
    levels = torch.tensor(PROFILE_QUANTILES, dtype=torch.float64) / 100
    quantiles = torch.quantile(samples, levels, dim=1).T  # (C, Q)
    profile = {"quantiles": {f"{q:g}": quantiles[:, i].tolist() for i, q in enumerate(PROFILE_QUANTILES)}}
    if normalise["method"] == "window":
        low, high = float(normalise["low"]), float(normalise["high"])
        profile["clipped_low"] = (samples < low).double().mean(1).tolist()
        profile["clipped_high"] = (samples > high).double().mean(1).tolist()
    else:
        positions = torch.stack([zero_position(image, normalise) for image in images])  # (I, C)
        profile["zero_position"] = positions.mean(0).tolist()
    return profile


def _subsample(image: torch.Tensor) -> torch.Tensor:
    flat = image.reshape(image.shape[0], -1)
    return flat[:, :: max(flat.shape[1] // _MAX_SAMPLE, 1)]


def percentile_bounds(image: torch.Tensor, normalise: dict[str, Any]) -> torch.Tensor:
    """``(C, 2)`` intensities that the normalisation maps to 0 and 1, per channel, on a subsample of the voxels
    (quantiles need no more; :func:`medidiff.data.transforms.intensity_bounds` computes them)."""
    return intensity_bounds(_subsample(image).double(), normalise)


def zero_position(image: torch.Tensor, normalise: dict[str, Any]) -> torch.Tensor:
    """Where intensity 0 lands after percentile normalisation, per channel: about 0 for magnitude MR (its
    background), about 0.5 or more for CT in Hounsfield units (air -1000 sets the lower bound)."""
    bounds = percentile_bounds(image, normalise)
    return (0 - bounds[:, 0]) / (bounds[:, 1] - bounds[:, 0]).clamp(min=1e-6)


# ------------------------------------------------------------------------------------------- checks


def check_intensities(image: torch.Tensor, entry: dict[str, Any], path: Path, allow: Iterable[str],
                      image_output: bool = False) -> dict:
    """Compare one input ``(C, *spatial)`` (the channels the model takes, raw units) with the training profile.

    ``image_output``: the task writes an image in the input's units (restoration, super-resolution), which can
    hold nothing beyond a window's bounds: any voxel a window would clip is refused unless clipping is allowed.

    Returns what was measured (for provenance); raises :class:`MedidiffError` on a misfit not in ``allow``.
    """
    allow, profile, norm = set(allow), entry.get("profile"), entry["normalise"]
    measured = intensity_profile([image], norm)
    record = {"quantiles": {k: measured["quantiles"][k] for k in ("1", "50", "99")},
              "clipped_voxels": clipped_voxels(image, norm)}
    if profile is None:
        _refuse_output_clipping(image_output, record, image, norm, path, entry, allow)
        return record | {"checked": False, "why": "the checkpoint holds no intensity profile of its training data"}
    if norm["method"] == "window":
        record |= {"clipped_low": measured["clipped_low"], "clipped_high": measured["clipped_high"]}
        problem = _window_range_problem(measured, profile, norm) if "intensity" not in allow else None
        _refuse(problem, path, entry, "intensity")
        problem = _clipping_problem(measured, profile, norm) if "clipping" not in allow else None
        _refuse(problem, path, entry, "clipping")
        _refuse_output_clipping(image_output, record, image, norm, path, entry, allow)
    else:
        record["zero_position"] = measured["zero_position"]
        bounds = percentile_bounds(image, norm)
        if bool((bounds[:, 1] - bounds[:, 0] <= 0).any()):
            raise MedidiffError(f"is (almost) constant: its {norm['lower']:g}th and {norm['upper']:g}th percentile "
                                f"intensities are equal ({float(bounds[0, 0]):.4g}); nothing for the model to see",
                                path)
        problem = _zero_position_problem(measured, profile) if "intensity" not in allow else None
        _refuse(problem, path, entry, "intensity")
    return record | {"checked": True, "allowed": sorted(allow & {"intensity", "clipping"})}


def _window_range_problem(measured: dict, profile: dict, norm: dict) -> str | None:
    """Absolute units: the darkest 1 % (CT air, a photograph's black surround) sits where it sat in training,
    and the brightest 1 % is not brighter than anything training saw. The 99th percentile may be lower: it
    follows content (a slice with little bright tissue), not units."""
    tolerance = RANGE_TOLERANCE * (float(norm["high"]) - float(norm["low"]))
    for channel, (got, seen) in enumerate(zip(measured["quantiles"]["1"], profile["quantiles"]["1"])):
        if abs(got - seen) > tolerance:
            return (f"its 1st percentile intensity is {got:.4g}{_channel(channel, measured)} where the training "
                    f"images had {seen:.4g} (tolerance {tolerance:.3g})")
    for channel, (got, seen) in enumerate(zip(measured["quantiles"]["99"], profile["quantiles"]["99.9"])):
        if got > seen + tolerance:
            return (f"its 99th percentile intensity is {got:.4g}{_channel(channel, measured)}, above the "
                    f"training images' 99.9th percentile {seen:.4g} by more than {tolerance:.3g}")
    return None


def _clipping_problem(measured: dict, profile: dict, norm: dict) -> str | None:
    for end, bound in (("clipped_low", norm["low"]), ("clipped_high", norm["high"])):
        for channel, (got, seen) in enumerate(zip(measured[end], profile[end])):
            if got > seen + CLIP_TOLERANCE:
                side = "below" if end == "clipped_low" else "above"
                return (f"{100 * got:.2f} % of its voxels{_channel(channel, measured)} lie {side} the model's "
                        f"window bound {bound:g} and would be clipped (training images: {100 * seen:.2f} %)")
    return None


def clipped_voxels(image: torch.Tensor, normalise: dict[str, Any]) -> int:
    """How many voxels the normalisation changes by clipping (outside a window, or the percentile bounds)."""
    bounds = percentile_bounds(image, normalise)
    shape = (-1,) + (1,) * (image.ndim - 1)
    low, high = (bounds[:, i].reshape(shape) for i in (0, 1))
    values = image.double()
    return int(((values < low) | (values > high)).sum())


def _refuse_output_clipping(image_output: bool, record: dict, image: torch.Tensor, norm: dict, path: Path,
                            entry: dict, allow: set[str]) -> None:
    if image_output and norm["method"] == "window" and record["clipped_voxels"] and "clipping" not in allow:
        _refuse(_output_clipping(image, norm), path, entry, "clipping")


def _output_clipping(image: torch.Tensor, norm: dict) -> str:
    low, high = float(norm["low"]), float(norm["high"])
    below, above = int((image < low).sum()), int((image > high).sum())
    return (f"{below} voxel(s) lie below and {above} above the model's window {low:g}..{high:g} (input range "
            f"{float(image.min()):.4g}..{float(image.max()):.4g}); the output image cannot hold them and would "
            "show them at the window's bounds")


def _zero_position_problem(measured: dict, profile: dict) -> str | None:
    for channel, (got, seen) in enumerate(zip(measured["zero_position"], profile["zero_position"])):
        if abs(got - seen) > RANGE_TOLERANCE:
            return (f"intensity 0 sits at {got:.2f} of its percentile range{_channel(channel, measured)} where the "
                    f"training images had it at {seen:.2f} (negative values where training had none, or the "
                    "reverse: CT in Hounsfield units given to an MR model?)")
    return None


def _refuse(problem: str | None, path: Path, entry: dict, check: str) -> None:
    if problem:
        raise MedidiffError(f"{problem}; the model expects {expectation(entry)}. Run it anyway with "
                            f"--allow {check}", path)


def expectation(entry: dict[str, Any]) -> str:
    """``entry`` in words: modality, channels and intensities, e.g. for an error message."""
    norm, profile = entry["normalise"], entry.get("profile")
    channels = ", ".join(entry["use"])
    if entry["use"] != entry["channels"]:
        channels += f" of {'/'.join(entry['channels'])} files"
    text = f"{entry.get('modality') or 'images'} ({channels})"
    if norm["method"] == "window":
        text += f" in the units of a window {norm['low']:g}..{norm['high']:g}"
    if profile:
        low, high = profile["quantiles"]["1"], profile["quantiles"]["99"]
        text += ", trained on 1st-99th percentiles " + ", ".join(f"{a:.4g}..{b:.4g}" for a, b in zip(low, high))
    return text


def _first_sentence(text: str, limit: int = 160) -> str:
    sentence = " ".join(text.split()).split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= limit else sentence[:limit].rsplit(" ", 1)[0] + " ..."


def _channel(index: int, measured: dict) -> str:
    return f" (channel {index})" if len(measured["quantiles"]["1"]) > 1 else ""


def describe(contract: dict[str, Any]) -> str:
    """One paragraph on what a model was trained on, for ``infer`` without ``--ckpt``."""
    card = contract.get("card") or {}
    entries = "; ".join(f"{key}: {expectation(entry)}" for key, entry in contract["inputs"].items())
    dims = f"{contract['spatial_dims']}D"
    if contract["spatial_dims"] < contract["data_dims"]:
        dims += f" (slices of 3D volumes along axis {contract['slice_axis']})"
    text = f"trained on '{card.get('name', '?')}' ({_first_sentence(card.get('description', ''))}); {dims}; {entries}"
    if contract.get("spacing"):
        text += f"; resampled to {contract['spacing']} mm"
    if contract.get("labels"):
        text += "; labels " + ", ".join(f"{name}={value}" for name, value in contract["labels"].items())
    if contract.get("degradation"):
        text += f"; degradation {contract['degradation']}"
    return text


# ------------------------------------------------------------------------------------- validation

_AXES = ("LR", "PA", "IS")  # orientation letters: one of each pair
_NORMALISE_FIELDS = {"window": ("low", "high"), "percentile": ("lower", "upper"), "auto": ()}


def check_contract(contract: Any, path: Path | str, tasks: Iterable[str]) -> None:
    """Refuse a contract read from a checkpoint whose fields would mislead or break inference, naming the first
    bad field: it is as untrusted as the file it came from."""
    need = _Checker(path)
    need(isinstance(contract, dict), "contract", contract, "a mapping")
    need(contract.get("task") in tuple(tasks), "task", contract.get("task"), f"one of {', '.join(tasks)}")
    for key in ("spatial_dims", "data_dims"):
        need(contract.get(key) in (2, 3), key, contract.get(key), "2 or 3")
    need(_int(contract.get("slice_axis"), 0, 2), "slice_axis", contract.get("slice_axis"), "0, 1 or 2")
    patch = contract.get("patch_size")
    need(patch is None or _ints(patch, 1, 4096), "patch_size", patch, "null or sizes of 1..4096 voxels")
    inputs = contract.get("inputs")
    need(isinstance(inputs, dict) and inputs and all(isinstance(k, str) for k in inputs), "inputs", inputs,
         "a mapping of input names to entries")
    for role, entry in inputs.items():
        _check_entry(need, f"inputs.{role}", entry)
    labels = contract.get("labels")
    need(isinstance(labels, dict) and all(isinstance(k, str) and _int(v, 0, 999) for k, v in labels.items()),
         "labels", labels, "a mapping of class names to ids 0..999")
    spacing = contract.get("spacing")
    need(spacing is None or (_numbers(spacing) and len(spacing) in (2, 3) and min(spacing) > 0), "spacing",
         spacing, "null or 2-3 positive voxel sizes")
    orientation = contract.get("orientation")
    need(_orientation(orientation), "orientation", orientation, "axis codes such as RAS (one of L/R, A/P, S/I each)")
    factors = contract.get("factors")
    need(factors is None or _ints(factors, 1, 16), "factors", factors, "null or factors of 1..16")
    target = contract.get("target")
    if target is not None:
        norm = target.get("normalise") if isinstance(target, dict) else None
        bounds = [norm.get("low"), norm.get("high")] if isinstance(norm, dict) else None
        need(isinstance(norm, dict) and norm.get("method") == "window" and _numbers(bounds) and bounds[0] < bounds[1],
             "target.normalise", norm, "a window with finite low < high (the units outputs are written in)")
    for key in ("degradation", "sampling", "card", "target"):
        value = contract.get(key)
        need(value is None or (isinstance(value, dict) and _plain(value)), key, value, "null or a mapping")


def _check_entry(need: Any, field: str, entry: Any) -> None:
    need(isinstance(entry, dict), field, entry, "a mapping")
    channels, use = entry.get("channels"), entry.get("use")
    need(_strings(channels), f"{field}.channels", channels, "a list of channel names")
    need(_strings(use) and set(use) <= set(channels), f"{field}.use", use, f"names among {channels}")
    need(entry.get("modality") is None or isinstance(entry.get("modality"), str), f"{field}.modality",
         entry.get("modality"), "null or text")
    norm = entry.get("normalise")
    method = norm.get("method") if isinstance(norm, dict) else None
    need(method in _NORMALISE_FIELDS, f"{field}.normalise", norm, "a window (low, high) or percentiles (lower, upper)")
    bounds = [norm.get(key) for key in _NORMALISE_FIELDS[method]]
    need(_numbers(bounds) and (not bounds or bounds[0] < bounds[1]), f"{field}.normalise", norm,
         f"a {method} with finite {' < '.join(_NORMALISE_FIELDS[method])}")
    need(method != "percentile" or (0 <= bounds[0] and bounds[1] <= 100), f"{field}.normalise", norm,
         "percentiles within 0..100")
    profile = entry.get("profile")
    if profile is not None:
        _check_profile(need, f"{field}.profile", profile, len(use), method)


def _check_profile(need: Any, field: str, profile: Any, channels: int, method: str) -> None:
    quantiles = profile.get("quantiles") if isinstance(profile, dict) else None
    levels = [f"{q:g}" for q in PROFILE_QUANTILES]
    need(isinstance(quantiles, dict) and all(_numbers(quantiles.get(q), channels) for q in levels),
         f"{field}.quantiles", quantiles, f"{channels} finite value(s) at each of the quantiles {', '.join(levels)}")
    shares = ("clipped_low", "clipped_high") if method == "window" else ("zero_position",)
    for key in shares if method != "auto" else ():
        need(_numbers(profile.get(key), channels), f"{field}.{key}", profile.get(key), f"{channels} finite value(s)")


class _Checker:
    def __init__(self, path: Path | str):
        self.path = path

    def __call__(self, ok: bool, field: str, value: Any, expected: str) -> None:
        if not ok:
            shown = repr(value)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise MedidiffError(f"its model-input contract is damaged: {field} is {shown}, expected {expected}",
                                self.path)


def _int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _ints(values: Any, low: int, high: int) -> bool:
    return isinstance(values, list) and bool(values) and all(_int(v, low, high) for v in values)


def _numbers(values: Any, count: int | None = None) -> bool:
    return isinstance(values, list) and (count is None or len(values) == count) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _strings(values: Any) -> bool:
    return isinstance(values, list) and bool(values) and all(isinstance(v, str) and v for v in values)


def _orientation(code: Any) -> bool:
    if not isinstance(code, str) or len(code) not in (2, 3):
        return False
    pairs = [next((i for i, pair in enumerate(_AXES) if letter in pair), None) for letter in code]
    return None not in pairs and len(set(pairs)) == len(pairs)


def _plain(value: Any) -> bool:
    return fits(value, dict[str, Any])
