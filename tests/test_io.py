"""medidiff.io: metadata round trips (oblique, anisotropic), DICOM series, 2D images, atomic writes, bad input."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.transforms import Compose, Orientationd, Spacingd
from PIL import Image

from medidiff import io
from medidiff.data.transforms import invert
from medidiff.errors import MedidiffError


def oblique_affine(spacing=(0.8, 1.3, 3.0), origin=(-30.0, 12.0, 40.0)) -> np.ndarray:
    """Rotated 25 deg about z and 10 deg about x, flipped in x: an oblique LPS-ish scan."""
    a, b = np.deg2rad(25), np.deg2rad(10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([-1, 1, 1]) @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def smooth_volume(shape=(18, 14, 9)) -> np.ndarray:
    grids = np.meshgrid(*[np.linspace(0, np.pi, n) for n in shape], indexing="ij")
    return (100 * np.sin(grids[0]) * np.cos(grids[1] / 2) + 10 * grids[2]).astype(np.float32)


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def write_dicom_series(folder: Path, volume: np.ndarray, spacing=(0.5, 0.6, 2.0), origin=(10.0, -20.0, 5.0)) -> None:
    """A minimal CT series written slice by slice with SimpleITK (volume given as x, y, z)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(volume.shape[2]):
        s = sitk.GetImageFromArray(volume[:, :, z].T.astype(np.int16)[None])  # (1, y, x)
        s.SetSpacing(spacing)
        s.SetOrigin((origin[0], origin[1], origin[2] + z * spacing[2]))
        tags = {"0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
                "0020|000e": "1.2.826.0.1.3680043.2.1125.2",
                "0020|0013": str(z + 1), "0020|0032": "\\".join(str(v) for v in s.GetOrigin()),
                "0020|0037": "1\\0\\0\\0\\1\\0", "0008|0018": f"1.2.826.0.1.3680043.2.1125.3.{z}",
                "0028|0030": f"{spacing[1]}\\{spacing[0]}", "0018|0050": str(spacing[2])}
        for tag, value in tags.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(s)


# ------------------------------------------------------------------------------------------ round trips


def test_oblique_anisotropic_roundtrip_through_transforms(tmp_path):
    affine = oblique_affine()
    src = save_nifti(tmp_path / "scan.nii.gz", smooth_volume(), affine)
    image = io.read(src)
    assert image.shape == (1, 18, 14, 9)
    np.testing.assert_allclose(image.meta["spacing"], (0.8, 1.3, 3.0), rtol=1e-6)
    pipeline = Compose([Orientationd("image", axcodes="RAS", labels=None), Spacingd("image", pixdim=(1.5, 1.5, 1.5))])
    processed = pipeline({"image": image})["image"]
    assert not np.allclose(processed.affine, affine)
    restored = invert(processed, processed, pipeline)
    out = io.write(restored, tmp_path / "out" / "pred.nii.gz", like=src)
    back = io.read(out)
    assert back.shape == image.shape
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    for code in ("qform_code", "sform_code"):  # the source's header codes are kept
        assert nib.load(out).header[code] == nib.load(src).header[code]


def test_read_metadata(tmp_path):
    src = save_nifti(tmp_path / "a.nii", smooth_volume(), oblique_affine())
    image = io.read(src)
    assert image.dtype == torch.float32
    assert image.meta["filename_or_obj"] == str(src)
    assert len(image.meta["orientation"]) == 3 and image.meta["space"] == "RAS"
    np.testing.assert_allclose(image.meta["pixdim"][1:4], (0.8, 1.3, 3.0), rtol=1e-6)


def test_write_new_spacing_keeps_direction_and_field_of_view(tmp_path):
    affine = oblique_affine(spacing=(1.0, 1.0, 4.0))
    src = save_nifti(tmp_path / "lr.nii.gz", smooth_volume((10, 10, 5)), affine)
    hr = torch.zeros(1, 10, 10, 20)
    out = io.read(io.write(hr, tmp_path / "sr.nii.gz", like=src, spacing=(1.0, 1.0, 1.0)))
    np.testing.assert_allclose(out.meta["spacing"], (1, 1, 1), atol=1e-6)
    np.testing.assert_allclose(out.affine[:3, 2] / 1.0, affine[:3, 2] / 4.0, atol=1e-6)  # same direction
    for corner_lr, corner_hr in (([-0.5] * 3, [-0.5] * 3), ([9.5, 9.5, 4.5], [9.5, 9.5, 19.5])):
        np.testing.assert_allclose(affine @ [*corner_lr, 1], out.affine.numpy() @ [*corner_hr, 1], atol=1e-5)


def test_multichannel_write_and_read_back(tmp_path):
    src = save_nifti(tmp_path / "ref.nii.gz", smooth_volume(), oblique_affine())
    samples = torch.rand(3, 18, 14, 9)
    back = io.read(io.write(samples, tmp_path / "samples.nii.gz", like=src))
    assert back.shape == (3, 18, 14, 9)
    np.testing.assert_allclose(back.numpy(), samples.numpy(), atol=1e-6)
    labels = io.read(io.write(torch.ones(18, 14, 9, dtype=torch.int64), tmp_path / "l.nii.gz", like=src), kind="label")
    assert labels.dtype == torch.int64 and nib.load(tmp_path / "l.nii.gz").get_data_dtype() == np.uint8


def test_dicom_series_reads_and_writes_back_in_line(tmp_path):
    volume = np.arange(8 * 6 * 4).reshape(8, 6, 4) * 3 - 100
    write_dicom_series(tmp_path / "series", volume)
    image = io.read(tmp_path / "series")
    assert image.shape == (1, 8, 6, 4) and image.meta["modality"] == "CT"
    np.testing.assert_allclose(image.meta["spacing"], (0.5, 0.6, 2.0), rtol=1e-5)
    np.testing.assert_array_equal(image[0].numpy(), volume)
    # LPS origin (10, -20, 5) is RAS (-10, 20, 5); x and y axes point to -R and -A.
    np.testing.assert_allclose(image.affine.numpy(), np.array(
        [[-0.5, 0, 0, -10], [0, -0.6, 0, 20], [0, 0, 2, 5], [0, 0, 0, 1]]), atol=1e-5)
    out = io.write(image[0] > 0, tmp_path / "mask.nii.gz", like=tmp_path / "series")
    np.testing.assert_allclose(nib.load(out).affine, image.affine.numpy(), atol=1e-5)


def test_2d_images_grey_rgb_palette(tmp_path):
    grey = (np.arange(20 * 30).reshape(20, 30) % 256).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    Image.fromarray(np.stack([grey, grey // 2, grey // 3], -1)).save(tmp_path / "c.tif")
    Image.fromarray(grey).convert("P").save(tmp_path / "p.gif")
    g, c, p = io.read(tmp_path / "g.png"), io.read(tmp_path / "c.tif"), io.read(tmp_path / "p.gif", kind="label")
    assert g.shape == (1, 20, 30) and c.shape == (3, 20, 30) and p.shape == (1, 20, 30)
    assert g.meta["spacing"] == (1.0, 1.0)
    np.testing.assert_array_equal(g[0].numpy(), grey)
    io.write_png(g, tmp_path / "preview.png")
    assert io.read(tmp_path / "preview.png").shape == (1, 20, 30)


def test_a_label_map_in_a_colour_palette_reads_as_its_indices(tmp_path):
    """DRIVE's second observer: indices 0/1 drawn in two near-grey colours; as an image it stays colour."""
    indices = np.zeros((12, 10), np.uint8)
    indices[3:7, 2:5] = 1
    mask = Image.fromarray(indices, mode="P")
    mask.putpalette([4, 2, 4, 252, 254, 252] + [0] * 762)
    mask.save(tmp_path / "observer.gif")
    label = io.read(tmp_path / "observer.gif", kind="label")
    assert label.shape == (1, 12, 10)
    np.testing.assert_array_equal(label[0].numpy(), indices)
    assert io.read(tmp_path / "observer.gif").shape == (3, 12, 10)


# ---------------------------------------------------------------------------------------- safe writes


def test_write_refuses_to_overwrite_input(tmp_path):
    src = save_nifti(tmp_path / "scan.nii.gz", smooth_volume(), np.eye(4))
    image = io.read(src)
    with pytest.raises(MedidiffError, match="overwrite the input"):
        io.write(image, src)
    with pytest.raises(MedidiffError, match="overwrite the input"):
        io.write(image, tmp_path / "." / "scan.nii.gz", like=src)


def test_write_is_atomic_and_creates_folders(tmp_path):
    out = io.write(torch.rand(4, 5, 6), tmp_path / "a" / "b" / "x.nii.gz")
    assert out.exists() and sorted(p.name for p in out.parent.iterdir()) == ["x.nii.gz"]


def test_write_into_unwritable_place(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(MedidiffError, match="output folder") as err:
        io.write(torch.rand(4, 5, 6), tmp_path / "file" / "x.nii.gz")
    assert "file" in str(err.value)
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(MedidiffError, match="not writable"):
            io.write(torch.rand(4, 5, 6), locked / "x.nii.gz")


def test_write_shape_mismatch_with_reference(tmp_path):
    src = save_nifti(tmp_path / "scan.nii.gz", smooth_volume(), np.eye(4))
    with pytest.raises(MedidiffError, match="does not match the reference grid"):
        io.write(torch.rand(1, 5, 5, 5), tmp_path / "p.nii.gz", like=src)


# ------------------------------------------------------------------------------------------ bad input


def test_missing_file(tmp_path):
    with pytest.raises(MedidiffError, match="file not found") as err:
        io.read(tmp_path / "nope.nii.gz")
    assert "nope.nii.gz" in str(err.value)


@pytest.mark.parametrize("name", ["trunc.nii.gz", "trunc.nii", "trunc.png"])
def test_truncated_or_corrupt_file(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".png"):
        Image.fromarray(np.zeros((30, 30), np.uint8)).save(path)
    else:
        save_nifti(path, smooth_volume(), np.eye(4))
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(MedidiffError, match="corrupt or truncated") as err:
        io.read(path)
    assert name in str(err.value)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_bytes(gzip.compress(b"hello"))
    with pytest.raises(MedidiffError, match="cannot be read"):
        io.read(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels(tmp_path, bad):
    data = smooth_volume()
    data[3, 4, 5] = bad
    with pytest.raises(MedidiffError, match="NaN and .* infinite voxel") as err:
        io.read(save_nifti(tmp_path / "bad.nii.gz", data, np.eye(4)))
    assert "bad.nii.gz" in str(err.value)


def test_4d_where_3d_expected(tmp_path):
    path = save_nifti(tmp_path / "fmri.nii.gz", np.zeros((6, 6, 4, 5), np.float32), np.eye(4))
    with pytest.raises(MedidiffError, match="4D array .* where a 3D image is expected"):
        io.read(path, expected_ndim=3)
    assert io.read(path).shape == (5, 6, 6, 4)  # without the expectation: channels


def test_wrong_channel_count(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "grey.png")
    with pytest.raises(MedidiffError, match="1 channel.* but 3 expected"):
        io.read(tmp_path / "grey.png", channels=3)


def test_non_integer_label(tmp_path):
    path = save_nifti(tmp_path / "seg.nii.gz", np.full((4, 4, 4), 0.5, np.float32), np.eye(4))
    with pytest.raises(MedidiffError, match="non-integer"):
        io.read(path, kind="label")


def test_empty_dicom_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedidiffError, match="no DICOM series") as err:
        io.read(tmp_path / "empty")
    assert "empty" in str(err.value)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("not dicom")
    with pytest.raises(MedidiffError, match="no DICOM series"):
        io.read(tmp_path / "junk")


def test_check_pair_shape_and_affine(tmp_path):
    image = io.read(save_nifti(tmp_path / "img.nii.gz", smooth_volume(), np.eye(4)))
    small = io.read(save_nifti(tmp_path / "small.nii.gz", np.zeros((5, 5, 5), np.uint8), np.eye(4)), kind="label")
    shifted = io.read(save_nifti(tmp_path / "shifted.nii.gz", np.zeros((18, 14, 9), np.uint8),
                                 oblique_affine()), kind="label")
    with pytest.raises(MedidiffError, match="label shape .* differs") as err:
        io.check_pair(image, small)
    assert "small.nii.gz" in str(err.value) and "img.nii.gz" in str(err.value)
    with pytest.raises(MedidiffError, match="affine differs") as err:
        io.check_pair(image, shifted)
    assert "shifted.nii.gz" in str(err.value)
    io.check_pair(image, io.read(tmp_path / "img.nii.gz"))


def _turned(degrees: float, spacing=(3.0, 3.0, 3.0), origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    angle = np.radians(degrees)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine[:3, :3] *= spacing
    affine[:3, 3] = origin
    return affine


def test_one_grid_rule_for_training_pairs_and_evaluation(tmp_path):
    """``grid_problem`` is the rule of check_pair (image and label) and of evaluate (prediction and reference): the
    stricter of their two former rules wherever they differed, only the origin tolerance is the caller's."""
    data = np.zeros((6, 6, 4), np.uint8)
    image = io.read(save_nifti(tmp_path / "img.nii.gz", data, _turned(0.0)), kind="label")

    def other(affine: np.ndarray) -> torch.Tensor:
        return io.read(save_nifti(tmp_path / "other.nii.gz", data, affine), kind="label")

    assert io.grid_problem(other(_turned(0.0)), image) is None
    # 0.05 degrees on 3 mm voxels moves the axes by 0.0026 mm: evaluate's angle rule passed it, check_pair's did not
    assert io.grid_problem(other(_turned(0.05)), image).startswith("voxel axes [[")
    assert io.grid_problem(other(_turned(0.5)), image) == ("voxel axes (direction) are turned by 0.5 degrees "
                                                           "against those")
    # a voxel 0.0005 mm larger: check_pair's 1e-3 mm passed it, evaluate's relative spacing rule did not
    assert io.grid_problem(other(_turned(0.0, spacing=(3.0005, 3.0, 3.0))), image).startswith("spacing (3.000")
    with pytest.raises(MedidiffError, match=r"label affine differs .*same grid \(spacing \(3.000"):
        io.check_pair(image, other(_turned(0.0, spacing=(3.0005, 3.0, 3.0))))
    flipped = np.diag([-3.0, 3.0, 3.0, 1.0])
    assert io.grid_problem(other(flipped), image) == "orientation LAS differs from RAS"
    shifted = other(_turned(0.0, origin=(0.1, 0.0, 0.0)))
    assert io.grid_problem(shifted, image) == "origin [0.1, 0.0, 0.0] lies 0.10 mm from [0.0, 0.0, 0.0]"
    assert io.grid_problem(shifted, image, origin_atol=1.5) is None  # evaluate: up to half a voxel
    assert io.grid_problem(other(np.eye(4))[:, :5], image) == "shape (5, 6, 4) differs from (6, 6, 4)"
