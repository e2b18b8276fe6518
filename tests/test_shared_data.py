"""Real data in ../shared/data (and the MNI152 template in nilearn): every card loads, the DICOM series
reads with its geometry and its label map lines up. Skipped cleanly when ../shared/data is absent."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import decollate_batch
from monai.transforms import Orientation

from medidiff import io
from medidiff.data.cards import load_card, shared_data_root
from medidiff.data.datamodule import MedicalDataModule

SHARED = shared_data_root()
_skip = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data not found at {SHARED}")


def needs_shared(test):
    """Marked ``shared`` and skipped when ../shared/data is absent."""
    return pytest.mark.shared(_skip(test))

SMALL = {"batch_size": 1, "num_workers": 0, "limit_cases": 1}


def first(loader):
    return next(iter(loader))


@needs_shared
def test_dicom_series_geometry_and_label_alignment():
    ct = io.read(SHARED / "totalseg_ct" / "example_ct_dicom", expected_ndim=3)
    assert ct.shape == (1, 512, 512, 20)
    np.testing.assert_allclose(ct.meta["spacing"], (0.9765625, 0.9765625, 2.0))
    assert ct.meta["modality"] == "CT" and ct.meta["dicom_files"] == 20
    seg = io.read(SHARED / "totalseg_ct" / "example_seg_dicom.nii.gz", kind="label")
    ct_ras, seg_ras = Orientation("RAS", labels=None)(ct), Orientation("RAS", labels=None)(seg)
    io.check_pair(ct_ras, seg_ras)  # the label map is stored y-flipped; in world space it is the same grid
    liver, air = ct_ras[seg_ras == 5], ct_ras[seg_ras == 0]
    assert 30 < float(liver.mean()) < 200  # soft tissue HU under the liver label: the maps line up
    assert float(air.mean()) < -300


@needs_shared
def test_dicom_in_nifti_out_lines_up(tmp_path):
    series = SHARED / "totalseg_ct" / "example_ct_dicom"
    ct = io.read(series)
    out = io.write((ct > 0).to(torch.uint8), tmp_path / "mask.nii.gz", like=series)
    saved = nib.load(out)
    assert saved.shape == (512, 512, 20)
    np.testing.assert_allclose(saved.affine, ct.affine.numpy(), atol=1e-4)
    # and against the reference label map written by TotalSegmentator from the same series
    seg = nib.load(SHARED / "totalseg_ct" / "example_seg_dicom.nii.gz")
    corner_ours = saved.affine @ [0, 0, 0, 1]
    corner_ref = seg.affine @ [0, 511, 0, 1]  # its y axis is flipped
    np.testing.assert_allclose(corner_ours, corner_ref, atol=1e-3)


@needs_shared
def test_drive_2d_segmentation():
    dm = MedicalDataModule("drive", "segmentation", patch_size=[48, 48], **SMALL)
    assert dm.task.channels(dm.card, dm.task.card_settings(dm.card)) == (1, 1)  # binary mask, green channel
    assert [len(load_card("drive").splits[s].cases) for s in ("train", "val", "test")] == [16, 4, 20]
    b = first(dm.train_dataloader())
    assert b["image"].shape == (1, 1, 48, 48) and b["fov"].shape == (1, 1, 48, 48)
    t = first(dm.test_dataloader())
    assert t["image"].shape == (1, 1, 584, 565) and set(t["label"].unique().tolist()) == {0, 1}
    assert set(t["fov"].unique().tolist()) == {0.0, 1.0}


@needs_shared
@pytest.mark.parametrize("name", ["harvard_ct_mri", "harvard_pet_mri"])
def test_harvard_2d_fusion(name):
    dm = MedicalDataModule(name, "fusion", patch_size=[32, 32], **SMALL)
    assert first(dm.train_dataloader())["image"].shape == (1, 1, 32, 32)
    t = first(dm.test_dataloader())
    assert t["source_a"].shape == t["source_b"].shape == (1, 1, 256, 256)
    assert ("source_b_chroma" in t) == (name == "harvard_pet_mri")


@needs_shared
def test_totalseg_3d_segmentation_and_inversion(tmp_path):
    dm = MedicalDataModule("totalseg_ct", "segmentation", patch_size=[32, 32, 16], **SMALL)
    b = first(dm.train_dataloader())
    assert b["image"].shape == (1, 1, 32, 32, 16) and b["label"].dtype == torch.int64
    t = first(dm.test_dataloader())  # the DICOM series at 3 mm
    assert t["image"].shape[2:] == t["label"].shape[2:]
    assert set(t["label"].unique().tolist()) <= set(range(6)) and len(t["label"].unique()) > 2
    item = decollate_batch(t)[0]
    pred = dm.invert(item["label"].float(), item["image"], nearest=True)  # a "prediction" = its label
    series = load_card("totalseg_ct").splits["test"].cases[0]["image"]
    out = io.write(pred.round().to(torch.uint8), tmp_path / "pred.nii.gz", like=series)
    assert nib.load(out).shape == (512, 512, 20)  # back on the 0.977 x 0.977 x 2 mm grid


def test_mni152_from_nilearn_2d_slices():
    dm = MedicalDataModule("mni152", "segmentation", spatial_dims=2, patch_size=[64, 64], **SMALL)
    assert dm.task.card_settings(dm.card) == {"num_classes": 3}
    b = first(dm.train_dataloader())
    assert b["image"].shape == (1, 1, 64, 64) and set(b["label"].unique().tolist()) <= {0, 1, 2}
    dm.setup("validate")
    assert len(dm.datasets["val"]) == 15  # the card's val slab
