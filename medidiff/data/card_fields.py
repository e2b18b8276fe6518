"""The fields of a data card, one validator each: types, ranges and the schema of every level, with a "did you
mean" hint for an unknown key. Used by :mod:`medidiff.data.cards`; every error is a :class:`MedidiffError` naming the
card file and the key.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any

from medidiff.errors import MedidiffError

# key -> required?   (one table per level of the schema)
_TOP = {"name": True, "description": True, "source": True, "licence": True, "modality": True,
        "spatial_dims": True, "tasks": True, "inputs": True, "splits": True, "citation": False,
        "root": False, "labels": False, "label_remap": False, "label_others": False, "spacing": False,
        "orientation": False, "slice_axis": False, "derive": False, "caveats": False,
        "label_channel": False, "label_threshold": False, "case_suffixes": False}
_INPUT = {"channels": True, "normalise": True, "use": False, "modality": False}
_NORMALISE = {"method": True, "low": False, "high": False, "lower": False, "upper": False}
_SPLIT = {"pattern": False, "ids": False, "take": False, "cases": False, "slices": False}
_DERIVE = {"method": True, "from": True, "threshold": False, "scale": False}
_NORM_METHODS = {"window": ("low", "high"), "percentile": ("lower", "upper")}


def _check_keys(raw: Any, schema: dict[str, bool], path: Path, where: str) -> None:
    if not isinstance(raw, dict):
        raise MedidiffError(f"{where}: expected a mapping of keys, got {type(raw).__name__}", path)
    for key in raw:
        if key not in schema:
            hint = difflib.get_close_matches(str(key), list(schema), n=1)
            raise MedidiffError(f"{where}: unknown key '{key}'" + (f"; did you mean '{hint[0]}'?" if hint else "")
                                + f" (allowed: {', '.join(schema)})", path)
    for key, required in schema.items():
        if required and key not in raw:
            raise MedidiffError(f"{where}: missing required key '{key}'", path)


def _checked(raw: Any, schema: dict[str, bool], path: Path, where: str) -> dict[str, Any]:
    _check_keys(raw, schema, path, where)
    return dict(raw)


def _mapping(raw: Any, where: str, path: Path) -> dict[str, Any]:
    if not isinstance(raw, dict) or not raw:
        raise MedidiffError(f"{where}: expected a non-empty mapping", path)
    return raw


def _key(key: Any, where: str, path: Path) -> str:
    """A name under ``inputs``/``splits``/``derive``: a non-empty string."""
    if not isinstance(key, str) or not key:
        raise MedidiffError(f"{where}: key {key!r} must be a non-empty name", path)
    return key


def _text(value: Any, where: str, path: Path) -> str:
    """A free-text field: a string (numbers are taken as their text), never a list, mapping or empty."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or str(value) == "":
        raise MedidiffError(f"{where}: expected text, got {_show(value)}", path)
    return str(value)


def _texts(value: Any, where: str, path: Path) -> tuple[str, ...]:
    """A list of names or lines (a single string is a list of one)."""
    items = value if isinstance(value, list) else [value]
    return tuple(_text(v, f"{where}[{i}]", path) for i, v in enumerate(items))


def _number(value: Any, where: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MedidiffError(f"{where}: expected a finite number, got {_show(value)}", path)
    return float(value)


def _integer(value: Any, where: str, path: Path, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MedidiffError(f"{where}: expected an integer, got {_show(value)}", path)
    if (low is not None and value < low) or (high is not None and value > high):
        raise MedidiffError(f"{where}: {value} is outside {low}..{high}", path)
    return value


def _range(value: Any, where: str, path: Path) -> tuple[int, int]:
    """``[start, stop]``, two integers with 0 <= start < stop."""
    if not isinstance(value, list) or len(value) != 2:
        raise MedidiffError(f"{where}: expected [start, stop], got {_show(value)}", path)
    start, stop = (_integer(v, where, path, low=0) for v in value)
    if start >= stop:
        raise MedidiffError(f"{where}: start {start} must be below stop {stop}", path)
    return start, stop


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) < 60 else text[:57] + '...'}"


def _dims(raw: dict, path: Path) -> int:
    value = raw["spatial_dims"]
    if isinstance(value, bool) or value not in (2, 3):
        raise MedidiffError(f"spatial_dims must be 2 or 3, got {value!r}", path)
    return int(value)


def _tasks(raw: Any, path: Path) -> tuple[str, ...]:
    from medidiff.tasks import REGISTRY  # here: the tasks import the data layer's transforms

    tasks, known = tuple(raw if isinstance(raw, list) else [raw]), list(REGISTRY)
    if not tasks:
        raise MedidiffError(f"tasks: list at least one of {', '.join(known)}", path)
    for task in tasks:
        if not isinstance(task, str) or task not in known:
            hint = difflib.get_close_matches(str(task), known, n=1)
            raise MedidiffError(f"tasks: unknown task '{task}'" + (f"; did you mean '{hint[0]}'?" if hint else ""),
                                path)
    return tasks


def _spacing(raw: Any, dims: int, path: Path) -> tuple[float, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) != dims:
        raise MedidiffError(f"spacing: expected {dims} voxel sizes in mm, got {_show(raw)}", path)
    spacing = tuple(_number(v, "spacing", path) for v in raw)
    if min(spacing) <= 0:
        raise MedidiffError(f"spacing: voxel sizes must be positive, got {list(spacing)}", path)
    return spacing


def _orientation(raw: Any, path: Path) -> str:
    """Three axis codes, one from each of L/R, A/P, S/I (the nibabel/MONAI convention: where axes point to)."""
    text = raw if isinstance(raw, str) else ""
    pairs = [{"L", "R"}, {"A", "P"}, {"S", "I"}]
    axes = sorted(next((i for i, pair in enumerate(pairs) if c in pair), 9) for c in text)
    if axes != [0, 1, 2]:
        raise MedidiffError(f"orientation: expected three axis codes such as RAS or LPS, got {_show(raw)}",
                            path)
    return text


def _labels(raw: Any, path: Path) -> dict[str, int]:
    if not isinstance(raw, dict):
        raise MedidiffError(f"labels: expected a mapping of label name to integer, got {_show(raw)}", path)
    labels = {_text(k, "labels", path): _integer(v, f"labels.{k}", path) for k, v in raw.items()}
    if labels and sorted(labels.values()) != list(range(len(labels))):
        raise MedidiffError(f"labels must map names to contiguous integers 0..K-1, got {labels}", path)
    return labels


def _remap(raw: Any, others: Any, labels: dict[str, int], path: Path) -> tuple[dict[int, int] | None, int | None]:
    def to_class(value: Any, where: str) -> int:
        if isinstance(value, str) and value in labels:
            return labels[value]
        if isinstance(value, int) and not isinstance(value, bool) and value in labels.values():
            return value
        hint = difflib.get_close_matches(str(value), list(labels), n=1)
        raise MedidiffError(f"{where}: '{value}' is not a label of this card"
                            + (f"; did you mean '{hint[0]}'?" if hint else f" ({list(labels)})"), path)

    if raw is not None and not isinstance(raw, dict):
        raise MedidiffError(f"label_remap: expected a mapping of file value to label, got {_show(raw)}", path)
    remap = None if raw is None else {_integer(k, "label_remap key", path): to_class(v, f"label_remap.{k}")
                                      for k, v in raw.items()}
    return remap, None if others is None else to_class(others, "label_others")


def _case_suffixes(raw: dict, path: Path) -> tuple[str, ...]:
    """``case_suffixes``: what ``medidiff evaluate --card`` strips from file names before pairing them by case name
    (a list of non-empty strings; none when absent)."""
    value = raw.get("case_suffixes")
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise MedidiffError(f"case_suffixes: expected a list of non-empty file-name suffixes such as [_test, _mask], "
                            f"got {_show(value)}", path)
    return tuple(value)


def _label_reading(raw: dict, labels: dict[str, int], path: Path) -> tuple[int | None, float | None]:
    """``label_channel``: the channel of colour mask files (RGB / JPEG) holding the mask; ``label_threshold``:
    values above it are the foreground class 1 (masks stored 0/255 or with JPEG noise), others background."""
    channel = raw.get("label_channel")
    channel = None if channel is None else _integer(channel, "label_channel", path, low=0, high=3)
    threshold = raw.get("label_threshold")
    threshold = None if threshold is None else _number(threshold, "label_threshold", path)
    if threshold is not None and sorted(labels.values()) != [0, 1]:
        raise MedidiffError(f"label_threshold makes binary masks (0 and 1), but labels name {labels}", path)
    if threshold is not None and raw.get("label_remap") is not None:
        raise MedidiffError("give label_threshold or label_remap, not both: thresholded masks are 0 and 1", path)
    if threshold is not None and raw.get("label_others") is not None:  # it would look as if it did something
        raise MedidiffError("label_others has no effect with label_threshold: every value of a thresholded mask "
                            "becomes 0 or 1; remove label_others", path)
    return channel, threshold


def _derive(key: str, raw: Any, path: Path) -> dict[str, Any]:
    spec = _checked(raw, _DERIVE, path, f"derive.{key}")
    if spec["method"] != "tissue_argmax":
        raise MedidiffError(f"derive.{key}.method must be 'tissue_argmax', got '{spec['method']}'", path)
    if not isinstance(spec["from"], list) or not spec["from"]:
        raise MedidiffError(f"derive.{key}.from: expected a list of keys, got {_show(spec['from'])}", path)
    spec["from"] = list(_texts(spec["from"], f"derive.{key}.from", path))
    for name in ("threshold", "scale"):
        if name in spec:
            spec[name] = _number(spec[name], f"derive.{key}.{name}", path)
    if spec.get("scale", 1.0) <= 0:
        raise MedidiffError(f"derive.{key}.scale must be positive, got {spec['scale']}", path)
    return spec
