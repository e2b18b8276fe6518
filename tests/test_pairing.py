"""The pairing rule of ``medidiff evaluate``: exact names (the extension stripped, nothing else) unless the card lists
``case_suffixes``; the card field's validation; DRIVE's file names pair through its card."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from PIL import Image

from medidiff.cli import main
from medidiff.data.cards import load_card
from medidiff.errors import MedidiffError
from medidiff.metrics.evaluate import evaluate_fusion, evaluate_image, evaluate_segmentation
from medidiff.metrics.pairing import case_name, read_pairs
from tests.test_bad_inputs import log_handlers_on_live_stderr, user_error  # noqa: F401 (fixture)


def _card(folder: Path, **fields) -> Path:
    """A segmentation card (its data never read by evaluate) with ``fields`` added."""
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "image.png")
    split = {"cases": [{"id": "a", "image": "image.png", "label": "image.png"}]}
    card = {"name": "suffixed", "description": "hand-built", "source": "this test", "licence": "CC0",
            "modality": "CT", "spatial_dims": 3, "tasks": ["segmentation"], "root": str(folder),
            "inputs": {"image": {"channels": ["CT"], "normalise": {"method": "window", "low": 0, "high": 1}}},
            "labels": {"background": 0, "liver": 1}, **fields, "splits": {"train": split, "val": split}}
    path = folder / "suffixed.yaml"
    path.write_text(yaml.safe_dump(card, sort_keys=False))
    return path


def _liver(tmp_path: Path) -> tuple[Path, Path]:
    """``pred/liver_test.nii.gz`` and ``ref/liver.nii.gz``: the same mask."""
    mask = np.zeros((8, 8, 4), np.uint8)
    mask[2:6, 2:6] = 1
    for name in ("pred/liver_test.nii.gz", "ref/liver.nii.gz"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / name)
    return tmp_path / "pred", tmp_path / "ref"


def test_a_file_name_keeps_its_suffix_without_a_card_and_loses_it_with_one(tmp_path):
    assert case_name("liver_test.nii.gz") == "liver_test"
    for suffix in ("_seg", "_pred", "_label", "_mask", "_gt", "_manual1", "_test", "_training", "_fused"):
        assert case_name(f"liver{suffix}.png") == f"liver{suffix}"  # no built-in list any more
    card = load_card(_card(tmp_path, case_suffixes=["_test"]), check_files=False)
    assert card.case_suffixes == ("_test",)
    assert case_name("liver_test.nii.gz", card.case_suffixes) == "liver"
    assert load_card(_card(tmp_path), check_files=False).case_suffixes == ()  # optional: none by default


def test_evaluate_pairs_exact_names_by_default_and_strips_the_cards_suffixes(tmp_path):
    pred, ref = _liver(tmp_path)
    with pytest.raises(MedidiffError, match="case 'liver' has no pred file"):
        evaluate_segmentation(pred, ref)
    card = load_card(_card(tmp_path, case_suffixes=["_test"]), check_files=False)
    case = evaluate_segmentation(pred, ref, card=card)["cases"][0]
    assert case["case"] == "liver" and case["dice_liver"] == pytest.approx(1.0)
    assert evaluate_segmentation(pred, ref, labels={"liver": 1}, suffixes=["_test"])["cases"][0]["case"] == "liver"


def test_the_card_given_to_evaluate_on_the_command_line_pairs_the_files(tmp_path):
    pred, ref = _liver(tmp_path)
    card = _card(tmp_path, case_suffixes=["_test"])
    out = tmp_path / "m.json"
    assert main(["evaluate", "--task", "segmentation", "--pred", str(pred), "--ref", str(ref), "--card", str(card),
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["cases"][0]["case"] == "liver"


def test_image_and_fusion_evaluation_take_the_suffixes_from_a_card(tmp_path):
    pred, ref = _liver(tmp_path)
    card = load_card(_card(tmp_path, case_suffixes=["_test"]), check_files=False)
    with pytest.raises(MedidiffError, match="case 'liver' has no pred file"):
        evaluate_image(pred, ref, data_range=1.0, metrics=("psnr", "nmse"))
    scored = evaluate_image(pred, ref, data_range=1.0, metrics=("psnr", "nmse"), card=card)  # SSIM: 7 voxels a side
    assert scored["cases"][0]["case"] == "liver"
    image = np.random.default_rng(0).integers(0, 256, (16, 16)).astype(np.uint8)
    for name in ("fused/a_test.png", "ct/a.png", "mr/a_test.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / name)
    with pytest.raises(MedidiffError, match="case 'a' has no pred file"):
        evaluate_fusion(tmp_path / "fused", tmp_path / "ct", tmp_path / "mr")
    assert evaluate_fusion(tmp_path / "fused", tmp_path / "ct", tmp_path / "mr", card=card)["cases"][0]["case"] == "a"


def test_a_pairs_file_without_a_case_column_names_the_case_by_the_same_rule(tmp_path):
    pred, ref = _liver(tmp_path)
    (tmp_path / "pairs.csv").write_text("pred,ref\npred/liver_test.nii.gz,ref/liver.nii.gz\n")
    assert read_pairs(tmp_path / "pairs.csv", ["pred", "ref"])[0][0] == "liver_test"
    assert read_pairs(tmp_path / "pairs.csv", ["pred", "ref"], ["_test"])[0][0] == "liver"


@pytest.mark.parametrize("value", ["_test", 3, [""], [1], ["_test", None], [["_test"]], {"_test": 1}])
def test_a_case_suffixes_field_that_is_not_a_list_of_strings_is_one_error_naming_the_card(tmp_path, capsys, value):
    card = _card(tmp_path, case_suffixes=value)
    with pytest.raises(MedidiffError, match=r"case_suffixes: expected a list of non-empty file-name suffixes") as err:
        load_card(card, check_files=False)
    assert err.value.path.endswith("suffixed.yaml") and "\n" not in str(err.value)
    pred, ref = _liver(tmp_path)
    user_error(capsys, ["evaluate", "--task", "segmentation", "--pred", str(pred), "--ref", str(ref), "--card",
                        str(card), "--out", str(tmp_path / "m.json")], "suffixed.yaml", "case_suffixes")


def _gif(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data.astype(np.uint8)).save(path)


def test_drive_file_names_pair_through_the_drive_card(tmp_path):
    """The README's DRIVE command: ``01_test`` predictions (``medidiff infer`` keeps the image's stem), 1st and 2nd
    observer masks ``01_manual1.gif`` / ``01_manual2.gif``, field of view ``01_test_mask.gif``."""
    vessels = np.zeros((24, 24), np.uint8)
    vessels[:, 8:11] = 1
    _gif(tmp_path / "preds" / "01_test.png", vessels)
    _gif(tmp_path / "1st_manual" / "01_manual1.gif", 255 * vessels)
    _gif(tmp_path / "2nd_manual" / "01_manual2.gif", vessels)  # indices 0/1, as the 2nd observer's GIFs
    _gif(tmp_path / "mask" / "01_test_mask.gif", np.full((24, 24), 255))
    out = tmp_path / "m.json"
    argv = ["evaluate", "--task", "segmentation", "--pred", str(tmp_path / "preds"), "--ref",
            str(tmp_path / "1st_manual"), "--region", str(tmp_path / "mask"), "--out", str(out)]
    assert main([*argv, "--card", "drive"]) == 0
    case = json.loads(out.read_text())["cases"][0]
    assert case["case"] == "01" and case["dice_vessel"] == pytest.approx(1.0)
    assert case["region"].endswith("01_test_mask.gif")
    assert evaluate_segmentation(tmp_path / "2nd_manual", tmp_path / "1st_manual", region_dir=tmp_path / "mask",
                                 card=load_card("drive", check_files=False))["cases"][0]["case"] == "01"
