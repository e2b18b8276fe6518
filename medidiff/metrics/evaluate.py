"""File-to-file evaluation: folders of predictions against folders of references, per case and summary.

Every evaluator returns (and, given ``out_json``, writes) ::

    {"task": ..., "settings": {...},
     "cases":   [{"case": name, "pred": path, "ref": path, <metric>: value, ...}, ...],
     "summary": {<metric>: {"mean", "std", "median", "n", "n_nan", "n_inf"}}}

* **Pairing rule** (:mod:`medidiff.metrics.pairing`). A file's case name is its name without the image extension
  (``.nii.gz``, ``.nii``, ``.png``, ``.tif``, ``.gif``, ``.mha``, ...), nothing else stripped, unless the card
  (``card=``, ``medidiff evaluate --card``) lists ``case_suffixes`` to strip as well: the DRIVE card's make
  ``01_test.tif``, ``01_manual1.gif`` and ``01_test_mask.gif`` all case ``01``. Files of other types and hidden
  files are ignored. A case without a partner in any folder, two files with one case name, a shape, spacing,
  orientation or origin mismatch (:func:`medidiff.io.grid_problem`) each raise
  :class:`~medidiff.errors.MedidiffError` naming the file.
* **Geometry** comes from the files through :func:`medidiff.io.read` (NIfTI/ITK header; 1.0 for 2D images):
  HD95 is in millimetres for scans, in pixels for PNGs.
* **Classes** (segmentation). References and raters are read through the card (or
  :class:`~medidiff.data.labels.LabelRules`) exactly as training reads labels
  (:func:`medidiff.data.labels.read_label`: its ``label_channel``, ``label_threshold``, ``label_remap`` /
  ``label_others``; values it does not name are refused); predictions never are. Without a card, ``label_remap``
  maps the references' stored values to classes (DRIVE's manual masks store vessels as 255: ``{255: 1}``; the
  values ``labels`` name are kept, others refused). ``pred_labels`` (the ``labels.json`` ``medidiff infer``
  writes beside its label maps) matches prediction classes to the references' by name, which needs the
  references' names (``labels`` or the card); ``by_value`` compares the stored integers as they are instead
  (recorded in the settings), and without it named predictions against unnamed references are refused.
* **JSON.** NaN and infinities are written as ``null`` (strict JSON). The summary statistics use the finite
  values only; ``n`` counts them, ``n_nan`` and ``n_inf`` count the rest (for segmentation: a class absent
  from both masks, and a missed or hallucinated structure, whose HD95 is ``inf`` and Dice 0). ``std`` is the
  sample standard deviation (ddof = 1; null when n < 2). The file is written atomically (temp file + rename).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.data.custom import LUMA
from medidiff.data.labels import LabelRules, Rules, describe, labels_file, match_by_name, prediction_labels, read_label
from medidiff.errors import MedidiffError
from medidiff.metrics.fusion import fusion_metrics
from medidiff.metrics.image import image_metrics
from medidiff.metrics.pairing import card_suffixes, case_name, read_pairs
from medidiff.metrics.runner import Score, evaluate_cases, single_channel
from medidiff.metrics.segmentation import segmentation_metrics
from medidiff.metrics.uncertainty import uncertainty_metrics

__all__ = ["case_name", "read_pairs", "evaluate_segmentation", "evaluate_image", "evaluate_fusion",
           "check_nsd_tolerance", "prediction_labels"]

PathLike = str | os.PathLike
_LUMA = np.asarray(LUMA, dtype=np.float64)  # ITU-R BT.601, the Y of YCbCr that colour fusion works on


def evaluate_segmentation(
    pred_dir: PathLike | None, ref_dir: PathLike | None, *, labels: dict[str, int] | None = None,
    card: Rules | None = None, region_dir: PathLike | None = None, label_remap: Mapping[int, int] | None = None,
    pred_labels: Mapping[str, int] | None = None, by_value: bool = False, uncertainty: bool = False,
    raters: Sequence[PathLike] = (), nsd_tolerance: float = 1.0, pairs: PathLike | None = None,
    out_json: PathLike | None = None, suffixes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per-class Dice, HD95 (mm) and NSD (``dice_<class>``, ``hd95_<class>``, ``nsd_<class>``) of label maps against
    reference label maps and their means per case, plus the uncertainty metrics when asked (classes: see the module
    docstring).

    Args:
        pred_dir, ref_dir: two label-map files, or two folders of them paired by case name.
        labels: foreground classes ``{name: value}`` of the references (default: the card's foreground). None and
            no card: every non-zero value found in a case's reference or prediction, named by its value; a class
            absent from a case is then NaN there, exactly as if it had been listed.
        card: the references' data card (or label rules): how references and raters are read; its
            ``case_suffixes`` are stripped from file names (the pairing rule).
        region_dir: optional mask(s) (non-zero = inside) restricting the evaluation, e.g. DRIVE's field of view.
        label_remap: without a card: stored value -> class of the **references**.
        pred_labels: ``{name: value}`` the predictions use; None: they use ``labels``' values.
        by_value: compare stored integers as they are, ignoring ``pred_labels``.
        uncertainty: also score the probability and uncertainty maps ``medidiff infer`` writes beside the label
            maps (``prob/``, ``entropy/``, and ``members/`` for the GED):
            :func:`medidiff.metrics.uncertainty.uncertainty_metrics`.
        raters: further reference folders (other observers), read like ``ref``: GED against all raters and the
            AUROC of the uncertainty where they disagree.
        nsd_tolerance: tolerance of the normalised surface Dice, in the units of the reference's spacing (> 0).
        pairs: a CSV file of pairs (see :func:`read_pairs`) instead of ``pred_dir`` / ``ref_dir``.
        out_json: where to write the result (only a missing file or an earlier result is replaced).
        suffixes: case-name suffixes to strip instead of the card's ``case_suffixes`` (default: the card's).
    """
    check_nsd_tolerance(nsd_tolerance)
    folders = _segmentation_folders(pred_dir, ref_dir, region_dir, pairs is not None, uncertainty, raters)
    rules = _reference_rules(card, labels, label_remap)
    if labels is None and card is not None:  # foreground only: a background Dice near 1 would inflate every mean
        labels = {name: value for name, value in card.labels.items() if value != 0}
    translate = None if by_value else match_by_name(pred_labels, labels, pred_dir)
    settings = {"labels": labels, "reference_reading": None if rules is None else describe(rules),
                "region_dir": None if region_dir is None else str(region_dir),
                "prediction_labels": None if pred_labels is None else dict(pred_labels),
                "class_matching": "by name" if translate is not None else "by value", "by_value": bool(by_value),
                "hd_percentile": 95, "both_empty": "nan", "one_empty_hd95": "inf",
                "nsd_tolerance": nsd_tolerance, "uncertainty": bool(uncertainty), "raters": [str(r) for r in raters],
                "ece_bins": 15 if uncertainty else None}
    return evaluate_cases("segmentation", folders, _segmentation_kinds(rules, len(raters)),
                          _segmentation_score(labels, translate, nsd_tolerance), settings,
                          suffixes=card_suffixes(card, suffixes), out_json=out_json,
                          complete=_fill_absent if labels is None else None, pairs_file=pairs,
                          reads=[labels_file(pred_dir)] if pred_dir is not None else [])


def check_nsd_tolerance(value: float) -> None:
    """Refused before any file is read: MONAI's own error about it was reported against a case's file."""
    if not (math.isfinite(value) and value > 0):
        raise MedidiffError(f"--nsd-tolerance must be a positive number (mm; pixels for 2D images), got {value}")


def _segmentation_folders(pred: PathLike | None, ref: PathLike | None, region: PathLike | None, paired: bool,
                          uncertainty: bool, raters: Sequence[PathLike]) -> dict[str, Any]:
    """The roles of a segmentation case and where their files are (None for each with a pairs file)."""
    folders = {"pred": pred, "ref": ref} | ({"region": region} if region is not None else {})
    if paired:
        folders = {"pred": None, "ref": None} | ({"region": None} if region is not None else {})
    return folders | _uncertainty_folders(pred, uncertainty) | {f"rater_{i + 2}": r for i, r in enumerate(raters)}


def _segmentation_kinds(rules: Rules | None, raters: int) -> dict[str, Any]:
    """How each role's files are read: references and raters through the rules, when there are any."""
    reference = "label" if rules is None else (lambda path: read_label(path, rules))
    return {"pred": "label", "ref": reference, "region": "label", "prob": "image", "uncertainty": "image",
            "members": "label"} | {f"rater_{i + 2}": reference for i in range(raters)}


def _segmentation_score(labels: Mapping[str, int] | None, translate: Mapping[int, int] | None,
                        nsd_tolerance: float) -> Score:
    """The scores of one segmentation case (and its uncertainty maps, when read)."""

    def score(images: dict[str, Any], paths: dict[str, Path]) -> dict[str, float]:
        pred, ref = single_channel(images, paths, "pred"), single_channel(images, paths, "ref")
        region = _region(images, paths)
        pred = _checked_prediction(pred, labels, translate, paths["pred"])
        present = labels if labels is not None else sorted((set(np.unique(pred)) | set(np.unique(ref))) - {0})
        spacing = images["ref"].meta["spacing"]
        values = segmentation_metrics(pred, ref, present, spacing=spacing, region=region, nsd_tolerance=nsd_tolerance)
        if "prob" in images:
            values |= _uncertainty_scores(images, paths, pred, ref, region, _inverse(translate))
        return values

    return score


def _region(images: dict[str, Any], paths: dict[str, Path]) -> np.ndarray | None:
    region = single_channel(images, paths, "region") > 0 if "region" in images else None
    if region is not None and not region.any():
        raise ValueError("the region mask is empty: there is nothing to evaluate inside it")
    return region


def _checked_prediction(pred: np.ndarray, labels: Mapping[str, int] | None, translate: Mapping[int, int] | None,
                        path: Path) -> np.ndarray:
    """The prediction in the references' class values, holding none that ``labels`` do not name."""
    if translate is not None:
        pred = _translate(pred, translate, path)
    if labels is not None:
        unknown = sorted(set(np.unique(pred).tolist()) - {0} - set(labels.values()))
        if unknown:
            raise ValueError(f"the prediction holds label value(s) {unknown} not in the card's labels {labels} "
                             "(predictions are class ids: the card's channel, threshold and remap read the "
                             "references only)")
    return pred


def _uncertainty_scores(images: dict[str, Any], paths: dict[str, Path], pred: np.ndarray, ref: np.ndarray,
                        region: np.ndarray | None, model_space: Mapping[int, int] | None) -> dict[str, float]:
    """The uncertainty metrics, in the model's class ids (those of its probability maps)."""
    others = [single_channel(images, paths, r) for r in images if r.startswith("rater_")]
    return uncertainty_metrics(
        np.asarray(images["prob"]), np.asarray(images["uncertainty"][0]), _translate_plain(pred, model_space),
        _translate_plain(ref, model_space), region=region,
        members=np.asarray(images["members"]) if "members" in images else None,
        raters=np.stack([ref, *others]) if others else None)


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


def _uncertainty_folders(pred: PathLike | None, wanted: bool) -> dict[str, Path]:
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
    """``labels`` with each value replaced by its target in ``table`` (values it does not name become 0)."""
    if table is None:
        return labels
    out = np.zeros_like(labels)
    for value, target in table.items():
        out[labels == value] = target
    return out


def _translate(pred: np.ndarray, table: Mapping[int, int], path: Path) -> np.ndarray:
    """:func:`_translate_plain`, refusing a prediction value its ``labels.json`` does not name."""
    unknown = sorted(set(np.unique(pred).tolist()) - set(table) - {0})
    if unknown:
        raise MedidiffError(f"holds label value(s) {unknown} that its labels.json does not name", path)
    return _translate_plain(pred, table)


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
    pred_dir: PathLike | None,
    ref_dir: PathLike | None,
    *,
    data_range: float | None = None,
    metrics: tuple[str, ...] = ("psnr", "ssim", "nmse"),
    pairs: PathLike | None = None,
    out_json: PathLike | None = None,
    card: Any = None,
    suffixes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """PSNR, SSIM and NMSE of restored / super-resolved images against references, 2D or 3D.

    Args:
        pred_dir, ref_dir: two files, or two folders of single-channel images paired by case name.
        data_range: intensity range of the scale (max - min; e.g. a card's CT window). None: each reference's
            own range, recorded per case as ``data_range``.
        metrics: any of "psnr", "ssim", "nmse".
        pairs: a CSV file of pairs instead of ``pred_dir`` / ``ref_dir``.
        out_json: where to write the result.
        card: the references' data card: its ``case_suffixes`` are stripped from file names (the pairing rule).
        suffixes: case-name suffixes to strip instead of the card's (default: the card's; none without one).
    """
    if data_range is not None and not (math.isfinite(data_range) and data_range > 0):
        raise MedidiffError(f"the data range must be a positive number, got {data_range}")

    def score(images: dict[str, Any], paths: dict[str, Path]) -> dict[str, float]:
        pred, ref = single_channel(images, paths, "pred"), single_channel(images, paths, "ref")
        span = data_range if data_range is not None else float(ref.max() - ref.min())
        if span <= 0:
            raise ValueError("the reference is constant: give its intensity range with --data-range or --card")
        return image_metrics(pred, ref, data_range=span, metrics=metrics) | \
            ({} if data_range is not None else {"data_range": span})

    settings = {"data_range": data_range if data_range is not None else "range of each reference",
                "metrics": list(metrics)}
    folders = {"pred": pred_dir, "ref": ref_dir}
    return evaluate_cases("image", folders, dict.fromkeys(folders, "image"), score, settings,
                          suffixes=card_suffixes(card, suffixes), out_json=out_json, pairs_file=pairs)


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
    pred_dir: PathLike,
    source_a_dir: PathLike,
    source_b_dir: PathLike,
    out_json: PathLike | None = None,
    *,
    pairs: PathLike | None = None,
    card: Any = None,
    suffixes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """EN, SD, SF, MI, SSIM, Qabf and VIF of fused images against their two sources.

    Args:
        pred_dir: fused 2D images on the 8-bit scale (PNG as written by the fusion task; colour is scored
            on its luminance).
        source_a_dir, source_b_dir: the registered sources (e.g. CT/PET and MRI), same case names.
        out_json: where to write the result.
        pairs: a CSV file of pairs (``pred,source_a,source_b``) instead of the folders.
        card: the sources' data card: its ``case_suffixes`` are stripped from file names (the pairing rule).
        suffixes: case-name suffixes to strip instead of the card's (default: the card's; none without one).

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
    return evaluate_cases("fusion", folders, dict.fromkeys(folders, "image"), score, settings,
                          suffixes=card_suffixes(card, suffixes), out_json=out_json, pairs_file=pairs)
