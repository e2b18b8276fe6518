"""Reading a label file through a data card: the one rule that training and ``medidiff evaluate`` share.

A card says how the values stored in a label file become its classes:

* ``label_channel``: a mask stored as a colour image (RGB PNG/JPEG) is that channel of the file;
* ``label_threshold``: stored values above it are class 1, the others 0 (masks stored 0/255, or with JPEG noise);
* otherwise ``label_remap`` (stored value -> class) with ``label_others`` (the class of every value the remap does
  not list), or without a remap the card's own class values. A stored value the card does not name is refused,
  naming the file: it is never trained on, nor scored, as some other class.

:func:`read_stored` reads the file (the mask's channel), :func:`to_classes` turns stored values into classes, and
:func:`read_label` does both. Training runs the two halves as the transforms ``LoadCased`` and ``RemapLabelsd`` of
:mod:`medidiff.data.custom`; evaluation reads references and raters with :func:`read_label`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from monai.data import MetaTensor

from medidiff import io
from medidiff.data.cards import DataCard
from medidiff.errors import MedidiffError

__all__ = ["LabelRules", "read_label", "read_stored", "to_classes", "describe", "labels_file", "prediction_labels",
           "match_by_name"]


@dataclass(frozen=True)
class LabelRules:
    """The label fields of a data card, for reading label files where there is no card file (the Python API of
    :func:`medidiff.metrics.evaluate.evaluate_segmentation`). Field meanings as in ``data_cards/README.md``."""

    labels: Mapping[str, int]
    label_remap: Mapping[int, int] | None = None
    label_others: int | None = None
    label_channel: int | None = None
    label_threshold: float | None = None
    name: str = "the labels given to evaluation"


Rules = Union[DataCard, LabelRules]


def read_label(path: str | os.PathLike, card: Rules, expected_ndim: int | None = None) -> MetaTensor:
    """A label file as the card's classes: ``MetaTensor (1, *spatial)`` int64 with the file's metadata.

    Raises:
        MedidiffError: naming the file: unreadable, a channel it lacks, values the card does not name.
    """
    stored = read_stored(path, card, expected_ndim)
    classes = to_classes(stored.detach().cpu().numpy(), card, path)
    return MetaTensor(torch.from_numpy(classes), meta=dict(stored.meta))


def read_stored(path: str | os.PathLike, card: Rules, expected_ndim: int | None = None) -> MetaTensor:
    """The stored values of a label file, one channel: the card's ``label_channel`` of a colour mask (read as an
    image, so that :func:`to_classes` may threshold JPEG noise), else the file's only channel as integers."""
    if card.label_channel is None and card.label_threshold is None:
        mask = io.read(path, kind="label", expected_ndim=expected_ndim)
        if mask.shape[0] != 1:  # io.read's own wording, plus where a colour mask's channel is named
            raise MedidiffError(f"has {mask.shape[0]} channel(s) but 1 expected (array shape {tuple(mask.shape)}); "
                                f"a colour mask? set label_channel (the channel holding it) in {_where(card)}", path)
        return mask
    image = io.read(path, expected_ndim=expected_ndim)
    channel = card.label_channel or 0
    if channel >= image.shape[0]:
        raise MedidiffError(f"label_channel {channel} of {_where(card)}, but the mask has "
                            f"{image.shape[0]} channel(s)", path)
    return image[channel:channel + 1]


def to_classes(array: np.ndarray, card: Rules, path: str | os.PathLike | None) -> np.ndarray:
    """Stored label values to the card's classes (int64, same shape): thresholded, or remapped and checked.

    Args:
        array: stored values, as :func:`read_stored` gives them.
        card: a :class:`~medidiff.data.cards.DataCard` or :class:`LabelRules`.
        path: the file the values come from, named in errors.
    """
    array = np.asarray(array)
    if card.label_threshold is not None:
        return (array > card.label_threshold).astype(np.int64)
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise MedidiffError(f"is read as a label map but holds non-integer values; {_lossy_advice(card)}", path)
    values = array.astype(np.int64)
    remap = card.label_remap or {v: v for v in card.labels.values()}
    stored = np.array(sorted(remap), dtype=np.int64)
    classes = np.array([remap[v] for v in stored], dtype=np.int64)
    pos = np.clip(np.searchsorted(stored, values), 0, len(stored) - 1)
    known = stored[pos] == values
    if not known.all() and card.label_others is None:
        bad = np.unique(values[~known])[:10].tolist()
        raise MedidiffError(f"label value(s) {bad} are not in {_where(card)} (known values: "
                            f"{stored.tolist()}); {_unnamed_advice(card, bad)}", path)
    return np.where(known, classes[pos], card.label_others or 0)


def _where(card: Rules) -> str:
    """The card as messages name it: its file name; rules given through the Python API by their own name."""
    return f"the card {card.path.name}" if isinstance(card, DataCard) else card.name


def _name_of(card: Rules, value: int) -> str:
    return next((name for name, class_value in card.labels.items() if class_value == value), "<label name>")


def _may_threshold(card: Rules) -> bool:
    """The card rules allow label_threshold: binary labels and no label_remap (cards.py, ``_label_reading``)."""
    return sorted(card.labels.values()) == [0, 1] and card.label_remap is None


def _unnamed_advice(card: Rules, bad: list[int]) -> str:
    """What to change in the card for stored values it does not name, within the card's rules."""
    if card.label_remap is not None:
        return "add them to the card's label_remap (stored value: label name), or set label_others"
    example = f"label_remap {{0: {_name_of(card, 0)}, {bad[-1]}: {_name_of(card, 1)}}}"
    if _may_threshold(card):
        return (f"map them in the card: {example}, or label_threshold: 127 for masks stored 0/255 or with JPEG "
                "noise (values above it are class 1)")
    return f"map them in the card with label_remap (stored value: label name, e.g. {bad[-1]}: ...), or label_others"


def _lossy_advice(card: Rules) -> str:
    """Non-integer stored values: a mask saved lossily (JPEG); the fix the card's rules allow."""
    if _may_threshold(card):
        return "a JPEG mask? set label_threshold in the card (values above it are class 1)"
    if sorted(card.labels.values()) == [0, 1]:
        return "a JPEG mask? replace the card's label_remap by label_threshold (values above it are class 1)"
    return "store label maps losslessly (PNG, NIfTI): JPEG changes the values of a multi-class map"


def describe(card: Rules) -> dict[str, Any]:
    """The label reading a card asks for, as recorded in evaluation settings."""
    remap = None if card.label_remap is None else {str(k): v for k, v in card.label_remap.items()}
    return {"card": str(card.path) if isinstance(card, DataCard) else card.name, "label_channel": card.label_channel,
            "label_threshold": card.label_threshold, "label_remap": remap, "label_others": card.label_others}


# ---------------------------------------------------------------- the class names of predictions (labels.json)


def labels_file(pred: str | os.PathLike) -> Path:
    """Where ``medidiff infer`` names the classes of the label maps in ``pred`` (a folder, or a file in one)."""
    pred = Path(pred)
    return (pred if pred.is_dir() else pred.parent) / "labels.json"


def prediction_labels(pred: str | os.PathLike | None) -> dict[str, int] | None:
    """The ``labels.json`` (class name -> value) that ``medidiff infer`` writes beside its label maps."""
    if pred is None:
        return None
    path = labels_file(pred)
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise MedidiffError(f"is not a readable labels file ({err})", path) from None
    if not isinstance(found, dict) or not all(isinstance(v, int) for v in found.values()):
        raise MedidiffError("must map class names to integer values", path)
    return found


def match_by_name(pred_labels: Mapping[str, int] | None, labels: Mapping[str, int] | None,
                  pred: str | os.PathLike | None) -> dict[int, int] | None:
    """Prediction value -> reference class value, by class name; None when the predictions carry no names.
    Named predictions against unnamed references are refused: equal integers need not be equal classes."""
    if pred_labels is None:
        return None
    if labels is None:
        names = ", ".join(f"{name} {value}" for name, value in pred_labels.items())
        raise MedidiffError(f"the predictions name their classes ({names}) but the references do not, so their "
                            "integers cannot be matched by name; give the references' data card with --card CARD "
                            "(their class names and stored values), or --by-value to compare the stored integers as "
                            "they are", None if pred is None else labels_file(pred))
    missing = [name for name in labels if name not in pred_labels]
    if missing:
        raise MedidiffError(f"the predictions have no class named {missing} (their labels: {dict(pred_labels)}); "
                            f"the card names {dict(labels)}")
    return {value: labels.get(name, 0) for name, value in pred_labels.items()}
