"""bf16 autocast is kept only where the hardware computes it: emulated bf16 on an AVX2 CPU was 13x slower."""

from __future__ import annotations

import pytest

from medidiff import lightning_cli as cli


@pytest.mark.parametrize("has_bf16,accelerator,precision,expected", [
    (False, "cpu", "bf16-mixed", "32-true"),
    (False, "auto", "bf16-mixed", "32-true"),
    (True, "cpu", "bf16-mixed", "bf16-mixed"),
    (False, "gpu", "bf16-mixed", "bf16-mixed"),
    (False, "cpu", "32-true", "32-true"),
    (False, "cpu", "16-mixed", "16-mixed"),
])
def test_bf16_falls_back_to_float32_only_on_a_cpu_without_bf16(monkeypatch, capsys, has_bf16, accelerator,
                                                               precision, expected):
    monkeypatch.setattr(cli, "cpu_has_bf16", lambda: has_bf16)
    monkeypatch.setattr(cli, "runs_on_cpu", lambda a: a in ("cpu", "auto"))
    trainer = {"accelerator": accelerator, "precision": precision}
    cli.cpu_precision(trainer)
    assert trainer["precision"] == expected
    said = capsys.readouterr().err
    assert ("AVX512-BF16" in said) == (expected != precision)


def test_runs_on_cpu_follows_the_accelerator_and_the_hardware(monkeypatch):
    import torch

    for cuda in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
        assert cli.runs_on_cpu("auto") is (not cuda) and cli.runs_on_cpu(None) is (not cuda)
        assert cli.runs_on_cpu("cpu") is True and cli.runs_on_cpu("gpu") is False
