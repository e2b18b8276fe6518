"""Data cards: one YAML file per data set describing files, channels, labels and splits.

The schema is documented in ``data_cards/README.md``. :func:`load_card` validates every key (an
unknown key gets a "did you mean" hint), resolves the data root and file patterns into per-split case
lists of absolute paths, and checks that the files exist — so a wrong card fails at once, naming the
card and the key or file, rather than deep inside a training run.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib.resources
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
        "orientation": False, "slice_axis": False, "derive": False, "caveats": False}
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
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise MedidiffError(f"cannot be parsed as YAML ({err})", path) from None
    _check_keys(raw, _TOP, path, "card")
    inputs = {k: _input_spec(k, v, path) for k, v in _mapping(raw["inputs"], "inputs", path).items()}
    labels = _labels(raw.get("labels") or {}, path)
    remap, others = _remap(raw.get("label_remap"), raw.get("label_others"), labels, path)
    derive = {k: _checked(v, _DERIVE, path, f"derive.{k}") for k, v in (raw.get("derive") or {}).items()}
    for k, v in derive.items():
        if v["method"] != "tissue_argmax":
            raise MedidiffError(f"derive.{k}.method must be 'tissue_argmax', got '{v['method']}'", path)
    for k, v in _mapping(raw["splits"], "splits", path).items():
        _check_keys(v, _SPLIT, path, f"splits.{k}")
    root = resolve_root(str(raw.get("root", "${shared}")), path)
    if check_files and not root.exists():
        raise MedidiffError(f"data root {root} does not exist (for ${{shared}} set MEDIDIFF_SHARED_DATA "
                            "or place the data in ../shared/data beside the repository)", path)
    splits = {k: _split(k, v, root, path, check_files) for k, v in raw["splits"].items()}
    for needed in ("train", "val"):
        if needed not in splits:
            raise MedidiffError(f"splits: missing required split '{needed}'", path)
    card = DataCard(
        name=str(raw["name"]), description=str(raw["description"]), source=str(raw["source"]),
        licence=str(raw["licence"]), modality=str(raw["modality"]), spatial_dims=_dims(raw, path),
        tasks=_tasks(raw["tasks"], path), inputs=inputs, splits=splits, path=path, root=root,
        citation=raw.get("citation"), labels=labels, label_remap=remap, label_others=others,
        spacing=tuple(float(s) for s in raw["spacing"]) if raw.get("spacing") else None,
        orientation=str(raw.get("orientation", "RAS")), slice_axis=int(raw.get("slice_axis", 2)),
        derive=derive, caveats=tuple(raw.get("caveats") or ()),
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
        try:
            base = Path(str(importlib.resources.files(module)))
        except ModuleNotFoundError:
            raise MedidiffError(f"root/file names package '{module}', which is not installed", card_path) from None
        return base / rest
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


def _dims(raw: dict, path: Path) -> int:
    if raw["spatial_dims"] not in (2, 3):
        raise MedidiffError(f"spatial_dims must be 2 or 3, got {raw['spatial_dims']!r}", path)
    return int(raw["spatial_dims"])


def _tasks(raw: Any, path: Path) -> tuple[str, ...]:
    tasks = tuple(raw if isinstance(raw, list) else [raw])
    for task in tasks:
        if task not in TASKS:
            hint = difflib.get_close_matches(str(task), TASKS, n=1)
            raise MedidiffError(f"tasks: unknown task '{task}'" + (f"; did you mean '{hint[0]}'?" if hint else ""), path)
    return tasks


def _input_spec(key: str, raw: Any, path: Path) -> InputSpec:
    _check_keys(raw, _INPUT, path, f"inputs.{key}")
    norm = _checked(raw["normalise"], _NORMALISE, path, f"inputs.{key}.normalise")
    if norm["method"] not in _NORM_METHODS:
        raise MedidiffError(f"inputs.{key}.normalise.method must be one of {list(_NORM_METHODS)}, "
                            f"got '{norm['method']}'", path)
    for needed in _NORM_METHODS[norm["method"]]:
        if needed not in norm:
            raise MedidiffError(f"inputs.{key}.normalise: missing required key '{needed}'", path)
    channels = tuple(str(c) for c in raw["channels"])
    use = tuple(str(c) for c in raw.get("use", channels))
    for name in use:
        if name not in channels:
            raise MedidiffError(f"inputs.{key}.use: channel '{name}' is not one of {list(channels)}", path)
    return InputSpec(channels=channels, use=use, normalise=norm, modality=raw.get("modality"))


def _labels(raw: dict, path: Path) -> dict[str, int]:
    labels = {str(k): int(v) for k, v in raw.items()}
    if labels and sorted(labels.values()) != list(range(len(labels))):
        raise MedidiffError(f"labels must map names to contiguous integers 0..K-1, got {labels}", path)
    return labels


def _remap(raw: dict | None, others: Any, labels: dict[str, int], path: Path) -> tuple[dict[int, int] | None, int | None]:
    def to_class(value: Any, where: str) -> int:
        if isinstance(value, str) and value in labels:
            return labels[value]
        if isinstance(value, int) and value in labels.values():
            return value
        hint = difflib.get_close_matches(str(value), list(labels), n=1)
        raise MedidiffError(f"{where}: '{value}' is not a label of this card"
                            + (f"; did you mean '{hint[0]}'?" if hint else f" ({list(labels)})"), path)

    remap = None if raw is None else {int(k): to_class(v, f"label_remap.{k}") for k, v in raw.items()}
    return remap, None if others is None else to_class(others, "label_others")


def _split(name: str, raw: Any, root: Path, path: Path, strict: bool = True) -> Split:
    _check_keys(raw, _SPLIT, path, f"splits.{name}")
    if ("pattern" in raw) == ("cases" in raw):
        raise MedidiffError(f"splits.{name}: give exactly one of 'pattern' or 'cases'", path)
    if "cases" in raw:
        cases = [{"id": str(case.get("id", i)),
                  **{k: str(_file(root, v, path)) for k, v in case.items() if k != "id"}}
                 for i, case in enumerate(raw["cases"])]
    else:
        cases = _expand_pattern(raw["pattern"], raw.get("ids"), root, path, f"splits.{name}", strict)
    if "take" in raw:
        start, stop = raw["take"]
        cases = cases[start:stop]
    if not cases and strict:
        raise MedidiffError(f"splits.{name}: no cases found (pattern matched no files under {root})", path)
    slices = tuple(int(s) for s in raw["slices"]) if raw.get("slices") else None
    return Split(cases=cases, slices=slices)


def _expand_pattern(pattern: dict[str, str], ids: Any, root: Path, path: Path, where: str,
                    strict: bool = True) -> list[dict]:
    """Cases from ``{id}`` patterns; ``ids`` selects among the ids found, by exact value or glob ("41*")."""
    first = pattern.get("image", pattern.get("source_a", ""))
    if "{id}" not in first:
        raise MedidiffError(f"{where}.pattern: the image pattern must contain '{{id}}'", path)
    regex = re.compile(re.escape(first).replace(re.escape("{id}"), "(?P<id>.+?)") + "$")
    found = (regex.match(p.relative_to(root).as_posix()) for p in root.glob(first.replace("{id}", "*")))
    available = sorted(m["id"] for m in found if m)
    selected = available
    if ids is not None:
        globs = [str(i) for i in (ids if isinstance(ids, list) else [ids])]
        for glob in globs:
            if strict and not any(fnmatch.fnmatchcase(i, glob) for i in available):
                raise MedidiffError(f"{where}.ids: no file matches id '{glob}' ({root / first})", path)
        selected = [i for i in available if any(fnmatch.fnmatchcase(i, g) for g in globs)]
    return [{"id": i, **{k: str(_file(root, v.replace("{id}", i), path)) for k, v in pattern.items()}}
            for i in selected]


def _file(root: Path, value: str, card_path: Path) -> Path:
    return resolve_root(value, card_path) if value.startswith(("package:", "${")) else root / value


def _check_files(card: DataCard) -> None:
    for split_name, split in card.splits.items():
        for case in split.cases:
            for key, value in case.items():
                if key != "id" and not Path(value).exists():
                    raise MedidiffError(f"splits.{split_name}, case '{case['id']}', key '{key}': file "
                                        f"{value} does not exist", card.path)
