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
    ckpt = planted(tmp_path, lambda c: c["hyper_parameters"].update(_class_path="this.Zen"), tiny_seg_checkpoint)
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
    (lambda c: c["hyper_parameters"].update(teacher_ckpt="/etc/passwd"), "teacher_ckpt"),
    (lambda c: c["hyper_parameters"].update(steps=1e8), "steps"),
    (lambda c: c["hyper_parameters"].update(ensemble=10**9), "ensemble"),
    (lambda c: c["hyper_parameters"].update(sampler=["dpmpp_2m"]), "sampler"),
    (lambda c: c["medidiff"].update(module=["SegmentationDiffusion"]), "module"),
], ids=["no normalise", "window without low", "orientation XYZ", "slice_axis 7", "labels not a mapping",
        "profile without a quantile", "contract steps 1e8", "teacher_ckpt /etc/passwd", "steps 1e8",
        "ensemble 1e9", "sampler a list", "module a list"])
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
