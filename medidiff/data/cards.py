"""Data cards: one YAML file per data set describing files, channels, labels and splits.

The schema is documented in ``data_cards/README.md``. :func:`load_card` validates every key (an
unknown key gets a "did you mean" hint), resolves the data root and file patterns into per-split case
lists of absolute paths, and checks that the files exist — so a wrong card fails at once, naming the
card and the key or file, rather than deep inside a training run.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib.util
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medidiff.errors import MedidiffError

__all__ = ["DataCard", "InputSpec", "Split", "load_card", "card_search_path", "shared_data_root"]

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGED_CARDS = Path(__file__).resolve().parents[1] / "sample_data" / "cards"
TASKS = ("segmentation", "restoration", "superres", "fusion")

# key -> required?   (one table per level of the schema)
_TOP = {"name": True, "description": True, "source": True, "licence": True, "modality": True,
        "spatial_dims": True, "tasks": True, "inputs": True, "splits": True, "citation": False,
        "root": False, "labels": False, "label_remap": False, "label_others": False, "spacing": False,
        "orientation": False, "slice_axis": False, "derive": False, "caveats": False,
        "label_channel": False, "label_threshold": False}
_INPUT = {"channels": True, "normalise": True, "use": False, "modality": False}
_NORMALISE = {"method": True, "low": False, "high": False, "lower": False, "upper": False}
_SPLIT = {"pattern": False, "ids": False, "take": False, "cases": False, "slices": False}
_DERIVE = {"method": True, "from": True, "threshold": False, "scale": False}
_NORM_METHODS = {"window": ("low", "high"), "percentile": ("lower", "upper")}


@dataclass(frozen=True)
class InputSpec:
    """One image key of the cases (``image``, ``source_a``, ...): channel names and normalisation."""

    channels: tuple[str, ...]
    use: tuple[str, ...]
    normalise: dict[str, Any]
    modality: str | None = None

    @property
    def use_indices(self) -> list[int]:
        return [self.channels.index(name) for name in self.use]

    @property
    def is_rgb(self) -> bool:
        return self.channels == ("red", "green", "blue")


@dataclass(frozen=True)
class Split:
    """The cases of one split: dicts of key -> absolute path (plus ``id``)."""

    cases: list[dict[str, str]]
    slices: tuple[int, int] | None = None


@dataclass(frozen=True)
class DataCard:
    """A validated data card; see ``data_cards/README.md`` for each field's meaning."""

    name: str
    description: str
    source: str
    licence: str
    modality: str
    spatial_dims: int
    tasks: tuple[str, ...]
    inputs: dict[str, InputSpec]
    splits: dict[str, Split]
    path: Path
    root: Path
    citation: str | None = None
    labels: dict[str, int] = field(default_factory=dict)
    label_remap: dict[int, int] | None = None
    label_others: int | None = None
    spacing: tuple[float, ...] | None = None
    orientation: str = "RAS"
    slice_axis: int = 2
    derive: dict[str, dict[str, Any]] = field(default_factory=dict)
    caveats: tuple[str, ...] = ()
    label_channel: int | None = None
    label_threshold: float | None = None

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def load_card(name_or_path: str | os.PathLike, *, check_files: bool = True) -> DataCard:
    """Load and validate a data card.

    Args:
        name_or_path: a card file, or a card name looked up in :func:`card_search_path`.
        check_files: check that the data root and every file the card names exist. False when only the
            card's description is needed (inference, label names): the data may then be absent, and
            splits list only the cases that can be resolved.

    Raises:
        MedidiffError: naming the card file and the missing/misspelled key, bad value or missing file.
    """
    path = _find_card(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as err:
        detail = " ".join(str(err).split())[:300]
        raise MedidiffError(f"cannot be parsed as YAML ({type(err).__name__}: {detail})", path) from None
    _check_keys(raw, _TOP, path, "card")
    inputs = {_key(k, "inputs", path): _input_spec(k, v, path)
              for k, v in _mapping(raw["inputs"], "inputs", path).items()}
    labels = _labels(raw.get("labels") or {}, path)
    remap, others = _remap(raw.get("label_remap"), raw.get("label_others"), labels, path)
    derive_raw = raw.get("derive") or {}
    derive = {_key(k, "derive", path): _derive(k, v, path)
              for k, v in (_mapping(derive_raw, "derive", path).items() if derive_raw else ())}
    for k, v in _mapping(raw["splits"], "splits", path).items():
        _check_keys(v, _SPLIT, path, f"splits.{_key(k, 'splits', path)}")
    dims = _dims(raw, path)
    spacing = _spacing(raw.get("spacing"), dims, path)
    orientation = _orientation(raw.get("orientation", "RAS"), path)
    slice_axis = _integer(raw.get("slice_axis", 2), "slice_axis", path, low=0, high=2)
    root = resolve_root(_text(raw.get("root", "${shared}"), "root", path), path)
    if check_files and not _exists(root):
        raise MedidiffError(f"data root {root} does not exist (for ${{shared}} set MEDIDIFF_SHARED_DATA "
                            "or place the data in ../shared/data beside the repository)", path)
    splits = {k: _split(k, v, root, path, check_files) for k, v in raw["splits"].items()}
    for needed in ("train", "val"):
        if needed not in splits:
            raise MedidiffError(f"splits: missing required split '{needed}'", path)
    citation = raw.get("citation")
    label_channel, label_threshold = _label_reading(raw, labels, path)
    card = DataCard(
        name=_text(raw["name"], "name", path), description=_text(raw["description"], "description", path),
        source=_text(raw["source"], "source", path), licence=_text(raw["licence"], "licence", path),
        modality=_text(raw["modality"], "modality", path), spatial_dims=dims,
        tasks=_tasks(raw["tasks"], path), inputs=inputs, splits=splits, path=path, root=root,
        citation=None if citation is None else _text(citation, "citation", path), labels=labels,
        label_remap=remap, label_others=others, spacing=spacing, orientation=orientation, slice_axis=slice_axis,
        derive=derive, caveats=_texts(raw.get("caveats") or [], "caveats", path),
        label_channel=label_channel, label_threshold=label_threshold,
    )
    if check_files:
        _check_files(card)
    return card


def card_search_path() -> list[Path]:
    """Folders searched for cards by name: ``$MEDIDIFF_CARDS``, the repo's ``data_cards/``, packaged cards."""
    extra = [Path(p) for p in os.environ.get("MEDIDIFF_CARDS", "").split(os.pathsep) if p]
    return [*extra, REPO_ROOT / "data_cards", PACKAGED_CARDS]


def shared_data_root() -> Path:
    """``$MEDIDIFF_SHARED_DATA`` or ``../shared/data`` beside the repository."""
    env = os.environ.get("MEDIDIFF_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def resolve_root(root: str, card_path: Path) -> Path:
    """Expand ``${shared}``, ``${card}`` and ``package:<module>/<sub/path>`` in a card's root or file."""
    if root.startswith("package:"):
        module, _, rest = root[len("package:"):].partition("/")
        # find_spec locates a top-level package without importing it: a card never runs code
        spec = importlib.util.find_spec(module) if module.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise MedidiffError(f"root/file names package '{module}', which is not an installed package",
                                card_path)
        return Path(next(iter(spec.submodule_search_locations))) / rest
    expanded = root.replace("${shared}", str(shared_data_root())).replace("${card}", str(card_path.parent))
    if "${" in expanded:
        raise MedidiffError(f"unknown variable in '{root}'; use ${{shared}}, ${{card}} or package:", card_path)
    path = Path(expanded)
    return path if path.is_absolute() else (card_path.parent / path).resolve()


def _find_card(name_or_path: str | os.PathLike) -> Path:
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or os.sep in text or "/" in text:
        path = Path(text)
        if not path.is_file():
            raise MedidiffError("data card not found", path)
        return path.resolve()
    for folder in card_search_path():
        if (folder / f"{text}.yaml").is_file():
            return (folder / f"{text}.yaml").resolve()
    known = sorted({p.stem for folder in card_search_path() if folder.is_dir() for p in folder.glob("*.yaml")})
    hint = difflib.get_close_matches(text, known, n=1)
    raise MedidiffError(f"no data card named '{text}'" + (f"; did you mean '{hint[0]}'?" if hint else "")
                        + f" Known cards: {', '.join(known)}")


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
    tasks = tuple(raw if isinstance(raw, list) else [raw])
    if not tasks:
        raise MedidiffError(f"tasks: list at least one of {', '.join(TASKS)}", path)
    for task in tasks:
        if not isinstance(task, str) or task not in TASKS:
            hint = difflib.get_close_matches(str(task), TASKS, n=1)
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


def _input_spec(key: str, raw: Any, path: Path) -> InputSpec:
    _check_keys(raw, _INPUT, path, f"inputs.{key}")
    norm = _checked(raw["normalise"], _NORMALISE, path, f"inputs.{key}.normalise")
    if not isinstance(norm["method"], str) or norm["method"] not in _NORM_METHODS:
        raise MedidiffError(f"inputs.{key}.normalise.method must be one of {list(_NORM_METHODS)}, "
                            f"got '{norm['method']}'", path)
    for needed in _NORM_METHODS[norm["method"]]:
        if needed not in norm:
            raise MedidiffError(f"inputs.{key}.normalise: missing required key '{needed}'", path)
    low, high = (_number(norm[b], f"inputs.{key}.normalise.{b}", path) for b in _NORM_METHODS[norm["method"]])
    rule = "0 <= lower < upper <= 100" if norm["method"] == "percentile" else "low < high"
    if low >= high or (norm["method"] == "percentile" and not 0 <= low < high <= 100):
        raise MedidiffError(f"inputs.{key}.normalise: need {rule}, got {low} and {high}", path)
    channels = _texts(raw["channels"], f"inputs.{key}.channels", path)
    use = _texts(raw.get("use", list(channels)), f"inputs.{key}.use", path)
    for name, names in (("channels", channels), ("use", use)):
        if not names or len(set(names)) != len(names):
            raise MedidiffError(f"inputs.{key}.{name}: expected distinct channel names, got {list(names)}", path)
    for name in use:
        if name not in channels:
            raise MedidiffError(f"inputs.{key}.use: channel '{name}' is not one of {list(channels)}", path)
    modality = raw.get("modality")
    return InputSpec(channels=channels, use=use, normalise=norm,
                     modality=None if modality is None else _text(modality, f"inputs.{key}.modality", path))


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


def _split(name: str, raw: Any, root: Path, path: Path, strict: bool = True) -> Split:
    where = f"splits.{name}"
    _check_keys(raw, _SPLIT, path, where)
    if ("pattern" in raw) == ("cases" in raw):
        raise MedidiffError(f"{where}: give exactly one of 'pattern' or 'cases'", path)
    if "cases" in raw:
        if not isinstance(raw["cases"], list):
            raise MedidiffError(f"{where}.cases: expected a list of cases, got {_show(raw['cases'])}", path)
        cases = [_case(case, i, root, path, f"{where}.cases[{i}]") for i, case in enumerate(raw["cases"])]
    else:
        pattern = _mapping(raw["pattern"], f"{where}.pattern", path)
        pattern = {_key(k, f"{where}.pattern", path): _text(v, f"{where}.pattern.{k}", path)
                   for k, v in pattern.items()}
        cases = _expand_pattern(pattern, raw.get("ids"), root, path, where, strict)
    if "take" in raw:
        start, stop = _range(raw["take"], f"{where}.take", path)
        cases = cases[start:stop]
    if not cases and strict:
        raise MedidiffError(f"{where}: no cases found (pattern matched no files under {root})", path)
    slices = _range(raw["slices"], f"{where}.slices", path) if raw.get("slices") is not None else None
    return Split(cases=cases, slices=slices)


def _case(raw: Any, index: int, root: Path, path: Path, where: str) -> dict[str, str]:
    if not isinstance(raw, dict) or not raw:
        raise MedidiffError(f"{where}: expected a mapping such as {{id: ..., image: ...}}, got {_show(raw)}",
                            path)
    files = {_key(k, where, path): _text(v, f"{where}.{k}", path) for k, v in raw.items() if k != "id"}
    if not files:
        raise MedidiffError(f"{where}: names no file", path)
    return {"id": _text(raw.get("id", index), f"{where}.id", path),
            **{k: str(_file(root, v, path)) for k, v in files.items()}}


def _expand_pattern(pattern: dict[str, str], ids: Any, root: Path, path: Path, where: str,
                    strict: bool = True) -> list[dict]:
    """Cases from ``{id}`` patterns; ``ids`` selects among the ids found, by exact value or glob ("41*")."""
    first = pattern.get("image", pattern.get("source_a", ""))
    if "{id}" not in first:
        raise MedidiffError(f"{where}.pattern: the image pattern must contain '{{id}}'", path)
    regex = re.compile(re.escape(first).replace(re.escape("{id}"), "(?P<id>.+?)") + "$")
    try:
        found = [regex.match(p.relative_to(root).as_posix()) for p in root.glob(first.replace("{id}", "*"))]
    except (ValueError, NotImplementedError, OSError) as err:
        raise MedidiffError(f"{where}.pattern: '{first}' is not a usable file pattern under {root} ({err})",
                            path) from None
    available = sorted(m["id"] for m in found if m)
    selected = available
    if ids is not None:
        globs = list(_texts(ids, f"{where}.ids", path))
        for glob in globs:
            if strict and not any(fnmatch.fnmatchcase(i, glob) for i in available):
                raise MedidiffError(f"{where}.ids: no file matches id '{glob}' ({root / first})", path)
        selected = [i for i in available if any(fnmatch.fnmatchcase(i, g) for g in globs)]
    return [{"id": i, **{k: str(_file(root, v.replace("{id}", i), path)) for k, v in pattern.items()}}
            for i in selected]


def _file(root: Path, value: str, card_path: Path) -> Path:
    return resolve_root(value, card_path) if value.startswith(("package:", "${")) else root / value


def _exists(path: Path) -> bool:
    """``path.exists()``, False for names the OS cannot even look up (NUL bytes, too long)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _check_files(card: DataCard) -> None:
    for split_name, split in card.splits.items():
        for case in split.cases:
            for key, value in case.items():
                if key != "id" and not _exists(Path(value)):
                    raise MedidiffError(f"splits.{split_name}, case '{case['id']}', key '{key}': file "
                                        f"{value} does not exist", card.path)
