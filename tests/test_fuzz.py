"""Property-based tests: whatever a data card or an image file holds, medidiff either accepts it (and what it
returns is well formed) or refuses it with its own :class:`MedidiffError` — never another exception.

Cards: random YAML documents, random mappings over the schema's keys, and valid cards with one part replaced,
removed or added. Readers: random bytes under every file suffix ``io.read`` knows, valid files with random
bytes overwritten, and NIfTI files whose header fields (dims, datatype, offsets, pixdim, affines, scaling) are
set to random values — including huge dims, which must be refused before any memory is allocated for them.
"""

from __future__ import annotations

import gzip
import io as pyio
import math
import os
import struct
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor
from PIL import Image

from medidiff import io
from medidiff.data.cards import DataCard, load_card
from medidiff.errors import MedidiffError
from medidiff.tasks import REGISTRY

# A fixed, bounded search by default (the whole file runs in well under a minute); for a longer random hunt:
# MEDIDIFF_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py
EXAMPLES = int(os.environ.get("MEDIDIFF_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize="MEDIDIFF_FUZZ_EXAMPLES" not in os.environ, database=None)

# ------------------------------------------------------------------------------------------- data cards

SCHEMA_KEYS = ["name", "description", "source", "licence", "modality", "spatial_dims", "tasks", "inputs", "splits",
               "citation", "root", "labels", "label_remap", "label_others", "spacing", "orientation", "slice_axis",
               "derive", "caveats", "channels", "normalise", "method", "low", "high", "lower", "upper", "pattern",
               "ids", "take", "cases", "slices", "image", "label", "id", "from", "threshold", "use"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**40), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(SCHEMA_KEYS + ["${card}", "${shared}", "${x}", "package:",
                                                                         "package:nope/x", "imgs/{id}_img.nii.gz",
                                                                         "{id}", "RAS", "LPI", "XYZ", "window"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(SCHEMA_KEYS), st.text(max_size=6),
                                                           st.integers(-3, 300)), inner, max_size=4)),
    max_leaves=12)


def valid_card() -> dict:
    return {
        "name": "toy", "description": "toy", "source": "made here", "licence": "CC0", "modality": "CT",
        "spatial_dims": 3, "tasks": ["segmentation"], "root": "${card}",
        "inputs": {"image": {"channels": ["CT"], "normalise": {"method": "window", "low": -1000, "high": 1000}}},
        "labels": {"background": 0, "organ": 1},
        "label_remap": {0: "background", 5: "organ"},
        "spacing": [1.0, 1.0, 2.0], "orientation": "RAS", "slice_axis": 2, "caveats": ["toy data"],
        "splits": {
            "train": {"pattern": {"image": "imgs/{id}_img.nii.gz", "label": "imgs/{id}_seg.nii.gz"}, "ids": ["a", "b"],
                      "take": [0, 2], "slices": [0, 4]},
            "val": {"cases": [{"id": "c", "image": "imgs/c_img.nii.gz", "label": "imgs/c_seg.nii.gz"}]},
        },
    }


def _paths(node, prefix=()):
    """Every key path into a nested dict/list, the root included."""
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield from _paths(child, prefix + (key,))


@st.composite
def mutated_cards(draw):
    card = valid_card()
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(card))
        path = draw(st.sampled_from(paths))
        parent = card
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if not path:  # the root itself
            if action == "replace":
                card = draw(values)
            continue
        if action == "replace":
            parent[path[-1]] = draw(values)
        elif action == "delete":
            del parent[path[-1]]
        else:
            target = parent[path[-1]]
            if isinstance(target, dict):
                target[draw(st.one_of(st.sampled_from(SCHEMA_KEYS), st.text(max_size=6)))] = draw(values)
            elif isinstance(target, list):
                target.append(draw(values))
        if not isinstance(card, (dict, list)):
            break
    return card


cards = st.one_of(
    mutated_cards(),
    st.dictionaries(st.sampled_from(SCHEMA_KEYS), values, max_size=12),
    values,
)


@pytest.fixture(scope="module")
def card_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cards")
    (root / "imgs").mkdir()
    for case in ("a", "b", "c"):
        for kind in ("img", "seg"):
            (root / "imgs" / f"{case}_{kind}.nii.gz").write_bytes(b"")
    return root


def assert_well_formed(card: DataCard) -> None:
    """What the rest of medidiff relies on once a card has loaded."""
    assert isinstance(card.name, str) and isinstance(card.description, str) and isinstance(card.licence, str)
    assert card.spatial_dims in (2, 3)
    assert card.tasks and all(t in REGISTRY for t in card.tasks)
    assert card.inputs
    for spec in card.inputs.values():
        assert spec.channels and all(isinstance(c, str) for c in spec.channels)
        assert len(set(spec.channels)) == len(spec.channels) and len(set(spec.use)) == len(spec.use)
        assert spec.use and set(spec.use) <= set(spec.channels)
        assert spec.normalise["method"] in ("window", "percentile")
        bounds = ("low", "high") if spec.normalise["method"] == "window" else ("lower", "upper")
        assert all(isinstance(spec.normalise[b], (int, float)) and math.isfinite(spec.normalise[b]) for b in bounds)
        assert spec.normalise[bounds[0]] < spec.normalise[bounds[1]]
    assert all(isinstance(k, str) and isinstance(v, int) for k, v in card.labels.items())
    assert sorted(card.labels.values()) == list(range(len(card.labels)))
    if card.label_remap is not None:
        assert all(isinstance(k, int) and v in card.labels.values() for k, v in card.label_remap.items())
    if card.spacing is not None:
        assert len(card.spacing) == card.spatial_dims and all(math.isfinite(s) and s > 0 for s in card.spacing)
    assert sorted(nib.orientations.axcodes2ornt(tuple(card.orientation))[:, 0].tolist()) == [0, 1, 2]
    assert 0 <= card.slice_axis < card.spatial_dims or card.spatial_dims == 2
    assert all(isinstance(c, str) for c in card.caveats)
    assert card.citation is None or isinstance(card.citation, str)
    assert {"train", "val"} <= set(card.splits)
    for split in card.splits.values():
        for case in split.cases:
            assert isinstance(case["id"], str) and all(isinstance(v, str) for v in case.values())
        if split.slices is not None:
            assert len(split.slices) == 2 and all(isinstance(s, int) for s in split.slices)


def _load_or_refuse(path: Path, check_files: bool) -> None:
    try:
        card = load_card(path, check_files=check_files)
    except MedidiffError as err:
        assert str(path.name) in str(err) or "card" in str(err)
        return
    assert_well_formed(card)


def test_the_valid_card_loads(card_dir):
    path = card_dir / "valid.yaml"
    path.write_text(yaml.safe_dump(valid_card()), encoding="utf-8")
    assert_well_formed(load_card(path))


@FUZZ
@given(raw=cards, check_files=st.booleans())
def test_random_cards_load_or_raise_medidiff_error(card_dir, raw, check_files):
    path = card_dir / "fuzz.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    _load_or_refuse(path, check_files)


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                      st.sampled_from(["!!python/object/apply:os.system ['true']", "a: [1, 2", "{a: b}: c",
                                       "- - -", "name: &a [*a]", "? [a]\n: b", "\t\ttabs: 1", "\x00"])))
def test_random_yaml_text_loads_or_raises_medidiff_error(card_dir, text):
    path = card_dir / "text.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    _load_or_refuse(path, check_files=False)


# ----------------------------------------------------------------------------------------------- readers

SUFFIXES = [".nii", ".nii.gz", ".png", ".tif", ".gif", ".jpg", ".bmp", ".mha", ".nrrd"]


def _valid_bytes(suffix: str) -> bytes:
    """A small valid file of each type, as bytes."""
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 200, (6, 5, 4)).astype(np.int16)
    if suffix in (".nii", ".nii.gz"):
        raw = nib.Nifti1Image(volume, np.diag([0.8, 1.0, 2.5, 1.0])).to_bytes()
        return gzip.compress(raw) if suffix == ".nii.gz" else raw
    if suffix in (".mha", ".nrrd"):
        return _itk_bytes(volume, suffix)
    buffer = pyio.BytesIO()
    fmt = {".png": "PNG", ".tif": "TIFF", ".gif": "GIF", ".jpg": "JPEG", ".bmp": "BMP"}[suffix]
    Image.fromarray(volume[:, :, 0].astype(np.uint8) * 20).save(buffer, format=fmt)
    return buffer.getvalue()


def _itk_bytes(volume: np.ndarray, suffix: str) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"v{suffix}"
        sitk.WriteImage(sitk.GetImageFromArray(volume), str(path))
        return path.read_bytes()


VALID = {suffix: _valid_bytes(suffix) for suffix in SUFFIXES}


@pytest.fixture(scope="module")
def file_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("files")


def read_or_refuse(path: Path, **kwargs) -> None:
    """``io.read`` returns a well-formed MetaTensor or raises a MedidiffError naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = io.read(path, **kwargs)
    except MedidiffError as err:
        assert path.name in str(err), str(err)
        assert "\n" not in str(err), "one line"
        return
    assert isinstance(image, MetaTensor)
    assert image.ndim in (3, 4) and image.numel() > 0
    assert image.dtype in (torch.float32, torch.int64)
    assert bool(torch.isfinite(image.float()).all())
    affine = np.asarray(image.affine)
    assert affine.shape == (4, 4) and np.isfinite(affine).all()
    assert all(math.isfinite(s) and s > 0 for s in image.meta["spacing"])


@FUZZ
@given(suffix=st.sampled_from(SUFFIXES), data=st.binary(max_size=600), kind=st.sampled_from(["image", "label"]))
def test_random_bytes_are_refused_cleanly(file_dir, suffix, data, kind):
    path = file_dir / f"random{suffix}"
    path.write_bytes(data)
    read_or_refuse(path, kind=kind)


@FUZZ
@given(suffix=st.sampled_from(SUFFIXES), edits=st.lists(st.tuples(st.integers(0, 10**6), st.binary(min_size=1,
                                                                                               max_size=4)),
                                                       min_size=1, max_size=6),
       header_bias=st.booleans(), truncate=st.one_of(st.none(), st.floats(0, 1)))
def test_mangled_valid_files_read_or_are_refused(file_dir, suffix, edits, header_bias, truncate):
    compressed = suffix == ".nii.gz"
    data = bytearray(gzip.decompress(VALID[suffix]) if compressed else VALID[suffix])
    for offset, chunk in edits:
        span = min(len(data), 352) if header_bias else len(data)
        where = offset % span
        data[where:where + len(chunk)] = chunk
    if truncate is not None:
        data = data[: int(len(data) * truncate)]
    path = file_dir / f"mangled{suffix}"
    path.write_bytes(gzip.compress(bytes(data)) if compressed else bytes(data))
    read_or_refuse(path)


# NIfTI-1 header fields: (offset, struct format) — see nifti1.h
NIFTI_FIELDS = {
    "sizeof_hdr": (0, "<i"), "dim": (40, "<8h"), "intent_code": (68, "<h"), "datatype": (70, "<h"),
    "bitpix": (72, "<h"), "pixdim": (76, "<8f"), "vox_offset": (108, "<f"), "scl_slope": (112, "<f"),
    "scl_inter": (116, "<f"), "qform_code": (252, "<h"), "sform_code": (254, "<h"), "quatern": (256, "<6f"),
    "srow": (280, "<12f"), "magic": (344, "<4s"),
}
shorts = st.one_of(st.integers(-32768, 32767), st.sampled_from([0, 1, 2, 3, 4, 5, 7, 8, 32767]))
floats32 = st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0, -1.0]))
NIFTI_DATATYPES = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 255, 3]


def _field_value(name: str):
    fmt = NIFTI_FIELDS[name][1]
    count = int(fmt[1:-1] or 1) if fmt[-1] != "s" else 1
    if name == "datatype":
        return st.sampled_from(NIFTI_DATATYPES).map(lambda v: (v,))
    if name == "magic":
        return st.sampled_from([b"n+1\x00", b"ni1\x00", b"n+2\x00", b"xxxx"]).map(lambda v: (v,))
    if name == "sizeof_hdr":
        return st.sampled_from([348, 540, 0, -1, 1 << 24]).map(lambda v: (v,))
    element = shorts if fmt[-1] == "h" else st.integers(-(2**31), 2**31 - 1) if fmt[-1] == "i" else floats32
    return st.lists(element, min_size=count, max_size=count).map(tuple)


@FUZZ
@given(fields=st.lists(st.sampled_from(sorted(NIFTI_FIELDS)), min_size=1, max_size=4, unique=True).flatmap(
    lambda names: st.tuples(*[st.tuples(st.just(n), _field_value(n)) for n in names])),
    compressed=st.booleans(), expected_ndim=st.sampled_from([None, 2, 3]))
def test_random_nifti_headers_read_or_are_refused(file_dir, fields, compressed, expected_ndim):
    data = bytearray(gzip.decompress(VALID[".nii.gz"]))
    for name, value in fields:
        offset, fmt = NIFTI_FIELDS[name]
        struct.pack_into(fmt, data, offset, *value)
    suffix = ".nii.gz" if compressed else ".nii"
    path = file_dir / f"header{suffix}"
    path.write_bytes(gzip.compress(bytes(data)) if compressed else bytes(data))
    read_or_refuse(path, expected_ndim=expected_ndim)


@pytest.mark.parametrize("compressed", [False, True])
def test_header_claiming_a_huge_volume_is_refused_before_allocating(file_dir, compressed):
    data = bytearray(gzip.decompress(VALID[".nii.gz"]))
    struct.pack_into("<8h", data, 40, 3, 30000, 30000, 30000, 1, 1, 1, 1)  # 27e12 voxels, 54 TB as int16
    path = file_dir / ("huge.nii.gz" if compressed else "huge.nii")
    path.write_bytes(gzip.compress(bytes(data)) if compressed else bytes(data))
    with pytest.raises(MedidiffError, match="header") as err:
        io.read(path)
    assert path.name in str(err.value)


def test_valid_files_of_every_type_read(file_dir):
    for suffix, data in VALID.items():
        path = file_dir / f"valid{suffix}"
        path.write_bytes(data)
        image = io.read(path)
        assert image.numel() > 0 and all(v > 0 for v in image.meta["spacing"]), suffix


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
       level=st.sampled_from([0, 1, 9]))
def test_a_corrupted_gzip_stream_is_refused_never_read_as_other_voxels(file_dir, flips, level):
    """Bytes flipped anywhere in the compressed stream (stored blocks at level 0, so the damage still decodes):
    the reader gives back exactly the original voxels or refuses the file; it never returns other values."""
    original = gzip.decompress(VALID[".nii.gz"])
    packed = bytearray(gzip.compress(original, compresslevel=level))
    for offset, mask in flips:
        packed[10 + offset % (len(packed) - 10)] ^= mask  # past the gzip header's fixed part
    path = file_dir / "flipped.nii.gz"
    path.write_bytes(bytes(packed))
    expected = nib.Nifti1Image.from_bytes(original)
    try:
        image = io.read(path)
    except MedidiffError:
        return
    assert np.array_equal(np.asarray(image[0]), np.asanyarray(expected.dataobj).astype(np.float32))
