"""A new user's own scans through the command line: one test per finding of the "Your own scans, right answers"
review (each failed before the single inference pipeline and the model-input contract existed).

Real images where they exist here: the shipped MNI152 T1 and TotalSegmentator CT crops, scikit-image's CC0
fundus photograph as an RGB JPEG; an "MR volume in scanner units" is the T1 template scaled to the range of
pydicom's MR test file (139..2052).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from medidiff.cli import main
from tests.conftest import REPO
from tests.test_bad_inputs import log_handlers_on_live_stderr, user_error  # noqa: F401 (fixture)

SAMPLES = REPO / "medidiff/sample_data"
T1, CT = SAMPLES / "mni152/t1_2mm.nii.gz", SAMPLES / "totalseg_ct/ct_b.nii.gz"
WEIGHTS = REPO / "medidiff/weights"


def mr_volume(path: Path, slices: slice = slice(30, 42), every: int = 1) -> Path:
    """The T1 template in MR scanner-like units (0..~2000), optionally with every ``every``-th slice only."""
    source = nib.load(T1)
    data = np.asanyarray(source.dataobj).astype(np.float32)[:, :, slices][:, :, ::every] * 8.5
    affine = source.affine.copy()
    affine[:3, 2] *= every
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def provenance(folder: Path) -> dict:
    return json.loads(next((folder / "provenance").glob("*.json")).read_text())


# 1 ------------------------------------------------------------------------------------------- 2D inputs


def test_an_rgb_jpeg_is_refused_naming_the_channels_and_the_flags(tmp_path, capsys):
    from skimage.data import retina

    photo = tmp_path / "polyp.jpg"
    Image.fromarray(retina()[::4, ::4]).save(photo, quality=90)
    line = user_error(capsys, ["infer", "--task", "segmentation", "--ckpt", "segmentation_mni_2d", "--input",
                               str(photo), "--output",
                               str(tmp_path / "out")], "polyp.jpg", "3 channel(s) (RGB)")
    assert "--channel" in line and "--luma" in line


def test_a_grey_png_reaches_the_shipped_2d_model(tmp_path):
    slice_ = np.asanyarray(nib.load(T1).dataobj)[:, :, 36].astype(np.uint8)
    png = tmp_path / "in" / "slice.png"
    png.parent.mkdir()
    Image.fromarray(slice_).save(png)
    assert main(["infer", "--task", "segmentation", "--ckpt", "segmentation_mni_2d", "--input", str(png), "--output",
                 str(tmp_path / "out")]) == 0
    labels = nib.load(tmp_path / "out" / "slice.nii.gz")
    assert labels.shape == slice_.shape and np.issubdtype(labels.get_data_dtype(), np.integer)
    assert provenance(tmp_path / "out")["settings"]["checkpoint"].endswith("segmentation_mni_2d.ckpt")


# 2 ------------------------------------------------------------------------------------ wrong modality


def test_an_mr_volume_is_refused_by_the_ct_superres_model(tmp_path, capsys):
    scan = mr_volume(tmp_path / "in" / "mr_thick.nii.gz", every=4)
    user_error(capsys, ["infer", "--task", "superres", "--ckpt", "superres_ct_3d", "--input", str(scan), "--output",
                        str(tmp_path / "out")], "mr_thick.nii.gz", "--allow intensity", "CT")
    assert main(["infer", "--task", "superres", "--ckpt", "superres_ct_3d", "--input", str(scan), "--output",
                 str(tmp_path / "forced"),
                 "--allow", "intensity", "clipping", "--steps", "1"]) == 0
    checks = provenance(tmp_path / "forced")["checks"]["image"]["intensity"]
    assert checks["allowed"] == ["clipping", "intensity"] and checks["clipped_high"][0] > 0  # what was clipped


def test_the_kspace_model_without_a_mask_is_refused(tmp_path, capsys):
    scan = mr_volume(tmp_path / "in" / "noisy.nii.gz")
    user_error(capsys, ["infer", "--task", "restoration", "--ckpt", "restoration_mni_2d", "--input", str(scan),
                        "--output", str(tmp_path / "o")], "k-space", "--mask")


def test_an_mr_volume_is_taken_by_the_mr_model_and_refused_by_the_ct_one(tmp_path, capsys):
    scan = mr_volume(tmp_path / "in" / "mr.nii.gz")
    assert main(["infer", "--task", "segmentation", "--ckpt", "segmentation_mni_2d", "--input", str(scan), "--output",
                 str(tmp_path / "out")]) == 0
    assert provenance(tmp_path / "out")["settings"]["checkpoint"].endswith("segmentation_mni_2d.ckpt")
    user_error(capsys, ["infer", "--task", "segmentation", "--ckpt", str(WEIGHTS / "segmentation_ct_3d.ckpt"),
                        "--input", str(scan), "--output", str(tmp_path / "ct")], "mr.nii.gz", "--allow intensity")


def test_a_ct_scan_is_accepted_by_the_ct_model_with_its_clipping_recorded(tmp_path):
    assert main(["infer", "--task", "segmentation", "--ckpt", str(WEIGHTS / "segmentation_ct_3d.ckpt"), "--input",
                 str(CT), "--output", str(tmp_path / "out"), "--steps", "1"]) == 0
    checks = provenance(tmp_path / "out")["checks"]["image"]["intensity"]
    assert checks["checked"] and 0 < checks["clipped_low"][0] < 0.2


# 3 ------------------------------------------------------------------- evaluate: model ids vs card remap


def test_evaluate_matches_classes_by_name_when_the_card_remaps_references(tmp_path):
    """sample_ct stores liver as 5 and spleen as 1 (TotalSegmentator ids); the model writes liver 1, spleen 2."""
    reference = np.zeros((12, 10, 6), np.int16)
    reference[2:6, 2:6, 1:4], reference[7:10, 5:9, 2:5] = 5, 1
    model_ids = np.zeros_like(reference)
    model_ids[reference == 5], model_ids[reference == 1] = 1, 2
    for folder, array in (("pred", model_ids), ("ref", reference)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / folder / "case.nii.gz")
    labels = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "stomach": 4, "aorta": 5}
    (tmp_path / "pred" / "labels.json").write_text(json.dumps(labels))  # as medidiff infer writes it
    out = tmp_path / "m.json"
    assert main(["evaluate", "--task", "segmentation", "--pred", str(tmp_path / "pred"), "--ref",
                 str(tmp_path / "ref"), "--card", "sample_ct", "--out", str(out)]) == 0
    case = json.loads(out.read_text())["cases"][0]
    assert case["dice_liver"] == pytest.approx(1.0) and case["dice_spleen"] == pytest.approx(1.0)


# 4 ------------------------------------------------------------------------ cards: colour masks, channels


def _rgb_card(tmp_path: Path) -> Path:
    """Four RGB JPEG photographs with JPEG masks (the mask in the red channel, noisy around 0 and 255)."""
    from skimage.data import retina

    rng = np.random.default_rng(0)
    photo = retina()[200:1224:8, 200:1224:8]  # 128 x 128 x 3
    for i in range(4):
        (tmp_path / "images").mkdir(exist_ok=True), (tmp_path / "masks").mkdir(exist_ok=True)
        Image.fromarray(np.roll(photo, 9 * i, axis=0)).save(tmp_path / "images" / f"{i}.jpg", quality=90)
        mask = np.zeros((128, 128, 3), np.uint8)
        mask[30 + 5 * i:70, 40:90] = 255
        noisy = np.clip(mask.astype(int) + rng.integers(-20, 20, mask.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(tmp_path / "masks" / f"{i}.jpg", quality=90)
    card = {"name": "endo", "description": "RGB photographs with JPEG masks", "source": "test",
            "licence": "CC0", "modality": "endoscopy", "spatial_dims": 2, "tasks": ["segmentation"],
            "root": str(tmp_path), "inputs": {"image": {"channels": ["red", "green", "blue"],
                                                        "normalise": {"method": "window", "low": 0, "high": 255}}},
            "labels": {"background": 0, "polyp": 1}, "label_channel": 0, "label_threshold": 127,
            "splits": {split: {"pattern": {"image": "images/{id}.jpg", "label": "masks/{id}.jpg"}, "ids": ids}
                       for split, ids in (("train", ["0", "1", "2"]), ("val", ["3"]))}}
    path = tmp_path / "endo.yaml"
    path.write_text(yaml.safe_dump(card))
    return path


def _fit_argv(card: Path, run: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(REPO / "configs/segmentation/sample_mni_2d.yaml"), "--data.card", str(card),
            "--data.spatial_dims", "2", "--data.patch_size", "[32, 32]", "--data.cache", "false",
            "--model.init_args.task.init_args.num_classes", "2", "--model.init_args.net.init_args.in_channels", "1",
            "--model.init_args.net.init_args.channels", "[8, 16]", "--trainer.max_steps", "2",
            "--trainer.limit_val_batches", "0", "--trainer.max_time", "null", "--trainer.enable_progress_bar",
            "false", "--trainer.logger", "false", "--trainer.default_root_dir", str(run), *extra]


def test_a_card_takes_masks_from_jpeg_files_and_the_channels_of_the_network(tmp_path, capsys):
    card = _rgb_card(tmp_path)
    line = user_error(capsys, _fit_argv(card, tmp_path / "run1"), "cond_channels is 1", "3 image channel(s)")
    assert "--model.init_args.net.init_args.cond_channels 3" in line
    assert main(_fit_argv(card, tmp_path / "run2", "--model.init_args.net.init_args.cond_channels", "3")) == 0
    from medidiff.data.datamodule import MedicalDataModule

    data = MedicalDataModule(str(card), "segmentation", patch_size=[32, 32])
    data.setup("fit")
    label = data.datasets["val"][0]["label"]
    assert set(torch.unique(label).tolist()) == {0, 1}  # JPEG noise thresholded away


# 5 ---------------------------------------------------------------------------- validation foreground


def test_validation_patches_hold_the_foreground_and_its_absence_warns(tmp_path):
    from medidiff.data.datamodule import MedicalDataModule

    card = _rgb_card(tmp_path)
    # an off-centre structure that a centre patch of 32 x 32 misses
    for name in ("3.jpg",):
        mask = np.zeros((128, 128, 3), np.uint8)
        mask[100:120, 5:25] = 255
        Image.fromarray(mask).save(tmp_path / "masks" / name, quality=95)
    data = MedicalDataModule(str(card), "segmentation", patch_size=[32, 32])
    data.setup("fit")
    assert int(data.datasets["val"][0]["label"].sum()) > 0

    from medidiff.tasks import Segmentation

    task = Segmentation(num_classes=2)
    empty = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    task.sample_metrics(torch.zeros(1, 1, 1, 8, 8), {"label": empty})
    with pytest.warns(UserWarning, match="no sampled validation patch holds any foreground"):
        task.end_validation(sanity_checking=False)


# 6 --------------------------------------------------------------------------------- explicit pairing


def test_evaluate_pairs_two_files_and_a_pairs_file(tmp_path):
    a = np.zeros((10, 10, 4), np.int16)
    a[2:6, 2:6] = 1
    for name in ("prediction_of_patient7.nii.gz", "patient7_manual.nii.gz"):
        nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / name)
    assert main(["evaluate", "--task", "segmentation", "--pred", str(tmp_path / "prediction_of_patient7.nii.gz"),
                 "--ref", str(tmp_path / "patient7_manual.nii.gz"), "--out", str(tmp_path / "a.json")]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["cases"][0]["dice_mean"] == pytest.approx(1.0)
    (tmp_path / "pairs.csv").write_text("case,pred,ref\np7,prediction_of_patient7.nii.gz,patient7_manual.nii.gz\n")
    assert main(["evaluate", "--task", "segmentation", "--pairs", str(tmp_path / "pairs.csv"),
                 "--out", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["cases"][0]["case"] == "p7"


# 7 ------------------------------------------------------------------------------- classical fusion CLI


@pytest.mark.parametrize("method", ["average", "max_abs", "laplacian"])
def test_classical_fusion_from_the_command_line(tmp_path, method):
    pair = SAMPLES / "fusion"
    assert main(["infer", "--task", "fusion", "--method", method, "--input", str(pair / "mri/124.png"),
                 "--input-b", str(pair / "pet/124.png"), "--output", str(tmp_path / "out")]) == 0
    fused = np.asarray(Image.open(tmp_path / "out" / "124.png"))
    assert fused.shape == (208, 176, 3) and provenance(tmp_path / "out")["settings"]["method"] == method


# 8 ---------------------------------------------------------------------- the validated step count


def test_infer_uses_the_step_count_that_scored_best_on_validation(tmp_path):
    """The shipped 2D model scored Dice 0.940 at 1 step and 0.919 at 10 on its validation slices."""
    contract = torch.load(WEIGHTS / "segmentation_mni_2d.ckpt", weights_only=True)["medidiff"]["contract"]
    assert contract["sampling"]["chosen_by"] == "validation" and contract["sampling"]["steps"] == 1
    assert main(["infer", "--task", "segmentation", "--ckpt", str(WEIGHTS / "segmentation_mni_2d.ckpt"),
                 "--input", str(mr_volume(tmp_path / "in" / "mr.nii.gz")), "--output", str(tmp_path / "out")]) == 0
    record = provenance(tmp_path / "out")
    assert record["settings"]["steps"] == 1 and record["nfe"] == 1


def test_fit_records_the_validated_step_count_in_the_checkpoint(tmp_path):
    argv = ["fit", "--config", str(REPO / "configs/segmentation/sample_mni_2d.yaml"), "--trainer.max_steps", "2",
            "--trainer.max_time", "null", "--trainer.limit_val_batches", "1", "--trainer.check_val_every_n_epoch",
            "1", "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
            "--model.init_args.net.init_args.channels", "[8, 16]", "--config", str(tmp_path / "steps.yaml")]
    (tmp_path / "steps.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "medidiff.callbacks.Checkpoint", "init_args": {"save_last": True}},
        {"class_path": "medidiff.callbacks.ChooseSteps", "init_args": {"steps": [1, 2]}}]}}))
    assert main(argv) == 0
    checkpoint = sorted(tmp_path.rglob("last.ckpt"))[-1]
    sampling = torch.load(checkpoint, weights_only=True)["medidiff"]["contract"]["sampling"]
    assert sampling["chosen_by"] == "validation" and sampling["steps"] in (1, 2)
    assert set(sampling["scores"]) == {"1", "2"}


# 9 ------------------------------------------------------------------------------ label maps and header


def test_label_maps_are_integers_and_keep_the_header_codes(tmp_path):
    source = nib.load(T1)
    image = nib.Nifti1Image(np.asanyarray(source.dataobj)[:, :, 30:34], source.affine)
    image.set_qform(source.affine, code=0)
    image.set_sform(source.affine, code=2)
    (tmp_path / "in").mkdir()
    nib.save(image, tmp_path / "in" / "scan.nii.gz")
    assert main(["infer", "--task", "segmentation", "--ckpt", str(WEIGHTS / "segmentation_mni_2d.ckpt"),
                 "--input", str(tmp_path / "in" / "scan.nii.gz"), "--output", str(tmp_path / "out")]) == 0
    written = nib.load(tmp_path / "out" / "scan.nii.gz")
    assert np.issubdtype(written.get_data_dtype(), np.integer)
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (0, 2)
    assert np.allclose(written.affine, source.affine)


# 10 ------------------------------------------------------------------------------------------- device


def _spy(monkeypatch, cls, method: str, make_output):
    """Replace ``cls.method`` by a spy that records the devices of its tensor arguments, and make every module
    report the ``meta`` device: inputs must be moved there, so the spy sees ``meta``."""
    seen: list[str] = []

    def spy(self, *args, **kwargs):
        values = [v for a in (*args, *kwargs.values()) for v in (a.values() if isinstance(a, dict) else [a])]
        seen.extend(t.device.type for t in values if isinstance(t, torch.Tensor))
        return make_output(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, spy)
    monkeypatch.setattr(cls, "device", property(lambda self: torch.device("meta")))
    return seen


def test_segmentation_inputs_reach_the_network_on_the_module_device(tmp_path, monkeypatch):
    from medidiff.lit import DiffusionModule

    def probabilities(self, inputs, **kwargs):
        image = inputs["image"]
        return torch.full((kwargs.get("ensemble", 1), image.shape[0], self.task.mask_channels, *image.shape[2:]), 0.5)

    seen = _spy(monkeypatch, DiffusionModule, "predict", probabilities)
    assert main(["infer", "--task", "segmentation", "--ckpt", str(WEIGHTS / "segmentation_mni_2d.ckpt"),
                 "--input", str(mr_volume(tmp_path / "in" / "mr.nii.gz")), "--output", str(tmp_path / "o")]) == 0
    assert seen and set(seen) == {"meta"}


@pytest.mark.parametrize("task", ["restoration", "superres"])
def test_image_task_inputs_reach_the_network_on_the_module_device(tmp_path, monkeypatch, task):
    from medidiff.core.operators import kspace_mask
    from medidiff.lit import DiffusionModule

    seen = _spy(monkeypatch, DiffusionModule, "predict",
                lambda self, inputs, **kwargs: torch.zeros(1, *inputs["condition"].shape))
    if task == "restoration":
        scan = mr_volume(tmp_path / "in" / "zf.nii.gz")
        mask = kspace_mask(nib.load(scan).shape[:2], 4, 0.08, "random", torch.Generator().manual_seed(0))
        nib.save(nib.Nifti1Image(mask.numpy().astype(np.uint8), np.eye(4)), tmp_path / "mask.nii.gz")
        extra, ckpt = ["--mask", str(tmp_path / "mask.nii.gz")], "restoration_mni_2d"
    else:
        source = nib.load(CT)
        scan, extra, ckpt = tmp_path / "in" / "ct.nii.gz", ["--allow", "clipping"], "superres_ct_3d"
        scan.parent.mkdir()
        nib.save(nib.Nifti1Image(np.asanyarray(source.dataobj)[:, :, ::4].astype(np.float32), source.affine), scan)
    assert main(["infer", "--task", task, "--ckpt", str(WEIGHTS / f"{ckpt}.ckpt"), "--input", str(scan),
                 "--output", str(tmp_path / "o"), *extra]) == 0
    assert seen and set(seen) == {"meta"}
