"""File-to-file evaluation: folders of predictions against folders of references, per case and summary.

Every evaluator returns (and, given ``out_json``, writes) ::

    {"task": ..., "settings": {...},
     "cases":   [{"case": name, "pred": path, "ref": path, <metric>: value, ...}, ...],
     "summary": {<metric>: {"mean", "std", "median", "n", "n_nan", "n_inf"}}}

* **Pairing rule.** A file's case name is its name without the image extension (``.nii.gz``, ``.nii``,
  ``.png``, ``.tif``, ``.gif``, ``.mha``, ...) and then without any trailing suffixes from ``suffixes``,
  stripped repeatedly (default :data:`CASE_SUFFIXES`: ``_seg``, ``_pred``, ``_label``, ``_mask``, ``_gt``,
  ``_fused``, ``_manual1``, ``_test``, ...). So ``01_test.png``, ``01_manual1.gif`` and ``01_test_mask.gif``
  (DRIVE) are all case ``01``, and ``liver_007_seg.nii.gz`` pairs with ``liver_007.nii.gz``. Files of other
  types and hidden files are ignored. A case without a partner in any folder, two files with one case name,
  a shape, spacing or orientation mismatch each raise :class:`~medidiff.errors.MedidiffError` naming the
  file.
* **Geometry** comes from the files through :func:`medidiff.io.read` (NIfTI/ITK header; 1.0 for 2D images):
  HD95 is in millimetres for scans, in pixels for PNGs.
* **JSON.** NaN and infinities are written as ``null`` (strict JSON). The summary statistics use the finite
  values only; ``n`` counts them, ``n_nan`` and ``n_inf`` count the rest (for segmentation: a class absent
  from both masks, and a missed or hallucinated structure, whose HD95 is ``inf`` and Dice 0). ``std`` is the
  sample standard deviation (ddof = 1; null when n < 2). The file is written atomically (temp file + rename).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.data.labels import LabelRules, Rules, describe, labels_file, match_by_name, prediction_labels, read_label
from medidiff.errors import MedidiffError
from medidiff.io import IMAGE_2D_SUFFIXES, ITK_SUFFIXES, NIFTI_SUFFIXES, read, reorient_like, write_json
from medidiff.metrics.fusion import fusion_metrics
from medidiff.metrics.image import image_metrics
from medidiff.metrics.segmentation import segmentation_metrics
from medidiff.metrics.uncertainty import uncertainty_metrics

__all__ = ["CASE_SUFFIXES", "case_name", "evaluate_segmentation", "evaluate_image", "evaluate_fusion",
           "prediction_labels"]

CASE_SUFFIXES = ("_seg", "_pred", "_prediction", "_label", "_labels", "_mask", "_gt", "_ref", "_fused",
                 "_fusion", "_manual1", "_manual2", "_test", "_training")
_EXTENSIONS = tuple(sorted(NIFTI_SUFFIXES + IMAGE_2D_SUFFIXES + ITK_SUFFIXES, key=len, reverse=True))
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, the Y of YCbCr that colour fusion works on


def case_name(filename: str, suffixes: Sequence[str] = CASE_SUFFIXES) -> str | None:
    """Case name of an image file per the pairing rule, or None when it is not an image file."""
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
                                "rename one (see the pairing rule in medidiff.metrics.evaluate)", path)
        cases[name] = path
    return cases


def _pair(
    folders: Mapping[str, str | os.PathLike], suffixes: Sequence[str]
) -> list[tuple[str, dict[str, Path]]]:
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
    names = set().union(*(idx.keys() for idx in indexes.values()))
    for name in sorted(names):
        have = {role for role, idx in indexes.items() if name in idx}
        for role in folders:
            if role not in have:
                where = indexes[sorted(have)[0]][name]
                raise MedidiffError(f"case '{name}' has no {role} file in {folders[role]} (files pair by case "
                                    "name; give a --pairs file to pair them otherwise)", where)
    return [(name, {role: indexes[role][name] for role in folders}) for name in sorted(names)]


def read_pairs(path: str | os.PathLike, roles: Sequence[str]) -> list[tuple[str, dict[str, Path]]]:
    """Pairs from a CSV file with a header naming the roles (``pred,ref`` and optionally ``region``; fusion
    ``pred,source_a,source_b``) and an optional ``case`` column; relative paths are relative to the CSV file."""
    import csv

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
        name = (row.get("case") or "").strip() or case_name(files[roles[0]].name) or files[roles[0]].name
        if name in seen:
            raise MedidiffError(f"line {number}: case '{name}' appears twice", path)
        seen.add(name)
        pairs.append((name, files))
    return pairs


def _geometry_problem(img: Any, ref: Any) -> str | None:
    shape, ref_shape = tuple(img.shape[1:]), tuple(ref.shape[1:])
    if shape != ref_shape:
        return f"shape {shape} differs from {ref_shape}"
    if not np.allclose(img.meta["spacing"], ref.meta["spacing"], rtol=1e-4, atol=1e-4):
        return f"spacing {img.meta['spacing']} differs from {ref.meta['spacing']}"
    if img.meta["orientation"] != ref.meta["orientation"]:
        return f"orientation {img.meta['orientation']} differs from {ref.meta['orientation']}"
    directions = [np.asarray(m.meta["affine"], dtype=float)[:3, :3] / np.asarray(m.meta["spacing"] + (1.0,) *
                  (3 - len(m.meta["spacing"])))[:3] for m in (img, ref)]
    turn = float(np.degrees(np.arccos(np.clip(np.min(np.sum(directions[0] * directions[1], axis=0)), -1, 1))))
    if turn > 0.1:  # same axis codes yet rotated (an oblique re-slice): voxel-wise scores would be meaningless
        return f"voxel axes (direction) are turned by {turn:.1f} degrees against those"
    # same shape, spacing and axes yet shifted (e.g. two different crops): voxel-wise scores would be meaningless
    origin, ref_origin = (np.asarray(m.meta["affine"], dtype=float)[:3, 3] for m in (img, ref))
    shift = float(np.linalg.norm(origin - ref_origin))
    if shift > 0.5 * float(np.min(ref.meta["spacing"])):
        return f"origin {np.round(origin, 2).tolist()} lies {shift:.2f} mm from {np.round(ref_origin, 2).tolist()}"
    return None


def _check_geometry(images: Mapping[str, Any], paths: Mapping[str, Path]) -> None:
    """Same spatial shape, spacing and orientation as the first image, else an error naming the file."""
    first, *others = images
    for role in others:
        problem = _geometry_problem(images[role], images[first])
        if problem:
            raise MedidiffError(f"{problem} of the {first} file {paths[first]}", paths[role])


def _single_channel(images: Mapping[str, Any], paths: Mapping[str, Path], role: str) -> np.ndarray:
    if images[role].shape[0] != 1:
        raise MedidiffError(f"has {images[role].shape[0]} channels where one is expected", paths[role])
    return np.asarray(images[role][0])


def _run(
    task: str,
    folders: Mapping[str, str | os.PathLike],
    kinds: Mapping[str, str | Callable[[Path], Any]],
    score: Callable[[dict[str, Any], dict[str, Path]], dict[str, float]],
    settings: dict[str, Any],
    suffixes: Sequence[str],
    out_json: str | os.PathLike | None,
    complete: Callable[[list[dict[str, Any]]], None] | None = None,
    pairs_file: str | os.PathLike | None = None,
    reads: Sequence[Path] = (),
) -> dict[str, Any]:
    """Pair, read (``kinds``: "image", "label" or a reader of the role's files), check geometry, score each case,
    complete the case rows, summarise, write. ``reads``: further files evaluation reads (never replaced)."""
    pairs = read_pairs(pairs_file, list(folders)) if pairs_file is not None else _pair(folders, suffixes)
    if out_json is not None:
        _check_out(Path(out_json), pairs, [*reads, *([Path(pairs_file)] if pairs_file is not None else [])])
    cases = []
    for name, paths in pairs:
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
        cases.append({"case": name, **{role: str(p) for role, p in paths.items()}, **values}
                     | ({"reoriented": reoriented} if reoriented else {}))
    if pairs_file is not None:
        settings = settings | {"pairs_file": str(pairs_file)}
    if complete is not None:
        complete(cases)
    result = {"task": task, "settings": settings, "cases": cases, "summary": _summary(cases)}
    if out_json is not None:
        write_json(Path(out_json), result)  # atomically; _check_out allowed the file
    return result


def _load(path: Path, kind: str | Callable[[Path], Any]) -> Any:
    return kind(path) if callable(kind) else read(path, kind=kind)


def _check_out(out_json: Path, pairs: list[tuple[str, dict[str, Path]]], reads: Sequence[Path]) -> None:
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


def _summary(cases: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
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


def evaluate_segmentation(
    pred_dir: str | os.PathLike | None,
    ref_dir: str | os.PathLike | None,
    *,
    labels: dict[str, int] | None = None,
    card: Rules | None = None,
    region_dir: str | os.PathLike | None = None,
    label_remap: Mapping[int, int] | None = None,
    pred_labels: Mapping[str, int] | None = None,
    by_value: bool = False,
    uncertainty: bool = False,
    raters: Sequence[str | os.PathLike] = (),
    nsd_tolerance: float = 1.0,
    pairs: str | os.PathLike | None = None,
    out_json: str | os.PathLike | None = None,
    suffixes: Sequence[str] = CASE_SUFFIXES,
) -> dict[str, Any]:
    """Per-class Dice and HD95 (mm) of label maps against reference label maps.

    Args:
        pred_dir, ref_dir: two label-map files, or two folders of them paired by case name.
        labels: foreground classes ``{name: value}`` of the references (default: the card's foreground). None and
            no card: every non-zero value found in a case's reference or prediction, named by its value; a class
            absent from a case is then NaN there, exactly as if it had been listed.
        card: the references' data card (or :class:`~medidiff.data.labels.LabelRules`): references and raters are
            read through it exactly as training reads labels (:func:`medidiff.data.labels.read_label`: its
            ``label_channel``, ``label_threshold``, ``label_remap`` / ``label_others``; values it does not name are
            refused). Predictions are never read through the card.
        region_dir: optional mask(s) (non-zero = inside) restricting the evaluation, e.g. DRIVE's field of view.
        label_remap: without a card: stored value -> class of the **references** (DRIVE's manual masks store
            vessels as 255: ``{255: 1}``); the values ``labels`` name are kept, others refused.
        pred_labels: ``{name: value}`` the predictions use (``labels.json`` that ``medidiff infer`` writes beside
            them): classes are matched by name, which needs the references' names (``labels`` or ``card``).
            None: predictions use ``labels``' values.
        by_value: compare the predictions' stored integers with the references' as they are, ignoring
            ``pred_labels`` (recorded in the settings); without it, named predictions against unnamed references
            are refused.
        uncertainty: also score the probability and uncertainty maps ``medidiff infer`` writes beside the label
            maps (``prob/``, ``entropy/``, and ``members/`` for the GED):
            :func:`medidiff.metrics.uncertainty.uncertainty_metrics`.
        raters: further reference folders (other observers), read like ``ref``: GED against all raters and the
            AUROC of the uncertainty where they disagree.
        nsd_tolerance: tolerance of the normalised surface Dice, in the units of the reference's spacing (> 0).
        pairs: a CSV file of pairs (see :func:`read_pairs`) instead of ``pred_dir`` / ``ref_dir``.
        out_json: where to write the result (only a missing file or an earlier result is replaced).
        suffixes: case-name suffixes to strip (see the pairing rule).

    Returns:
        Result dict with ``dice_<class>``, ``hd95_<class>``, ``nsd_<class>`` and their means per case (plus the
        uncertainty metrics when asked).
    """
    check_nsd_tolerance(nsd_tolerance)
    folders = {"pred": pred_dir, "ref": ref_dir} | ({"region": region_dir} if region_dir is not None else {})
    if pairs is not None:
        folders = {"pred": None, "ref": None} | ({"region": None} if region_dir is not None else {})
    folders |= _uncertainty_folders(pred_dir, uncertainty) | {f"rater_{i + 2}": r for i, r in enumerate(raters)}
    rules = _reference_rules(card, labels, label_remap)
    if labels is None and card is not None:  # foreground only: a background Dice near 1 would inflate every mean
        labels = {name: value for name, value in card.labels.items() if value != 0}
    translate = None if by_value else match_by_name(pred_labels, labels, pred_dir)

    def score(images: dict[str, Any], paths: dict[str, Path]) -> dict[str, float]:
        pred, ref = _single_channel(images, paths, "pred"), _single_channel(images, paths, "ref")
        region = _single_channel(images, paths, "region") > 0 if "region" in images else None
        if region is not None and not region.any():
            raise ValueError("the region mask is empty: there is nothing to evaluate inside it")
        if translate is not None:
            pred = _translate(pred, translate, paths["pred"])
        if labels is not None:
            unknown = sorted(set(np.unique(pred).tolist()) - {0} - set(labels.values()))
            if unknown:
                raise ValueError(f"the prediction holds label value(s) {unknown} not in the card's labels {labels} "
                                 "(predictions are class ids: the card's channel, threshold and remap read the "
                                 "references only)")
        present = labels if labels is not None else sorted((set(np.unique(pred)) | set(np.unique(ref))) - {0})
        spacing = images["ref"].meta["spacing"]
        values = segmentation_metrics(pred, ref, present, spacing=spacing, region=region, nsd_tolerance=nsd_tolerance)
        if "prob" in images:
            model_space = _inverse(translate)
            others = [_single_channel(images, paths, r) for r in images if r.startswith("rater_")]
            values |= uncertainty_metrics(
                np.asarray(images["prob"]), np.asarray(images["uncertainty"][0]), _translate_plain(pred, model_space),
                _translate_plain(ref, model_space), region=region,
                members=np.asarray(images["members"]) if "members" in images else None,
                raters=np.stack([ref, *others]) if others else None)
        return values

    reference = "label" if rules is None else (lambda path: read_label(path, rules))
    kinds = {"pred": "label", "ref": reference, "region": "label", "prob": "image", "uncertainty": "image",
             "members": "label"} | {f"rater_{i + 2}": reference for i in range(len(raters))}
    settings = {"labels": labels, "reference_reading": None if rules is None else describe(rules),
                "region_dir": None if region_dir is None else str(region_dir),
                "prediction_labels": None if pred_labels is None else dict(pred_labels),
                "class_matching": "by name" if translate is not None else "by value", "by_value": bool(by_value),
                "hd_percentile": 95, "both_empty": "nan", "one_empty_hd95": "inf",
                "nsd_tolerance": nsd_tolerance, "uncertainty": bool(uncertainty), "raters": [str(r) for r in raters],
                "ece_bins": 15 if uncertainty else None}
    complete = _fill_absent if labels is None else None
    reads = [labels_file(pred_dir)] if pred_dir is not None else []
    return _run("segmentation", folders, kinds, score, settings, suffixes, out_json, complete, pairs, reads)


def check_nsd_tolerance(value: float) -> None:
    """Refused before any file is read: MONAI's own error about it was reported against a case's file."""
    if not (math.isfinite(value) and value > 0):
        raise MedidiffError(f"--nsd-tolerance must be a positive number (mm; pixels for 2D images), got {value}")


def _reference_rules(card: Rules | None, labels: Mapping[str, int] | None,
                     label_remap: Mapping[int, int] | None) -> Rules | None:
    """How references are read: the card's rules, or rules made of ``labels`` and ``label_remap``."""
    if card is not None:
        if label_remap is not None:
            raise ValueError("give the card or label_remap, not both: the card holds the remap")
        return card
    if labels is None:
        if label_remap is not None:
            raise ValueError("label_remap needs labels (the classes it maps to)")
        return None
    named = {"background": 0} | dict(labels)
    kept = {value: value for value in named.values()}  # the values labels name are kept, as before the remap
    return LabelRules(named, None if label_remap is None else kept | dict(label_remap))


def _uncertainty_folders(pred: str | os.PathLike | None, wanted: bool) -> dict[str, Path]:
    """The maps ``medidiff infer`` writes beside a label map (folder) or label-map file."""
    if not wanted or pred is None:
        return {}
    pred = Path(pred)
    base, name = (pred, None) if pred.is_dir() else (pred.parent, pred.name)
    found = {role: base / folder for role, folder in (("prob", "prob"), ("uncertainty", "entropy"),
                                                       ("members", "members"))}
    found = {role: (path / name if name else path) for role, path in found.items()}
    for role in ("prob", "uncertainty"):
        if not found[role].exists():
            raise MedidiffError(f"--uncertainty needs the {found[role].parent.name if name else found[role].name}/ "
                                "maps that medidiff infer writes beside the label maps", found[role])
    return {role: path for role, path in found.items() if path.exists()}


def _inverse(table: Mapping[int, int] | None) -> dict[int, int] | None:
    return None if table is None else {target: value for value, target in table.items() if target}


def _translate_plain(labels: np.ndarray, table: Mapping[int, int] | None) -> np.ndarray:
    if table is None:
        return labels
    out = np.zeros_like(labels)
    for value, target in table.items():
        out[labels == value] = target
    return out


def _translate(pred: np.ndarray, table: Mapping[int, int], path: Path) -> np.ndarray:
    unknown = sorted(set(np.unique(pred).tolist()) - set(table) - {0})
    if unknown:
        raise MedidiffError(f"holds label value(s) {unknown} that its labels.json does not name", path)
    out = np.zeros_like(pred)
    for value, target in table.items():
        out[pred == value] = target
    return out


def _fill_absent(cases: list[dict[str, Any]]) -> None:
    """With inferred labels, a class missing from a case was absent from both masks: NaN there. No class in any
    case leaves nothing scored, which must not pass for a result."""
    keys = dict.fromkeys(k for case in cases for k in case)
    if not any(key.startswith("dice_") for key in keys):
        raise MedidiffError("no foreground class in any prediction or reference (all background), so nothing can be "
                            "scored; give --card to name the classes (each then scores NaN where absent from both)")
    for case in cases:
        for key in keys:
            case.setdefault(key, math.nan)


def evaluate_image(
    pred_dir: str | os.PathLike | None,
    ref_dir: str | os.PathLike | None,
    *,
    data_range: float | None = None,
    metrics: tuple[str, ...] = ("psnr", "ssim", "nmse"),
    pairs: str | os.PathLike | None = None,
    out_json: str | os.PathLike | None = None,
    suffixes: Sequence[str] = CASE_SUFFIXES,
) -> dict[str, Any]:
    """PSNR, SSIM and NMSE of restored / super-resolved images against references, 2D or 3D.

    Args:
        pred_dir, ref_dir: two files, or two folders of single-channel images paired by case name.
        data_range: intensity range of the scale (max - min; e.g. a card's CT window). None: each reference's
            own range, recorded per case as ``data_range``.
        metrics: any of "psnr", "ssim", "nmse".
        pairs: a CSV file of pairs instead of ``pred_dir`` / ``ref_dir``.
        out_json: where to write the result.
        suffixes: case-name suffixes to strip.
    """
    if data_range is not None and not (math.isfinite(data_range) and data_range > 0):
        raise MedidiffError(f"the data range must be a positive number, got {data_range}")

    def score(images: dict[str, Any], paths: dict[str, Path]) -> dict[str, float]:
        pred, ref = _single_channel(images, paths, "pred"), _single_channel(images, paths, "ref")
        span = data_range if data_range is not None else float(ref.max() - ref.min())
        if span <= 0:
            raise ValueError("the reference is constant: give its intensity range with --data-range or --card")
        return image_metrics(pred, ref, data_range=span, metrics=metrics) | \
            ({} if data_range is not None else {"data_range": span})

    settings = {"data_range": data_range if data_range is not None else "range of each reference",
                "metrics": list(metrics)}
    folders = {"pred": pred_dir, "ref": ref_dir}
    return _run("image", folders, dict.fromkeys(folders, "image"), score, settings, suffixes, out_json,
                pairs_file=pairs)


def _grey_2d(img: Any, path: Path) -> np.ndarray:
    """``(1|3, *spatial)`` to a 2D grey image; colour becomes its BT.601 luminance (unrounded)."""
    data = np.asarray(img, dtype=np.float64)
    if data.shape[0] == 3:
        data = np.tensordot(_LUMA, data, axes=1)[None]
    data = data[0]
    if data.ndim > 2:  # a 2D slice stored as a one-slice volume
        data = data.reshape([s for s in data.shape if s > 1])
    if data.ndim != 2:
        raise MedidiffError(f"fusion metrics need a 2D image, got spatial shape {tuple(img.shape[1:])}", path)
    return data


def evaluate_fusion(
    pred_dir: str | os.PathLike,
    source_a_dir: str | os.PathLike,
    source_b_dir: str | os.PathLike,
    out_json: str | os.PathLike | None = None,
    *,
    pairs: str | os.PathLike | None = None,
    suffixes: Sequence[str] = CASE_SUFFIXES,
) -> dict[str, Any]:
    """EN, SD, SF, MI, SSIM, Qabf and VIF of fused images against their two sources.

    Args:
        pred_dir: fused 2D images on the 8-bit scale (PNG as written by the fusion task; colour is scored
            on its luminance).
        source_a_dir, source_b_dir: the registered sources (e.g. CT/PET and MRI), same case names.
        out_json: where to write the result.
        suffixes: case-name suffixes to strip.

    Returns:
        Result dict; cases carry ``pred``, ``source_a``, ``source_b`` paths and the metrics of
        :func:`medidiff.metrics.fusion.fusion_metrics` (conventions there: MI in nats, VIF summed).
    """
    folders = {"pred": pred_dir, "source_a": source_a_dir, "source_b": source_b_dir}

    def score(images: dict[str, Any], paths: dict[str, Path]) -> dict[str, float]:
        grey = {role: _grey_2d(images[role], paths[role]) for role in images}
        return fusion_metrics(grey["pred"], grey["source_a"], grey["source_b"])

    settings = {"scale": "8-bit [0, 255]", "mi": "sum over sources, nats", "ssim": "sum over sources",
                "vif": "sum over sources"}
    return _run("fusion", folders, dict.fromkeys(folders, "image"), score, settings, suffixes, out_json,
                pairs_file=pairs)
