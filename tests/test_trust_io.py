"""Trust, round 2: hand-made inputs that ``medidiff.io`` once read silently wrong, blocked on, crashed on or
mislabelled, and the writer's header and temporaries. Each is refused with one ``MedidiffError`` naming the file
(and, through the command line, one ``medidiff: error:`` line, exit 2, no traceback) or kept as it should be.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import struct
import threading
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medidiff import io
from medidiff.errors import MedidiffError
from tests.conftest import REPO
from tests.test_bad_inputs import log_handlers_on_live_stderr, user_error, write_dicom_series  # noqa: F401 (fixture)

SEG2D = REPO / "medidiff/weights/segmentation_mni_2d.ckpt"
RESTORE = REPO / "medidiff/weights/restoration_mni_2d.ckpt"
BUDGET = "MEDIDIFF_MAX_IMAGE_BYTES"


def infer(task: str, ckpt: Path, source: Path, output: Path, *extra: str) -> list[str]:
    return ["infer", "--task", task, "--ckpt", str(ckpt), "--input", str(source), "--output", str(output),
            "--steps", "1", *extra]


def small_scan(path: Path, shape=(20, 18, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(0).uniform(0, 100, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


# ----------------------------------------------------------------------------------- 1. multi-frame images


def frames(path: Path, count: int, size=(12, 10)) -> Path:
    """``count`` different frames (identical GIF frames would be merged into one)."""
    pages = [Image.fromarray(np.full(size[::-1], 40 * i, np.uint8)) for i in range(count)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pages[0].save(path, save_all=True, append_images=pages[1:])
    return path


@pytest.mark.parametrize(("name", "what"), [("pages.tif", "multi-page TIFF"), ("moving.gif", "animated GIF")])
def test_a_multi_frame_image_is_refused_not_read_as_its_first_frame(tmp_path, name, what):
    path = frames(tmp_path / name, 4)
    with Image.open(path) as img:
        assert img.n_frames == 4
    with pytest.raises(MedidiffError, match="holds 4 frames") as err:
        io.read(path)
    assert str(err.value).startswith(str(path)) and what in str(err.value)


def test_a_single_frame_tiff_and_gif_still_read(tmp_path):
    for name in ("one.tif", "one.gif"):
        assert io.read(frames(tmp_path / name, 1)).shape == (1, 10, 12)


def test_infer_refuses_a_multi_page_tiff_in_one_line(tmp_path, capsys):
    path = frames(tmp_path / "in" / "pages.tif", 4)
    user_error(capsys, infer("segmentation", SEG2D, path, tmp_path / "out"), "pages.tif", "4 frames")


# --------------------------------------------------------------------------------------- 2. FIFOs, devices


@contextlib.contextmanager
def never_opened(fifo: Path, after: float = 2.0):
    """Fail if the code under test opens ``fifo``. Opening a FIFO for reading blocks until a writer comes: be that
    writer (open and close the other end, which succeeds only while a reader has it open) every 0.2 s after
    ``after`` seconds, so that the test fails instead of hanging."""
    done, opened = threading.Event(), []

    def release():
        if done.wait(after):
            return
        while not done.wait(0.2):
            with contextlib.suppress(OSError):  # ENXIO: nobody has it open for reading
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                opened.append(fifo)

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    assert not opened, f"{fifo} was opened"


def test_a_fifo_is_refused_before_it_is_opened(tmp_path):
    fifo = tmp_path / "scan.nii.gz"
    os.mkfifo(fifo)
    with never_opened(fifo), pytest.raises(MedidiffError) as err:
        io.read(fifo)
    assert str(err.value) == f"{fifo}: is not a regular file (a FIFO); medidiff reads image files and DICOM folders"


def test_a_device_is_refused():
    with pytest.raises(MedidiffError, match=r"^/dev/null: is not a regular file \(a device\)"):
        io.read("/dev/null")


def test_infer_refuses_a_fifo_as_the_kspace_mask_in_one_line(tmp_path, capsys):
    fifo = tmp_path / "mask.png"
    os.mkfifo(fifo)
    with never_opened(fifo):
        user_error(capsys, infer("restoration", RESTORE, small_scan(tmp_path / "in" / "scan.nii.gz"),
                                 tmp_path / "out", "--mask", str(fifo)), "mask.png", "not a regular file (a FIFO)")


def test_is_dicom_folder_does_not_open_a_fifo_inside(tmp_path):
    os.mkfifo(tmp_path / "a")  # no DICOM suffix: only its first 132 bytes could tell
    with never_opened(tmp_path / "a"):
        assert not io.is_dicom_folder(tmp_path)


def test_a_fifo_in_a_dicom_series_folder_is_named(tmp_path):
    write_dicom_series(tmp_path / "series", np.random.default_rng(0).integers(0, 500, (16, 16, 4)))
    os.mkfifo(tmp_path / "series" / "aa")  # GDCM then finds no series at all
    with never_opened(tmp_path / "series" / "aa"), pytest.raises(MedidiffError) as err:
        io.read(tmp_path / "series")
    assert str(err.value).startswith(f"{tmp_path / 'series' / 'aa'}: is not a regular file (a FIFO)")


# ----------------------------------------------------------------------------------------- 3. memory budget


def zeros_nii_gz(path: Path, shape: tuple[int, ...], chunks: int = 1000) -> Path:
    """A valid ``.nii.gz`` of uint8 zeros, built without holding the voxels: the same fully flushed deflate block
    (byte aligned, no back references) repeated ``chunks`` times. 1200^3 voxels make 1.7 MB."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    header.set_data_offset(352)
    head = header.binaryblock + b"\0" * 4
    voxels = int(np.prod(shape))
    assert voxels % chunks == 0
    chunk = bytes(voxels // chunks)

    def deflated(data: bytes) -> bytes:
        packer = zlib.compressobj(9, zlib.DEFLATED, -15)
        return packer.compress(data) + packer.flush(zlib.Z_FULL_FLUSH)

    crc = zlib.crc32(head)
    for _ in range(chunks):
        crc = zlib.crc32(chunk, crc)
    path.parent.mkdir(parents=True, exist_ok=True)
    end = zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)
    trailer = struct.pack("<II", crc, (len(head) + voxels) & 0xFFFFFFFF)
    path.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + deflated(head) + deflated(chunk) * chunks + end
                     + trailer)
    return path


@pytest.fixture
def no_decompressing(monkeypatch):
    """Fail at once where a voxel would be decompressed (without the check, 1.7 GB would be)."""
    def refuse(*_):
        raise AssertionError("decompressed before the memory budget was checked")

    monkeypatch.setattr(gzip, "decompress", refuse)


def test_a_small_nii_gz_declaring_1200_cubed_voxels_is_refused_before_decompressing(tmp_path, monkeypatch,
                                                                                    no_decompressing):
    path = zeros_nii_gz(tmp_path / "big.nii.gz", (1200, 1200, 1200))
    assert path.stat().st_size < 2_000_000
    monkeypatch.delenv(BUDGET, raising=False)
    physical = {"SC_PHYS_PAGES": 16 * 2**30 // 4096, "SC_PAGE_SIZE": 4096}  # 16 GiB: a budget of 4 GiB
    monkeypatch.setattr(os, "sysconf", lambda name: physical[name])
    with pytest.raises(MedidiffError) as err:
        io.read(path)
    message = str(err.value)
    for fragment in (f"{path}: ", "(1200, 1200, 1200)", "6.91 GB", "4.29 GB", BUDGET):
        assert fragment in message, message


def test_infer_refuses_a_scan_over_the_budget_in_one_line(tmp_path, capsys, monkeypatch, no_decompressing):
    monkeypatch.setenv(BUDGET, "1000000000")
    path = zeros_nii_gz(tmp_path / "in" / "big.nii.gz", (1200, 1200, 1200))
    user_error(capsys, infer("segmentation", SEG2D, path, tmp_path / "out"), "big.nii.gz", "(1200, 1200, 1200)",
               "1 GB", BUDGET)


def test_the_budget_variable_lowers_and_raises_the_limit(tmp_path, monkeypatch):
    path = small_scan(tmp_path / "scan.nii")  # 20 x 18 x 6 voxels: 8640 bytes as float32
    monkeypatch.setenv(BUDGET, "8640")
    assert io.read(path).shape == (1, 20, 18, 6)
    monkeypatch.setenv(BUDGET, "8639")
    with pytest.raises(MedidiffError, match=rf"^{path}: declares \(20, 18, 6\) voxels .*{BUDGET}"):
        io.read(path)
    for bad in ("lots", "-1", "0", "nan"):
        monkeypatch.setenv(BUDGET, bad)
        with pytest.raises(MedidiffError, match=f"{BUDGET}={bad!r} is not a positive number of bytes"):
            io.read(path)


def test_an_itk_header_over_the_budget_is_refused_before_reading_pixels(tmp_path, monkeypatch):
    monkeypatch.setenv(BUDGET, "1000000000")
    path = tmp_path / "big.mha"
    path.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 1000 1000 1000\nElementType = MET_UCHAR\n"
                     b"ElementDataFile = LOCAL\n" + bytes(64))
    with pytest.raises(MedidiffError, match=rf"^{path}: declares \(1000, 1000, 1000\) voxels .*{BUDGET}"):
        io.read(path)


def test_a_dicom_series_over_the_budget_is_refused(tmp_path, monkeypatch):
    write_dicom_series(tmp_path / "series", np.random.default_rng(0).integers(0, 500, (16, 16, 4)))
    monkeypatch.setenv(BUDGET, "4095")  # 16 x 16 x 4 voxels take 4096 bytes as float32
    with pytest.raises(MedidiffError, match=rf"^{tmp_path / 'series'}: declares \(16, 16, 4\) voxels .*{BUDGET}"):
        io.read(tmp_path / "series")
    monkeypatch.setenv(BUDGET, "4096")
    assert io.read(tmp_path / "series").shape == (1, 16, 16, 4)


def test_a_2d_image_over_the_budget_is_refused(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((30, 20, 3), np.uint8)).save(tmp_path / "rgb.png")
    monkeypatch.setenv(BUDGET, str(30 * 20 * 3 * 4 - 1))
    with pytest.raises(MedidiffError, match=rf"^{tmp_path / 'rgb.png'}: declares \(30, 20\) voxels x 3 channels"):
        io.read(tmp_path / "rgb.png")


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG declaring ``width`` x ``height`` grey pixels that holds one row."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(width + 1)))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [10_000, 20_000])  # Pillow warns above 89 M pixels, refuses above 179 M
def test_pillows_decompression_bomb_guard_is_one_error(tmp_path, monkeypatch, side):
    monkeypatch.setenv(BUDGET, str(10**13))
    path = png_header(tmp_path / "bomb.png", side, side)
    with pytest.raises(MedidiffError) as err:
        io.read(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "decompression bomb" in message and str(side * side) in message
    assert "corrupt" not in message, message


# ------------------------------------------------------------------------------- 4. DICOM slice of another size


def series_with_a_small_slice(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    files = write_dicom_series(folder / "series", rng.integers(0, 500, (16, 16, 4)))
    small = write_dicom_series(folder / "small", rng.integers(0, 500, (8, 8, 4)))
    shutil.copy(small[2], files[2])  # same series, same position, another matrix
    shutil.rmtree(folder / "small")
    return files[2]


def test_a_dicom_slice_of_another_size_is_named_as_such(tmp_path):
    odd = series_with_a_small_slice(tmp_path)
    with pytest.raises(MedidiffError) as err:
        io.read(odd.parent)
    assert str(err.value).startswith(f"{odd}: is 8 x 8 where the other slices of the series are 16 x 16; ")
    assert "corrupt" not in str(err.value)


def test_infer_names_the_dicom_slice_of_another_size_in_one_line(tmp_path, capsys):
    odd = series_with_a_small_slice(tmp_path)
    user_error(capsys, infer("segmentation", SEG2D, odd.parent, tmp_path / "out"), odd.name, "is 8 x 8",
               "16 x 16")


# --------------------------------------------------------------------------------------- 5. qform and sform


def reference_with_two_forms(path: Path, qcode: int = 1, scode: int = 2) -> nib.Nifti1Image:
    """An oblique scan whose qform sits 10 mm from its sform (as some converters write them)."""
    angle = np.deg2rad(20)
    sform = np.eye(4)
    sform[:3, :3] = [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    sform[:3, :3] = sform[:3, :3] @ np.diag([0.8, 1.2, 3.0])
    sform[:3, 3] = (-40.0, 25.0, 12.0)
    qform = sform.copy()
    qform[:3, 3] += (10.0, 0.0, 0.0)
    image = nib.Nifti1Image(np.random.default_rng(0).uniform(0, 1, (10, 8, 5)).astype(np.float32), sform)
    image.set_sform(sform, code=scode)
    image.set_qform(qform, code=qcode)
    nib.save(image, path)
    return nib.load(path)


def assert_forms(written: Path, qform: np.ndarray, qcode: int, sform: np.ndarray, scode: int) -> None:
    header = nib.load(written).header
    (q, qc), (s, sc) = header.get_qform(coded=True), header.get_sform(coded=True)
    assert (int(qc), int(sc)) == (qcode, scode)
    np.testing.assert_allclose(q, qform, atol=1e-5)
    np.testing.assert_allclose(s, sform, atol=1e-5)


@pytest.mark.parametrize("as_metatensor", [False, True])
def test_write_keeps_the_references_qform_and_sform_each(tmp_path, as_metatensor):
    ref = reference_with_two_forms(tmp_path / "ref.nii.gz")
    (qform, qcode), (sform, scode) = ref.header.get_qform(coded=True), ref.header.get_sform(coded=True)
    assert np.abs(qform - sform).max() == pytest.approx(10.0, abs=1e-4)
    like = io.read(tmp_path / "ref.nii.gz") if as_metatensor else tmp_path / "ref.nii.gz"
    out = io.write(torch.ones(10, 8, 5), tmp_path / "out.nii.gz", like=like)
    assert_forms(out, qform, int(qcode), sform, int(scode))
    resampled = io.write(torch.ones(20, 16, 5), tmp_path / "sr.nii.gz", like=like, spacing=(0.4, 0.6, 3.0))
    assert_forms(resampled, io.respaced_affine(qform, (0.4, 0.6, 3.0)), int(qcode),
                 io.respaced_affine(sform, (0.4, 0.6, 3.0)), int(scode))


def test_write_keeps_a_reference_without_a_qform_without_one(tmp_path):
    ref = reference_with_two_forms(tmp_path / "ref.nii.gz", qcode=0, scode=4)
    out = nib.load(io.write(torch.ones(10, 8, 5), tmp_path / "out.nii.gz", like=tmp_path / "ref.nii.gz"))
    assert int(out.header["qform_code"]) == 0 and int(out.header["sform_code"]) == 4
    np.testing.assert_allclose(out.affine, ref.affine, atol=1e-5)


def test_a_reoriented_metatensor_is_not_given_its_files_forms(tmp_path):
    reference_with_two_forms(tmp_path / "ref.nii.gz")
    image = io.read(tmp_path / "ref.nii.gz")
    flipped = image.clone()
    flipped.affine = image.affine @ torch.as_tensor(np.diag([-1.0, 1.0, 1.0, 1.0]), dtype=image.affine.dtype)
    out = nib.load(io.write(flipped, tmp_path / "out.nii.gz"))
    np.testing.assert_allclose(out.affine, flipped.affine.numpy(), atol=1e-5)


# ------------------------------------------------------------------------------------------ 6. temporaries


def test_clear_partial_writes_removes_only_medidiffs_own_temporaries(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "prob").mkdir()
    users = [tmp_path / "notes" / ".results.csv.v2_final.csv", tmp_path / ".foo.nii.gz.abcdefgh.nii.gz",
             tmp_path / "prob" / ".scan.nii.gz.abc12_xy.nii.gz", tmp_path / ".keep_me"]
    ours = tmp_path / "prob" / ".medidiff-partial-scan.nii.gz.abc12_xy.nii.gz"
    for path in [*users, ours]:
        path.write_text("x")
    assert io.clear_partial_writes(tmp_path) == [ours]
    assert all(path.exists() for path in users)


def test_a_killed_writes_temporary_is_recognised_and_an_interrupted_one_removed(tmp_path):
    names = []

    def killed(tmp: str) -> None:
        Path(tmp).write_bytes(b"half a file")
        names.append(Path(tmp).name)
        raise KeyboardInterrupt

    for target in (tmp_path / "scan.nii.gz", tmp_path / "provenance" / "scan.json", tmp_path / "noext"):
        with pytest.raises(KeyboardInterrupt):
            io.atomic_write(target, killed)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # an interrupted write leaves nothing
    assert all(name.startswith(".medidiff-partial-") for name in names), names
    left = [tmp_path / names[0], tmp_path / "provenance" / names[1], tmp_path / names[2]]
    for path in left:  # what a kill -9 during the writes would have left
        path.write_bytes(b"half a file")
    assert sorted(io.clear_partial_writes(tmp_path)) == sorted(left)
