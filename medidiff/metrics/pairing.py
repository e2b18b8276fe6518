"""Which prediction goes with which reference: the pairing of files to cases for ``medidiff evaluate``.

* **Pairing rule.** A file's case name is its name without the image extension (``.nii.gz``, ``.nii``,
  ``.png``, ``.tif``, ``.gif``, ``.mha``, ...) and nothing else: ``liver_test.nii.gz`` is case ``liver_test``, and
  ``medidiff infer`` writes ``<case>.nii.gz`` for ``<case>.<ext>`` so that its predictions pair with references
  of the same stem. A data card (``medidiff evaluate --card``) may list ``case_suffixes`` to strip as well, from
  prediction, reference, region and rater file names alike, repeatedly and never down to nothing: the DRIVE card
  lists ``_test``, ``_training``, ``_manual1``, ``_manual2`` and ``_mask``, so ``01_test.tif``, ``01_manual1.gif``
  and ``01_test_mask.gif`` are all case ``01``. Files of other types and hidden files are ignored. A case
  without a partner in any folder and two files with one case name each raise
  :class:`~medidiff.errors.MedidiffError` naming the file.
* **Explicit pairs.** A CSV file (:func:`read_pairs`) pairs files by row instead, whatever their names.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medidiff.errors import MedidiffError
from medidiff.io import IMAGE_2D_SUFFIXES, ITK_SUFFIXES, NIFTI_SUFFIXES

__all__ = ["case_name", "card_suffixes", "pair_inputs", "read_pairs"]

Pairs = list[tuple[str, dict[str, Path]]]
_EXTENSIONS = tuple(sorted(NIFTI_SUFFIXES + IMAGE_2D_SUFFIXES + ITK_SUFFIXES, key=len, reverse=True))


def case_name(filename: str, suffixes: Sequence[str] = ()) -> str | None:
    """Case name of an image file per the pairing rule (``suffixes``: a card's ``case_suffixes``), or None when it
    is not an image file."""
    lower = filename.lower()
    ext = next((e for e in _EXTENSIONS if lower.endswith(e)), None)
    if ext is None or filename.startswith("."):
        return None
    name = filename[: -len(ext)]
    while True:
        suffix = next((s for s in suffixes if name.lower().endswith(s.lower()) and len(name) > len(s)), None)
        if suffix is None:
            return name
        name = name[: -len(suffix)]


def card_suffixes(card: Any, suffixes: Sequence[str] | None = None) -> tuple[str, ...]:
    """The suffixes to strip: ``suffixes`` when given, else the card's ``case_suffixes`` (none without a card, or
    for label rules that are not a card)."""
    if suffixes is not None:
        return tuple(suffixes)
    return tuple(getattr(card, "case_suffixes", None) or ())


def _index(folder: str | os.PathLike, suffixes: Sequence[str]) -> dict[str, Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise MedidiffError("folder not found", folder)
    cases: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        name = case_name(path.name, suffixes) if path.is_file() else None
        if name is None:
            continue
        if name in cases:
            raise MedidiffError(f"two files map to case '{name}': {cases[name].name} and {path.name}; "
                                "rename one (see the pairing rule in medidiff.metrics.pairing)", path)
        cases[name] = path
    return cases


def pair_inputs(folders: Mapping[str, str | os.PathLike], suffixes: Sequence[str]) -> Pairs:
    """Match the inputs of each role: one file each (a single pair), or folders whose files pair by case name;
    the first role is the one being evaluated."""
    paths = {role: Path(p) for role, p in folders.items()}
    if all(p.is_file() for p in paths.values()):
        first = next(iter(paths.values()))
        return [(case_name(first.name, suffixes) or first.name, paths)]
    for role, path in paths.items():
        if path.is_file():
            raise MedidiffError(f"is a file while the {next(r for r in paths if r != role)} input is a folder; "
                                "give files for all, folders for all, or a --pairs file", path)
    indexes = {role: _index(folder, suffixes) for role, folder in folders.items()}
    first = next(iter(folders))
    if not indexes[first]:
        raise MedidiffError("no image files found", folders[first])
    names = sorted(set().union(*(idx.keys() for idx in indexes.values())))
    for name in names:
        have = {role for role, idx in indexes.items() if name in idx}
        for role in folders:
            if role not in have:
                where = indexes[sorted(have)[0]][name]
                raise MedidiffError(f"case '{name}' has no {role} file in {folders[role]} (files pair by case "
                                    "name; give a --pairs file to pair them otherwise)", where)
    return [(name, {role: indexes[role][name] for role in folders}) for name in names]


def read_pairs(path: str | os.PathLike, roles: Sequence[str], suffixes: Sequence[str] = ()) -> Pairs:
    """Pairs from a CSV file with a header naming the roles (``pred,ref`` and optionally ``region``; fusion
    ``pred,source_a,source_b``) and an optional ``case`` column (else the case is named after the first role's
    file, per the pairing rule); relative paths are relative to the CSV file."""
    path = Path(path)
    if not path.is_file():
        raise MedidiffError("pairs file not found", path)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise MedidiffError("pairs file holds no rows", path)
    missing = [role for role in roles if role not in rows[0]]
    if missing:
        raise MedidiffError(f"pairs file needs the column(s) {missing} (header: {list(rows[0])})", path)
    pairs, seen = [], set()
    for number, row in enumerate(rows, start=2):
        files = {role: (path.parent / row[role].strip()) for role in roles if (row.get(role) or "").strip()}
        for role, file in files.items():
            if not file.is_file():
                raise MedidiffError(f"line {number}: {role} file {file} not found", path)
        name = (row.get("case") or "").strip() or case_name(files[roles[0]].name, suffixes) or files[roles[0]].name
        if name in seen:
            raise MedidiffError(f"line {number}: case '{name}' appears twice", path)
        seen.add(name)
        pairs.append((name, files))
    return pairs
