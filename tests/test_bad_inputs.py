"""Bad input through the command line, where a user meets it: ``fit``, ``infer`` and ``evaluate``.

Every case must exit non-zero with exactly one ``medidiff: error: ...`` line on stderr naming the file and the
problem, show no traceback (``--debug`` shows one), and leave nothing half-written in the output folder.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml

from medidiff.cli import main
from medidiff.errors import MedidiffError
from tests.conftest import REPO

CONFIG = REPO / "configs/segmentation/sample_mni_2d.yaml"
SAMPLE_T1 = REPO / "medidiff/sample_data/mni152/t1_2mm.nii.gz"
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


@pytest.fixture(autouse=True)
def log_handlers_on_live_stderr():
    """Lightning and MONAI bind StreamHandlers to the sys.stderr of the moment they are imported; under pytest
    that is an earlier test's capture, closed by now, and logging then prints its own "Logging error" traceback
    (a test artefact: a real terminal stays open). Point such handlers at this test's stderr."""
    import logging
    import sys

    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if type(handler) is logging.StreamHandler and getattr(handler.stream, "closed", False):
                handler.stream = sys.stderr  # setStream would flush the closed one first


def user_error(capsys, argv: list[str], *fragments: str) -> str:
    """Run the CLI; check the exit code, the single error line, the absence of a traceback; return the line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("medidiff: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def assert_nothing_written(folder: Path) -> None:
    """No file at all under ``folder`` (empty folders are harmless), in particular no temporary ones."""
    written = [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
    assert written == [], written


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def small_scan(shape=(20, 18, 6)) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 100, shape).astype(np.float32)


def small_labels(shape=(20, 18, 6)) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    labels[4:12, 4:12] = 1
    labels[12:16, 4:12] = 2
    return labels


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_dicom_series(folder: Path, volume: np.ndarray, spacing=(0.5, 0.6, 2.0)) -> list[Path]:
    """A small CT series, one file per slice, written with SimpleITK (volume given as x, y, z)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer, files = sitk.ImageFileWriter(), []
    writer.KeepOriginalImageUIDOn()
    for z in range(volume.shape[2]):
        image = sitk.GetImageFromArray(volume[:, :, z].T.astype(np.int16)[None])
        image.SetSpacing(spacing)
        image.SetOrigin((0.0, 0.0, z * spacing[2]))
        tags = {"0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
                "0020|000e": "1.2.826.0.1.3680043.2.1125.2", "0020|0013": str(z + 1),
                "0020|0032": f"0\\0\\{z * spacing[2]}", "0020|0037": "1\\0\\0\\0\\1\\0",
                "0008|0018": f"1.2.826.0.1.3680043.2.1125.3.{z}", "0028|0030": f"{spacing[1]}\\{spacing[0]}",
                "0018|0050": str(spacing[2])}
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        files.append(folder / f"slice{z:03d}.dcm")
        writer.SetFileName(str(files[-1]))
        writer.Execute(image)
    return files


# ------------------------------------------------------------------------------------------------- fit


def write_card(folder: Path, image: str = "img.nii.gz", label: str = "seg.nii.gz", channels=("T1",)) -> Path:
    """A one-case segmentation card over files in ``folder`` (the sample MNI labels: background, GM, WM)."""
    case = {"id": "a", "image": image, "label": label}
    card = {"name": "toy", "description": "one small case", "source": "made by the test", "licence": "CC0",
            "modality": "MRI", "spatial_dims": 3, "tasks": ["segmentation"], "root": "${card}",
            "inputs": {"image": {"channels": list(channels),
                                 "normalise": {"method": "percentile", "lower": 0.5, "upper": 99.5}}},
            "labels": {"background": 0, "grey_matter": 1, "white_matter": 2},
            "splits": {"train": {"cases": [case]}, "val": {"cases": [case]}}}
    path = folder / "toy.yaml"
    path.write_text(yaml.safe_dump(card))
    return path


def fit_argv(card: Path, run: Path) -> list[str]:
    return ["fit", "--config", str(CONFIG), "--data.card", str(card), "--data.patch_size", "[16, 16]",
            "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.max_time", "null",
            "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
            "--trainer.logger", "false", "--model.init_args.net.init_args.channels", "[8, 16]"]


def assert_no_checkpoint(run: Path) -> None:
    assert not list(run.rglob("*.ckpt")) and not [p for p in run.rglob(".*") if p.is_file()]


@pytest.mark.parametrize(
    ("name", "make", "fragments"),
    [
        ("missing file", lambda d: save(d / "seg.nii.gz", small_labels()),
         ["toy.yaml", "img.nii.gz does not exist"]),
        ("truncated NIfTI", lambda d: (truncated(save(d / "img.nii.gz", small_scan())),
                                       save(d / "seg.nii.gz", small_labels())),
         ["img.nii.gz", "corrupt or truncated"]),
        ("NaN voxel", lambda d: (save(d / "img.nii.gz", np.where(small_labels() == 2, np.nan, small_scan())),
                                 save(d / "seg.nii.gz", small_labels())),
         ["img.nii.gz", "NaN"]),
        ("4D image", lambda d: (save(d / "img.nii.gz", np.stack([small_scan()] * 3, -1)),
                                save(d / "seg.nii.gz", small_labels())),
         ["img.nii.gz", "4D array", "3D image is expected"]),
        ("affine mismatch", lambda d: (save(d / "img.nii.gz", small_scan()),
                                       save(d / "seg.nii.gz", small_labels(), np.diag([2.0, 2.0, 3.0, 1.0]))),
         ["seg.nii.gz", "affine differs", "img.nii.gz"]),
        ("shape mismatch", lambda d: (save(d / "img.nii.gz", small_scan()),
                                      save(d / "seg.nii.gz", small_labels((20, 18, 5)))),
         ["seg.nii.gz", "label shape (20, 18, 5) differs from image shape (20, 18, 6)"]),
        ("label not in card", lambda d: (save(d / "img.nii.gz", small_scan()),
                                         save(d / "seg.nii.gz", np.where(small_labels() == 2, 7, small_labels()))),
         ["seg.nii.gz", "label value(s) [7] are not in the card"]),
    ],
)
def test_fit_refuses_bad_training_data(tmp_path, capsys, name, make, fragments):
    make(tmp_path)
    run = tmp_path / "run"
    user_error(capsys, fit_argv(write_card(tmp_path), run), *fragments)
    assert_no_checkpoint(run)


def test_fit_refuses_wrong_channel_count(tmp_path, capsys):
    save(tmp_path / "img.nii.gz", small_scan()), save(tmp_path / "seg.nii.gz", small_labels())
    card = write_card(tmp_path, channels=("T1", "T2"))
    argv = fit_argv(card, tmp_path / "run") + ["--model.init_args.net.init_args.cond_channels", "2"]
    user_error(capsys, argv, "img.nii.gz", "1 channel(s) but 2 expected")
    assert_no_checkpoint(tmp_path / "run")


def test_fit_unknown_config_key_names_the_key(tmp_path, capsys):
    # LightningCLI's parser error, as one line with the nearest accepted key
    user_error(capsys, ["fit", "--config", str(CONFIG), "--model.init_args.lr_typo", "0.1",
                        "--trainer.default_root_dir", str(tmp_path)], "lr_typo")
    extra = tmp_path / "extra.yaml"
    extra.write_text("data:\n  crad: sample_mni\n")
    user_error(capsys, ["fit", "--config", str(CONFIG), "--config", str(extra), "--trainer.default_root_dir",
                        str(tmp_path)], "crad", "did you mean 'card'")
    assert_no_checkpoint(tmp_path)


def test_fit_resume_from_a_missing_or_code_carrying_checkpoint(tmp_path, capsys):
    argv = ["fit", "--config", str(CONFIG), "--trainer.default_root_dir", str(tmp_path / "run"), "--ckpt_path"]
    user_error(capsys, [*argv, str(tmp_path / "nope.ckpt")], "nope.ckpt", "checkpoint not found")

    class Payload:
        def __reduce__(self):
            return (Path(tmp_path / "pwned").touch, ())

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 0.1}, "x": Payload()}, evil)
    user_error(capsys, [*argv, str(evil)], "evil.ckpt", "refused to load")
    assert not (tmp_path / "pwned").exists()
    assert_no_checkpoint(tmp_path / "run")


def test_debug_shows_the_traceback(tmp_path, capsys):
    card = write_card(tmp_path)
    with pytest.raises(MedidiffError, match="img.nii.gz does not exist"):
        main([*fit_argv(card, tmp_path / "run"), "--debug"])


# ----------------------------------------------------------------------------------------------- infer


def infer_argv(checkpoint: Path, source: Path, output: Path, task: str = "segmentation") -> list[str]:
    return ["infer", "--task", task, "--ckpt", str(checkpoint), "--input", str(source), "--output", str(output),
            "--steps", "1"]


@pytest.fixture(scope="module")
def tiny_3d_checkpoint(tmp_path_factory) -> Path:
    """An untrained 3D segmentation model for the sample CT card, written by ``export``."""
    from medidiff.lit import DiffusionModule
    from medidiff.nets import ConditionalUNet
    from medidiff.tasks import Segmentation
    from tests.conftest import export_untrained

    net = ConditionalUNet(spatial_dims=3, in_channels=6, cond_channels=1, channels=(8, 16), norm_num_groups=4)
    module = DiffusionModule(net=net, task=Segmentation(num_classes=6))
    return export_untrained(module, {"card": "sample_ct", "task": "segmentation", "patch_size": [16, 16, 16]},
                            tmp_path_factory.mktemp("ckpt3d") / "seg3d.ckpt")


def test_infer_missing_input(tiny_seg_checkpoint, tmp_path, capsys):
    user_error(capsys, infer_argv(tiny_seg_checkpoint, tmp_path / "nope.nii.gz", tmp_path / "out"),
               "nope.nii.gz", "not found")
    assert_nothing_written(tmp_path / "out")


def test_infer_missing_checkpoint(tmp_path, capsys):
    user_error(capsys, infer_argv(tmp_path / "model.ckpt", SAMPLE_T1, tmp_path / "out"), "model.ckpt", "not found")


@pytest.mark.parametrize(
    ("name", "make", "fragments"),
    [
        ("truncated NIfTI", lambda d: truncated(save(d / "scan.nii.gz", small_scan())),
         ["scan.nii.gz", "corrupt or truncated"]),
        ("Inf voxel", lambda d: save(d / "scan.nii.gz", np.where(small_labels() == 1, np.inf, small_scan())),
         ["scan.nii.gz", "infinite voxel"]),
        ("4D volume", lambda d: save(d / "scan.nii.gz", np.zeros((20, 18, 6, 2), np.float32)),
         ["scan.nii.gz", "has 2 channel(s)", "--channel"]),
        ("not an image", lambda d: write_bytes(d / "scan.nii.gz", b"hello"), ["scan.nii.gz", "cannot be read"]),
    ],
)
def test_infer_refuses_a_bad_scan(tiny_seg_checkpoint, tmp_path, capsys, name, make, fragments):
    (tmp_path / "in").mkdir()
    source = make(tmp_path / "in")
    user_error(capsys, infer_argv(tiny_seg_checkpoint, source, tmp_path / "out"), *fragments)
    assert_nothing_written(tmp_path / "out")


def test_infer_refuses_a_dicom_series_with_a_corrupt_slice(tiny_seg_checkpoint, tmp_path, capsys):
    files = write_dicom_series(tmp_path / "series", small_scan((20, 18, 6)) * 10)
    files[3].write_bytes(files[3].read_bytes()[:300])  # a slice cut short by a failed copy
    user_error(capsys, infer_argv(tiny_seg_checkpoint, tmp_path / "series", tmp_path / "out"),
               "slice003.dcm", "not a readable DICOM file")
    assert_nothing_written(tmp_path / "out")
    files[3].unlink()  # the slice is gone altogether: the gap is found from the slice positions
    user_error(capsys, infer_argv(tiny_seg_checkpoint, tmp_path / "series", tmp_path / "out"),
               "series", "not evenly spaced", "slice002.dcm and slice004.dcm")
    assert_nothing_written(tmp_path / "out")


def test_infer_refuses_a_checkpoint_of_another_spatial_dimension(tiny_3d_checkpoint, tmp_path, capsys):
    from PIL import Image

    source = tmp_path / "photo.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(source)
    user_error(capsys, infer_argv(tiny_3d_checkpoint, source, tmp_path / "out"),
               "photo.png", "is a 2D image but the model takes 3D volumes")
    assert_nothing_written(tmp_path / "out")


def test_infer_refuses_a_checkpoint_of_another_task(tiny_3d_checkpoint, tmp_path, capsys):
    user_error(capsys, infer_argv(tiny_3d_checkpoint, SAMPLE_T1, tmp_path / "out", task="restoration"),
               "seg3d.ckpt", "segmentation checkpoint, not a restoration one")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (lambda c: c["medidiff"]["settings"].update(warp_speed=9), ["setting 'warp_speed'", "does not know"]),
        (lambda c: c["medidiff"]["net_config"].update(class_path="os.system"), ["refused network class 'os.system'"]),
        (lambda c: c["medidiff"]["net_config"]["init_args"].update(channels="many"),
         ["network setting channels='many'", "not a valid"]),
    ],
    ids=["unknown setting", "network outside the allow-list", "bad network settings"],
)
def test_infer_refuses_a_checkpoint_with_foreign_settings(tiny_3d_checkpoint, tmp_path, capsys, edit, fragments):
    from medidiff.checkpoint import read_checkpoint

    content = read_checkpoint(tiny_3d_checkpoint)
    edit(content)
    edited = tmp_path / "edited.ckpt"
    torch.save(content, edited)
    user_error(capsys, infer_argv(edited, SAMPLE_T1, tmp_path / "out"), "edited.ckpt", *fragments)
    assert_nothing_written(tmp_path / "out")


def test_infer_output_is_an_existing_file_or_below_one(tiny_seg_checkpoint, tmp_path, capsys):
    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    user_error(capsys, infer_argv(tiny_seg_checkpoint, SAMPLE_T1, existing), "results.txt",
               "must be a folder")
    user_error(capsys, infer_argv(tiny_seg_checkpoint, SAMPLE_T1, existing / "out"), "results.txt/out",
               "cannot create the output folder")
    assert existing.read_text() == "keep me"


def test_infer_output_equal_to_an_input(tiny_seg_checkpoint, tmp_path, capsys):
    folder = tmp_path / "scans"
    scan = save(folder / "scan.nii.gz", small_scan())
    before = scan.read_bytes()
    user_error(capsys, infer_argv(tiny_seg_checkpoint, scan, scan), "scan.nii.gz", "must not be an input")
    user_error(capsys, infer_argv(tiny_seg_checkpoint, folder, folder), "scans", "holds the input scan.nii.gz")
    user_error(capsys, infer_argv(tiny_seg_checkpoint, scan, folder), "scans", "holds the input scan.nii.gz")
    assert scan.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["scan.nii.gz"]


@pytest.mark.parametrize(("option", "value"), [("--sampler", "eulr"), ("--steps", "-3"), ("--device", "nonsense:0"),
                                               ("--flips", "5"), ("--flips", "0")])
def test_infer_bad_sampling_options(tiny_seg_checkpoint, tmp_path, capsys, option, value):
    user_error(capsys, [*infer_argv(tiny_seg_checkpoint, SAMPLE_T1, tmp_path / "out"), option, value], value)
    assert_nothing_written(tmp_path / "out")


def test_infer_refuses_flips_outside_segmentation(tiny_seg_checkpoint, tmp_path, capsys):
    argv = infer_argv(tiny_seg_checkpoint, SAMPLE_T1, tmp_path / "out", task="restoration")
    user_error(capsys, [*argv, "--flips", "2"], "--flips applies to segmentation, not restoration")
    assert_nothing_written(tmp_path / "out")


# -------------------------------------------------------------------------------------------- evaluate


@pytest.fixture
def seg_folders(tmp_path) -> tuple[Path, Path]:
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    save(pred / "case1.nii.gz", small_labels())
    save(ref / "case1.nii.gz", small_labels())
    return pred, ref


def evaluate_argv(pred: Path, ref: Path, out: Path, *extra: str) -> list[str]:
    return ["evaluate", "--task", "segmentation", "--pred", str(pred), "--ref", str(ref), "--out", str(out), *extra]


def test_evaluate_missing_folder(seg_folders, tmp_path, capsys):
    _, ref = seg_folders
    user_error(capsys, evaluate_argv(tmp_path / "nowhere", ref, tmp_path / "m.json"), "nowhere", "folder not found")
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize(
    ("name", "make", "fragments"),
    [
        ("shape mismatch", lambda p: save(p / "case1.nii.gz", small_labels((20, 18, 5))),
         ["case1.nii.gz", "shape (20, 18, 6) differs from (20, 18, 5)"]),
        ("truncated NIfTI", lambda p: truncated(p / "case1.nii.gz"), ["case1.nii.gz", "corrupt or truncated"]),
        ("two channels", lambda p: save(p / "case1.nii.gz", np.stack([small_labels()] * 2, -1)),
         ["case1.nii.gz", "2 channels where one is expected"]),
        ("NaN voxel", lambda p: save(p / "case1.nii.gz", np.full((20, 18, 6), np.nan, np.float32)),
         ["case1.nii.gz", "NaN"]),
        ("non-integer labels", lambda p: save(p / "case1.nii.gz", small_labels() * np.float32(0.5)),
         ["case1.nii.gz", "non-integer"]),
    ],
)
def test_evaluate_refuses_a_bad_prediction(seg_folders, tmp_path, capsys, name, make, fragments):
    pred, ref = seg_folders
    make(pred)
    user_error(capsys, evaluate_argv(pred, ref, tmp_path / "m.json"), *fragments)
    assert not (tmp_path / "m.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_evaluate_output_below_a_file(seg_folders, tmp_path, capsys):
    pred, ref = seg_folders
    (tmp_path / "report").write_text("keep me")
    user_error(capsys, evaluate_argv(pred, ref, tmp_path / "report" / "m.json"), "m.json",
               "cannot create the output folder")
    assert (tmp_path / "report").read_text() == "keep me"


def test_evaluate_empty_masks_are_scored_not_refused(seg_folders, tmp_path, capsys):
    """An empty mask is data, not an error: both empty gives NaN Dice, a missed structure Dice 0 (nnU-Net)."""
    pred, ref = seg_folders
    save(pred / "case1.nii.gz", np.zeros((20, 18, 6), np.uint8))
    assert main(evaluate_argv(pred, ref, tmp_path / "m.json", "--card", "sample_mni")) == 0
    import json

    row = json.loads((tmp_path / "m.json").read_text())["cases"][0]
    assert row["dice_grey_matter"] == 0 and row["hd95_grey_matter"] is None  # inf is written as null


def test_evaluate_output_equal_to_an_input(seg_folders, tmp_path, capsys):
    pred, ref = seg_folders
    before = (ref / "case1.nii.gz").read_bytes()
    try:
        user_error(capsys, evaluate_argv(pred, ref, ref / "case1.nii.gz"), "case1.nii.gz", "input")
    finally:
        assert (ref / "case1.nii.gz").read_bytes() == before


def test_evaluate_label_value_not_in_the_card(seg_folders, tmp_path, capsys):
    pred, ref = seg_folders
    save(pred / "case1.nii.gz", np.where(small_labels() == 2, 7, small_labels()))
    user_error(capsys, evaluate_argv(pred, ref, tmp_path / "m.json", "--card", "sample_mni"),
               "case1.nii.gz", "7", "not in the card")


def test_evaluate_empty_region_mask(seg_folders, tmp_path, capsys):
    pred, ref = seg_folders
    save(tmp_path / "region" / "case1.nii.gz", np.zeros((20, 18, 6), np.uint8))
    user_error(capsys, evaluate_argv(pred, ref, tmp_path / "m.json", "--region", str(tmp_path / "region")),
               "case1.nii.gz", "empty")
