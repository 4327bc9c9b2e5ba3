"""A real 2-process torchrun (gloo, CPU) against a single process with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_cli

# SGD keeps float-rounding differences between 1 and 2 processes at rounding size (Adam would
# amplify them for parameters whose gradients are near zero); Swin has no BatchNorm, whose
# statistics are per process by design.
COMMON = ["teacher", "--teacher", "swin", "--subset", "128", "--eval-subset", "64", "--batch-size", "32",
          "--epochs", "2", "--precision", "fp32", "--optimizer", "sgd", "--lr", "0.05", "--warmup-epochs", "0",
          "--drop-path", "0", "--seed", "5", "--no-progress"]
PARAM_TOLERANCE = 1e-4  # max |weight difference| between the 2-process and the 1-process run


def test_torchrun_two_processes_match_single_process(tmp_path, stripes_root):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    ddp = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "pipeline", *COMMON,
                          "--data-root", str(stripes_root), "--run-dir", str(ddp_dir)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert not any(ddp_dir.glob("*/checkpoints")), "rank 0 removes a finished stage's resume state"
    single = subprocess.run([sys.executable, "-m", "pipeline", *COMMON, "--data-root", str(stripes_root),
                             "--run-dir", str(single_dir)], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]

    ddp_metrics = json.loads((ddp_dir / "teacher" / "metrics.json").read_text())
    single_metrics = json.loads((single_dir / "teacher" / "metrics.json").read_text())
    assert ddp_metrics["world_size"] == 2 and single_metrics["world_size"] == 1
    assert ddp_metrics["replica_max_abs_diff"] == 0.0  # both ranks end with identical parameters
    assert ddp_metrics["test_images"] == single_metrics["test_images"] == 64  # all-reduced, nothing twice

    a = torch.load(ddp_dir / "teacher" / "model.pt", weights_only=True)
    b = torch.load(single_dir / "teacher" / "model.pt", weights_only=True)
    max_diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    assert max_diff <= PARAM_TOLERANCE, f"2-process and 1-process weights differ by {max_diff:.2e}"
    assert abs(ddp_metrics["test_loss"] - single_metrics["test_loss"]) < 1e-3
    print(f"max |w_ddp - w_single| = {max_diff:.2e}")


def test_a_collective_timeout_that_is_not_a_number_is_refused_in_one_line(tmp_path, stripes_root):
    result = run_cli(*COMMON, "--data-root", str(stripes_root), "--run-dir", str(tmp_path / "run"),
                     env={"PIPELINE_DIST_TIMEOUT": "ten minutes"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "error: PIPELINE_DIST_TIMEOUT='ten minutes' is not a positive number of seconds"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["inf", "1e12"])
def test_a_collective_timeout_past_a_week_is_refused_in_one_line(monkeypatch, value):
    """inf (or a typo's 10^12 s) passed the positivity check, and a timedelta cannot hold inf."""
    from pipeline.errors import BadInputError
    from pipeline.training.distributed import seconds_setting

    monkeypatch.setenv("PIPELINE_DIST_TIMEOUT", value)
    with pytest.raises(BadInputError, match="is over a week"):
        seconds_setting("PIPELINE_DIST_TIMEOUT", 900.0)
    monkeypatch.setenv("PIPELINE_DIST_TIMEOUT", "120")
    assert seconds_setting("PIPELINE_DIST_TIMEOUT", 900.0) == 120.0
