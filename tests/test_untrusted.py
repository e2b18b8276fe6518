"""Untrusted files and faults through ``fit``, ``infer`` and ``evaluate``: one test per finding of the review
"no code runs, no silent wrong answer, no traceback". Every refusal is one ``medidiff: error:`` line, exit 2.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medidiff.cli import main
from tests.conftest import REPO
from tests.test_bad_inputs import (  # noqa: F401 (fixture)
    assert_nothing_written,
    log_handlers_on_live_stderr,
    user_error,
    write_card,
    write_dicom_series,
)

CONFIG = REPO / "configs/segmentation/sample_mni_2d.yaml"
SAMPLES = REPO / "medidiff/sample_data"
T1 = SAMPLES / "mni152/t1_2mm.nii.gz"
SEG2D = REPO / "medidiff/weights/segmentation_mni_2d.ckpt"
RESTORE = REPO / "medidiff/weights/restoration_mni_2d.ckpt"


class Payload:
    """Pickled, it calls ``Path(target).touch()`` when loaded: proof that loading ran code."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path(self.target).touch, ())


def slab(path: Path, start: int = 30, stop: int = 34, affine: np.ndarray | None = None) -> Path:
    source = nib.load(T1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asanyarray(source.dataobj)[:, :, start:stop], source.affine if affine is None
                             else affine), path)
    return path


def tiny_fit(root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(CONFIG), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
            "--trainer.max_time", "null", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(root), "--model.init_args.net.init_args.channels", "[8, 16]", *extra]


# 1 ---------------------------------------------------------------------------------------------- security


@pytest.mark.parametrize("weights_only", [[], ["--weights_only", "false"]], ids=["default", "weights_only false"])
def test_a_planted_last_checkpoint_runs_no_code(tmp_path, capsys, weights_only):
    root = tmp_path / "run"
    assert main(tiny_fit(root)) == 0
    last = next(root.rglob("last.ckpt"))
    content = torch.load(last, weights_only=True)
    content["x"] = Payload(tmp_path / "pwned")
    torch.save(content, last)
    line = user_error(capsys, [*tiny_fit(root, "--trainer.max_steps", "4"), "--ckpt_path", "last", *weights_only])
    assert not (tmp_path / "pwned").exists()
    assert "weights_only=False" not in line and ("refused" in line or "weights_only" in line)


# 2 ----------------------------------------------------------------------------------- silent wrong results


def test_a_gzip_stream_with_flipped_bytes_is_refused(tmp_path, capsys):
    image = nib.Nifti1Image(np.random.default_rng(0).uniform(0, 100, (20, 18, 6)).astype(np.float32), np.eye(4))
    raw = image.to_bytes()
    packed = bytearray(gzip.compress(raw, compresslevel=0))  # stored blocks: flipped bytes still decode
    packed[len(packed) // 2] ^= 0xFF
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "scan.nii.gz").write_bytes(bytes(packed))
    user_error(capsys, ["infer", "--task", "segmentation", "--ckpt", str(SEG2D), "--input",
                        str(tmp_path / "in" / "scan.nii.gz"), "--output", str(tmp_path / "out")], "scan.nii.gz",
               "corrupt")
    assert_nothing_written(tmp_path / "out")


def _image_pair(tmp_path: Path) -> tuple[Path, Path]:
    ref = np.linspace(0, 255, 32 * 32, dtype=np.float32).reshape(32, 32)
    for name, data in (("pred", ref + 5.0), ("ref", ref)):
        (tmp_path / name).mkdir()
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / name / "a.nii.gz")
    return tmp_path / "pred", tmp_path / "ref"


def test_evaluate_image_data_range_is_the_references_or_the_cards_never_one(tmp_path, capsys):
    pred, ref = _image_pair(tmp_path)
    out = tmp_path / "m.json"
    assert main(["evaluate", "--task", "restoration", "--pred", str(pred), "--ref", str(ref), "--out", str(out)]) == 0
    case = json.loads(out.read_text())["cases"][0]
    assert case["psnr"] == pytest.approx(20 * np.log10(255 / 5), abs=1e-3) and case["data_range"] == 255
    assert main(["evaluate", "--task", "restoration", "--pred", str(pred), "--ref", str(ref), "--card", "sample_ct",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["settings"]["data_range"] == 2000
    for bad in ("0", "-3"):
        user_error(capsys, ["evaluate", "--task", "restoration", "--pred", str(pred), "--ref", str(ref),
                            "--data-range", bad, "--out", str(tmp_path / "x.json")], "positive")


def test_a_kspace_mask_stored_0_255_is_the_same_mask(tmp_path):
    from medidiff.core.operators import kspace_mask, undersample

    volume = torch.from_numpy(np.asanyarray(nib.load(T1).dataobj)[:, :, 30:33].astype(np.float32))
    mask = kspace_mask(volume.shape[:2], 4, 0.08, "random", torch.Generator().manual_seed(0))
    zero_filled = undersample(volume.movedim(-1, 0)[:, None], mask)[0][:, 0].movedim(0, -1)
    slab_path = tmp_path / "in" / "zf.nii.gz"
    slab_path.parent.mkdir()
    nib.save(nib.Nifti1Image(zero_filled.numpy(), nib.load(T1).affine), slab_path)
    outputs = []
    for scale in (1, 255):
        mask_path = tmp_path / f"mask{scale}.nii.gz"
        nib.save(nib.Nifti1Image((mask.numpy() * scale).astype(np.uint8), np.eye(4)), mask_path)
        out = tmp_path / f"out{scale}"
        assert main(["infer", "--task", "restoration", "--ckpt", str(RESTORE), "--input", str(slab_path),
                     "--mask", str(mask_path), "--output", str(out), "--steps", "1"]) == 0
        outputs.append(np.asanyarray(nib.load(out / "zf.nii.gz").dataobj))
    assert np.array_equal(outputs[0], outputs[1])


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path, capsys):
    content = torch.load(SEG2D, weights_only=True)
    first = next(k for k, v in content["state_dict"].items() if v.is_floating_point())
    content["state_dict"][first] = torch.full_like(content["state_dict"][first], float("nan"))
    torch.save(content, tmp_path / "nan.ckpt")
    user_error(capsys, ["infer", "--task", "segmentation", "--ckpt", str(tmp_path / "nan.ckpt"), "--input", str(T1),
                        "--output", str(tmp_path / "out")], "nan.ckpt", "NaN")


def test_evaluate_refuses_a_rotated_grid(tmp_path, capsys):
    mask = np.zeros((16, 16, 4), np.int16)
    mask[4:10, 4:10] = 1
    angle = np.deg2rad(10)
    rotated = np.eye(4)
    rotated[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    for name, affine in (("pred", rotated), ("ref", np.eye(4))):
        (tmp_path / name).mkdir()
        nib.save(nib.Nifti1Image(mask, affine), tmp_path / name / "a.nii.gz")
    user_error(capsys, ["evaluate", "--task", "segmentation", "--pred", str(tmp_path / "pred"), "--ref",
                        str(tmp_path / "ref"), "--out", str(tmp_path / "m.json")], "a.nii.gz", "direction")


def test_a_zero_voxel_size_is_refused(tmp_path, capsys):
    image = nib.Nifti1Image(np.ones((8, 8, 4), np.float32), None)
    image.header.set_zooms((0.0, 0.0, 0.0))
    image.set_qform(None, code=0)
    image.set_sform(None, code=0)
    (tmp_path / "in").mkdir()
    nib.save(image, tmp_path / "in" / "flat.nii.gz")
    user_error(capsys, ["infer", "--task", "segmentation", "--ckpt", str(SEG2D), "--input",
                        str(tmp_path / "in" / "flat.nii.gz"), "--output", str(tmp_path / "out")], "flat.nii.gz",
               "voxel size")


def test_two_dicom_series_in_one_folder_are_refused(tmp_path, capsys):
    from medidiff import io

    volume = np.random.default_rng(0).integers(0, 500, (16, 16, 4))
    write_dicom_series(tmp_path / "mixed", volume)
    second = write_dicom_series(tmp_path / "other", volume[:, :, :3])
    import SimpleITK as sitk

    for path in second:  # the same slices as a second series (another SeriesInstanceUID)
        image = sitk.ReadImage(str(path))
        image.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.9")
        image.SetMetaData("0008|0018", image.GetMetaData("0008|0018") + ".9")
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(tmp_path / "mixed" / f"b_{path.name}"))
        writer.Execute(image)
    with pytest.raises(Exception, match="2 DICOM series"):
        io.read(tmp_path / "mixed")


def test_evaluate_refuses_reference_values_the_card_does_not_name(tmp_path, capsys):
    mask = np.zeros((12, 10, 4), np.int16)
    mask[2:6, 2:6], mask[7:9, 7:9] = 5, 77  # 77: not in sample_ct's label_remap
    for name in ("pred", "ref"):
        (tmp_path / name).mkdir()
    nib.save(nib.Nifti1Image((mask == 5).astype(np.int16), np.eye(4)), tmp_path / "pred" / "a.nii.gz")
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "ref" / "a.nii.gz")
    user_error(capsys, ["evaluate", "--task", "segmentation", "--pred", str(tmp_path / "pred"), "--ref",
                        str(tmp_path / "ref"), "--card", "sample_ct", "--out", str(tmp_path / "m.json")],
               "a.nii.gz", "77")


def test_fit_refuses_num_classes_against_the_card_and_all_empty_labels(tmp_path, capsys):
    user_error(capsys, tiny_fit(tmp_path / "a", "--model.init_args.task.init_args.num_classes", "2",
                                "--model.init_args.net.init_args.in_channels", "1"), "num_classes is 2", "3 classes")
    image = np.random.default_rng(0).uniform(0, 100, (20, 18, 6)).astype(np.float32)
    for name, data in (("img.nii.gz", image), ("seg.nii.gz", np.zeros((20, 18, 6), np.uint8))):
        nib.save(nib.Nifti1Image(data, np.diag([2.0, 2, 2, 1])), tmp_path / name)
    user_error(capsys, tiny_fit(tmp_path / "b", "--data.card", str(write_card(tmp_path)), "--data.patch_size",
                                "[16, 16]"), "no foreground")


# 3 ------------------------------------------------------------------------------------------------- broken


def test_segmentation_infers_a_dicom_folder_on_its_own_grid(tmp_path):
    volume = (np.asanyarray(nib.load(T1).dataobj)[:, :, 30:34].astype(np.int16))
    write_dicom_series(tmp_path / "series", volume, spacing=(1.5, 1.5, 3.0))  # resampled to 2 mm for the model
    # the series says CT (the test writer's tags); the grid is what this test is about
    assert main(["infer", "--task", "segmentation", "--ckpt", str(SEG2D), "--input", str(tmp_path / "series"),
                 "--output", str(tmp_path / "out"), "--steps", "1", "--allow", "modality"]) == 0
    written = nib.load(tmp_path / "out" / "series.nii.gz")
    assert written.shape == volume.shape


# 4 -------------------------------------------------------------------------------------------- folder runs


def test_case_names_do_not_collide_and_a_bad_case_does_not_stop_the_run(tmp_path, capsys):
    slab(tmp_path / "in" / "case1.nii.gz"), slab(tmp_path / "in" / "case1_seg.nii.gz", 40, 44)
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"not a scan")
    code = main(["infer", "--task", "segmentation", "--ckpt", str(SEG2D), "--input", str(tmp_path / "in"),
                 "--output", str(tmp_path / "out"), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "1 of 3 case(s) failed (broken)" in err
    assert {p.name for p in (tmp_path / "out" / "provenance").iterdir()} == {"case1.json", "case1_seg.json"}


def test_a_killed_runs_temporary_files_are_cleared(tmp_path):
    out = tmp_path / "out"
    (out / "provenance").mkdir(parents=True)
    stale = out / ".medidiff-partial-scan.nii.gz.abc12_xy.nii.gz"
    stale.write_bytes(b"")
    (out / ".keep_me").write_text("a user's own hidden file")
    assert main(["infer", "--task", "segmentation", "--ckpt", str(SEG2D), "--input", str(slab(tmp_path / "in" /
                 "scan.nii.gz")), "--output", str(out), "--steps", "1"]) == 0
    assert not stale.exists() and (out / ".keep_me").exists()


def test_an_interrupt_while_writing_leaves_no_case_half_written(tmp_path, monkeypatch):
    from medidiff import io

    def interrupted(path, content):
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "write_json", interrupted)
    assert main(["infer", "--task", "segmentation", "--ckpt", str(SEG2D), "--input", str(slab(tmp_path / "in" /
                 "scan.nii.gz")), "--output", str(tmp_path / "out"), "--steps", "1"]) == 130
    assert not list((tmp_path / "out").rglob("*.nii.gz"))


# 5 ------------------------------------------------------------------------------------------- tracebacks


def test_faults_are_one_line_errors(tmp_path, capsys):
    scan = slab(tmp_path / "in" / "scan.nii.gz")
    infer = ["infer", "--task", "segmentation", "--input", str(scan), "--output", str(tmp_path / "out")]
    user_error(capsys, [*infer, "--ckpt", str(SEG2D), "--seed", str(2**64)], "--seed")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    user_error(capsys, [*infer, "--ckpt", str(tmp_path / "empty.ckpt")], "empty.ckpt")
    content = torch.load(SEG2D, weights_only=True)
    bare = {"state_dict": content["state_dict"], "hyper_parameters": content["hyper_parameters"],
            "medidiff": {**content["medidiff"], "contract": None}}
    torch.save(bare, tmp_path / "bare.ckpt")
    user_error(capsys, [*infer, "--ckpt", str(tmp_path / "bare.ckpt")], "bare.ckpt", "contract")
    content["hyper_parameters"]["steps"] = -3
    content["medidiff"]["contract"]["sampling"]["steps"] = -3
    torch.save(content, tmp_path / "steps.ckpt")
    user_error(capsys, [*infer, "--ckpt", str(tmp_path / "steps.ckpt")], "steps.ckpt", "steps")
    (tmp_path / "dir.json").mkdir()
    user_error(capsys, ["evaluate", "--task", "segmentation", "--pred", str(scan), "--ref", str(scan), "--out",
                        str(tmp_path / "dir.json")], "dir.json", "folder")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    user_error(capsys, tiny_fit(blocker / "run"), "blocker")


def test_a_full_disk_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    scan = slab(tmp_path / "in" / "scan.nii.gz")
    monkeypatch.setattr(nib, "save", full)
    user_error(capsys, ["infer", "--task", "segmentation", "--ckpt", str(SEG2D), "--input", str(scan),
                        "--output", str(tmp_path / "out"), "--steps", "1"],
               "No space left on device")
    assert not list((tmp_path / "out").rglob("*.nii.gz"))


# 6 ------------------------------------------------------------------------------------ small but real


def test_outputs_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        assert main(["infer", "--task", "segmentation", "--ckpt", str(SEG2D), "--input", str(slab(tmp_path / "in" /
                     "scan.nii.gz")), "--output", str(tmp_path / "out"), "--steps", "1"]) == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "out" / "scan.nii.gz").stat().st_mode & 0o777 == 0o644


def test_a_dicom_folder_is_recognised_by_content_not_names(tmp_path):
    volume = (np.asanyarray(nib.load(T1).dataobj)[:, :, 30:34].astype(np.int16))
    for path in write_dicom_series(tmp_path / "series", volume, spacing=(2.0, 2.0, 2.0)):
        path.rename(path.with_suffix(""))  # IM0001-style names, no extension
    assert main(["infer", "--task", "segmentation", "--ckpt", str(SEG2D), "--input", str(tmp_path / "series"),
                 "--output", str(tmp_path / "out"), "--steps", "1", "--allow", "modality"]) == 0
    assert [p.name for p in (tmp_path / "out" / "provenance").iterdir()] == ["series.json"]


def test_a_misspelled_fit_key_gets_one_line_with_a_suggestion(tmp_path, capsys):
    line = user_error(capsys, tiny_fit(tmp_path, "--model.init_args.task.init_args.dice_wieght", "2"), "dice_wieght")
    assert "did you mean" in line and "dice_weight" in line


def test_a_png_mask_of_another_size_is_refused_for_restoration(tmp_path, capsys):
    Image.fromarray(np.full((10, 10), 255, np.uint8)).save(tmp_path / "mask.png")
    user_error(capsys, ["infer", "--task", "restoration", "--ckpt", str(RESTORE), "--input",
                        str(slab(tmp_path / "in" / "zf.nii.gz")), "--mask", str(tmp_path / "mask.png"),
                        "--output", str(tmp_path / "out")], "mask.png", "does not fit")
