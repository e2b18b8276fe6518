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
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medidiff.data.card_fields import (
    _INPUT,
    _NORM_METHODS,
    _NORMALISE,
    _SPLIT,
    _TOP,
    _case_suffixes,
    _check_keys,
    _checked,
    _derive,
    _dims,
    _integer,
    _key,
    _label_reading,
    _labels,
    _mapping,
    _number,
    _orientation,
    _range,
    _remap,
    _show,
    _spacing,
    _tasks,
    _text,
    _texts,
)
from medidiff.errors import MedidiffError

__all__ = ["DataCard", "InputSpec", "Split", "load_card", "card_search_path", "shared_data_root"]

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGED_CARDS = Path(__file__).resolve().parents[1] / "sample_data" / "cards"


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
    case_suffixes: tuple[str, ...] = ()

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
    raw = _read_yaml(path)
    _check_keys(raw, _TOP, path, "card")
    inputs = {_key(k, "inputs", path): _input_spec(k, v, path)
              for k, v in _mapping(raw["inputs"], "inputs", path).items()}
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
    card = DataCard(
        name=_text(raw["name"], "name", path), description=_text(raw["description"], "description", path),
        source=_text(raw["source"], "source", path), licence=_text(raw["licence"], "licence", path),
        modality=_text(raw["modality"], "modality", path), spatial_dims=dims,
        tasks=_tasks(raw["tasks"], path), inputs=inputs, splits=splits, path=path, root=root,
        citation=None if citation is None else _text(citation, "citation", path), spacing=spacing,
        orientation=orientation, slice_axis=slice_axis, derive=derive,
        caveats=_texts(raw.get("caveats") or [], "caveats", path), case_suffixes=_case_suffixes(raw, path),
        **_label_fields(raw, path),
    )
    if check_files:
        _check_files(card)
    return card


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as err:
        detail = " ".join(str(err).split())[:300]
        raise MedidiffError(f"cannot be parsed as YAML ({type(err).__name__}: {detail})", path) from None


def _label_fields(raw: dict, path: Path) -> dict[str, Any]:
    """The label names and how label files are read: remap, class of unlisted values, channel, threshold."""
    labels = _labels(raw.get("labels") or {}, path)
    remap, others = _remap(raw.get("label_remap"), raw.get("label_others"), labels, path)
    channel, threshold = _label_reading(raw, labels, path)
    return {"labels": labels, "label_remap": remap, "label_others": others, "label_channel": channel,
            "label_threshold": threshold}


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
