"""The segmentation task through the command line: every config trains a step, infer keeps the scan's
geometry (oblique affine included), evaluate scores files, checkpoints load safely."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medidiff.cli import main
from tests.conftest import REPO, SHARED

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
SAMPLE_T1 = REPO / "medidiff/sample_data/mni152/t1_2mm.nii.gz"


def _card_needs_shared(config: Path) -> bool:
    import yaml

    from medidiff.data.cards import _find_card

    card = yaml.safe_load(config.read_text(encoding="utf-8"))["data"]["card"]
    return "${shared}" in _find_card(card).read_text(encoding="utf-8")


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(REPO / "configs")) for c in CONFIGS])
def test_every_config_runs_a_fast_dev_run(config, tmp_path):
    if _card_needs_shared(config) and not SHARED.exists():
        pytest.skip("needs ../shared/data")
    common = ["--data.limit_cases", "1", "--data.cache", "false", "--trainer.enable_progress_bar", "false"]
    extra = []
    text = config.read_text(encoding="utf-8")
    if "teacher_ckpt:" in text:  # a distillation config: train its teacher for one step first
        assert main(["fit", "--config", str(config), "--model.init_args.teacher_ckpt", "null", "--trainer.max_steps",
                     "1", "--trainer.limit_val_batches", "0", "--trainer.max_time", "null",
                     "--trainer.default_root_dir", str(tmp_path / "teacher"), *common]) == 0
        extra = ["--model.init_args.teacher_ckpt", str(next((tmp_path / "teacher").rglob("last.ckpt")))]
    code = main(["fit", "--config", str(config), "--trainer.fast_dev_run", "1", "--trainer.default_root_dir",
                 str(tmp_path), *common, *extra])
    assert code == 0


def test_infer_writes_label_probability_and_uncertainty_with_the_input_geometry(tiny_seg_checkpoint, tmp_path):
    source = nib.load(SAMPLE_T1)
    oblique = source.affine.copy()
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    oblique[:3, :3] = rotation @ np.diag([2.0, 2.0, 3.5])  # oblique and anisotropic
    scan = tmp_path / "in" / "oblique.nii.gz"
    scan.parent.mkdir()
    nib.save(nib.Nifti1Image(np.asanyarray(source.dataobj)[:, :, 30:36], oblique), scan)
    out = tmp_path / "out"
    code = main(["infer", "--task", "segmentation", "--ckpt", str(tiny_seg_checkpoint), "--input", str(scan.parent),
                 "--output", str(out), "--steps", "2", "--ensemble", "3", "--fusion", "staple"])
    assert code == 0
    for kind in ("", "prob/", "entropy/", "variance/"):
        written = nib.load(out / f"{kind}oblique.nii.gz")
        assert written.shape[:3] == (73, 90, 6), kind
        assert np.allclose(written.affine, oblique, atol=1e-4), kind
    labels = np.asanyarray(nib.load(out / "oblique.nii.gz").dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2}
    info = json.loads((out / "provenance" / "oblique.json").read_text())
    settings = info["settings"]
    assert settings["seed"] == 0 and settings["ensemble"] == 3 and info["nfe"] == 2 and "torch" in info
    # a second run with the same settings skips the finished case and leaves it untouched; one with other
    # settings is refused rather than taking the old results for its own
    before = (out / "oblique.nii.gz").stat().st_mtime_ns
    same = ["infer", "--task", "segmentation", "--ckpt", str(tiny_seg_checkpoint), "--input", str(scan.parent),
            "--output", str(out), "--steps", "2", "--ensemble", "3", "--fusion", "staple"]
    assert main(same) == 0
    assert main(same[:-4]) == 2
    assert (out / "oblique.nii.gz").stat().st_mtime_ns == before


def test_same_seed_gives_identical_outputs(tiny_seg_checkpoint, tmp_path):
    runs = []
    for name in ("a", "b"):
        assert main(["infer", "--task", "segmentation", "--ckpt", str(tiny_seg_checkpoint), "--input",
                     str(SAMPLE_T1), "--output", str(tmp_path / name), "--steps", "2", "--seed", "3"]) == 0
        runs.append(np.asanyarray(nib.load(tmp_path / name / "prob" / "t1_2mm.nii.gz").dataobj))
    assert np.array_equal(runs[0], runs[1])


def test_evaluate_command_scores_hand_built_masks(tmp_path):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir(), ref.mkdir()
    a = np.zeros((10, 10, 4), np.int16)
    a[2:6, 2:6] = 1
    b = np.zeros_like(a)
    b[2:6, 4:8] = 1  # half the square overlaps: Dice 0.5
    nib.save(nib.Nifti1Image(a, np.diag([1.0, 1.0, 3.0, 1.0])), pred / "case1.nii.gz")  # pairs by exact name
    nib.save(nib.Nifti1Image(b, np.diag([1.0, 1.0, 3.0, 1.0])), ref / "case1.nii.gz")
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--task", "segmentation", "--pred", str(pred), "--ref", str(ref), "--out",
                 str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["cases"][0]["dice_mean"] == pytest.approx(0.5)


def test_checkpoint_of_another_task_and_a_malicious_pickle_are_refused(tiny_seg_checkpoint, tmp_path, capsys):
    assert main(["infer", "--task", "restoration", "--ckpt", str(tiny_seg_checkpoint), "--input", str(SAMPLE_T1),
                 "--output", str(tmp_path / "o")]) == 2

    class Payload:
        def __reduce__(self):
            return (Path(tmp_path / "pwned").touch, ())

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"task": "segmentation", "module": "UNetSegmenter"},
                "x": Payload()}, evil)
    assert main(["infer", "--task", "segmentation", "--ckpt", str(evil), "--input", str(SAMPLE_T1),
                 "--output", str(tmp_path / "o2")]) == 2
    assert not (tmp_path / "pwned").exists()
    assert "refused" in capsys.readouterr().err


def test_infer_flips_record_themselves_and_change_the_result(tiny_seg_checkpoint, tmp_path):
    base = ["infer", "--task", "segmentation", "--ckpt", str(tiny_seg_checkpoint), "--input", str(SAMPLE_T1),
            "--steps", "1"]
    assert main([*base, "--output", str(tmp_path / "plain")]) == 0
    assert main([*base, "--output", str(tmp_path / "flips"), "--flips", "2"]) == 0
    info = json.loads((tmp_path / "flips" / "provenance" / "t1_2mm.json").read_text())
    assert info["settings"]["flips"] == 2
    plain, flipped = (np.asanyarray(nib.load(tmp_path / run / "prob" / "t1_2mm.nii.gz").dataobj)
                      for run in ("plain", "flips"))
    assert plain.shape == flipped.shape and not np.allclose(plain, flipped)
