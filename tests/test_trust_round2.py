"""Trust, round 2: planted and damaged checkpoints, silent wrong answers, data loss and unclear messages found by
a hostile but realistic user, one test per finding. Every refusal is one ``medidiff: error:`` line, exit 2, no
traceback, nothing written; no code from a checkpoint runs and nothing reaches the network.
"""

from __future__ import annotations

import shutil
import struct
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from medidiff.cli import main
from tests.conftest import REPO
from tests.test_bad_inputs import (  # noqa: F401 (fixture)
    assert_nothing_written,
    log_handlers_on_live_stderr,
    user_error,
)

SAMPLES = REPO / "medidiff/sample_data"
T1 = SAMPLES / "mni152/t1_2mm.nii.gz"
SEG2D = REPO / "medidiff/weights/segmentation_mni_2d.ckpt"
RESTORE = REPO / "medidiff/weights/restoration_mni_2d.ckpt"
CONFIG = REPO / "configs/segmentation/sample_mni_2d.yaml"


def slab(path: Path, start: int = 30, stop: int = 32) -> Path:
    source = nib.load(T1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asanyarray(source.dataobj)[:, :, start:stop], source.affine), path)
    return path


def infer_argv(ckpt: Path | str, source: Path, out: Path, *extra: str, task: str = "segmentation") -> list[str]:
    return ["infer", "--task", task, "--ckpt", str(ckpt), "--input", str(source), "--output", str(out),
            "--steps", "1", *extra]


def planted(tmp_path: Path, edit, source: Path = SEG2D, name: str = "planted.ckpt") -> Path:
    """A copy of a shipped checkpoint with ``edit`` applied to its contents (written as torch.save would)."""
    content = torch.load(source, weights_only=True)
    edit(content)
    path = tmp_path / name
    torch.save(content, path)
    return path


# 1 ------------------------------------------------------------------------ no code, no network, no files


@pytest.mark.parametrize("net_config", [
    {"class_path": "monai.networks.nets.HoVerNet", "init_args": {"pretrained_url": "http://127.0.0.1:9/w.pth"}},
    {"class_path": "monai.networks.nets.DenseNet121", "init_args": {"spatial_dims": 2, "in_channels": 1,
                                                                    "out_channels": 2, "pretrained": True}},
    {"class_path": "medidiff.nets.ConditionalUNet", "init_args": {"spatial_dims": 2, "pretrained_url": "http://x"}},
    {"class_path": "medidiff.nets.ConditionalUNet", "init_args": {"spatial_dims": 2, "channels": [1 << 20]}},
], ids=["HoVerNet pretrained_url", "DenseNet pretrained", "unknown network argument", "huge network"])
def test_a_checkpoint_names_no_network_outside_the_closed_list(tmp_path, capsys, monkeypatch, net_config):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    ckpt = planted(tmp_path, lambda c: c["medidiff"].update(net_config=net_config))
    line = user_error(capsys, infer_argv(ckpt, slab(tmp_path / "in/a.nii.gz"), tmp_path / "out"), "planted.ckpt")
    assert "refused network class" in line or "network setting" in line
    assert not (tmp_path / "torch_home").exists()
    assert_nothing_written(tmp_path / "out")


def resume_argv(root: Path, ckpt: Path | str, steps: int = 4) -> list[str]:
    return ["fit", "--config", str(CONFIG), "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
            "--trainer.max_time", "null", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(root), "--model.init_args.net.init_args.channels", "[8, 16]",
            "--ckpt_path", str(ckpt)]


def test_resuming_never_imports_what_the_checkpoint_names(tiny_seg_checkpoint, tmp_path, capsys):
    sys.modules.pop("this", None)
    ckpt = planted(tmp_path, lambda c: (c["hyper_parameters"].update(_class_path="this.Zen"),
                                        c["medidiff"]["settings"].update(_class_path="this.Zen")), tiny_seg_checkpoint)
    assert main(resume_argv(tmp_path / "run", ckpt)) == 0
    assert "this" not in sys.modules
    assert "Beautiful is better than ugly" not in capsys.readouterr().out


def test_resuming_from_an_inference_checkpoint_is_one_line(tmp_path, capsys):
    user_error(capsys, resume_argv(tmp_path / "run", SEG2D), "segmentation_mni_2d.ckpt", "no training state")


def test_resuming_with_another_network_is_one_line(tiny_seg_checkpoint, tmp_path, capsys):
    argv = resume_argv(tmp_path / "run", tiny_seg_checkpoint)
    argv[argv.index("[8, 16]")] = "[16, 32]"
    user_error(capsys, argv, "the configuration builds")


# 2 ------------------------------------------------------------------------------ damaged checkpoints


def flip_weight_signs(source: Path, target: Path) -> Path:
    """Flip the sign bit of every float16 weight in place, leaving the zip records' CRCs as they were."""
    shutil.copy(source, target)
    data = bytearray(target.read_bytes())
    with zipfile.ZipFile(target) as archive:
        records = [info for info in archive.infolist() if "/data/" in info.filename]
    for info in records:
        name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
        start = info.header_offset + 30 + name_length + extra_length
        for index in range(start + 1, start + info.file_size, 2):
            data[index] ^= 0x80
    target.write_bytes(bytes(data))
    return target


def test_a_checkpoint_with_altered_weights_is_refused(tmp_path, capsys):
    damaged = flip_weight_signs(SEG2D, tmp_path / "damaged.ckpt")
    assert torch.load(damaged, weights_only=True)  # torch itself reads it without complaint
    user_error(capsys, infer_argv(damaged, slab(tmp_path / "in/a.nii.gz"), tmp_path / "out"), "damaged.ckpt",
               "fails its checksum")
    assert_nothing_written(tmp_path / "out")


def _contract(edit):
    return lambda content: edit(content["medidiff"]["contract"])


@pytest.mark.parametrize(("edit", "fragment"), [
    (_contract(lambda c: c["inputs"]["image"].pop("normalise")), "inputs.image.normalise"),
    (_contract(lambda c: c["inputs"]["image"].update(normalise={"method": "window", "high": 10})),
     "inputs.image.normalise"),
    (_contract(lambda c: c.update(orientation="XYZ")), "orientation"),
    (_contract(lambda c: c.update(slice_axis=7)), "slice_axis"),
    (_contract(lambda c: c.update(labels=["grey_matter"])), "labels"),
    (_contract(lambda c: c["inputs"]["image"]["profile"]["quantiles"].pop("99")), "profile.quantiles"),
    (_contract(lambda c: c["sampling"].update(steps=10**8)), "steps"),
    (lambda c: c["medidiff"]["settings"].update(teacher_ckpt="/etc/passwd"), "teacher_ckpt"),
    (lambda c: c["medidiff"]["settings"].update(predictor_ckpt="/etc/passwd"), "predictor_ckpt"),
    (lambda c: c["medidiff"]["settings"].update(steps=1e8), "steps"),
    (lambda c: c["medidiff"]["settings"]["diffusion"].update(num_timesteps=10**9), "num_timesteps"),
    (lambda c: c["medidiff"]["settings"].update(sampler=["dpmpp_2m"]), "sampler"),
    (lambda c: c["medidiff"]["task"]["settings"].update(num_classes=10**6), "num_classes"),
    (lambda c: c["medidiff"]["task"].update(name="os.system"), "task"),
    (lambda c: c["medidiff"].update(system=["DiffusionModule"]), "system"),
], ids=["no normalise", "window without low", "orientation XYZ", "slice_axis 7", "labels not a mapping",
        "profile without a quantile", "contract steps 1e8", "teacher_ckpt /etc/passwd", "predictor_ckpt",
        "steps 1e8", "num_timesteps 1e9", "sampler a list", "classes 1e6", "task os.system", "system a list"])
def test_a_checkpoint_with_a_malformed_field_is_one_line_naming_it(tmp_path, capsys, edit, fragment):
    ckpt = planted(tmp_path, edit)
    user_error(capsys, infer_argv(ckpt, slab(tmp_path / "in/a.nii.gz"), tmp_path / "out")[:-2] +
               (["--steps", "1"] if fragment != "steps" else []), "planted.ckpt", fragment)
    assert_nothing_written(tmp_path / "out")


def test_a_text_file_as_checkpoint(tmp_path, capsys):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n" * 10)
    user_error(capsys, infer_argv(text, slab(tmp_path / "in/a.nii.gz"), tmp_path / "out"), "notes.ckpt",
               "not a checkpoint")


@pytest.mark.parametrize("option", [["--steps", "100000000"], ["--ensemble", "1000000"]], ids=["steps", "ensemble"])
def test_step_and_ensemble_counts_are_bounded(tmp_path, capsys, option):
    user_error(capsys, infer_argv(SEG2D, slab(tmp_path / "in/a.nii.gz"), tmp_path / "out")[:-2] + option,
               option[0], "at most")
    assert_nothing_written(tmp_path / "out")


# 3 -------------------------------------------------------------------------------- silent wrong answers


def test_a_kspace_model_without_its_mask_is_refused_even_when_degradation_is_allowed(tmp_path, capsys):
    scan = slab(tmp_path / "in/a.nii.gz")
    for extra in ([], ["--allow", "degradation"]):
        user_error(capsys, infer_argv("restoration_mni_2d", scan, tmp_path / "out", *extra, task="restoration"),
                   "restoration_mni_2d.ckpt", "--mask", "no override")
    assert_nothing_written(tmp_path / "out")


def test_restoration_provenance_says_what_was_applied(tmp_path):
    import json

    scan = slab(tmp_path / "in/a.nii.gz")
    mask = np.zeros(nib.load(scan).shape[:2], np.uint8)
    mask[:, ::2] = 1
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "mask.nii.gz")
    argv = infer_argv("restoration_mni_2d", scan, tmp_path / "out", "--mask", str(tmp_path / "mask.nii.gz"),
                      task="restoration")
    assert main(argv) == 0
    settings = json.loads((tmp_path / "out/provenance/a.json").read_text())["settings"]
    assert settings["consistency"] is True and settings["mask"].endswith("mask.nii.gz")
    argv[argv.index(str(tmp_path / "out"))] = str(tmp_path / "out2")
    assert main(argv + ["--no-consistency"]) == 0
    assert json.loads((tmp_path / "out2/provenance/a.json").read_text())["settings"]["consistency"] is False


def ct_with_bone(path: Path, peak: float = 2149.0) -> Path:
    """The shipped CT crop at 8 mm through-plane, with a few voxels of dense bone above the model's window."""
    source = nib.load(SAMPLES / "totalseg_ct/ct_b.nii.gz")
    volume = np.asanyarray(source.dataobj).astype(np.float32)[:48, :48, ::4][:, :, :4]
    volume = np.clip(volume, -1000, 1000)
    volume[20:22, 20:22, 1] = peak
    affine = source.affine.copy()
    affine[:3, 2] *= 4
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, affine), path)
    return path


def test_superres_refuses_to_clip_what_its_output_cannot_hold(tmp_path, capsys):
    import json

    scan = ct_with_bone(tmp_path / "in/ct.nii.gz")
    user_error(capsys, infer_argv("superres_ct_3d", scan, tmp_path / "out", task="superres"), "ct.nii.gz",
               "0 voxel(s) lie below and 4 above the model's window -1000..1000", "--allow clipping")
    assert_nothing_written(tmp_path / "out")
    assert main(infer_argv("superres_ct_3d", scan, tmp_path / "out", "--allow", "clipping", task="superres")) == 0
    said = capsys.readouterr().out
    intensity = json.loads((tmp_path / "out/provenance/ct.json").read_text())["checks"]["image"]["intensity"]
    assert intensity["clipped_voxels"] == 4 and "4 input voxel(s) lay beyond" in said


def test_input_dot_on_a_dicom_folder_names_the_case_after_the_folder(tmp_path, monkeypatch):
    from tests.test_bad_inputs import write_dicom_series

    volume = np.asanyarray(nib.load(SAMPLES / "totalseg_ct/ct_b.nii.gz").dataobj)[:40, :40, :16]
    write_dicom_series(tmp_path / "series", np.clip(volume, -1000, 1000), spacing=(3.0, 3.0, 3.0))
    monkeypatch.chdir(tmp_path / "series")
    assert main(["infer", "--task", "segmentation", "--ckpt", "segmentation_ct_3d", "--input", ".", "--output",
                 str(tmp_path / "out"), "--steps", "1"]) == 0
    assert (tmp_path / "out/series.nii.gz").is_file() and (tmp_path / "out/provenance/series.json").is_file()
    assert not [p for p in (tmp_path / "out").rglob(".*") if p.is_file()]


def test_a_replaced_input_is_done_again_not_skipped(tmp_path, capsys):
    import json

    folder = tmp_path / "in"
    slab(folder / "a.nii.gz", 30, 32)
    argv = infer_argv("segmentation_mni_2d", folder, tmp_path / "out")
    assert main(argv) == 0
    first = json.loads((tmp_path / "out/provenance/a.json").read_text())["input_sha256"]
    capsys.readouterr()
    assert main(argv) == 0 and "skipped" in capsys.readouterr().out  # same content: resumed
    slab(folder / "a.nii.gz", 40, 42)  # another scan under the same name
    assert main(argv) == 0
    assert "skipped" not in capsys.readouterr().out
    second = json.loads((tmp_path / "out/provenance/a.json").read_text())["input_sha256"]
    assert second != first
    assert not (tmp_path / "out/.medidiff-lock").exists()


def test_a_second_run_into_a_held_folder_is_refused(tmp_path, capsys):
    import fcntl

    (tmp_path / "out").mkdir()
    with open(tmp_path / "out/.medidiff-lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        user_error(capsys, infer_argv("segmentation_mni_2d", slab(tmp_path / "in/a.nii.gz"), tmp_path / "out"),
                   "another medidiff run is writing into this folder")
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".medidiff-lock"]


def test_ckpt_path_last_resumes_the_run_just_made(tmp_path, caplog):
    import logging

    root = tmp_path / "run"
    first = resume_argv(root, "last", steps=2)
    assert main(first) == 0  # nothing to resume yet: trains from the start
    made = next(root.rglob("last.ckpt"))
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        assert main(resume_argv(root, "last", steps=4)) == 0
    assert f"Restoring states from the checkpoint path at {made}" in caplog.text
    newest = max(root.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    assert torch.load(newest, weights_only=True)["global_step"] == 4


# 5 ------------------------------------------------------------------------------------ tracebacks


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_device_as_input_is_one_line(tmp_path, capsys, kind):
    import os

    source = Path("/dev/null")
    if kind == "fifo":
        source = tmp_path / "pipe.nii.gz"
        os.mkfifo(source)
    user_error(capsys, infer_argv("segmentation_mni_2d", source, tmp_path / "out"), str(source), "not a regular")
    assert_nothing_written(tmp_path / "out")


class PressCtrlC(Callback):
    """Presses Ctrl-C after the first training step."""

    def on_train_batch_end(self, *args, **kwargs):
        raise KeyboardInterrupt


def test_ctrl_c_in_fit_is_exit_130_with_one_line(tmp_path, capsys):
    import signal

    before = signal.getsignal(signal.SIGINT)
    argv = resume_argv(tmp_path / "run", "x")[:-2] + ["--trainer.callbacks+=tests.test_trust_round2.PressCtrlC"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "medidiff: interrupted" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) == before


def failing_save(monkeypatch):
    """torch.save that writes a few bytes, then fails as PyTorch's zip writer does on a full disk."""
    def save(content, path, *args, **kwargs):
        Path(path).write_bytes(b"PK\x03\x04partial")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")

    monkeypatch.setattr(torch, "save", save)


def test_a_full_disk_during_fit_leaves_no_truncated_checkpoint(tmp_path, capsys, monkeypatch):
    failing_save(monkeypatch)
    user_error(capsys, resume_argv(tmp_path / "run", "x")[:-2], "last.ckpt", "disk full")
    assert not [p for p in (tmp_path / "run").rglob("*.ckpt*")] and not list((tmp_path / "run").rglob(".medidiff*"))


def test_a_full_disk_during_export_is_one_line(tmp_path, capsys, monkeypatch):
    failing_save(monkeypatch)
    user_error(capsys, ["export", "--ckpt", str(SEG2D), "--out", str(tmp_path / "small.ckpt")], "small.ckpt",
               "disk full")
    assert list(tmp_path.iterdir()) == []


def test_a_single_slice_volume_given_to_a_2d_model(tmp_path):
    scan = slab(tmp_path / "in/one.nii.gz", 40, 41)
    assert main(infer_argv("segmentation_mni_2d", scan, tmp_path / "out")) == 0
    written = nib.load(tmp_path / "out/one.nii.gz")
    assert written.shape == nib.load(scan).shape and np.allclose(written.affine, nib.load(scan).affine)


def test_a_null_on_the_command_line_is_one_line_naming_the_key(tmp_path, capsys):
    argv = resume_argv(tmp_path / "run", "x")[:-2] + ["--model.init_args.net.init_args.cond_channels", "null"]
    user_error(capsys, argv, "model.init_args.net.init_args.cond_channels", "configuration file")


# 6 -------------------------------------------------------------------------------- what a user sees


@pytest.fixture(scope="module")
def tiny_unet_checkpoint(tmp_path_factory) -> Path:
    import yaml

    root = tmp_path_factory.mktemp("unet")
    config = yaml.safe_load(CONFIG.read_text())
    config["model"] = {"class_path": "medidiff.lit.SupervisedModule", "init_args": {
        "task": {"class_path": "medidiff.tasks.Segmentation", "init_args": {"num_classes": 3}}, "roi_size": [64, 64],
        "net": {"class_path": "medidiff.nets.PlainUNet", "init_args": {
            "spatial_dims": 2, "in_channels": 1, "out_channels": 3, "channels": [8, 16], "strides": [2],
            "num_res_units": 1}}}}
    config["trainer"]["callbacks"] = config["trainer"]["callbacks"][:1]  # no ChooseSteps: nothing is sampled
    config["trainer"] |= {"max_steps": 2, "max_time": None, "default_root_dir": str(root), "logger": False,
                          "enable_progress_bar": False}
    (root / "unet.yaml").write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(root / "unet.yaml")]) == 0
    return next(root.rglob("last.ckpt"))


def test_a_unet_claims_no_sampler_and_its_progress_completes(tiny_unet_checkpoint, tmp_path):
    import json

    from medidiff.inference import from_checkpoint, infer

    reports: list[tuple[int, int]] = []
    adapter = from_checkpoint("segmentation", tiny_unet_checkpoint)
    infer(adapter, {"image": slab(tmp_path / "in/a.nii.gz")}, tmp_path / "out", report=lambda text: None,
          progress_factory=lambda case: lambda done, total: reports.append((done, total)))
    assert reports == [(1, 1)]
    record = json.loads((tmp_path / "out/provenance/a.json").read_text())
    assert "nfe" not in record and not {"sampler", "steps", "grid"} & set(record["settings"])


def test_training_progress_counts_steps_not_epochs():
    from types import SimpleNamespace

    from medidiff.callbacks import StepProgressBar

    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=500, global_step=42)
    assert bar._get_train_description(293) == "Step 42/500 (epoch 293)"


def test_fit_prints_no_lightning_tips(tmp_path, capsys):
    assert main(resume_argv(tmp_path / "run", "x")[:-2]) == 0
    said = capsys.readouterr()
    text = said.out + said.err
    for noise in ("GPU available", "TPU available", "Tip:", "tensorboardX", "LeafSpec", "logging interval",
                  "on_after_batch_transfer", "/-2"):
        assert noise not in text, noise


def test_a_data_seed_other_than_the_models_trains_with_the_default_logger(tmp_path):
    """The model's sampling seed and the data module's augmentation seed are different settings; Lightning refused to
    log the two under one name (a RuntimeError traceback) whenever they differed."""
    argv = resume_argv(tmp_path / "run", "x", steps=1)[:-2] + ["--data.seed", "1"]
    assert main(argv) == 0
    assert list((tmp_path / "run").rglob("hparams.yaml"))
