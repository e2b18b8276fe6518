"""Segmentation metrics on hand-built masks with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medidiff.metrics.segmentation import (
    dice,
    ensemble_variance,
    fuse_majority_vote,
    fuse_mean_threshold,
    fuse_staple,
    hd95,
    predictive_entropy,
    segmentation_metrics,
    staple,
    with_background,
)


def _squares(shape=(20, 20)):
    """Two 10x10 squares shifted by 5 columns: overlap 50 voxels, Dice = 2*50 / (100 + 100) = 0.5."""
    a, b = np.zeros(shape, int), np.zeros(shape, int)
    a[5:15, 0:10] = 1
    b[5:15, 5:15] = 1
    return a, b


def test_dice_of_two_squares_with_known_overlap():
    a, b = _squares()
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == pytest.approx(1.0)
    assert dice(a, b) == pytest.approx(dice(b, a))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_hd95_uses_anisotropic_spacing_per_axis(axis):
    # one-voxel-thick planes 2 voxels apart along `axis`: every surface distance is 2 voxels on that axis
    a, b = np.zeros((10, 10, 10), int), np.zeros((10, 10, 10), int)
    np.moveaxis(a, axis, 0)[3] = 1
    np.moveaxis(b, axis, 0)[5] = 1
    spacing = [0.5, 0.5, 0.5]
    spacing[axis] = 3.0
    assert hd95(a, b, spacing=spacing) == pytest.approx(6.0)
    assert hd95(a, b) == pytest.approx(2.0)  # default spacing is 1 per axis


def test_hd95_of_2d_squares_in_mm():
    a, b = _squares()
    # every column-face point of one square is 5 columns from the other's; spacing 0.7 mm across columns
    assert hd95(a, b, spacing=(2.0, 0.7)) == pytest.approx(3.5)


def test_empty_both_is_nan_and_excluded_from_mean():
    a, b = _squares()
    m = segmentation_metrics(a, b, {"square": 1, "absent": 2}, spacing=(1.0, 1.0))
    assert math.isnan(m["dice_absent"]) and math.isnan(m["hd95_absent"])
    assert m["dice_mean"] == pytest.approx(0.5)
    assert m["hd95_mean"] == pytest.approx(5.0)


def test_one_side_empty_is_dice_zero_and_hd95_inf():
    a, _ = _squares()
    empty = np.zeros_like(a)
    assert dice(a, empty) == 0.0 and dice(empty, a) == 0.0
    assert hd95(a, empty) == math.inf and hd95(empty, a) == math.inf


def test_region_restricts_scoring():
    a, b = _squares()
    # outside the region lies all the disagreement: inside, the masks are identical
    region = np.zeros_like(a, bool)
    region[:, 5:10] = True
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, b, region=region) == pytest.approx(1.0)
    assert hd95(a, b, region=region) == pytest.approx(0.0)
    assert math.isnan(dice(a, b, region=np.zeros_like(a, bool)))


def test_multiclass_labels_as_list_are_named_by_value():
    ref = np.zeros((8, 8), int)
    ref[:4], ref[4:] = 1, 2
    pred = ref.copy()
    pred[4:, :4] = 1  # half of class 2 predicted as class 1
    m = segmentation_metrics(pred, ref, [1, 2])
    assert m["dice_1"] == pytest.approx(2 * 32 / (48 + 32))
    assert m["dice_2"] == pytest.approx(2 * 16 / (16 + 32))
    assert m["dice_mean"] == pytest.approx((m["dice_1"] + m["dice_2"]) / 2)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((4, 4)), np.zeros((4, 5)))


# --------------------------------------------------------------------------- ensembles


def test_mean_threshold_binary_and_multiclass():
    probs = np.array([[[0.9, 0.2, 0.6]], [[0.7, 0.4, 0.3]]])  # (N=2, K=1, 3)
    np.testing.assert_array_equal(fuse_mean_threshold(probs), [1, 0, 0])
    multi = np.stack([1 - probs[:, 0], probs[:, 0]], axis=1)  # (N=2, K=2, 3)
    np.testing.assert_array_equal(fuse_mean_threshold(multi), [1, 0, 0])


def test_majority_vote_with_tie_to_lowest_label():
    maps = np.array([[0, 1, 2, 2], [1, 1, 2, 0], [1, 0, 1, 1]])
    np.testing.assert_array_equal(fuse_majority_vote(maps), [1, 1, 2, 0])


def _noisy_raters(seed=0, flip=0.2):
    rng = np.random.default_rng(seed)
    truth = np.zeros((40, 40), int)
    truth[10:30, 10:30] = 1
    raters = [truth.copy() for _ in range(3)]
    for i in (1, 2):
        raters[i][rng.random(truth.shape) < flip] ^= 1
    return truth, np.stack(raters)


def test_staple_of_two_agreeing_raters_is_their_consensus():
    truth, raters = _noisy_raters()
    raters[1] = truth  # raters 0 and 1 agree, rater 2 is noisy
    np.testing.assert_array_equal(fuse_staple(raters), truth)
    _, sensitivity, specificity = staple(raters)
    assert sensitivity[2] < 0.95 and specificity[2] < 0.95
    assert sensitivity[0] > 0.99 and specificity[0] > 0.99


def test_staple_trusts_the_reliable_rater_where_a_vote_does_not():
    # rater 0 is exact; raters 1 and 2 flip 20% of voxels independently, so they coincide on ~4% of voxels,
    # where the vote follows them; STAPLE learns rater 0's reliability and follows it there.
    truth, raters = _noisy_raters(seed=0)
    vote, fused = fuse_majority_vote(raters), fuse_staple(raters)
    assert (vote != truth).sum() > 30
    assert (fused != truth).sum() < (vote != truth).sum() / 4
    _, _, specificity = staple(raters)
    assert specificity[0] > max(specificity[1], specificity[2])


def test_staple_multiclass_keeps_unanimous_classes():
    truth = np.zeros((12, 12), int)
    truth[2:6, 2:6], truth[7:11, 7:11] = 1, 2
    noisy = truth.copy()
    noisy[0, :] = 2
    np.testing.assert_array_equal(fuse_staple(np.stack([truth, truth, noisy])), truth)


def test_uncertainty_of_uniform_two_class_ensemble_is_ln2():
    # two members, fully confident but opposite: mean is uniform over two classes
    probs = np.zeros((2, 2, 3, 3))
    probs[0, 0], probs[1, 1] = 1.0, 1.0
    np.testing.assert_allclose(predictive_entropy(probs), np.log(2))
    np.testing.assert_allclose(ensemble_variance(probs), 0.25)
    # a single foreground channel at p = 0.5 is read the same way
    np.testing.assert_allclose(predictive_entropy(np.full((3, 1, 4), 0.5)), np.log(2))


def test_uncertainty_of_confident_agreeing_ensemble_is_zero():
    probs = np.zeros((4, 3, 5))
    probs[:, 1] = 1.0
    np.testing.assert_allclose(predictive_entropy(probs), 0.0)
    np.testing.assert_allclose(ensemble_variance(probs), 0.0)


def test_with_background_is_the_plain_concatenation_bit_for_bit():
    import torch

    p = np.random.default_rng(0).random((3, 1, 5, 4)).astype(np.float32)
    both = with_background(p, axis=1)
    assert both.dtype == np.float32 and both.shape == (3, 2, 5, 4)
    assert np.array_equal(both, np.concatenate([1 - p, p], axis=1))  # float32 throughout, not via float64
    assert np.array_equal(with_background(p[0], axis=0), np.concatenate([1 - p[0], p[0]]))
    t = torch.from_numpy(p)
    assert torch.equal(with_background(t, axis=1), torch.cat([1 - t, t], 1))
