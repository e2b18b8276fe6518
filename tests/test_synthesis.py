"""Synthesis (one modality from another): the fifth task, added as one file, one registry line, a card and configs.
Exact checks of what it diffuses and of the units its outputs are written in, and the commands end to end on the
shipped sample (the MNI T1 slices -> the red channel of their simulated PET colour map, an 8-bit target)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from medidiff.cli import main
from medidiff.metrics.image import mae
from medidiff.tasks import Case, Synthesis
from tests.conftest import REPO

SAMPLES = REPO / "medidiff/sample_data/fusion"


def test_the_target_is_diffused_and_the_source_conditions_it():
    batch = {"image": torch.full((1, 1, 4, 4), 0.25), "target": torch.full((1, 1, 4, 4), 1.0)}
    task = Synthesis()
    assert torch.equal(task.target(batch), torch.ones(1, 1, 4, 4))  # the CT, in [-1, 1]
    assert torch.equal(task.condition(batch), torch.full((1, 1, 4, 4), -0.5))  # the MRI, in [-1, 1]
    residual = Synthesis(residual_scale=4.0)
    assert torch.equal(residual.target(batch), torch.full((1, 1, 4, 4), 6.0))  # (1 - (-0.5)) * 4


def test_outputs_are_written_in_the_targets_units_not_the_inputs():
    contract = {"target": {"normalise": {"method": "window", "low": -1000.0, "high": 2000.0}}}
    case = Case("c", {}, images={"image_bounds": torch.tensor([[0.0, 255.0]], dtype=torch.float64)})
    bounds = Synthesis().output_bounds(case, contract)
    assert bounds.tolist() == [[-1000.0, 2000.0]]


def test_mae_is_the_mean_absolute_difference_in_the_images_units():
    ref = np.zeros((4, 5))
    pred = ref.copy()
    pred[0, :] = 10.0
    assert mae(pred, ref) == pytest.approx(2.5)
    assert mae(pred, ref, mask=np.arange(20).reshape(4, 5) < 5) == pytest.approx(10.0)


def _card(tmp_path: Path) -> Path:
    ids = {"train": ["060", "068", "076", "084"], "val": ["108"], "test": ["124", "132"]}
    card = {"name": "toy_synthesis", "description": "MNI T1 slices to the red channel of a simulated PET map",
            "source": "medidiff/sample_data/fusion", "licence": "see the sample_fusion card", "modality": "MRI -> PET",
            "spatial_dims": 2, "tasks": ["synthesis"], "root": str(SAMPLES),
            "inputs": {"image": {"channels": ["T1"], "normalise": {"method": "window", "low": 0, "high": 255}},
                       "target": {"channels": ["red", "green", "blue"], "use": ["red"],
                                  "normalise": {"method": "window", "low": 0, "high": 255}}},
            "splits": {split: {"pattern": {"image": "mri/{id}.png", "target": "pet/{id}.png"}, "ids": chosen}
                       for split, chosen in ids.items()}}
    path = tmp_path / "toy_synthesis.yaml"
    path.write_text(yaml.safe_dump(card))
    return path


def test_fit_infer_and_evaluate_a_synthesis_model(tmp_path, capsys):
    card = _card(tmp_path)
    assert main(["fit", "--config", str(REPO / "configs/synthesis/harvard_mr_to_ct.yaml"), "--data.card", str(card),
                 "--data.patch_size", "[32, 32]", "--trainer.max_steps", "2", "--trainer.max_time", "null",
                 "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.enable_progress_bar",
                 "false", "--trainer.default_root_dir", str(tmp_path / "run"),
                 "--model.init_args.net.init_args.channels", "[8, 16]"]) == 0
    ckpt = next((tmp_path / "run").rglob("last.ckpt"))
    refs, inputs = tmp_path / "refs", tmp_path / "in"
    refs.mkdir(), inputs.mkdir()
    for case in ("124", "132"):  # the test cases; the target's used channel, as a grey 8-bit reference
        Image.fromarray(np.asarray(Image.open(SAMPLES / "pet" / f"{case}.png"))[..., 0]).save(refs / f"{case}.png")
        Image.open(SAMPLES / "mri" / f"{case}.png").save(inputs / f"{case}.png")
    assert main(["infer", "--task", "synthesis", "--ckpt", str(ckpt), "--input", str(inputs), "--output",
                 str(tmp_path / "out"), "--steps", "1"]) == 0
    written = json.loads((tmp_path / "out" / "provenance" / "124.json").read_text())
    assert written["settings"]["task"] == "synthesis" and written["nfe"] == 1
    out = tmp_path / "m.json"
    assert main(["evaluate", "--task", "synthesis", "--pred", str(tmp_path / "out"), "--ref", str(refs),
                 "--card", str(card), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {row["case"] for row in result["cases"]} == {"124", "132"}
    assert {"psnr", "ssim", "nmse", "mae"} <= set(result["summary"])
    assert result["settings"]["data_range"] == 255.0


def test_a_synthesis_card_needs_a_target_window(tmp_path, capsys):
    card = yaml.safe_load(_card(tmp_path).read_text())
    card["inputs"]["target"]["normalise"] = {"method": "percentile", "lower": 1, "upper": 99}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(card))
    assert main(["fit", "--config", str(REPO / "configs/synthesis/harvard_mr_to_ct.yaml"), "--data.card",
                 str(tmp_path / "bad.yaml"), "--trainer.max_steps", "1"]) == 2
    assert "inputs.target.normalise must be a window" in capsys.readouterr().err
