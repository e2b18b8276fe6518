"""Uncertainty of a segmentation: calibration of its probability map, how well its uncertainty map finds its
errors, and, with two or more raters, how its samples and its uncertainty relate to where experts disagree.

Conventions (arrays are flat voxel sets; pass only the voxels inside the evaluation region):

* **Calibration** of the class probabilities ``probs`` ``(C, N)`` (summing to 1 over C) against integer labels:
  ``ece`` is the top-label expected calibration error over ``bins`` equal-width confidence bins on [0, 1]
  (confidence = the largest class probability, correct = its class is the label), weighted by the voxels per bin;
  ``brier`` the mean over voxels of ``sum_c (p_c - [y = c])^2`` (0 perfect, 2 worst); ``nll`` the mean of
  ``-ln p_y`` with ``p_y`` clipped at ``1e-7``.
* **Error detection**: ``error = prediction != label``. ``error_auroc`` is the area under the ROC curve of the
  uncertainty as a score of "this voxel is wrong" (MONAI's ``compute_roc_auc``; 0.5 is chance, NaN when no voxel
  or every voxel is wrong); ``aurc`` the area under the risk-coverage curve: voxels kept in order of increasing
  uncertainty, risk = errors among the kept, averaged over every coverage ``k / N`` (lower is better); ``ueo`` the
  uncertainty-error overlap, the best Dice between ``uncertainty > t`` and the error mask over 100 thresholds
  (Jungo et al., 2020).
* **Raters**: ``ged`` the squared generalised energy distance ``2 E d(S, Y) - E d(S, S') - E d(Y, Y')`` between
  the sample set ``S`` and the rater set ``Y`` with ``d = 1 - IoU`` of the foreground (0 when both are empty;
  Kohl et al., 2018); ``disagreement_auroc`` the AUROC of the uncertainty as a score of "the raters disagree here".
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import compute_roc_auc

from medidiff.metrics.segmentation import with_background

__all__ = ["ece", "brier", "nll", "error_auroc", "aurc", "ueo", "ged", "disagreement_auroc", "class_probabilities",
           "uncertainty_metrics"]


def class_probabilities(prob: np.ndarray) -> np.ndarray:
    """``(C, ...)`` class probabilities; a single foreground-probability channel becomes ``[1 - p, p]``."""
    prob = np.asarray(prob, dtype=np.float64)
    return with_background(prob, axis=0) if prob.shape[0] == 1 else prob


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label expected calibration error of ``probs`` ``(C, N)`` against ``labels`` ``(N,)``."""
    confidence, predicted = probs.max(0), probs.argmax(0)
    correct = (predicted == labels).astype(np.float64)
    which = np.clip((confidence * bins).astype(int), 0, bins - 1)  # confidence 1.0 goes to the last bin
    total = 0.0
    for b in np.unique(which):
        inside = which == b
        total += inside.sum() * abs(confidence[inside].mean() - correct[inside].mean())
    return float(total / labels.size)


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    onehot = np.zeros_like(probs)
    onehot[labels, np.arange(labels.size)] = 1
    return float(((probs - onehot) ** 2).sum(0).mean())


def nll(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-7) -> float:
    return float(-np.log(np.clip(probs[labels, np.arange(labels.size)], eps, 1.0)).mean())


def error_auroc(uncertainty: np.ndarray, error: np.ndarray) -> float:
    """AUROC of ``uncertainty`` ``(N,)`` as a detector of ``error`` ``(N,)`` (boolean); NaN without both kinds."""
    return _auroc(uncertainty, error)


def aurc(uncertainty: np.ndarray, error: np.ndarray) -> float:
    """Area under the risk-coverage curve; tied uncertainties enter together (the risk at a tie's end)."""
    order = np.argsort(uncertainty, kind="stable")
    u, e = np.asarray(uncertainty)[order], np.asarray(error, dtype=np.float64)[order]
    risk = np.cumsum(e) / np.arange(1, e.size + 1)
    last_of_tie = np.r_[u[1:] != u[:-1], True]
    # every coverage inside a tie takes the risk at the tie's end: the order within a tie is arbitrary
    ends = np.flatnonzero(last_of_tie)
    filled = np.repeat(risk[ends], np.diff(np.r_[-1, ends]))
    return float(filled.mean())


def ueo(uncertainty: np.ndarray, error: np.ndarray, thresholds: int = 100) -> float:
    """Best Dice between ``uncertainty >= t`` and ``error`` over ``thresholds`` levels spanning its range."""
    error = np.asarray(error, dtype=bool)
    if not error.any():
        return float("nan")
    levels = np.unique(np.quantile(uncertainty, np.linspace(0, 1, thresholds, endpoint=False)))
    best = 0.0
    for level in levels:
        flagged = uncertainty >= level
        best = max(best, 2 * (flagged & error).sum() / (flagged.sum() + error.sum()))
    return float(best)


def ged(samples: np.ndarray, raters: np.ndarray) -> float:
    """Squared generalised energy distance between label maps ``samples`` ``(S, N)`` and ``raters`` ``(R, N)``
    (foreground = any non-zero label)."""
    s, r = np.asarray(samples) > 0, np.asarray(raters) > 0
    cross = np.mean([_distance(a, b) for a in s for b in r])
    within_s = np.mean([_distance(a, b) for a in s for b in s])
    within_r = np.mean([_distance(a, b) for a in r for b in r])
    return float(2 * cross - within_s - within_r)


def disagreement_auroc(uncertainty: np.ndarray, raters: np.ndarray) -> float:
    """AUROC of ``uncertainty`` as a detector of voxels where the ``raters`` ``(R, N)`` do not all agree."""
    raters = np.asarray(raters)
    return _auroc(uncertainty, (raters != raters[:1]).any(0))


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return 0.0 if union == 0 else 1.0 - (a & b).sum() / union


def _auroc(score: np.ndarray, positive: np.ndarray) -> float:
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return float("nan")
    return float(compute_roc_auc(torch.as_tensor(np.asarray(score, dtype=np.float64)),
                                 torch.as_tensor(positive.astype(np.float64))))


def uncertainty_metrics(
    probs: np.ndarray,
    uncertainty: np.ndarray,
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    region: np.ndarray | None = None,
    members: np.ndarray | None = None,
    raters: np.ndarray | None = None,
    bins: int = 15,
) -> dict[str, float]:
    """Every metric above for one case.

    Args:
        probs: ``(C, *spatial)`` class probabilities (one channel: the foreground probability), in the class ids
            of ``ref``.
        uncertainty: ``(*spatial)`` (e.g. the predictive entropy ``medidiff infer`` writes).
        pred, ref: label maps ``(*spatial)`` of the same ids.
        region: boolean ``(*spatial)``; only voxels inside are scored.
        members: ``(S, *spatial)`` sampled label maps, for ``ged``.
        raters: ``(R, *spatial)`` label maps of R >= 2 raters (``ref`` among them), for ``ged`` and
            ``disagreement_auroc``.
    """
    inside = np.ones(ref.shape, bool) if region is None else np.asarray(region, bool)
    p = class_probabilities(probs)[:, inside]
    labels, u = np.asarray(ref)[inside].astype(int), np.asarray(uncertainty, np.float64)[inside]
    if labels.max(initial=0) >= p.shape[0]:
        raise ValueError(f"the reference holds class {labels.max()} but the probability map has {p.shape[0]} "
                         "classes")
    error = np.asarray(pred)[inside] != labels
    out = {"ece": ece(p, labels, bins), "brier": brier(p, labels), "nll": nll(p, labels),
           "error_auroc": error_auroc(u, error), "aurc": aurc(u, error), "ueo": ueo(u, error)}
    if members is not None:
        out["ged"] = ged(np.asarray(members)[:, inside], (raters if raters is not None else ref[None])[:, inside])
    if raters is not None and len(raters) >= 2:
        out["disagreement_auroc"] = disagreement_auroc(u, np.asarray(raters)[:, inside])
    return out
