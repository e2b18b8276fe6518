"""Fusion priors train on batches that mix the grey and the colour-mapped modality."""

import pytest

from tests.conftest import SHARED


@pytest.mark.shared
@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data")
def test_mri_and_colour_pet_items_share_a_batch():
    from medidiff.data.datamodule import MedicalDataModule

    data = MedicalDataModule("harvard_pet_mri", "fusion", 2, (64, 64), batch_size=4, samples_per_case=2,
                             limit_cases=3, seed=0)
    batches = list(data.train_dataloader())  # 3 MRI + 3 PET items, shuffled: batches mix both
    assert sum(b["image"].shape[0] for b in batches) == 12
    assert all(set(k for k in b if hasattr(b[k], "shape")) == {"image"} for b in batches)
