"""The main job in a reduced mode: every task runs on the shipped sample with its shipped model, every output
file exists, every NIfTI keeps its input's geometry (SR: same field of view, finer spacing) and every PNG opens."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medidiff.demo import TASKS, WEIGHTS, run_demo

SHIPPED = ["segmentation_mni_2d", "segmentation_ct_3d", "restoration_mni_2d", "superres_ct_3d", "fusion_mni_2d"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    missing = [name for name in SHIPPED if not (WEIGHTS / f"{name}.ckpt").is_file()]
    assert not missing, f"shipped weights missing: {missing} (tasks/train_demo_models.sh)"
    out = tmp_path_factory.mktemp("demo")
    report = run_demo(out, steps=2, ensemble=2, log=lambda message: None)
    return out, report


def test_report_lists_every_task_and_every_panel_opens(demo):
    out, report = demo
    text = report.read_text()
    assert text.count("](panels/") == len(TASKS)
    for png in (out / "panels").glob("*.png"):
        with Image.open(png) as image:
            assert image.size[0] > 100
    assert len(list((out / "panels").glob("*.png"))) == len(TASKS)


@pytest.mark.parametrize("task,inputs", [("segmentation_2d", "seg2d"), ("segmentation_3d", "seg3d"),
                                         ("restoration", "recon")])
def test_outputs_keep_the_input_affine(demo, task, inputs):
    out, _ = demo
    for source in (out / "inputs" / inputs).glob("*.nii.gz"):
        reference = nib.load(source)
        for written in [out / task / source.name, *(out / task).glob(f"*/{source.name}")]:
            image = nib.load(written)
            assert image.shape[:3] == reference.shape[:3]
            assert np.allclose(image.affine, reference.affine, atol=1e-4), written


def test_superres_output_has_the_finer_spacing_over_the_same_field_of_view(demo):
    out, _ = demo
    low = nib.load(out / "inputs" / "sr" / "ct_b.nii.gz")
    high = nib.load(out / "superres" / "ct_b.nii.gz")
    assert np.allclose(high.header.get_zooms()[:3], (2.0, 2.0, 2.0), atol=1e-4)
    assert np.allclose(np.array(low.shape) * low.header.get_zooms()[:3],
                       np.array(high.shape) * high.header.get_zooms()[:3], atol=1e-3)


def test_metrics_and_provenance_are_written(demo):
    out, _ = demo
    assert {p.stem for p in (out / "metrics").glob("*.json")} == set(TASKS)
    for task in TASKS:
        assert list((out / task / "provenance").glob("*.json")), task


def test_shipped_models_are_used_only_when_named(tmp_path, capsys):
    """A model picked by modality alone labelled an abdominal MR with brain tissue classes: without --ckpt, infer
    refuses and names the shipped models; by name, one runs; `medidiff models` says what each was trained on."""
    import json

    import nibabel as nib
    import numpy as np

    from medidiff.cli import main

    scan = tmp_path / "in" / "slice.nii.gz"
    scan.parent.mkdir()
    nib.save(nib.Nifti1Image(np.random.default_rng(0).uniform(0, 200, (40, 36)).astype(np.float32), np.eye(4)), scan)
    assert main(["infer", "--task", "segmentation", "--input", str(scan), "--output", str(tmp_path / "out0")]) == 2
    said = capsys.readouterr().err
    assert "--ckpt" in said and "segmentation_mni_2d" in said and "medidiff models" in said
    assert not (tmp_path / "out0").exists()
    assert main(["infer", "--task", "segmentation", "--ckpt", "segmentation_mni_2d", "--input", str(scan),
                 "--output", str(tmp_path / "out"), "--steps", "1"]) == 0
    record = json.loads((tmp_path / "out" / "provenance" / "slice.json").read_text())
    assert record["settings"]["checkpoint"].endswith("segmentation_mni_2d.ckpt")
    capsys.readouterr()
    assert main(["models"]) == 0
    listed = capsys.readouterr().out
    for name in SHIPPED:
        assert name in listed
    assert "trained on 'sample_ct'" in listed and "labels background=0, grey_matter=1" in listed
