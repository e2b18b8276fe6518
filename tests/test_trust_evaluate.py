"""Trust, round 2: one label reading for training and evaluation, classes matched by name or refused, advice that
fits the card, evaluate's refusals, and a newcomer's RGB photographs with JPEG masks from fit to evaluate.

Every answer is built by hand: masks of known rectangles, predictions whose Dice is known exactly.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from PIL import Image

from medidiff.cli import main
from medidiff.errors import MedidiffError
from tests.conftest import REPO
from tests.test_bad_inputs import log_handlers_on_live_stderr, user_error  # noqa: F401 (fixture)

SIZE = 64
ROWS, COLS = slice(16, 48), slice(16, 48)  # the foreground rectangle of every hand-built mask: 32 x 32


def rectangle(rows: slice = ROWS, cols: slice = COLS) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[rows, cols] = 1
    return mask


def write_card(folder: Path, label_fields: dict, label_file: str, *, labels: dict | None = None,
               dims: int = 2, name: str = "card") -> Path:
    """A card over one image/label pair in ``folder`` (the image is only named, evaluate never reads it)."""
    image = "image.png"
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(folder / image)
    split = {"cases": [{"id": "a", "image": image, "label": label_file}]}
    card = {"name": name, "description": "hand-built", "source": "this test", "licence": "CC0", "modality": "photo",
            "spatial_dims": dims, "tasks": ["segmentation"], "root": str(folder),
            "inputs": {"image": {"channels": ["red", "green", "blue"] if dims == 2 else ["CT"],
                                 "normalise": {"method": "window", "low": 0, "high": 255}}},
            "labels": labels or {"background": 0, "vessel": 1}, **label_fields,
            "splits": {"train": split, "val": split}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(card, sort_keys=False))
    return path


def training_reading(card, path: Path):
    """A label file as training reads it: the data module's loading and remapping transforms."""
    from monai.transforms import Compose

    from medidiff.data import transforms as T
    from medidiff.data.custom import LoadCased, RemapLabelsd

    return T.apply(Compose([LoadCased(card, ["label"]), RemapLabelsd(["label"], card)]), {"label": str(path)})["label"]


def evaluate(pred: Path, ref: Path, out: Path, *extra: str) -> list[str]:
    return ["evaluate", "--task", "segmentation", "--pred", str(pred), "--ref", str(ref), "--out", str(out), *extra]


def scored(out: Path) -> dict:
    return json.loads(out.read_text())


def save_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def save_jpeg(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path, quality=90)
    return path


def save_nii(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.int16), np.eye(4)), str(path))
    return path


# 1 ------------------------------------------------------------------ one label reading, training = evaluate


def _jpeg_in_green(folder: Path) -> tuple[Path, dict, np.ndarray]:
    """A colour JPEG mask: the structure in green, another rectangle in red (which must be ignored)."""
    colour = np.zeros((SIZE, SIZE, 3), np.uint8)
    colour[..., 1] = 255 * rectangle()
    colour[..., 0] = 255 * rectangle(slice(0, 10), slice(0, 10))
    path = save_jpeg(folder / "mask.jpg", colour)
    stored = np.asarray(Image.open(path))[..., 1]
    assert set(np.unique(stored).tolist()) - {0, 255}, "the JPEG should carry compression noise"
    return path, {"label_channel": 1, "label_threshold": 127}, rectangle()


def _png_0_255(folder: Path) -> tuple[Path, dict, np.ndarray]:
    """DRIVE-like: vessels stored as 255, remapped to class 1."""
    return (save_png(folder / "mask.png", 255 * rectangle()), {"label_remap": {0: "background", 255: "vessel"}},
            rectangle())


def _nifti_others(folder: Path) -> tuple[Path, dict, np.ndarray]:
    """sample_ct-like: some stored ids remapped, every unlisted one (77) background via label_others."""
    stored = np.zeros((SIZE, SIZE, 2), np.int16)
    stored[ROWS, COLS], stored[:8, :8], stored[50:, 50:] = 5, 1, 77
    expected = np.zeros_like(stored, dtype=np.int64)
    expected[ROWS, COLS], expected[:8, :8] = 1, 2
    fields = {"label_remap": {0: "background", 5: "liver", 1: "spleen"}, "label_others": "background"}
    return save_nii(folder / "mask.nii.gz", stored), fields, expected


def _nifti_swap(folder: Path) -> tuple[Path, dict, np.ndarray]:
    stored = np.zeros((SIZE, SIZE, 2), np.int16)
    stored[ROWS, COLS], stored[:8, :8] = 1, 2
    expected = np.where(stored == 1, 2, np.where(stored == 2, 1, 0)).astype(np.int64)
    fields = {"label_remap": {0: "background", 1: "spleen", 2: "liver"}}
    return save_nii(folder / "mask.nii.gz", stored), fields, expected


@pytest.mark.parametrize("make", [_jpeg_in_green, _png_0_255, _nifti_others, _nifti_swap],
                         ids=["jpeg channel+threshold", "png 0/255 remap", "label_others", "swap"])
def test_training_and_evaluate_read_a_label_file_alike(tmp_path, make):
    from medidiff.data import load_card
    from medidiff.data.labels import read_label

    path, fields, expected = make(tmp_path)
    three_d = path.name.endswith(".nii.gz")
    labels = {"background": 0, "liver": 1, "spleen": 2} if three_d else None
    card = load_card(write_card(tmp_path, fields, path.name, labels=labels, dims=3 if three_d else 2))
    read = read_label(path, card)
    assert read.shape == (1, *expected.shape) and str(read.dtype) == "torch.int64"
    np.testing.assert_array_equal(read[0].numpy(), expected)
    trained = training_reading(card, path)
    np.testing.assert_array_equal(trained[0].numpy(), expected)
    # evaluate reads the reference the same way: the expected classes as a prediction score Dice 1 everywhere
    pred = (save_nii if three_d else save_png)(tmp_path / "pred" / path.name.replace(".jpg", ".png"), expected)
    assert main(evaluate(pred, path, tmp_path / "m.json", "--card", str(card.path))) == 0
    case = scored(tmp_path / "m.json")["cases"][0]
    dice = {k: v for k, v in case.items() if k.startswith("dice_") and k != "dice_mean"}
    assert dice and all(v == 1.0 for v in dice.values()), case


def test_a_value_the_card_does_not_name_is_refused_by_training_and_evaluate_alike(tmp_path, capsys):
    from medidiff.data import load_card
    from medidiff.data.labels import read_label

    stored = 255 * rectangle()
    stored[0, 0] = 3
    path = save_png(tmp_path / "mask.png", stored)
    card = load_card(write_card(tmp_path, {"label_remap": {0: "background", 255: "vessel"}}, "mask.png"))
    with pytest.raises(MedidiffError, match=r"label value\(s\) \[3\] are not in the card") as err:
        read_label(path, card)
    assert err.value.path.endswith("mask.png")
    user_error(capsys, evaluate(save_png(tmp_path / "pred.png", rectangle()), path, tmp_path / "m.json", "--card",
                                str(card.path)), "mask.png", "[3]", "not in the card")


# 2 ------------------------------------------------------------------------------ classes matched by name


def _model_ids_against_other_ids(tmp_path: Path) -> tuple[Path, Path]:
    """The model writes liver 1 (labels.json says so); the reference stores liver as 5: a perfect prediction."""
    reference = np.zeros((12, 10, 6), np.int16)
    reference[2:6, 2:6, 1:4] = 5
    prediction = (reference == 5).astype(np.int16)
    save_nii(tmp_path / "pred" / "case.nii.gz", prediction)
    save_nii(tmp_path / "ref" / "case.nii.gz", reference)
    names = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "stomach": 4, "aorta": 5}  # sample_ct's classes
    (tmp_path / "pred" / "labels.json").write_text(json.dumps(names))
    return tmp_path / "pred", tmp_path / "ref"


def test_named_predictions_against_unnamed_references_are_refused(tmp_path, capsys):
    pred, ref = _model_ids_against_other_ids(tmp_path)
    line = user_error(capsys, evaluate(pred, ref, tmp_path / "m.json"), "labels.json", "liver", "spleen",
                      "--card", "--by-value")
    assert "name" in line
    assert not (tmp_path / "m.json").exists()


def test_by_value_compares_the_stored_integers_and_is_recorded(tmp_path):
    pred, ref = _model_ids_against_other_ids(tmp_path)
    assert main(evaluate(pred, ref, tmp_path / "m.json", "--by-value")) == 0
    result = scored(tmp_path / "m.json")
    assert result["settings"]["by_value"] is True
    case = result["cases"][0]
    assert case["dice_1"] == 0.0 and case["dice_5"] == 0.0  # the integers disagree, as asked: nothing hidden
    # with the references' names (sample_ct stores liver as 5) the same prediction is perfect
    assert main(evaluate(pred, ref, tmp_path / "n.json", "--card", "sample_ct")) == 0
    named = scored(tmp_path / "n.json")
    assert named["cases"][0]["dice_liver"] == 1.0 and named["settings"]["by_value"] is False


def test_without_names_on_either_side_integers_are_compared_as_before(tmp_path):
    pred, ref = _model_ids_against_other_ids(tmp_path)
    (pred / "labels.json").unlink()
    save_nii(ref / "case.nii.gz", (np.asarray(nib.load(ref / "case.nii.gz").dataobj) == 5).astype(np.int16))
    assert main(evaluate(pred, ref, tmp_path / "m.json")) == 0
    assert scored(tmp_path / "m.json")["cases"][0]["dice_1"] == 1.0


# 3 ----------------------------------------------------------------------------------- advice fits the card


def test_a_0_255_mask_is_thresholded_when_the_card_says_so(tmp_path):
    ref = save_png(tmp_path / "ref.png", 255 * rectangle())
    card = write_card(tmp_path, {"label_threshold": 127}, "ref.png")
    pred = save_png(tmp_path / "pred.png", rectangle())
    assert main(evaluate(pred, ref, tmp_path / "m.json", "--card", str(card))) == 0
    assert scored(tmp_path / "m.json")["cases"][0]["dice_vessel"] == 1.0


@pytest.mark.parametrize(("fields", "labels", "wanted", "unwanted"), [
    ({}, None, ["label_remap", "255: vessel", "label_threshold"], []),
    ({"label_remap": {0: "background", 1: "vessel"}}, None, ["label_remap", "label_others"], ["label_threshold"]),
    ({}, {"background": 0, "liver": 1, "spleen": 2}, ["label_remap", "label_others"], ["label_threshold"]),
], ids=["binary card", "card with a remap", "three classes"])
def test_advice_for_a_0_255_mask_fits_the_card(tmp_path, capsys, fields, labels, wanted, unwanted):
    """label_threshold is advised only where the card may take it: binary labels and no label_remap."""
    from medidiff.data import load_card

    ref = save_png(tmp_path / "ref.png", 255 * rectangle())
    card = write_card(tmp_path, fields, "ref.png", labels=labels)
    line = user_error(capsys, evaluate(save_png(tmp_path / "pred.png", rectangle()), ref, tmp_path / "m.json",
                                       "--card", str(card)), "ref.png", "[255]", *wanted)
    assert not any(word in line for word in unwanted), line
    with pytest.raises(MedidiffError) as err:  # training gives the same advice
        training_reading(load_card(card), ref)
    assert all(word in str(err.value) for word in wanted) and not any(w in str(err.value) for w in unwanted)


# 4 --------------------------------------------------------------------------------------- evaluate refusals


@pytest.fixture
def infer_like(tmp_path) -> tuple[Path, Path, Path]:
    """A prediction folder as ``medidiff infer`` leaves it (labels.json, provenance/) and its references."""
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    save_png(pred / "a.png", rectangle())
    save_png(ref / "a.png", rectangle())
    (pred / "labels.json").write_text(json.dumps({"background": 0, "vessel": 1}))
    (pred / "provenance").mkdir()
    (pred / "provenance" / "a.json").write_text(json.dumps({"settings": {}}))
    card = write_card(tmp_path, {}, "ref/a.png")
    return pred, ref, card


@pytest.mark.parametrize(("target", "why"), [("labels.json", "is a file evaluate reads"),
                                             ("provenance/a.json", "exists and is not a medidiff evaluate result")])
def test_out_never_replaces_a_file_infer_wrote(infer_like, capsys, target, why):
    pred, ref, card = infer_like
    before = (pred / target).read_bytes()
    user_error(capsys, evaluate(pred, ref, pred / target, "--card", str(card)), target, why, "choose another --out")
    assert (pred / target).read_bytes() == before


def test_out_never_names_the_labels_file_evaluate_reads(infer_like, capsys):
    pred, ref, card = infer_like
    (pred / "labels.json").unlink()
    user_error(capsys, evaluate(pred, ref, pred / "labels.json", "--card", str(card)), "labels.json", "--out")
    assert not (pred / "labels.json").exists()


def test_out_replaces_only_an_earlier_evaluate_result(infer_like, tmp_path, capsys):
    pred, ref, card = infer_like
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    user_error(capsys, evaluate(pred, ref, notes, "--card", str(card)), "notes.json",
               "exists and is not a medidiff evaluate result; choose another --out")
    assert notes.read_text() == '{"mine": 1}'
    out = tmp_path / "m.json"
    assert main(evaluate(pred, ref, out, "--card", str(card))) == 0
    assert main(evaluate(pred, ref, out, "--card", str(card), "--nsd-tolerance", "2")) == 0
    assert scored(out)["settings"]["nsd_tolerance"] == 2.0


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_bad_nsd_tolerance_is_refused_before_any_file_is_read(tmp_path, capsys, value):
    line = user_error(capsys, evaluate(tmp_path / "absent_pred", tmp_path / "absent_ref", tmp_path / "m.json",
                                       f"--nsd-tolerance={value}"), "--nsd-tolerance", value)
    assert "absent" not in line


def test_all_background_without_a_card_is_an_error_not_silence(tmp_path, capsys):
    save_png(tmp_path / "pred" / "a.png", np.zeros((SIZE, SIZE)))
    save_png(tmp_path / "ref" / "a.png", np.zeros((SIZE, SIZE)))
    user_error(capsys, evaluate(tmp_path / "pred", tmp_path / "ref", tmp_path / "m.json"),
               "no foreground class", "--card")
    assert not (tmp_path / "m.json").exists()


# 5 ------------------------------------------------------------- the newcomer: RGB JPEGs with JPEG masks


def readme_newcomer() -> tuple[str, list[list[str]]]:
    """The card and the commands of README.md's "RGB images with JPEG masks, start to finish"."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("### RGB images with JPEG masks, start to finish", 1)[1]
    card = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    script = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    commands = [shlex.split(line, comments=True) for line in script.splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["medidiff", "fit"], ["medidiff", "infer"], ["medidiff", "evaluate"]]
    return card, [c[1:] for c in commands]


def _photographs_with_jpeg_masks(root: Path, card: str) -> Path:
    """Six RGB JPEG photographs with white-on-black JPEG masks (values 0..~8 and ~247..255); 4 and 5 held out."""
    from skimage.data import retina

    photo = retina()[200:1224:16, 200:1224:16]  # 64 x 64 x 3
    for i in range(6):
        where = "heldout" if i >= 4 else "data"
        save_jpeg(root / where / "images" / f"{i}.jpg", np.roll(photo, 7 * i, axis=1))
        mask = rectangle(slice(16 + i, 48), COLS)
        save_jpeg(root / where / "masks" / f"{i}.jpg", np.repeat(255 * mask[..., None], 3, axis=2))
    path = root / "my_photos.yaml"
    path.write_text(card)
    return path


TINY = ["--data.patch_size", "[32, 32]", "--model.init_args.net.init_args.channels", "[8, 16]", "--trainer.max_steps",
        "2", "--trainer.limit_val_batches", "0", "--trainer.max_time", "null", "--trainer.enable_progress_bar", "false"]


def test_rgb_photographs_with_jpeg_masks_from_fit_to_evaluate(tmp_path, monkeypatch):
    """The README's card and commands ("Your own data": RGB images with JPEG masks), run as written from the folder
    holding the data, with a tiny training budget and one sampler step added."""
    card_text, (fit, infer, evaluate_argv) = readme_newcomer()
    card = _photographs_with_jpeg_masks(tmp_path, card_text)
    monkeypatch.chdir(tmp_path)
    masks = tmp_path / "heldout" / "masks"
    stored = np.asarray(Image.open(masks / "4.jpg"))[..., 0]
    assert set(np.unique(stored).tolist()) - {0, 255}, "the masks should carry JPEG noise"
    truth = rectangle(slice(20, 48), COLS)
    np.testing.assert_array_equal(stored > 127, truth)  # the noise never crosses the threshold: truth is known
    fit = [str(REPO / word) if word.startswith("configs/") else word for word in fit]
    assert main([*fit, *TINY]) == 0
    assert main([*infer, "--steps", "1"]) == 0
    assert main(evaluate_argv) == 0
    result = scored(tmp_path / "metrics.json")
    assert [c["case"] for c in result["cases"]] == ["4", "5"]
    assert all(0.0 <= c["dice_lesion"] <= 1.0 for c in result["cases"])  # scored, not refused
    # hand-built predictions against the same JPEG mask: the thresholded mask itself, and half of it shifted
    exact = save_png(tmp_path / "exact" / "4.png", truth)
    assert main(evaluate(exact, masks / "4.jpg", tmp_path / "exact.json", "--card", str(card))) == 0
    assert scored(tmp_path / "exact.json")["cases"][0]["dice_lesion"] == 1.0
    shifted = save_png(tmp_path / "shifted" / "4.png", rectangle(slice(20, 48), slice(32, 64)))  # 28x16 overlap
    assert main(evaluate(shifted, masks / "4.jpg", tmp_path / "shifted.json", "--card", str(card))) == 0
    assert scored(tmp_path / "shifted.json")["cases"][0]["dice_lesion"] == pytest.approx(2 * 28 * 16 / (2 * 28 * 32))


@pytest.mark.parametrize(("task", "fragment"), [("segmentation", "names no labels"),
                                                ("restoration", "has no 'image' input")])
def test_a_card_that_cannot_describe_the_references_is_one_line(tmp_path, capsys, task, fragment):
    """sample_fusion names neither classes nor one image scale: it was a silent empty result, or a traceback."""
    save_png(tmp_path / "pred" / "a.png", rectangle())
    save_png(tmp_path / "ref" / "a.png", rectangle())
    argv = evaluate(tmp_path / "pred", tmp_path / "ref", tmp_path / "m.json", "--card", "sample_fusion")
    user_error(capsys, [argv[0], "--task", task, *argv[3:]], "sample_fusion.yaml", fragment)
    assert not (tmp_path / "m.json").exists()


def test_a_card_refuses_label_others_beside_label_threshold(tmp_path):
    """A thresholded mask is 0 and 1 whatever label_others says: a card that seems to say otherwise is refused."""
    from medidiff.data import load_card

    save_png(tmp_path / "ref.png", 255 * rectangle())
    with pytest.raises(MedidiffError, match="label_others has no effect with label_threshold") as err:
        load_card(write_card(tmp_path, {"label_threshold": 127, "label_others": "background"}, "ref.png"))
    assert err.value.path.endswith("card.yaml")


def test_a_prediction_stored_0_255_is_told_it_is_read_as_class_ids(tmp_path, capsys):
    ref = save_png(tmp_path / "ref.png", 255 * rectangle())
    card = write_card(tmp_path, {"label_threshold": 127}, "ref.png")
    user_error(capsys, evaluate(save_png(tmp_path / "pred.png", 255 * rectangle()), ref, tmp_path / "m.json",
                                "--card", str(card)), "pred.png", "[255]", "predictions are class ids")
