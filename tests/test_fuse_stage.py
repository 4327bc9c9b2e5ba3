"""distill --method none, then the fuse stage and its gate, through the real CLI."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision

from tests.conftest import TINY, clone_run, run_cli, shared_dir, tree_digest


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, stripes_root) -> Iterator[Path]:
    with shared_dir(tmp_path_factory, "fuse") as folder:
        run_dir = folder / "run"
        result = run_cli("distill", "--student", "shufflenetv2_x0_5", "--method", "none", "--points", "multi",
                         "--branches", "3", "--data-root", str(stripes_root), "--epochs", "2", "--run-dir",
                         str(run_dir), *TINY)
        assert result.returncode == 0, result.stderr
        yield run_dir


def test_distill_none_saves_the_student_only(distilled):
    state = torch.load(distilled / "student" / "model.pt", weights_only=True)
    assert any(".convs.2." in k for k in state)  # three branches at each point
    assert not any(k.startswith(("method.", "model.", "teacher.")) for k in state)
    meta = json.loads((distilled / "student" / "metrics.json").read_text())
    assert meta["arch"]["multibranch"]["m"] == 3 and meta["arch"]["method"] == "none"


def test_fuse_passes_and_writes_a_stock_model(distilled, stripes_root, tmp_path):
    run_dir = tmp_path / "run"
    clone_run(distilled, run_dir)
    student_before = tree_digest(run_dir / "student")
    result = run_cli("fuse", "--run-dir", str(run_dir), "--data-root", str(stripes_root), "--images", "64")
    assert result.returncode == 0, result.stderr
    report = json.loads((run_dir / "fused" / "equivalence.json").read_text())
    assert report["passed"] and len(report["checks"]) == 4
    for check in report["checks"]:
        assert check["top1_agreement"] == 100.0 and check["max_abs_diff"] <= check["tolerance"]
    info = json.loads((run_dir / "fused" / "model.json").read_text())
    assert info["architecture"] == "shufflenet_v2_x0_5" and info["input_size"] == [3, 32, 32]
    assert len(info["classes"]) == info["num_classes"] == 10 and len(info["mean"]) == 3
    stock = torchvision.models.shufflenet_v2_x0_5(num_classes=10)
    stock.load_state_dict(torch.load(run_dir / "fused" / "model.pt", weights_only=True), strict=True)
    assert tree_digest(run_dir / "student") == student_before


def test_failed_gate_exits_nonzero_and_keeps_student(distilled, stripes_root, tmp_path):
    run_dir = tmp_path / "run"
    clone_run(distilled, run_dir)
    student_before = tree_digest(run_dir / "student")
    result = run_cli("fuse", "--run-dir", str(run_dir), "--data-root", str(stripes_root), "--images", "32",
                     "--fp64-tol", "0", "--fp32-tol", "0")
    assert result.returncode == 3
    assert "error: fusion equivalence gate failed: " in result.stderr and "max abs diff" in result.stderr
    assert not (run_dir / "fused" / "model.pt").exists()
    assert json.loads((run_dir / "fused" / "equivalence.json").read_text())["passed"] is False
    assert tree_digest(run_dir / "student") == student_before


def test_fuse_without_student_says_what_to_run(tmp_path):
    result = run_cli("fuse", "--run-dir", str(tmp_path / "empty"))
    assert result.returncode == 2 and "run `pipeline distill` first" in result.stderr


@pytest.mark.parametrize("args,expected", [(["--method", "kdx"], "unknown method 'kdx'; valid: at, crd, dkd, fitnet, kd, kdiffusion, none"),
                                           (["--branches", "0"], "student.m"),
                                           (["--student", "swin"], "unknown student 'swin'")])
def test_distill_bad_input(args, expected, stripes_root, tmp_path):
    result = run_cli("distill", "--data-root", str(stripes_root), "--run-dir", str(tmp_path / "r"), *TINY, *args)
    assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr
