"""Run directories written by the flat pre-refactor layout keep working: finished stages are skipped, an
interrupted one resumes.

The old code is the commit before the house refactor, extracted from this
repository's own history (``git archive``) and run as a user ran it.
"""
from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

from pipeline.config import STUDENT_RECIPE, TrainConfig
from tests.conftest import ROOT, bench_torch_only, kill_when_written, run_cli, tree_digest

# The last commit with the flat layout (pipeline/stage.py, pipeline/teacher.py, ..., pipeline/latency.py).
OLD_LAYOUT_COMMIT = "edeb4e5"
STAGES = ["teacher", "distill", "fuse", "export", "bench", "report"]  # --no-baseline: the same code as distill

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def old_checkout(tmp_path_factory) -> Path:
    found = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{OLD_LAYOUT_COMMIT}^{{commit}}"],
                           capture_output=True)
    if found.returncode != 0:
        pytest.skip(f"commit {OLD_LAYOUT_COMMIT} is not in this clone (a shallow clone has no history)")
    dest = tmp_path_factory.mktemp("old-layout")
    archive = dest / "old.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), OLD_LAYOUT_COMMIT], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    assert (dest / "pipeline" / "stage.py").is_file() and not (dest / "pipeline" / "stages").exists()
    return dest


def _args(run_dir: Path, data_root: Path, *extra: str) -> list[str]:
    # the README's form (models named on the command line), the tiny profile, the stripes data; the bench times
    # torch only (both versions read this file)
    return ["run", "--profile", "tiny", "--teacher", "swin", "--student", "shufflenetv2", "--data-root",
            str(data_root), "--run-dir", str(run_dir), "--no-progress", "--no-baseline",
            *bench_torch_only(run_dir.parent), *extra]


def _actions(run_dir: Path) -> dict[str, str]:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return {name: stage.get("action") for name, stage in manifest["stages"].items()}


def test_a_finished_old_run_is_skipped_stage_by_stage(old_checkout, stripes_root, tmp_path):
    run = tmp_path / "run"
    old = run_cli(*_args(run, stripes_root), cwd=old_checkout)
    assert old.returncode == 0, old.stderr
    assert _actions(run) == {name: "ran" for name in STAGES}
    before = {k: v for k, v in tree_digest(run).items() if k.split("/")[0] in STAGES[:-1] or k == "config.yaml"}
    old_config_text = (run / "config.yaml").read_text()

    new = run_cli(*_args(run, stripes_root))
    assert new.returncode == 0, new.stderr
    # The teacher is reused as it is. The student trains again, once: the default method is now KD, its
    # fingerprint holds every method option's value (the old one only those given), and the tiny profile's partial
    # student.train now keeps the student's own recipe (the old merge replaced it with the teacher's). Everything
    # after it follows.
    rerun = set(STAGES) - {"teacher"}
    assert _actions(run) == {name: "ran" if name in rerun else "skipped" for name in STAGES}
    after = tree_digest(run)
    kept = {k: v for k, v in before.items() if k.split("/")[0] not in rerun and k != "config.yaml"}
    assert {k: after[k] for k in kept} == kept  # nothing else rewritten
    # config.yaml says the same settings, plus those added since (written out with their defaults)
    old_config, new_config = yaml.safe_load(old_config_text), yaml.safe_load((run / "config.yaml").read_text())
    assert new_config["student"].pop("teacher_precision") == "auto"
    assert new_config["data"].pop("validation") is None and new_config.pop("baselines") == ["none"]
    assert new_config.pop("keep_checkpoints") is False and new_config["student"].pop("subset") is None
    # the default method followed the evidence (pipeline.config.DEFAULT_METHOD_EVIDENCE)
    assert old_config["student"].pop("method") == "kdiffusion" and new_config["student"].pop("method") == "dkd"
    for key, default in (("int8", True), ("calibration_images", 32), ("int8_preset", "mixed"), ("int8_max_drop", 1.0),
                         ("int8_min_agreement", 97.0), ("int8_eval_images", None), ("int8_saturation_safe", True),
                         ("int8_confidence", 0.95), ("reference_images", 32)):
        assert new_config["export"].pop(key) == default  # the INT8 step, reference answers: added since
    for key in ("lr", "weight_decay", "grad_clip"):
        assert old_config["student"]["train"].pop(key) == getattr(TrainConfig(), key)  # the teacher's recipe
        assert new_config["student"]["train"].pop(key) == STUDENT_RECIPE[key]
    assert new_config == old_config


def test_an_interrupted_old_run_resumes(old_checkout, stripes_root, tmp_path):
    """The old code is killed after the teacher's first epoch; the new code resumes the teacher from the old
    layout's checkpoint with the old run's own config.yaml (the stages after it are test 1's subject)."""
    run = tmp_path / "run"
    kill_when_written(_args(run, stripes_root, "--teacher-epochs", "2"), run / "teacher" / "checkpoints" / "last.pt",
                      cwd=old_checkout)

    new = run_cli("teacher", "--config", str(run / "config.yaml"), "--data-root", str(stripes_root), "--run-dir",
                  str(run), "--no-progress")
    assert new.returncode == 0, new.stderr
    assert "resuming teacher from epoch 1" in new.stderr
    epochs = [json.loads(line)["epoch"] for line in (run / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    assert json.loads((run / "teacher" / "metrics.json").read_text())["resumed_from_epoch"] == 1
