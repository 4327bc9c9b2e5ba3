"""`python -m exporters bench`: latency of exported files on the machine that runs them, torch-free, timed by the
code `pipeline bench` uses. Real ONNX Runtime and OpenVINO sessions on a tiny run's real export."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

# Runs the runtime's CLI and fails if anything imported torch or pipeline on the way (a device has neither).
NO_TORCH = ("import runpy, sys; sys.argv = ['exporters'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('exporters', run_name='__main__')\n"
            "finally:\n    heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'pipeline'))\n"
            "    assert not heavy, heavy\n")


def exporters_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def export_dir(tiny_run) -> Path:
    return tiny_run / "export"


def test_bench_times_each_file_per_batch_size_without_torch(export_dir, tmp_path):
    out = tmp_path / "latency.json"
    result = exporters_cli("bench", "--model", str(export_dir / "model.onnx"), "--model",
                           str(export_dir / "model_int8.onnx"), "--model", str(export_dir / "openvino" / "model.xml"),
                           "--batch-sizes", "1,3", "--iterations", "5", "--warmup", "2", "--threads", "1",
                           "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "p50 ms" in result.stdout and "p99 ms" in result.stdout and "model_int8.onnx" in result.stdout
    latency = json.loads(out.read_text())
    rows = latency["results"]
    assert {(r["backend"], r["variant"], r["batch"]) for r in rows} == {
        ("onnxruntime", "model.onnx", 1), ("onnxruntime", "model.onnx", 3), ("onnxruntime", "model_int8.onnx", 1),
        ("onnxruntime", "model_int8.onnx", 3), ("openvino", "model.xml", 1), ("openvino", "model.xml", 3)}
    for r in rows:
        assert r["status"] == "ok" and r["threads"] == 1 and r["iterations"] >= 5
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["throughput_ips"] > 0
    assert latency["budget"]["warmup"] == 2 and latency["batch_sizes"] == [1, 3]
    assert latency["model"]["input_size"] == [3, 32, 32]
    machine = latency["machine"]
    assert machine["arch"] and machine["cpu"] and machine["versions"]["onnxruntime"]
    assert f"({machine['arch']}, " in result.stdout.splitlines()[0]
    assert "torch" not in machine["versions"]
    assert {q["ratio"] for q in latency["ratios"]} == {"model_int8.onnx/model.onnx"}


def test_bench_json_to_stdout_with_a_time_budget(export_dir):
    result = exporters_cli("bench", "--model", str(export_dir / "model_int8.onnx"), "--batch-sizes", "2",
                           "--duration", "0.3", "--warmup", "1", "--json", "-")
    assert result.returncode == 0, result.stderr
    latency = json.loads(result.stdout[result.stdout.index("\n{") + 1:])
    (row,) = latency["results"]
    assert row["batch"] == 2 and row["iterations"] >= 3 and latency["budget"]["duration_s"] == 0.3


@pytest.mark.parametrize("args,message", [
    (["--model", "missing.onnx"], "model file missing.onnx does not exist"),
    (["--model", "{export}/../fused/model.pt"], "unknown model format '.pt'; valid: .onnx"),
    (["--model", "{export}/model.onnx", "--batch-sizes", "1,x"], "batch sizes must be integers"),
    (["--model", "{export}/model.onnx", "--batch-sizes", "0"], "batch sizes must be >= 1"),
])
def test_bench_bad_input_is_one_line_and_exit_2(export_dir, args, message):
    result = exporters_cli("bench", *[a.format(export=export_dir) for a in args])
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bench_refuses_a_file_without_pipeline_metadata(export_dir, tmp_path):
    import onnx

    proto = onnx.load(str(export_dir / "model.onnx"))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    result = exporters_cli("bench", "--model", str(bare))
    assert result.returncode == 2 and "no square C x H x W input_size" in result.stderr, result.stderr
