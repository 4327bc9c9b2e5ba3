"""The distill stage with a teacher (kd, dkd) through the real CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY, clone_run, run_cli, tree_digest


@pytest.mark.parametrize("method,options", [
    ("kd", ["--method-option", "temperature=2"]),
    ("dkd", ["--method-option", "beta=4", "--method-option", "warmup=1"]),
    ("fitnet", ["--points", "multi", "--method-option", "lambda_kd=0.5"]),  # FitNet+KD
    ("at", ["--points", "multi"]),
    ("kdiffusion", ["--branches", "2", "--method-option", "lambda_kd=0.5"]),
])
def test_distill_stripes_teacher_saves_student_only_and_fuses(method, options, stripes_teacher, stripes_root, tmp_path):
    run_dir = tmp_path / "run"
    clone_run(stripes_teacher, run_dir)
    teacher_before = tree_digest(run_dir / "teacher")
    result = run_cli("distill", "--student", "shufflenetv2_x0_5", "--method", method, *options, "--data-root",
                     str(stripes_root), "--epochs", "1", "--run-dir", str(run_dir), *TINY)
    assert result.returncode == 0, result.stderr
    assert "teacher forward:" in result.stderr  # precision choice with its measured logit difference
    meta = json.loads((run_dir / "student" / "metrics.json").read_text())
    assert meta["arch"]["method"] == method and meta["arch"]["teacher"]["sha256"]
    given = dict(option.split("=") for option in options if "=" in option)
    assert all(str(meta["arch"]["method_options"][key]) == value for key, value in given.items())  # recorded
    state = torch.load(run_dir / "student" / "model.pt", weights_only=True)
    assert not any(k.startswith(("teacher", "method", "layer")) for k in state), "teacher/loss state leaked"
    assert any(k.startswith("conv5.0.convs.") for k in state)
    fused = run_cli("fuse", "--run-dir", str(run_dir), "--data-root", str(stripes_root), "--images", "32")
    assert fused.returncode == 0, fused.stderr
    assert tree_digest(run_dir / "teacher") == teacher_before


def test_crd_gets_every_training_image_index_from_the_engine(stripes_teacher, stripes_root, tmp_path):
    """One epoch visits each of the 320 training images once: every row of both memory banks has been written
    (unit norm; the initial rows are not), so the engine handed the method each image's own index. The banks live
    in the resume state, which a finished stage keeps only with --keep-checkpoints."""
    run_dir = clone_run(stripes_teacher, tmp_path / "run")
    result = run_cli("distill", "--student", "shufflenetv2_x0_5", "--method", "crd", "--method-option",
                     "negatives=256", "--data-root", str(stripes_root), "--epochs", "1", "--run-dir", str(run_dir),
                     "--keep-checkpoints", *TINY)
    assert result.returncode == 0, result.stderr
    assert (run_dir / "student" / "checkpoints" / "best.pt").is_file()
    task = torch.load(run_dir / "student" / "checkpoints" / "last.pt", weights_only=True)["task"]
    for bank in ("student_memory_0", "teacher_memory_0"):
        norms = task[f"method.{bank}"].norm(dim=1)
        assert norms.shape == (320,) and torch.allclose(norms, torch.ones(320), atol=1e-5), bank


def _two_class_folder(root: Path) -> str:
    from tests.test_data import _write_imagefolder

    _write_imagefolder(root)
    return str(root)


@pytest.mark.parametrize("args,expected", [
    (["--method", "kd", "--method-option", "alpha=1.5"], "method 'kd': alpha must be in [0, 1]"),
    (["--method", "dkd", "--method-option", "beta=-1"], "method 'dkd': beta must be >= 0"),
    (["--method", "kd", "--method-option", "gamma=1"], "method 'kd' has no option(s) gamma; valid: alpha, temperature"),
    (["--method", "kd", "--method-option", "oops"], "expected KEY=VALUE"),
    (["--method", "fitnet", "--method-option", "lambda_kd=-1"], "method 'fitnet': lambda_kd must be >= 0"),
])
def test_distill_option_errors(args, expected, stripes_teacher, stripes_root):
    result = run_cli("distill", "--data-root", str(stripes_root), "--run-dir", str(stripes_teacher), *TINY, *args)
    assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_teacher_of_other_classes_is_refused(stripes_teacher, tmp_path):
    folder = _two_class_folder(tmp_path / "images")
    result = run_cli("distill", "--method", "kd", "--dataset", f"imagefolder:{folder}", "--image-size", "32",
                     "--teacher-ckpt", str(stripes_teacher / "teacher" / "model.pt"), "--run-dir", str(tmp_path / "r"),
                     "--no-progress")
    assert result.returncode == 2
    assert "has 10 classes but dataset imagefolder:" in result.stderr and "has 2" in result.stderr


def test_missing_teacher_says_how_to_get_one(stripes_root, tmp_path):
    result = run_cli("distill", "--method", "kd", "--data-root", str(stripes_root), "--run-dir", str(tmp_path / "r"),
                     *TINY)
    assert result.returncode == 2 and "pipeline teacher" in result.stderr


def test_teacher_cache_serves_repeated_inputs_and_is_off_with_random_crops(stripes_teacher, stripes_root, tmp_path):
    """Through the real CLI: without augmentation epoch 2 never runs the teacher; with crop-flip no cache."""
    common = ["distill", "--student", "shufflenetv2_x0_5", "--method", "kdiffusion", "--branches", "2",
              "--data-root", str(stripes_root), "--teacher-ckpt", str(stripes_teacher / "teacher" / "model.pt"), *TINY]
    result = run_cli(*common, "--augment", "none", "--epochs", "2", "--run-dir", str(tmp_path / "none"))
    assert result.returncode == 0, result.stderr
    assert "teacher cache after epoch 1: 320 images (" in result.stderr and "0 hits and 320 misses" in result.stderr
    assert "distilled student: teacher cache in the last epoch: 320 images (" in result.stderr
    assert "320 hits and 0 misses (hit rate 100.0%)" in result.stderr
    meta = json.loads((tmp_path / "none" / "student" / "metrics.json").read_text())
    assert meta["arch"]["teacher"]["cache"] == {"dtype": "float16", "max_mb": 2048}
    result = run_cli(*common, "--augment", "crop-flip", "--epochs", "1", "--run-dir", str(tmp_path / "crop"))
    assert result.returncode == 0, result.stderr
    assert "teacher cache off: augmentation 'crop-flip'" in result.stderr and "teacher cache after" not in result.stderr
    meta = json.loads((tmp_path / "crop" / "student" / "metrics.json").read_text())
    assert meta["arch"]["teacher"]["cache"] is None


def test_the_teachers_precision_is_a_setting_in_the_fingerprint(stripes_teacher, stripes_root, tmp_path):
    """No timing probe decides the teacher's arithmetic: auto is fp32 on a CPU (the fingerprint of runs made before
    the setting existed), an explicit bf16 is recorded and makes another distillation."""
    import torch

    from pipeline.stages.distill import teacher_precision

    assert teacher_precision("auto", torch.device("cpu")) == "fp32"
    run_dir = clone_run(stripes_teacher, tmp_path / "run")
    common = ["distill", "--student", "shufflenetv2_x0_5", "--method", "kd", "--data-root", str(stripes_root),
              "--epochs", "1", "--run-dir", str(run_dir), *TINY]
    result = run_cli(*common)
    assert result.returncode == 0, result.stderr
    first = json.loads((run_dir / "student" / "stage.json").read_text())
    assert first["arch"]["teacher"]["precision"] == "fp32" and "-teacher-" not in first["settings_hash"]
    result = run_cli(*common, "--teacher-precision", "bf16")
    assert result.returncode == 0, result.stderr
    second = json.loads((run_dir / "student" / "stage.json").read_text())
    assert second["settings_hash"] == first["settings_hash"] + "-teacher-bf16"
    assert second["arch"]["teacher"]["precision"] == "bf16" and "bf16_top1_agreement" in second["arch"]["teacher"]


def test_the_student_can_train_on_fewer_labelled_images_than_its_teacher(stripes_teacher, stripes_root, tmp_path):
    """``--student-subset``: the few-labels setting (a teacher on every image, the student on a stratified few)."""
    run_dir = clone_run(stripes_teacher, tmp_path / "run")
    common = ["distill", "--student", "shufflenetv2_x0_5", "--data-root", str(stripes_root), "--epochs", "1",
              "--run-dir", str(run_dir), *TINY]
    result = run_cli(*common, "--student-subset", "80")
    assert result.returncode == 0, result.stderr
    meta = json.loads((run_dir / "student" / "metrics.json").read_text())
    teacher = json.loads((run_dir / "teacher" / "metrics.json").read_text())
    assert (meta["train_images"], teacher["train_images"]) == (80, 320)
    too_many = run_cli(*common, "--student-subset", "321")
    assert too_many.returncode == 2, too_many.stderr
    assert "student.subset: 321 is larger than the split (320 images)" in too_many.stderr
