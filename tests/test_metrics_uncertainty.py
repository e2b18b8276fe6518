"""Uncertainty metrics on hand-built maps whose values follow from the definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medidiff.metrics.segmentation import normalised_surface_dice
from medidiff.metrics.uncertainty import (
    aurc,
    brier,
    class_probabilities,
    disagreement_auroc,
    ece,
    error_auroc,
    ged,
    nll,
    ueo,
)


def binary(p: float, n: int = 10) -> np.ndarray:
    return class_probabilities(np.full((1, n), p))


def test_ece_is_zero_when_confidence_matches_accuracy_and_the_gap_otherwise():
    labels = np.array([1] * 8 + [0] * 2)  # predicting foreground everywhere: 8 of 10 correct
    assert ece(binary(0.8), labels) == pytest.approx(0.0)
    assert ece(binary(0.9), labels) == pytest.approx(0.1)
    # two bins: confidence 0.9 on 5 voxels all correct (gap 0.1), 0.6 on 5 voxels 3 correct (gap 0.0)
    probs = class_probabilities(np.array([[0.9] * 5 + [0.6] * 5]))
    assert ece(probs, np.array([1] * 5 + [1, 1, 1, 0, 0]), bins=10) == pytest.approx(0.5 * 0.1)


def test_brier_and_nll_of_certain_and_of_uniform_predictions():
    labels = np.ones(10, dtype=int)
    assert brier(binary(1.0), labels) == 0.0 and brier(binary(0.5), labels) == pytest.approx(0.5)
    assert brier(binary(0.0), labels) == pytest.approx(2.0)
    assert nll(binary(0.5), labels) == pytest.approx(math.log(2))
    assert nll(binary(0.0), labels) == pytest.approx(-math.log(1e-7))


def test_error_auroc_and_aurc_of_perfect_reversed_and_tied_rankings():
    error = np.array([0, 0, 1, 1], dtype=bool)
    assert error_auroc(np.array([0.1, 0.2, 0.8, 0.9]), error) == pytest.approx(1.0)
    assert error_auroc(np.array([0.9, 0.8, 0.2, 0.1]), error) == pytest.approx(0.0)
    assert math.isnan(error_auroc(np.ones(4), np.zeros(4, dtype=bool)))
    # kept in order: risks 0, 0, 1/3, 2/4
    assert aurc(np.array([0.1, 0.2, 0.3, 0.4]), error) == pytest.approx((0 + 0 + 1 / 3 + 2 / 4) / 4)
    # all tied: every coverage has the full-set risk 1/2
    assert aurc(np.zeros(4), error) == pytest.approx(0.5)


def test_uncertainty_error_overlap_is_one_when_uncertainty_marks_exactly_the_errors():
    error = np.array([0, 1, 0, 1, 0], dtype=bool)
    assert ueo(error.astype(float), error) == pytest.approx(1.0)
    assert ueo(np.array([1.0, 0, 1, 0, 1]), error) == pytest.approx(2 * 2 / (5 + 2))  # best: flag everything


def test_ged_of_identical_sets_is_zero_and_of_disjoint_certain_sets_two():
    a = np.array([1, 1, 0, 0])
    b = np.array([0, 0, 1, 1])
    assert ged(np.stack([a, a]), np.stack([a, a])) == pytest.approx(0.0)
    assert ged(a[None], b[None]) == pytest.approx(2.0)
    # samples spread over both raters' answers: cross 0.5, within samples 0.5, within raters 0.5 -> 0.5
    assert ged(np.stack([a, b]), np.stack([a, b])) == pytest.approx(2 * 0.5 - 0.5 - 0.5)


def test_disagreement_auroc_scores_uncertainty_where_raters_differ():
    raters = np.array([[1, 1, 0, 0], [1, 0, 1, 0]])  # they disagree on voxels 1 and 2
    assert disagreement_auroc(np.array([0.0, 0.9, 0.8, 0.1]), raters) == pytest.approx(1.0)


def test_normalised_surface_dice_within_and_beyond_the_tolerance():
    ref = np.zeros((20, 20), np.int16)
    ref[5:15, 5:15] = 1
    shifted = np.roll(ref, 1, axis=0)
    assert normalised_surface_dice(ref, ref, 1, tolerance=0.0) == pytest.approx(1.0)
    assert normalised_surface_dice(shifted, ref, 1, tolerance=1.0) == pytest.approx(1.0)
    assert normalised_surface_dice(shifted, ref, 1, tolerance=0.5) < 1.0
    assert normalised_surface_dice(shifted, ref, 1, tolerance=1.0, spacing=(2.0, 1.0)) < 1.0  # 2 mm rows


# ---------------------------------------------------------------------------------- through the command line


def _slice_case(tmp_path):
    """One axial slice of the shipped MNI sample, its tissue map, and a second 'observer' who misses a patch."""
    import nibabel as nib
    from PIL import Image

    from tests.conftest import REPO

    sample = REPO / "medidiff/sample_data/mni152"
    image = np.asanyarray(nib.load(sample / "t1_2mm.nii.gz").dataobj)[:, :, 36].astype(np.uint8)
    tissue = np.asanyarray(nib.load(sample / "tissue_2mm.nii.gz").dataobj)[:, :, 36].astype(np.uint8)
    other = tissue.copy()
    other[30:40, 30:40] = 0
    for folder, array in (("in", image), ("ref", tissue), ("ref2", other)):
        (tmp_path / folder).mkdir()
        Image.fromarray(array).save(tmp_path / folder / "slice.png")
    return tissue, other


def test_evaluate_scores_the_maps_infer_writes_against_two_observers(tmp_path):
    import json

    import nibabel as nib

    from medidiff.cli import main

    tissue, other = _slice_case(tmp_path)
    out = tmp_path / "out"
    assert main(["infer", "--task", "segmentation", "--ckpt", "segmentation_mni_2d", "--input", str(tmp_path / "in"),
                 "--output", str(out),
                 "--ensemble", "3", "--steps", "1"]) == 0
    members = np.asanyarray(nib.load(out / "members" / "slice.nii.gz").dataobj)
    assert members.shape == (*tissue.shape, 1, 1, 3) and np.issubdtype(members.dtype, np.integer)
    report = tmp_path / "m.json"
    assert main(["evaluate", "--task", "segmentation", "--pred", str(out), "--ref", str(tmp_path / "ref"),
                 "--rater", str(tmp_path / "ref2"), "--card", "sample_mni", "--uncertainty",
                 "--nsd-tolerance", "2", "--out", str(report)]) == 0
    result = json.loads(report.read_text())
    case = result["cases"][0]
    prob = np.moveaxis(np.asanyarray(nib.load(out / "prob" / "slice.nii.gz").dataobj)[:, :, 0, 0], -1, 0)
    labels = tissue.reshape(-1).astype(int)
    assert case["ece"] == pytest.approx(ece(prob.reshape(3, -1).astype(np.float64), labels), rel=1e-6)
    entropy = np.asanyarray(nib.load(out / "entropy" / "slice.nii.gz").dataobj).reshape(-1)
    disagree = (tissue != other).reshape(-1)
    assert case["disagreement_auroc"] == pytest.approx(error_auroc(entropy, disagree), rel=1e-6)
    assert 0 <= case["ged"] <= 2 and 0 <= case["nsd_mean"] <= 1
    assert result["settings"]["nsd_tolerance"] == 2 and result["settings"]["ece_bins"] == 15


def test_evaluate_uncertainty_without_the_maps_is_one_line(tmp_path, capsys):
    from medidiff.cli import main

    _slice_case(tmp_path)
    assert main(["evaluate", "--task", "segmentation", "--pred", str(tmp_path / "ref2"), "--ref",
                 str(tmp_path / "ref"), "--card", "sample_mni", "--uncertainty", "--out",
                 str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prob/" in err[0] and "medidiff infer" in err[0]
    assert not (tmp_path / "m.json").exists()


def test_a_rater_goes_through_the_same_checks_as_the_reference(tmp_path, capsys):
    """A second observer whose values the card does not name was silently scored as disagreeing everywhere."""
    from PIL import Image

    from medidiff.cli import main

    tissue, other = _slice_case(tmp_path)
    out = tmp_path / "out"
    assert main(["infer", "--task", "segmentation", "--ckpt", "segmentation_mni_2d", "--input", str(tmp_path / "in"),
                 "--output", str(out),
                 "--ensemble", "2", "--steps", "1"]) == 0
    other[other > 0] = 7  # the same outline in values the card does not name
    Image.fromarray(other).save(tmp_path / "ref2" / "slice.png")
    capsys.readouterr()
    assert main(["evaluate", "--task", "segmentation", "--pred", str(out), "--ref", str(tmp_path / "ref"),
                 "--rater", str(tmp_path / "ref2"), "--card", "sample_mni", "--uncertainty",
                 "--out", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ref2/slice.png" in err[0] and "[7]" in err[0], err
    assert not (tmp_path / "m.json").exists()
