from __future__ import annotations

import pytest

from tests.conftest import run_cli

SUBCOMMANDS = ["teacher", "distill", "fuse", "export", "bench", "predict", "run", "models"]


def test_help_lists_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(name):
    result = run_cli(name, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_models_lists_zoo_with_taps():
    result = run_cli("models")
    assert result.returncode == 0
    for name in ("swin_t", "resnet50", "shufflenetv2_x1_0", "mobilenetv3_small", "resnet18"):
        assert name in result.stdout
    assert "stage4" in result.stdout
