"""MedicalDataModule on the shipped sample data: the batch contract per task, 2D/3D, determinism,
inversion back to the source grid, card-level bad input; and the seeded degradations."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from monai.data import MetaTensor, decollate_batch
from PIL import Image

from medidiff import io
from medidiff.data.custom import rgb_to_ycbcr, ycbcr_to_rgb
from medidiff.data.datamodule import MedicalDataModule
from medidiff.data.degrade import DEGRADATIONS, degrade, degrade_batch, degrade_with_extras
from medidiff.errors import MedidiffError

SMALL = {"batch_size": 2, "num_workers": 0, "cache": False}


def first(loader):
    return next(iter(loader))


def check_image(x, batch: int, channels: int, spatial: tuple, meta: bool = True):
    assert isinstance(x, MetaTensor) == meta and x.dtype == torch.float32
    assert tuple(x.shape) == (batch, channels, *spatial)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


# ------------------------------------------------------------------------------------- batch contract


def test_segmentation_3d_batch():
    dm = MedicalDataModule("sample_ct", "segmentation", patch_size=[32, 32, 16], **{**SMALL, "cache": True})
    assert dm.task.card_settings(dm.card) == {"num_classes": 6} and dm.spatial_dims == 3
    assert dm.task.channels(dm.card, {"num_classes": 6}) == (6, 1)  # one-hot of 6 classes, given the CT
    dm.setup("fit")
    b = first(dm.train_dataloader())
    check_image(b["image"], 1, 1, (32, 32, 16), meta=False)  # cached training patches are plain tensors
    assert b["label"].dtype == torch.int64 and b["label"].shape == (1, 1, 32, 32, 16)
    assert set(b["label"].unique().tolist()) <= set(range(6))
    test = first(dm.test_dataloader())
    assert test["image"].shape[2:] == test["label"].shape[2:] and test["id"] == ["ct_b"]
    np.testing.assert_allclose(test["image"].meta["pixdim"][0][1:4], (3, 3, 3))  # resampled to the card


def test_cached_training_patches_without_metadata_are_the_same_patches():
    batches = []
    for track_meta in (True, False):
        dm = MedicalDataModule("sample_ct", "segmentation", patch_size=[32, 32, 16], batch_size=2, cache=True,
                               samples_per_case=2)
        dm.setup("fit")
        dm.datasets["train"].track_meta = track_meta
        batches.append(first(dm.train_dataloader()))
    assert isinstance(batches[0]["image"], MetaTensor) and not isinstance(batches[1]["image"], MetaTensor)
    for key in ("image", "label"):
        assert torch.equal(batches[0][key].as_tensor(), batches[1][key])
    assert len(batches[0]["label"].unique()) > 1  # foreground-balanced crops: not an all-background patch


def test_segmentation_2d_slices_of_3d():
    dm = MedicalDataModule("sample_mni", "segmentation", spatial_dims=2, patch_size=[32, 32], **SMALL)
    dm.setup("fit")
    b = first(dm.train_dataloader())
    check_image(b["image"], 1, 1, (32, 32))
    assert set(b["label"].unique().tolist()) <= {0, 1, 2}
    val = dm.datasets["val"]
    assert len(val) == 8  # the card's val slab: slices 50..58
    assert [val[i]["slice_index"] for i in (0, 7)] == [0, 7]
    assert first(dm.val_dataloader())["image"].shape == (2, 1, 32, 32)


def test_restoration_2d_and_determinism():
    kw = dict(spatial_dims=2, patch_size=[32, 32], degradation={"rician": {"std": [0.02, 0.05]}}, **SMALL)
    dm1 = MedicalDataModule("sample_mni", "restoration", **kw)
    dm2 = MedicalDataModule("sample_mni", "restoration", **kw)
    b1, b2 = first(dm1.train_dataloader()), first(dm2.train_dataloader())
    check_image(b1["image"], 1, 1, (32, 32))
    assert b1["condition"].shape == b1["image"].shape and not torch.equal(b1["condition"], b1["image"])
    assert torch.equal(b1["image"], b2["image"]) and torch.equal(b1["condition"], b2["condition"])
    v1, v2 = first(dm1.val_dataloader()), first(dm2.val_dataloader())
    assert torch.equal(v1["condition"], v2["condition"])  # validation degradations never change


def test_superres_3d_through_plane():
    dm = MedicalDataModule("sample_ct", "superres", patch_size=[32, 32, 16],
                           degradation={"downsample": {"factor": [1, 1, 4]}}, **SMALL)
    b = first(dm.train_dataloader())
    check_image(b["image"], 1, 1, (32, 32, 16))
    assert b["condition"].shape == b["image"].shape
    # in-plane detail survives, through-plane detail is lost: condition is smooth along z
    dz = lambda x: (x[..., 1:] - x[..., :-1]).abs().mean()  # noqa: E731
    assert dz(b["condition"]) < dz(b["image"])


def test_kspace_restoration_has_mask():
    pytest.importorskip("medidiff.core.operators")
    dm = MedicalDataModule("sample_mni", "restoration", spatial_dims=2, patch_size=[32, 32],
                           degradation={"kspace": {"acceleration": 4}}, **SMALL)
    b = first(dm.val_dataloader())
    assert b["kspace_mask"].shape == (2, 1, 32, 32) and set(b["kspace_mask"].unique().tolist()) <= {0.0, 1.0}


def test_fusion_batches():
    dm = MedicalDataModule("sample_fusion", "fusion", patch_size=[48, 48], **SMALL)
    assert dm.task.channels(dm.card, {}) == (1, 0)  # the luma, unconditional
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 12  # 6 pairs, both modalities
    check_image(first(dm.train_dataloader())["image"], 2, 1, (48, 48))
    t = first(dm.test_dataloader())
    check_image(t["source_a"], 1, 1, (208, 176))
    check_image(t["source_b"], 1, 1, (208, 176))
    assert t["source_b_chroma"].shape == (1, 2, 208, 176)
    # luma + chroma recombine to the stored PET colours
    rgb = ycbcr_to_rgb(torch.cat([t["source_b"], t["source_b_chroma"]], 1).as_tensor(), channel_dim=1)
    png = np.asarray(Image.open(t["source_b"].meta["filename_or_obj"][0])) / 255.0
    np.testing.assert_allclose(rgb[0].permute(1, 2, 0).numpy(), png, atol=1e-4)


def test_colour_transform_roundtrip():
    x = torch.rand(3, 5, 7)
    np.testing.assert_allclose(ycbcr_to_rgb(rgb_to_ycbcr(x)).numpy(), x.numpy(), atol=1e-5)


# ------------------------------------------------------------------------------ inversion, bad input


def oblique_card(tmp_path: Path, label: np.ndarray | None = None, label_affine=None, channels=("CT",)) -> Path:
    """A one-case card over an oblique, anisotropic NIfTI (and optional label)."""
    a = np.deg2rad(20)
    affine = np.array([[0.9 * np.cos(a), -1.4 * np.sin(a), 0, -20], [0.9 * np.sin(a), 1.4 * np.cos(a), 0, 8],
                       [0, 0, 3.0, 30], [0, 0, 0, 1]])
    volume = np.random.default_rng(0).normal(0, 100, (20, 16, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, affine), str(tmp_path / "img.nii.gz"))
    case = {"id": "c", "image": "img.nii.gz"}
    if label is not None:
        nib.save(nib.Nifti1Image(label, affine if label_affine is None else label_affine), str(tmp_path / "seg.nii.gz"))
        case["label"] = "seg.nii.gz"
    card = {"name": "oblique", "description": "d", "source": "s", "licence": "l", "modality": "CT",
            "spatial_dims": 3, "tasks": ["segmentation", "restoration"], "root": "${card}",
            "inputs": {"image": {"channels": list(channels),
                                 "normalise": {"method": "window", "low": -300, "high": 300}}},
            "labels": {"background": 0, "organ": 1}, "spacing": [1.5, 1.5, 1.5],
            "splits": {s: {"cases": [case]} for s in ("train", "val", "test")}}
    (tmp_path / "card.yaml").write_text(yaml.safe_dump(card))
    return tmp_path / "card.yaml"


def test_prediction_inverts_to_source_grid_and_writes(tmp_path):
    card = oblique_card(tmp_path)
    dm = MedicalDataModule(str(card), "restoration", patch_size=[16, 16, 8], degradation={"noise": {"std": 0.01}})
    batch = first(dm.test_dataloader())
    item = decollate_batch(batch)[0]
    assert not np.allclose(item["image"].affine, nib.load(tmp_path / "img.nii.gz").affine)
    restored = dm.invert(item["image"] * 2.0, item["image"])
    out = io.write(restored, tmp_path / "pred.nii.gz", like=tmp_path / "img.nii.gz")
    src, back = nib.load(tmp_path / "img.nii.gz"), nib.load(out)
    assert back.shape == src.shape
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-5)


def test_label_value_not_in_card(tmp_path):
    label = np.zeros((20, 16, 8), np.uint8)
    label[2:5, 2:5, 2:5] = 7
    dm = MedicalDataModule(str(oblique_card(tmp_path, label)), "segmentation", patch_size=[8, 8, 8])
    with pytest.raises(MedidiffError, match=r"label value\(s\) \[7\] are not in the card") as err:
        first(dm.test_dataloader())
    assert "seg.nii.gz" in str(err.value)


def test_image_label_mismatch_through_card(tmp_path):
    dm = MedicalDataModule(str(oblique_card(tmp_path, np.zeros((20, 16, 7), np.uint8))), "segmentation",
                           patch_size=[8, 8, 8])
    with pytest.raises(MedidiffError, match="label shape .* differs") as err:
        first(dm.test_dataloader())
    assert "seg.nii.gz" in str(err.value)
    dm = MedicalDataModule(str(oblique_card(tmp_path, np.zeros((20, 16, 8), np.uint8), np.diag([1, 1, 1, 1.0]))),
                           "segmentation", patch_size=[8, 8, 8])
    with pytest.raises(MedidiffError, match="affine differs"):
        first(dm.test_dataloader())


def test_wrong_channel_count_through_card(tmp_path):
    dm = MedicalDataModule(str(oblique_card(tmp_path, channels=("T1", "T2"))), "restoration", patch_size=[8, 8, 8])
    with pytest.raises(MedidiffError, match="has 1 channel.* but 2 expected") as err:
        first(dm.test_dataloader())
    assert "img.nii.gz" in str(err.value)


def test_task_not_in_card():
    with pytest.raises(MedidiffError, match="does not support task 'fusion'"):
        MedicalDataModule("sample_ct", "fusion")


def test_lightningcli_friendly_signature():
    from jsonargparse import ArgumentParser

    sig = inspect.signature(MedicalDataModule.__init__)
    hints = typing.get_type_hints(MedicalDataModule.__init__)
    for name, param in list(sig.parameters.items())[1:]:
        assert name in hints, f"{name} is untyped"
        assert not isinstance(param.default, (list, dict, set)), f"{name} has a mutable default"
    parser = ArgumentParser()
    parser.add_class_arguments(MedicalDataModule, "data")
    cfg = parser.parse_args(["--data.card=sample_ct", "--data.task=superres", "--data.patch_size=[16,16,8]",
                             "--data.degradation={'downsample': {'factor': [1, 1, 2]}}"])
    dm = parser.instantiate_classes(cfg).data
    assert dm.patch_size == (16, 16, 8) and dm.degradation == {"downsample": {"factor": [1, 1, 2]}}


# ------------------------------------------------------------------------------------- degradations


@pytest.mark.parametrize("shape", [(1, 24, 20), (1, 16, 16, 12)], ids=["2d", "3d"])
@pytest.mark.parametrize("name", sorted(DEGRADATIONS))
def test_each_degradation_is_seeded_and_shape_preserving(name, shape):
    if name == "kspace":
        pytest.importorskip("medidiff.core.operators")
    x = torch.rand(shape)
    spec = {name: {"factor": 2} if name == "downsample" else {}}
    a, b, c = degrade(x, spec, 1), degrade(x, spec, 1), degrade(x, spec, 2)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    if name != "downsample":  # the only deterministic one
        assert not torch.equal(a, c)


def test_degradation_is_independent_of_global_rng_and_keeps_meta():
    x = MetaTensor(torch.rand(1, 20, 20), affine=torch.diag(torch.tensor([0.5, 0.5, 1.0, 1.0])))
    torch.manual_seed(123)
    a = degrade(x, {"noise": {"std": [0.1, 0.1]}, "blur": {"std": [1, 1]}}, 7)
    torch.manual_seed(999)
    b = degrade(x, {"noise": {"std": [0.1, 0.1]}, "blur": {"std": [1, 1]}}, 7)
    assert torch.equal(a, b) and isinstance(a, MetaTensor) and torch.allclose(a.affine, x.affine)
    assert degrade_batch(torch.stack([x, x]), {"rician": {"std": 0.1}}, [1, 2]).shape == (2, 1, 20, 20)


def test_downsample_keeps_smooth_content_and_returns_low_res():
    grid = torch.linspace(0, 2 * np.pi, 64)
    smooth = (torch.sin(grid)[:, None] * torch.cos(grid)[None, :] + 1)[None] / 2
    out, extras = degrade_with_extras(smooth, {"downsample": {"factor": 4}}, 0)
    assert extras["low_res"].shape == (1, 16, 16)
    assert float((out - smooth)[:, 8:-8, 8:-8].abs().mean()) < 0.02


def test_bad_degradation_spec():
    with pytest.raises(MedidiffError, match="unknown degradation 'nosie'; did you mean 'noise'"):
        degrade(torch.rand(1, 8, 8), {"nosie": {}}, 0)
    with pytest.raises(MedidiffError, match="factor must be >= 1"):
        degrade(torch.rand(1, 8, 8), {"downsample": {"factor": [2, 2, 2]}}, 0)


def test_apply_unwraps_user_errors(tmp_path):
    from monai.transforms import Compose

    from medidiff.data import transforms as T
    from medidiff.data.cards import load_card

    card = load_card(oblique_card(tmp_path, channels=("T1", "T2")))
    pipeline = Compose(T.preprocess(card, with_labels=False))
    with pytest.raises(MedidiffError, match="2 expected"):
        T.apply(pipeline, {"id": "c", "image": str(tmp_path / "img.nii.gz")})
