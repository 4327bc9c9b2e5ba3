"""`pipeline run` end to end on the tiny profile: every stage, artifact and gate; rerun skips; SIGKILL resumes;
bad input loses nothing. Real data (Debian's Fashion-MNIST), real CLI in subprocesses."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.training.checkpoint import file_sha256
from tests.conftest import bench_torch_only, clone_run, kill_when_written, run_cli, tree_digest

pytestmark = pytest.mark.slow
STAGES = ["teacher", "distill", "baseline", "fuse", "export", "bench", "report"]


def run_tiny(run_dir: Path, data_root: Path, *extra: str):
    return run_cli("run", "--profile", "tiny", "--run-dir", str(run_dir), "--data-root", str(data_root),
                   "--no-progress", *extra)


@pytest.fixture(scope="module")
def finished_run(tiny_run) -> Path:
    return tiny_run


def test_the_whole_chain_writes_every_artifact_and_passes_every_gate(finished_run):
    run = finished_run
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["run"]["status"] == "complete" and manifest["run"]["dataset"] == "fashion-mnist"
    assert list(manifest["stages"]) == STAGES
    for name, stage in manifest["stages"].items():
        assert stage["status"] == "complete" and stage["action"] == "ran" and stage["wall_s"] > 0, name
        assert stage["settings_hash"], name
        for path, digest in stage["outputs"].items():
            assert digest == file_sha256(run / path), path
    assert manifest["stages"]["export"]["inputs"]["fused/model.pt"] == file_sha256(run / "fused" / "model.pt")

    assert json.loads((run / "fused" / "equivalence.json").read_text())["passed"]
    assert json.loads((run / "export" / "equivalence.json").read_text())["passed"]
    for artifact in ("model.onnx", "openvino/model.xml", "openvino/model.bin", "openvino/model_fp16.xml",
                     "manifest.json"):
        assert (run / "export" / artifact).is_file(), artifact
    latency = json.loads((run / "bench" / "latency.json").read_text())
    assert {r["backend"] for r in latency["results"] if r["status"] == "ok"} == {"torch", "onnxruntime", "openvino"}

    report = json.loads((run / "report.json").read_text())
    roles = {a["role"]: a["top1"] for a in report["accuracy"]}
    assert set(roles) == {"teacher", "baseline", "student", "fused"}
    assert roles["fused"] == pytest.approx(roles["student"], abs=1.0)  # same function, same test images
    markdown = (run / "report.md").read_text()
    for plot in report["plots"].values():
        assert (run / plot).stat().st_size > 1000 and f"]({plot})" in markdown
    for heading in ("## Accuracy", "## Equivalence", "## Latency", "## Artifacts", "## Stages"):
        assert heading in markdown


def test_exported_onnx_predicts_what_the_fused_pytorch_student_predicts(finished_run, fashion_root):
    from exporters.runtime import Classifier
    from pipeline.layout import RunLayout
    from pipeline.stages.loaders import held_out, load_fused

    model, info = load_fused(RunLayout(finished_run))
    images, _ = held_out({"dataset": "fashion-mnist", "image_size": info["input_size"][-1]}, str(fashion_root), 100)
    with torch.no_grad():
        expected = model(images).argmax(1).numpy()
    got = Classifier(finished_run / "export" / "model.onnx").logits(images.numpy()).argmax(1)
    np.testing.assert_array_equal(got, expected)


def test_the_report_states_the_arithmetic_and_that_the_gain_is_one_seed(finished_run):
    report = json.loads((finished_run / "report.json").read_text())
    assert report["precision"] == {"teacher": "fp32", "student": "fp32", "baseline": "fp32"}
    text = (finished_run / "report.md").read_text()
    assert "Training arithmetic: teacher fp32, student fp32, baseline fp32." in text
    assert "Distillation gain over the student alone:" in text and "from one seed" in text


def test_rerun_skips_every_stage(finished_run, fashion_root, tmp_path):
    run = tmp_path / "run"
    clone_run(finished_run, run)
    before = tree_digest(run / "teacher") | tree_digest(run / "export")
    result = run_tiny(run, fashion_root)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((run / "manifest.json").read_text())
    assert {name: s["action"] for name, s in manifest["stages"].items()} == {name: "skipped" for name in STAGES}
    assert tree_digest(run / "teacher") | tree_digest(run / "export") == before

    result = run_tiny(run, fashion_root, "--force", "report")  # --force STAGE: that stage and the ones after it
    assert result.returncode == 0, result.stderr
    actions = {n: s["action"] for n, s in json.loads((run / "manifest.json").read_text())["stages"].items()}
    assert [n for n in STAGES if actions[n] == "ran"] == ["report"], actions


def test_changing_a_setting_reruns_that_stage_and_the_later_ones_only(finished_run, fashion_root, tmp_path):
    run = tmp_path / "run"
    clone_run(finished_run, run)
    # the distillation's own setting (its default is 2): the baseline is unaffected
    changed = ("--method-option", "temperature=3")
    result = run_tiny(run, fashion_root, *changed, *bench_torch_only(tmp_path))
    assert result.returncode == 0, result.stderr
    actions = {n: s["action"] for n, s in json.loads((run / "manifest.json").read_text())["stages"].items()}
    assert actions["teacher"] == "skipped" and actions["baseline"] == "skipped", actions
    assert all(actions[n] == "ran" for n in ("distill", "fuse", "export", "bench", "report")), actions


def test_more_baselines_train_beside_the_student_and_reach_the_report(finished_run, fashion_root, tmp_path):
    """`--baselines none,kd`: KD with its defaults trains the same student with the same budget into
    baseline/kd/, the report lists it, and nothing else trains again; an unknown method is refused by name.
    Neither that nor another bench setting re-exports the model: the shipped files keep their sha256."""
    run = tmp_path / "run"
    clone_run(finished_run, run)
    alone, shipped = tree_digest(run / "baseline" / "student"), tree_digest(run / "export")
    result = run_tiny(run, fashion_root, "--baselines", "none,kd", *bench_torch_only(tmp_path))
    assert result.returncode == 0, result.stderr
    actions = {n: s["action"] for n, s in json.loads((run / "manifest.json").read_text())["stages"].items()}
    assert actions == {**{n: "skipped" for n in STAGES}, "baseline-kd": "ran", "bench": "ran", "report": "ran"}, \
        actions
    assert tree_digest(run / "baseline" / "student") == alone and tree_digest(run / "export") == shipped
    kd = json.loads((run / "baseline" / "kd" / "student" / "metrics.json").read_text())
    assert kd["arch"]["method"] == "kd" and kd["arch"]["teacher"]["sha256"]
    rows = {a["role"]: a for a in json.loads((run / "report.json").read_text())["accuracy"]}
    assert rows["baseline-kd"]["top1"] == kd["top1"] and "student with kd" in rows["baseline-kd"]["model"]
    assert "student with kd" in (run / "report.md").read_text()

    result = run_tiny(run, fashion_root, "--baselines", "none,nope")
    assert result.returncode == 2 and "unknown method 'nope'; valid:" in result.stderr


def test_sigkill_mid_distillation_then_rerun_resumes(finished_run, fashion_root, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    clone_run(finished_run / "teacher", run / "teacher")  # the teacher stage is done
    args = ["run", "--profile", "tiny", "--run-dir", str(run), "--data-root", str(fashion_root), "--no-progress",
            "--student-epochs", "2", "--no-baseline", "--no-int8", *bench_torch_only(tmp_path)]
    kill_when_written(args, run / "student" / "checkpoints" / "last.pt")
    assert not (run / "student" / "stage.json").exists()  # killed before the distillation finished

    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["teacher"]["action"] == "skipped"
    assert manifest["stages"]["distill"]["action"] == "resumed"
    metrics = json.loads((run / "student" / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] >= 1 and metrics["epochs"] == 2
    assert manifest["run"]["status"] == "complete"


def test_bad_input_through_run(finished_run, fashion_root, tmp_path):
    result = run_tiny(tmp_path / "a", fashion_root, "--teacher", "vgg99")
    assert result.returncode == 2 and "unknown" in result.stderr and "swin_t" in result.stderr
    result = run_tiny(tmp_path / "a", fashion_root, "--student", "nope")
    assert result.returncode == 2 and "shufflenetv2_x1_0" in result.stderr
    result = run_tiny(tmp_path / "a", fashion_root, "--profile", "huge")
    assert result.returncode == 2 and "unknown profile 'huge'; valid: default, full, tiny" in result.stderr
    result = run_tiny(tmp_path / "a", fashion_root, "--force", "everything")
    assert result.returncode == 2 and "unknown stage 'everything'" in result.stderr

    before = tree_digest(finished_run)
    result = run_cli("run", "--profile", "tiny", "--run-dir", str(finished_run), "--dataset", "cifar10",
                     "--no-progress")
    assert result.returncode == 2
    assert f"run directory {finished_run} holds a run on fashion-mnist, not cifar10" in result.stderr
    assert tree_digest(finished_run) == before


def _read_only(folder: Path):
    """Make ``folder`` read-only even for root (a read-only bind mount); returns an undo function."""
    if os.geteuid() != 0:
        subprocess.run(["chmod", "-R", "a-w", str(folder)], check=True)
        return lambda: subprocess.run(["chmod", "-R", "u+w", str(folder)], check=True)
    bind = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot simulate a read-only run directory as root without mount: {bind.stderr.decode()}")
    ro = subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True)
    if ro.returncode != 0:
        subprocess.run(["umount", str(folder)])
        pytest.skip(f"cannot remount read-only: {ro.stderr.decode()}")
    return lambda: subprocess.run(["umount", str(folder)], check=True)


def test_read_only_run_directory_gives_a_clear_error_and_loses_nothing(finished_run, fashion_root, tmp_path):
    run = tmp_path / "run"
    clone_run(finished_run, run)
    before = tree_digest(run)
    undo = _read_only(run)
    try:
        result = run_tiny(run, fashion_root, "--force", "export")
        assert result.returncode == 6, result.stderr
        assert "error: cannot write" in result.stderr and "finished stages are kept" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        undo()
    assert tree_digest(run) == before
    result = run_tiny(run, fashion_root)  # writable again: nothing to redo
    assert result.returncode == 0, result.stderr
