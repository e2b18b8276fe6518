"""File-to-file evaluation on temporary folders of NIfTI and PNG files with known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medidiff.data.cards import load_card
from medidiff.errors import MedidiffError
from medidiff.metrics.evaluate import case_name, evaluate_fusion, evaluate_image, evaluate_segmentation
from medidiff.metrics.fusion import fusion_metrics
from medidiff.metrics.image import psnr, ssim

SPACING = (3.0, 0.5, 0.5)
DRIVE_SUFFIXES = load_card("drive", check_files=False).case_suffixes


def _nii(path: Path, data: np.ndarray, spacing=SPACING) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), str(path))


def _png(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data.astype(np.uint8)).save(path)


def _strict_json(path: Path) -> dict:
    def refuse(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture
def seg_folders(tmp_path):
    """Two 3D cases, spacing 3 x 0.5 x 0.5 mm.

    case1: class 1 is a plane at x=3 (pred) vs x=5 (ref), two voxels apart along the 3 mm axis: Dice 0,
    HD95 6 mm; class 2 is an identical block: Dice 1, HD95 0. case2: class 1 identical, class 2 absent from
    both (NaN).
    """
    pred, ref = np.zeros((2, 10, 8, 8), np.uint8), np.zeros((2, 10, 8, 8), np.uint8)
    pred[0, 3], ref[0, 5] = 1, 1
    pred[0, 7:, :4, :4] = ref[0, 7:, :4, :4] = 2
    pred[1, 2:4, 2:6, 2:6] = ref[1, 2:4, 2:6, 2:6] = 1
    for i in range(2):
        _nii(tmp_path / "pred" / f"case{i + 1}.nii.gz", pred[i])
        _nii(tmp_path / "ref" / f"case{i + 1}.nii.gz", ref[i])
    return tmp_path


def test_case_name_rule():
    assert case_name("liver_007_seg.nii.gz") == "liver_007_seg"  # only the extension, without a card's suffixes
    assert case_name("liver_007_seg.nii.gz", ["_seg"]) == "liver_007"
    assert case_name("01_test_mask.gif", DRIVE_SUFFIXES) == case_name("01_manual1.gif", DRIVE_SUFFIXES) == "01"
    assert case_name("01_test.png", DRIVE_SUFFIXES) == case_name("01_manual2.gif", DRIVE_SUFFIXES) == "01"
    assert case_name("CASE_PRED.NII.GZ", ["_pred"]) == "CASE"
    assert case_name("_seg.png", ["_seg"]) == "_seg"  # never stripped to nothing
    assert case_name("notes.json") is None and case_name(".hidden.png") is None


def test_segmentation_json_per_case_and_summary(seg_folders):
    out = seg_folders / "out" / "metrics.json"
    result = evaluate_segmentation(seg_folders / "pred", seg_folders / "ref",
                                   labels={"plane": 1, "block": 2}, out_json=out)
    on_disk = _strict_json(out)
    c1, c2 = on_disk["cases"]
    assert (c1["case"], c2["case"]) == ("case1", "case2")
    assert c1["pred"].endswith("pred/case1.nii.gz") and c1["ref"].endswith("ref/case1.nii.gz")
    assert c1["dice_plane"] == pytest.approx(0.0) and c1["hd95_plane"] == pytest.approx(6.0)
    assert c1["dice_block"] == pytest.approx(1.0) and c1["hd95_block"] == pytest.approx(0.0)
    assert c1["dice_mean"] == pytest.approx(0.5) and c1["hd95_mean"] == pytest.approx(3.0)
    assert c2["dice_plane"] == pytest.approx(1.0)
    assert c2["dice_block"] is None and c2["hd95_block"] is None  # absent from both: NaN -> null
    assert c2["dice_mean"] == pytest.approx(1.0)  # nanmean skips the absent class
    summary = on_disk["summary"]
    assert summary["dice_block"] == {"mean": 1.0, "std": None, "median": 1.0, "n": 1, "n_nan": 1, "n_inf": 0}
    assert summary["dice_mean"]["mean"] == pytest.approx(0.75) and summary["dice_mean"]["n"] == 2
    assert summary["dice_mean"]["std"] == pytest.approx(np.std([0.5, 1.0], ddof=1))
    assert math.isnan(result["cases"][1]["dice_block"])  # the returned dict keeps NaN
    assert not list(out.parent.glob(".*"))  # no temporary file left behind


def test_inferred_labels_mark_absent_classes_nan(seg_folders):
    result = evaluate_segmentation(seg_folders / "pred", seg_folders / "ref")
    c1, c2 = result["cases"]
    assert c1["dice_2"] == pytest.approx(1.0) and c1["hd95_1"] == pytest.approx(6.0)
    assert math.isnan(c2["dice_2"]) and math.isnan(c2["hd95_2"])
    assert result["summary"]["dice_2"]["n"] == 1


def test_missed_structure_counts_as_inf_in_summary(tmp_path):
    ref = np.zeros((6, 6, 6), np.uint8)
    ref[2:4, 2:4, 2:4] = 1
    _nii(tmp_path / "pred" / "a.nii.gz", np.zeros_like(ref))
    _nii(tmp_path / "ref" / "a.nii.gz", ref)
    result = evaluate_segmentation(tmp_path / "pred", tmp_path / "ref", labels={"x": 1})
    assert result["cases"][0]["dice_x"] == 0.0 and result["cases"][0]["hd95_x"] == math.inf
    assert result["summary"]["hd95_x"]["n_inf"] == 1 and result["summary"]["hd95_x"]["n"] == 0


def test_region_folder_restricts_to_the_field_of_view(tmp_path):
    # DRIVE-like 2D PNGs: manual vessels stored as 255, predicted as 1; errors only outside the field of view
    ref = np.zeros((16, 16))
    ref[:, 4:6] = 255
    pred = (ref > 0).astype(float)
    pred[:, 12:14] = 1
    fov = np.zeros((16, 16))
    fov[:, :10] = 255
    _png(tmp_path / "pred" / "01_test.png", pred)
    _png(tmp_path / "ref" / "01_manual1.png", ref)
    _png(tmp_path / "fov" / "01_test_mask.png", fov)
    kwargs = {"labels": {"vessel": 1}, "label_remap": {255: 1}, "suffixes": DRIVE_SUFFIXES}
    whole = evaluate_segmentation(tmp_path / "pred", tmp_path / "ref", **kwargs)
    inside = evaluate_segmentation(tmp_path / "pred", tmp_path / "ref", region_dir=tmp_path / "fov", **kwargs)
    assert whole["cases"][0]["dice_vessel"] == pytest.approx(2 * 32 / (64 + 32))
    assert inside["cases"][0]["dice_vessel"] == pytest.approx(1.0)
    assert inside["cases"][0]["region"].endswith("01_test_mask.png")
    # without the remap, 255 is no class of the card: refused, not scored as a Dice of 0
    with pytest.raises(MedidiffError, match=r"value\(s\) \[255\]"):
        evaluate_segmentation(tmp_path / "pred", tmp_path / "ref", labels={"vessel": 1}, suffixes=DRIVE_SUFFIXES)


def test_missing_partner_names_the_file(seg_folders):
    (seg_folders / "ref" / "case2.nii.gz").unlink()
    with pytest.raises(MedidiffError, match="case 'case2' has no ref file") as err:
        evaluate_segmentation(seg_folders / "pred", seg_folders / "ref")
    assert err.value.path.endswith("pred/case2.nii.gz")


def test_shape_and_spacing_mismatch_name_the_file(seg_folders):
    _nii(seg_folders / "ref" / "case2.nii.gz", np.zeros((10, 8, 7), np.uint8))
    with pytest.raises(MedidiffError, match="shape") as err:
        evaluate_segmentation(seg_folders / "pred", seg_folders / "ref")
    assert err.value.path.endswith("case2.nii.gz")
    _nii(seg_folders / "ref" / "case2.nii.gz", np.zeros((10, 8, 8), np.uint8), spacing=(1.0, 0.5, 0.5))
    with pytest.raises(MedidiffError, match="spacing"):
        evaluate_segmentation(seg_folders / "pred", seg_folders / "ref")


def test_a_shifted_origin_names_the_file_and_a_tiny_one_passes(seg_folders):
    data = np.asanyarray(nib.load(seg_folders / "ref" / "case2.nii.gz").dataobj)
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = (0.1, 0.1, 0.1)  # well under half a voxel: the same grid
    nib.save(nib.Nifti1Image(data, affine), str(seg_folders / "ref" / "case2.nii.gz"))
    assert evaluate_segmentation(seg_folders / "pred", seg_folders / "ref")["summary"]
    affine[:3, 3] = (0.0, 4.0, 0.0)  # eight voxels along a 0.5 mm axis
    nib.save(nib.Nifti1Image(data, affine), str(seg_folders / "ref" / "case2.nii.gz"))
    with pytest.raises(MedidiffError, match="origin .* lies 4.00 mm from") as err:
        evaluate_segmentation(seg_folders / "pred", seg_folders / "ref")
    assert err.value.path.endswith("case2.nii.gz")


def test_duplicate_case_names_raise(seg_folders):
    _nii(seg_folders / "pred" / "case1_seg.nii.gz", np.zeros((10, 8, 8), np.uint8))
    with pytest.raises(MedidiffError, match="two files map to case 'case1'"):
        evaluate_segmentation(seg_folders / "pred", seg_folders / "ref", suffixes=["_seg"])


def test_image_evaluation_on_3d_nifti(tmp_path):
    rng = np.random.default_rng(0)
    ref = rng.random((12, 12, 12)).astype(np.float32)
    pred = (ref + 0.05 * rng.standard_normal(ref.shape)).astype(np.float32)
    _nii(tmp_path / "pred" / "vol.nii.gz", pred)
    _nii(tmp_path / "ref" / "vol.nii.gz", ref)
    out = tmp_path / "image.json"
    evaluate_image(tmp_path / "pred", tmp_path / "ref", data_range=1.0, out_json=out)
    case = _strict_json(out)["cases"][0]
    assert case["psnr"] == pytest.approx(psnr(pred, ref, data_range=1.0))
    assert case["ssim"] == pytest.approx(ssim(pred, ref, data_range=1.0))
    assert case["nmse"] == pytest.approx(float(((pred - ref) ** 2).sum() / (ref**2).sum()), rel=1e-5)


def test_fusion_evaluation_on_png_with_a_colour_source(tmp_path):
    rng = np.random.default_rng(0)
    ct = rng.integers(0, 256, (32, 32)).astype(np.uint8)
    pet = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    luma = pet.astype(float) @ np.array([0.299, 0.587, 0.114])
    fused = np.round((ct + luma) / 2).astype(np.uint8)
    _png(tmp_path / "fused" / "16003.png", fused)
    _png(tmp_path / "ct" / "16003.png", ct)
    _png(tmp_path / "pet" / "16003.png", pet)
    result = evaluate_fusion(tmp_path / "fused", tmp_path / "ct", tmp_path / "pet", tmp_path / "f.json")
    expected = fusion_metrics(fused.astype(float), ct.astype(float), luma)
    case = _strict_json(tmp_path / "f.json")["cases"][0]
    assert case["source_a"].endswith("ct/16003.png") and case["source_b"].endswith("pet/16003.png")
    for key, value in expected.items():
        assert case[key] == pytest.approx(value, rel=1e-6), key
    assert result["summary"]["vif"]["n"] == 1
    _png(tmp_path / "pet" / "16004.png", pet)
    with pytest.raises(MedidiffError, match="no pred file"):
        evaluate_fusion(tmp_path / "fused", tmp_path / "ct", tmp_path / "pet")


def test_fusion_values_off_the_8bit_scale_are_a_user_error(tmp_path):
    img = np.full((20, 20), 300.0, np.float32)
    for folder in ("fused", "a", "b"):
        _nii(tmp_path / folder / "x.nii.gz", img[..., None], spacing=(1.0, 1.0, 1.0))
    with pytest.raises(MedidiffError, match="8-bit") as err:
        evaluate_fusion(tmp_path / "fused", tmp_path / "a", tmp_path / "b")
    assert err.value.path.endswith("fused/x.nii.gz")


def test_a_reference_stored_in_another_axis_order_is_reoriented_exactly(tmp_path):
    """TotalSegmentator's DICOM label map is saved LAS beside its LPS series: the same voxels, y flipped.
    evaluate puts it on the prediction's axes (no interpolation) instead of refusing or scoring it flipped."""
    rng = np.random.default_rng(0)
    label = (rng.random((12, 10, 6)) > 0.6).astype(np.uint8)
    lps = np.diag([-1.0, -1.0, 2.0, 1.0])
    lps[:3, 3] = [5.0, 7.0, -3.0]
    las = lps.copy()
    las[:3, 1] *= -1  # y axis reversed: voxel j of LAS is voxel (9 - j) of LPS
    las[:3, 3] = lps[:3, :3] @ [0, 9, 0] + lps[:3, 3]
    for folder in ("pred", "ref"):
        (tmp_path / folder).mkdir()
    nib.save(nib.Nifti1Image(label, lps), tmp_path / "pred" / "case.nii.gz")
    nib.save(nib.Nifti1Image(label[:, ::-1].copy(), las), tmp_path / "ref" / "case.nii.gz")
    result = evaluate_segmentation(tmp_path / "pred", tmp_path / "ref")
    case = result["cases"][0]
    assert case["dice_1"] == pytest.approx(1.0) and case["reoriented"] == ["ref"]
    # the same reference without the flip in its data is a real disagreement, and is scored as one
    nib.save(nib.Nifti1Image(label, las), tmp_path / "ref" / "case.nii.gz")
    assert evaluate_segmentation(tmp_path / "pred", tmp_path / "ref")["cases"][0]["dice_1"] < 0.8
