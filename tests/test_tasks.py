"""The task objects: exact checks of what each task answers, and that no layer outside medidiff/tasks names one."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from medidiff.tasks import REGISTRY, Case, Segmentation, task_class, task_named
from tests.conftest import REPO


def test_members_are_each_members_own_label_map_whatever_the_dimension():
    """A 2D model over a volume gives predictions ``(N, C, X, Y, Z)``; every member's label map is the argmax over
    its class axis (it was taken over the first spatial axis, which zeroed every member and the vote and STAPLE
    fusions built on them)."""
    generator = torch.Generator().manual_seed(0)
    for spatial in ((6, 5), (6, 5, 4)):
        logits = torch.randn(3, 4, *spatial, generator=generator)
        probabilities = logits.softmax(1)
        outputs = Segmentation(num_classes=4).outputs(probabilities, {}, Case("c", {}), {"fusion": "vote"})
        members = outputs["members"].array
        assert torch.equal(members, probabilities.argmax(1).to(members.dtype))
        expected = torch.mode(probabilities.argmax(1), dim=0).values  # majority of 3 members (ties: lowest)
        agree = (outputs["seg"].array[0] == expected).float().mean()
        assert agree > 0.9, agree


def test_binary_members_threshold_the_foreground_probability():
    probability = torch.tensor([0.2, 0.6, 0.5, 0.9]).reshape(1, 1, 2, 2).repeat(2, 1, 1, 1)
    outputs = Segmentation(num_classes=2, threshold=0.55).outputs(probability, {}, Case("c", {}), {})
    assert outputs["members"].array.tolist() == [[[0, 1], [0, 1]]] * 2
    assert outputs["seg"].array.tolist() == [[[0, 1], [0, 1]]]


def test_the_registry_names_every_task_once_and_configurations_find_them():
    assert list(REGISTRY) == [cls.name for cls in REGISTRY.values()]
    for name, cls in REGISTRY.items():
        assert task_class(name) is cls
        assert task_named(f"medidiff.tasks.{cls.__name__}") is cls
        assert task_named(f"{cls.__module__}.{cls.__qualname__}") is cls
    assert task_named("os.system") is None


def test_a_task_keeps_its_settings_as_plain_data():
    task = Segmentation(num_classes=3, dice_weight=0.5)
    assert task.config == {"num_classes": 3, "dice_weight": 0.5, "threshold": 0.5}
    with pytest.raises(ValueError, match="num_classes"):
        Segmentation(num_classes=1)


def test_no_layer_outside_the_tasks_compares_task_names():
    names = "|".join(REGISTRY)
    comparison = re.compile(rf"""(==|!=|\bin)\s*\(?["']({names})["']|["']({names})["']\s*(==|!=|\bin\b)""")
    found = [f"{path.relative_to(REPO)}:{number}" for path in sorted((REPO / "medidiff").rglob("*.py"))
             if Path("medidiff/tasks") not in path.relative_to(REPO).parents
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if comparison.search(line)]
    assert found == []


def test_segmentation_outputs_are_on_the_grid_of_the_predictions():
    predictions = torch.from_numpy(np.random.default_rng(0).dirichlet([1, 1, 1], (2, 5, 6)).astype(np.float32))
    predictions = predictions.permute(0, 3, 1, 2)  # (N=2, C=3, 5, 6)
    outputs = Segmentation(num_classes=3).outputs(predictions, {}, Case("c", {}), {})
    assert {name: tuple(out.array.shape) for name, out in outputs.items()} == {
        "seg": (1, 5, 6), "prob": (3, 5, 6), "entropy": (1, 5, 6), "variance": (1, 5, 6), "members": (2, 5, 6)}
