"""Shared fixtures: where ../shared is, and a tiny trained segmentation checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def needs_shared(card_text: str) -> bool:
    return "${shared}" in card_text


@pytest.fixture(scope="session")
def tiny_seg_checkpoint(tmp_path_factory) -> Path:
    """A 2D segmentation model trained for 2 steps on the shipped MNI sample: enough to exercise every path."""
    from medidiff.cli import main

    root = tmp_path_factory.mktemp("tiny_seg")
    code = main(["fit", "--config", str(REPO / "configs/segmentation/sample_mni_2d.yaml"),
                 "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.max_time", "null",
                 "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
                 "--model.init_args.net.init_args.channels", "[8, 16]"])
    assert code == 0
    checkpoints = sorted(root.rglob("*.ckpt"))
    assert checkpoints, "training wrote no checkpoint"
    return checkpoints[-1]


def export_untrained(module, data: dict, path: Path) -> Path:
    """Write ``module`` (built in Python, untrained) as ``medidiff export`` would, with the contract of the data it
    would be trained on: ``data`` are data-module settings (``card``, ``task``, ``patch_size`` ...)."""
    from medidiff.data.datamodule import MedicalDataModule
    from medidiff.inference.contract import build_contract
    from medidiff.lit.registry import export

    module.contract = build_contract(MedicalDataModule(**data), module) | {"sampling": module.contract_sampling()}
    return export(module, data, path)
