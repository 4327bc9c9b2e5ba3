"""distill --method none, then the fuse stage and its gate, through the real CLI."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision

from tests.conftest import ROOT, TINY, clone_run, run_cli, shared_dir, tree_digest


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


def test_a_tuning_run_is_measured_on_its_validation_images_at_every_stage(stripes_root, tmp_path):
    """Regression: under --validation the student's top-1 was measured on images held out of the training split,
    but the fused model's (and the INT8 gate's) on the test split, and the report showed both as "test top-1"."""
    from pipeline.stages.loaders import held_out
    from pipeline.training.data import load_dataset, stratified_subset, validation_split

    run_dir = tmp_path / "run"
    # in subprocesses (cwd): in-process, after many other commands in one xdist worker, this pair once ended the
    # worker with a C stack overflow ("overflowed sigaltstack"); alone it passes either way
    result = run_cli("distill", "--student", "shufflenetv2_x0_5", "--method", "none", "--data-root",
                     str(stripes_root), "--epochs", "1", "--validation", "120", "--run-dir", str(run_dir), *TINY,
                     cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "student (no distillation): validation top-1" in result.stderr
    result = run_cli("fuse", "--run-dir", str(run_dir), "--data-root", str(stripes_root), "--images", "32",
                     cwd=ROOT)
    assert result.returncode == 0, result.stderr
    student = json.loads((run_dir / "student" / "metrics.json").read_text())
    fused = json.loads((run_dir / "fused" / "metrics.json").read_text())
    assert student["eval_split"] == fused["eval_split"] == "validation" and fused["validation"] == 120
    assert student["test_images"] == fused["test_images"] == 100
    # the fused network is the student: on the same images it scores the same (one flip allowed)
    assert abs(fused["top1"] - student["top1"]) <= 1.0 and fused["multibranch_top1"] == student["top1"]
    # and those images are the held-out training images, not the test split's
    images, labels = held_out(student, str(stripes_root), 100)
    bundle = load_dataset(student["dataset"], str(stripes_root), False, student["image_size"])
    expected = stratified_subset(validation_split(bundle.train, 120)[0], 100, 0, "eval_subset")
    assert labels.tolist() == [int(expected[i][1]) for i in range(len(expected))]
    assert not torch.equal(images, held_out({**student, "validation": None}, str(stripes_root), 100)[0])


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
