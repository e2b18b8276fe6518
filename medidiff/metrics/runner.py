"""One evaluation run, whatever the task: pair the inputs (:mod:`medidiff.metrics.pairing`), read each case's files,
put them on the first file's axes and check they share its grid (:func:`medidiff.io.grid_problem`), score the
case, summarise every numeric field and write the result as strict JSON (see :mod:`medidiff.metrics.evaluate`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.errors import MedidiffError
from medidiff.io import grid_problem, read, reorient_like, write_json
from medidiff.metrics.pairing import Pairs, pair_inputs, read_pairs

__all__ = ["evaluate_cases", "single_channel", "summarise"]

Kind = str | Callable[[Path], Any]
Score = Callable[[dict[str, Any], dict[str, Path]], dict[str, float]]


def evaluate_cases(
    task: str,
    folders: Mapping[str, str | os.PathLike],
    kinds: Mapping[str, Kind],
    score: Score,
    settings: dict[str, Any],
    *,
    suffixes: Sequence[str] = (),
    out_json: str | os.PathLike | None = None,
    complete: Callable[[list[dict[str, Any]]], None] | None = None,
    pairs_file: str | os.PathLike | None = None,
    reads: Sequence[Path] = (),
) -> dict[str, Any]:
    """Pair (by case name, ``suffixes`` stripped, or from ``pairs_file``), read (``kinds``: "image", "label" or a
    reader of the role's files), check geometry, score each case, complete the case rows, summarise, write.
    ``reads``: further files evaluation reads (never replaced)."""
    roles = list(folders)
    pairs = read_pairs(pairs_file, roles, suffixes) if pairs_file is not None else pair_inputs(folders, suffixes)
    if out_json is not None:
        _check_out(Path(out_json), pairs, [*reads, *([Path(pairs_file)] if pairs_file is not None else [])])
    cases = [_score_case(name, paths, kinds, score) for name, paths in pairs]
    if pairs_file is not None:
        settings = settings | {"pairs_file": str(pairs_file)}
    if complete is not None:
        complete(cases)
    result = {"task": task, "settings": settings, "cases": cases, "summary": summarise(cases)}
    if out_json is not None:
        write_json(Path(out_json), result)  # atomically; _check_out allowed the file
    return result


def _score_case(name: str, paths: dict[str, Path], kinds: Mapping[str, Kind], score: Score) -> dict[str, Any]:
    """One case's row: its files, its scores and the roles put on the first file's axes."""
    images = {role: _load(p, kinds[role]) for role, p in paths.items()}
    first = next(iter(paths))
    # the same voxels stored in another axis order are put in the first file's order (exact flips)
    reoriented = [role for role in images if images[role].meta["orientation"] != images[first].meta["orientation"]]
    images = {role: reorient_like(image, images[first]) for role, image in images.items()}
    _check_geometry(images, paths)
    try:
        values = score(images, paths)
    except ValueError as err:  # a metric refused the data (range, size): the user's input
        raise MedidiffError(str(err), paths[first]) from None
    return ({"case": name, **{role: str(p) for role, p in paths.items()}, **values}
            | ({"reoriented": reoriented} if reoriented else {}))


def _load(path: Path, kind: Kind) -> Any:
    return kind(path) if callable(kind) else read(path, kind=kind)


def _check_geometry(images: Mapping[str, Any], paths: Mapping[str, Path]) -> None:
    """Every image on the first one's grid (:func:`medidiff.io.grid_problem`; the origin may be off by up to half
    the first image's smallest voxel: the same voxels are compared), else an error naming the file."""
    first, *others = images
    half_voxel = 0.5 * float(np.min(images[first].meta["spacing"]))
    for role in others:
        problem = grid_problem(images[role], images[first], origin_atol=half_voxel)
        if problem:
            raise MedidiffError(f"{problem} of the {first} file {paths[first]}", paths[role])


def single_channel(images: Mapping[str, Any], paths: Mapping[str, Path], role: str) -> np.ndarray:
    """The one channel of a role's image, as an array ``(*spatial)``; several channels are an error."""
    if images[role].shape[0] != 1:
        raise MedidiffError(f"has {images[role].shape[0]} channels where one is expected", paths[role])
    return np.asarray(images[role][0])


def _check_out(out_json: Path, pairs: Pairs, reads: Sequence[Path]) -> None:
    """``--out`` may replace only a missing file or an earlier evaluate result: never a file evaluation reads, nor
    one it did not write (infer's labels.json and provenance beside the predictions, the user's own files)."""
    target = out_json.resolve()
    if any(path.resolve() == target for _, paths in pairs for path in paths.values()):
        raise MedidiffError("the metrics file would replace an input file; choose another --out", out_json)
    if any(Path(path).resolve() == target for path in reads):
        raise MedidiffError("is a file evaluate reads (the predictions' class names or the pairs); choose another "
                            "--out", out_json)
    if out_json.is_dir():
        raise MedidiffError("is a folder; --out names the JSON file to write", out_json)
    if out_json.exists() and not _is_evaluate_result(out_json):
        raise MedidiffError("exists and is not a medidiff evaluate result; choose another --out", out_json)


def _is_evaluate_result(path: Path) -> bool:
    try:
        if path.stat().st_size > 2**30:  # far beyond any result; not worth reading to find out
            return False
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return False
    return isinstance(found, dict) and {"task", "settings", "cases", "summary"} <= set(found)


def summarise(cases: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Statistics of every numeric field, over the cases' finite values."""
    keys = dict.fromkeys(k for case in cases for k, v in case.items() if isinstance(v, (int, float)))
    out = {}
    for key in keys:
        values = np.array([c.get(key, math.nan) for c in cases], dtype=float)
        finite = values[np.isfinite(values)]
        out[key] = {
            "mean": float(finite.mean()) if finite.size else math.nan,
            "std": float(finite.std(ddof=1)) if finite.size > 1 else math.nan,
            "median": float(np.median(finite)) if finite.size else math.nan,
            "n": int(finite.size),
            "n_nan": int(np.isnan(values).sum()),
            "n_inf": int(np.isinf(values).sum()),
        }
    return out
