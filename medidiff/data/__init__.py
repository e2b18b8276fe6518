"""Medical data layer: data cards, MONAI transform pipelines, degradations and the LightningDataModule.

``MedicalDataModule`` is imported lazily so that reading a card does not pull in Lightning.
"""

from __future__ import annotations

from typing import Any

from medidiff.data.cards import DataCard, load_card

__all__ = ["DataCard", "load_card", "MedicalDataModule", "degrade"]


def __getattr__(name: str) -> Any:
    if name == "MedicalDataModule":
        from medidiff.data.datamodule import MedicalDataModule

        return MedicalDataModule
    if name == "degrade":
        from medidiff.data.degrade import degrade

        return degrade
    raise AttributeError(f"module 'medidiff.data' has no attribute {name!r}")
