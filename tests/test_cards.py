"""Data cards: the shipped cards load; schema errors name the card and the key, with a hint."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medidiff.data.cards import PACKAGED_CARDS, REPO_ROOT, load_card, shared_data_root
from medidiff.errors import MedidiffError

SAMPLE_CARDS = ["sample_ct", "sample_mni", "sample_fusion"]


def minimal_card(root: Path) -> dict:
    (root / "imgs").mkdir(exist_ok=True)
    for i in ("a", "b", "c"):
        (root / "imgs" / f"{i}_img.nii.gz").write_bytes(b"")
        (root / "imgs" / f"{i}_seg.nii.gz").write_bytes(b"")
    return {
        "name": "toy", "description": "toy", "source": "made here", "licence": "CC0", "modality": "CT",
        "spatial_dims": 3, "tasks": ["segmentation"], "root": "${card}",
        "inputs": {"image": {"channels": ["CT"], "normalise": {"method": "window", "low": -1000, "high": 1000}}},
        "labels": {"background": 0, "organ": 1},
        "splits": {
            "train": {"pattern": {"image": "imgs/{id}_img.nii.gz", "label": "imgs/{id}_seg.nii.gz"}, "ids": ["a", "b"]},
            "val": {"pattern": {"image": "imgs/{id}_img.nii.gz", "label": "imgs/{id}_seg.nii.gz"}, "ids": "c*"},
        },
    }


def save(tmp_path: Path, card: dict, name: str = "toy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(card, sort_keys=False))
    return path


@pytest.mark.parametrize("name", SAMPLE_CARDS)
def test_sample_cards_load_by_name(name):
    card = load_card(name)
    assert card.path.parent == PACKAGED_CARDS
    assert card.licence and card.source and card.splits["train"].cases
    for split in card.splits.values():
        for case in split.cases:
            assert all(Path(v).exists() for k, v in case.items() if k != "id")


def test_minimal_card_expands_patterns(tmp_path):
    card = load_card(save(tmp_path, minimal_card(tmp_path)))
    assert [c["id"] for c in card.splits["train"].cases] == ["a", "b"]
    assert [c["id"] for c in card.splits["val"].cases] == ["c"]
    assert card.splits["val"].cases[0]["label"] == str(tmp_path / "imgs" / "c_seg.nii.gz")
    assert card.num_classes == 2 and card.orientation == "RAS"


@pytest.mark.parametrize("key", ["name", "licence", "inputs", "splits", "spatial_dims"])
def test_missing_key_names_key_and_card(tmp_path, key):
    raw = minimal_card(tmp_path)
    del raw[key]
    with pytest.raises(MedidiffError, match=f"missing required key '{key}'") as err:
        load_card(save(tmp_path, raw))
    assert "toy.yaml" in str(err.value)


@pytest.mark.parametrize(
    ("edit", "wrong", "hint"),
    [
        (lambda c: c.update(licnece=c.pop("licence")), "licnece", "licence"),
        (lambda c: c.update(lables=c.pop("labels")), "lables", "labels"),
        (lambda c: c["inputs"]["image"].update(chanels=c["inputs"]["image"].pop("channels")), "chanels", "channels"),
        (lambda c: c["inputs"]["image"]["normalise"].update(metod="window"), "metod", "method"),
        (lambda c: c["splits"]["train"].update(idz=["a"]), "idz", "ids"),
    ],
)
def test_misspelled_key_gets_did_you_mean(tmp_path, edit, wrong, hint):
    raw = minimal_card(tmp_path)
    edit(raw)
    with pytest.raises(MedidiffError, match=f"unknown key '{wrong}'; did you mean '{hint}'") as err:
        load_card(save(tmp_path, raw))
    assert "toy.yaml" in str(err.value)


def test_file_named_by_card_must_exist(tmp_path):
    raw = minimal_card(tmp_path)
    raw["splits"]["val"] = {"cases": [{"id": "x", "image": "imgs/c_img.nii.gz", "label": "imgs/missing.nii.gz"}]}
    with pytest.raises(MedidiffError, match="missing.nii.gz does not exist") as err:
        load_card(save(tmp_path, raw))
    assert "toy.yaml" in str(err.value) and "'label'" in str(err.value)


def test_unknown_id_and_missing_root(tmp_path):
    raw = minimal_card(tmp_path)
    raw["splits"]["train"]["ids"] = ["a", "zz"]
    with pytest.raises(MedidiffError, match="no file matches id 'zz'"):
        load_card(save(tmp_path, raw))
    raw = minimal_card(tmp_path)
    raw["root"] = "${card}/nowhere"
    with pytest.raises(MedidiffError, match="data root .*nowhere does not exist"):
        load_card(save(tmp_path, raw))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(labels={"background": 0, "organ": 2}), "contiguous integers"),
        (lambda c: c.update(label_remap={0: "background", 255: "organs"}),
         "'organs' is not a label.*did you mean 'organ'"),
        (lambda c: c.update(tasks=["segmentaton"]), "did you mean 'segmentation'"),
        (lambda c: c["inputs"]["image"]["normalise"].update(method="zscore"), "normalise.method must be one of"),
        (lambda c: c["inputs"]["image"]["normalise"].pop("high"), "missing required key 'high'"),
        (lambda c: c["inputs"]["image"].update(use=["green"]), "channel 'green' is not one of"),
        (lambda c: c["splits"].pop("val"), "missing required split 'val'"),
        (lambda c: c.update(spatial_dims=4), "spatial_dims must be 2 or 3"),
    ],
)
def test_bad_values(tmp_path, edit, message):
    raw = minimal_card(tmp_path)
    edit(raw)
    with pytest.raises(MedidiffError, match=message):
        load_card(save(tmp_path, raw))


def test_unknown_card_name_hints():
    with pytest.raises(MedidiffError, match="no data card named 'sample_cts'; did you mean 'sample_ct'"):
        load_card("sample_cts")


def test_package_root_and_shared_override(tmp_path, monkeypatch):
    raw = minimal_card(tmp_path)
    raw["root"] = "package:medidiff/sample_data/totalseg_ct"
    case = {"id": "a", "image": "ct_a.nii.gz", "label": "seg_a.nii.gz"}
    raw["splits"] = {s: {"cases": [case]} for s in ("train", "val")}
    card = load_card(save(tmp_path, raw))
    assert card.root == PACKAGED_CARDS.parent / "totalseg_ct"
    monkeypatch.setenv("MEDIDIFF_SHARED_DATA", str(tmp_path))
    assert shared_data_root() == tmp_path
    raw = minimal_card(tmp_path)
    raw["root"] = "${shared}"
    assert load_card(save(tmp_path, raw)).root == tmp_path


def test_repo_cards_load_without_data(monkeypatch, tmp_path):
    """Every card in data_cards/ is schema-valid and usable for its description when the data is absent."""
    monkeypatch.setenv("MEDIDIFF_SHARED_DATA", str(tmp_path / "absent"))
    for path in sorted((REPO_ROOT / "data_cards").glob("*.yaml")):
        card = load_card(path, check_files=False)
        assert card.licence and card.source and card.inputs
        if "segmentation" in card.tasks:
            assert card.labels and sorted(card.labels.values()) == list(range(card.num_classes))
    with pytest.raises(MedidiffError, match="data root .* does not exist"):
        load_card("drive")
