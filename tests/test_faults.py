"""Faults injected into finished run directories and inputs: nothing corrupted passes as finished, nothing unsafe
is loaded, and every failure is one line with its documented exit code."""
from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exporters.formats import read_metadata
from tests.conftest import (
    ROOT,
    TINY,
    clone_run,
    kill_when_written,
    run_cli,
    tree_digest,
)


def _actions(run_dir: Path) -> dict[str, str]:
    return {name: s.get("action") for name, s in json.loads((run_dir / "manifest.json").read_text())["stages"].items()}


def _replace(path: Path, data: bytes) -> None:
    """Write a file anew (never into a hard link shared with the fixture)."""
    path.unlink()
    path.write_bytes(data)


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    _replace(path, bytes(data))


def _rerun(run_dir: Path, fashion_root: Path, *extra: str):
    return run_cli("run", "--profile", "tiny", "--run-dir", str(run_dir), "--data-root", str(fashion_root),
                   "--no-progress", *extra)


@pytest.mark.slow
def test_a_truncated_onnx_file_makes_the_export_stage_run_again(tiny_run, fashion_root, tmp_path):
    run = clone_run(tiny_run, tmp_path / "run")
    onnx_file = run / "export" / "model.onnx"
    original = onnx_file.read_bytes()
    _replace(onnx_file, original[: len(original) // 2])
    result = _rerun(run, fashion_root)
    assert result.returncode == 0, result.stderr
    assert f"export: {onnx_file} is not the file this stage wrote" in result.stderr
    actions = _actions(run)
    assert actions["export"] == "ran" and all(actions[n] == "skipped" for n in ("teacher", "distill", "fuse"))
    assert onnx_file.read_bytes() == original  # the export is deterministic: the same file again


@pytest.mark.slow
def test_a_bit_flip_in_the_fused_weights_makes_the_fuse_stage_run_again(tiny_run, fashion_root, tmp_path):
    run = clone_run(tiny_run, tmp_path / "run")
    fused = run / "fused" / "model.pt"
    original = fused.read_bytes()
    _flip_a_bit(fused)
    result = _rerun(run, fashion_root)
    assert result.returncode == 0, result.stderr
    assert f"fused: {fused} is not the file this stage wrote" in result.stderr
    assert _actions(run)["fuse"] == "ran" and fused.read_bytes() == original


def test_verify_on_a_copied_export_folder(tiny_run, tmp_path):
    folder = clone_run(tiny_run / "export", tmp_path / "export")
    result = run_cli("verify", str(folder))
    assert result.returncode == 0, result.stderr
    assert "verified:" in result.stdout and "ok  model.onnx" in result.stdout
    assert "openvino/model.xml: top-1 agrees with its reference answers on 32/32 images" in result.stdout

    _flip_a_bit(folder / "openvino" / "model.bin")
    result = run_cli("verify", str(folder))
    assert result.returncode == 3, result.stderr
    assert f"error: {folder / 'openvino' / 'model.bin'} does not match manifest.json" in result.stderr

    (folder / "openvino" / "model.bin").unlink()
    result = run_cli("verify", str(folder))
    assert result.returncode == 2 and "is listed in manifest.json but does not exist" in result.stderr
    (tmp_path / "empty").mkdir()
    result = run_cli("verify", str(tmp_path / "empty"))
    assert result.returncode == 2 and "not an export folder" in result.stderr


def test_export_verify_checks_the_manifest_before_the_numbers(tiny_run, fashion_root, tmp_path):
    run = clone_run(tiny_run, tmp_path / "run")
    onnx_file = run / "export" / "model.onnx"
    _replace(onnx_file, onnx_file.read_bytes()[:1000])
    result = run_cli("export", "--verify", "--run-dir", str(run), "--data-root", str(fashion_root))
    assert result.returncode == 3, result.stderr
    assert f"error: {onnx_file} does not match manifest.json" in result.stderr and "Traceback" not in result.stderr


def test_an_unreadable_model_is_one_line_with_exit_code_2(tiny_run, tmp_path):
    broken = tmp_path / "model.onnx"
    broken.write_bytes((tiny_run / "export" / "model.onnx").read_bytes()[:500])
    image = tmp_path / "x.png"
    image.write_bytes(b"not read")
    result = run_cli("predict", "--model", str(broken), str(image))
    assert result.returncode == 2 and f"error: onnxruntime cannot load {broken}" in result.stderr
    assert "Traceback" not in result.stderr


class _RunsCode:
    """What a crafted pickle does: call any function on load (here: create a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_cifar_pickle_is_refused_and_runs_nothing(tmp_path):
    from pipeline.errors import BadInputError
    from pipeline.training.data import load_dataset

    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch"):
        (folder / name).write_bytes(pickle.dumps({"payload": _RunsCode(marker)}))
    with pytest.raises(BadInputError, match="refused to load posix.system"):
        load_dataset("cifar10", str(tmp_path))
    assert not marker.exists()


def test_real_cifar_batches_still_load(tmp_path):
    """The restricted reader takes what CIFAR's files hold: dicts, lists and uint8 arrays (protocol 2, as
    Python 3 writes it: bytes through _codecs.encode)."""
    import numpy as np

    from pipeline.training.data import load_dataset

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    meta = {"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": 20}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"):
        batch = {"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), "labels": list(range(10)) * 2}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    bundle = load_dataset("cifar10", str(tmp_path))
    assert len(bundle.train) == 100 and len(bundle.test) == 20 and bundle.classes[0] == "c0"


def test_a_run_dir_below_a_file_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_cli("run", "--profile", "tiny", "--run-dir", str(blocker / "run"))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "is in the way" in result.stderr


def test_bad_input_on_a_fresh_run_dir_leaves_no_trace(tmp_path):
    run = tmp_path / "fresh"
    result = run_cli("run", "--profile", "tiny", "--run-dir", str(run), "--data-root", str(tmp_path / "nothing"))
    assert result.returncode == 2 and "data root not found" in result.stderr
    assert not run.exists()


def test_method_options_are_checked_before_any_stage(tmp_path):
    run = tmp_path / "fresh"
    result = run_cli("run", "--profile", "tiny", "--run-dir", str(run), "--method-option", "foo=1")
    assert result.returncode == 2
    assert "method 'dkd' has no option(s) foo" in result.stderr and not run.exists()


@pytest.mark.parametrize("profile", ["../../../etc/hostname", "tiny/../../x", "nope"])
def test_a_profile_name_never_leaves_the_profiles_folder(profile, tmp_path):
    result = run_cli("run", "--profile", profile, "--run-dir", str(tmp_path / "r"))
    assert result.returncode == 2 and "unknown profile" in result.stderr and "default, full, tiny" in result.stderr


def test_a_profile_can_be_a_yaml_file(tmp_path):
    from pipeline.config import resolve_config

    path = tmp_path / "mine.yaml"
    path.write_text("data: {subset: 123}\n")
    assert resolve_config(profile=str(path)).data.subset == 123


def test_a_finished_stage_with_a_replaced_output_is_not_finished(tmp_path):
    from pipeline.layout import StageFolder
    from pipeline.stages.base import Stage

    stage = Stage(StageFolder(tmp_path / "s"), "s")
    stage.dir.mkdir()
    (stage.dir / "a.bin").write_bytes(b"abc")
    stage.mark_complete("h", ["a.bin"], {})
    before = tree_digest(stage.dir)
    assert stage.finished("h") is not None and stage.finished("other") is None
    _replace(stage.dir / "a.bin", b"abd")
    assert stage.finished("h") is None
    assert tree_digest(stage.dir).keys() == before.keys()  # checking changes nothing


def _with_file_limit(kib: int, *args: str) -> subprocess.CompletedProcess:
    """The CLI under `ulimit -f` (largest file it may write, in KiB): a full disk, reproducibly."""
    command = " ".join(shlex.quote(a) for a in (sys.executable, "-m", "pipeline", *args))
    return subprocess.run(["bash", "-c", f"ulimit -f {kib} && exec {command}"], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def test_a_full_disk_during_a_checkpoint_exits_6_and_leaves_no_torn_file(stripes_root, tmp_path):
    run = tmp_path / "run"
    result = _with_file_limit(2048, "teacher", "--teacher", "swin", "--data-root", str(stripes_root), "--epochs",
                              "1", "--run-dir", str(run), *TINY)
    assert result.returncode == 6, result.stderr
    assert "error: cannot write" in result.stderr and "Traceback" not in result.stderr
    leftovers = [p.name for p in run.rglob("*") if p.is_file() and p.name != ".lock"]
    assert not [name for name in leftovers if name.endswith(".tmp") or name.endswith(".pt")], leftovers


def test_a_full_disk_during_export_exits_6_and_keeps_the_shipped_files(tiny_run, fashion_root, tmp_path):
    run = clone_run(tiny_run, tmp_path / "run")
    before = tree_digest(run / "export")
    result = _with_file_limit(1024, "export", "--run-dir", str(run), "--data-root", str(fashion_root), "--images",
                              "17")
    assert result.returncode == 6, result.stderr
    assert "error: cannot write" in result.stderr and "Traceback" not in result.stderr
    after = tree_digest(run / "export")
    assert {k: v for k, v in after.items() if k != "stage.json"} == {k: v for k, v in before.items()
                                                                     if k != "stage.json"}
    assert not [p for p in (run / "export").iterdir() if p.name.startswith(".")]


def test_a_second_command_on_a_busy_run_dir_is_refused_at_once(tiny_run, tmp_path):
    from pipeline.layout import RunLayout
    from pipeline.runlock import hold_run_dir

    run = clone_run(tiny_run, tmp_path / "run")
    with hold_run_dir(RunLayout(run)):
        started = time.monotonic()
        result = run_cli("run", "--profile", "tiny", "--run-dir", str(run))
        assert time.monotonic() - started < 60
    assert result.returncode == 2, result.stderr
    assert f"run directory {run} is in use by pid {os.getpid()}" in result.stderr
    result = run_cli("export", "--run-dir", str(run), "--images", "16")  # free again: the lock went with its holder
    assert result.returncode == 0, result.stderr


def test_a_killed_commands_running_stage_is_reported_interrupted(tiny_run, fashion_root, tmp_path):
    run = clone_run(tiny_run, tmp_path / "run")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"]["export"]["status"] = "running"  # what a SIGKILL during export leaves
    (run / "manifest.json").unlink()
    (run / "manifest.json").write_text(json.dumps(manifest))
    stray = run / "export" / ".model.onnx.abc123.tmp"
    stray.write_bytes(b"half a file")
    from pipeline.config import resolve_config
    from pipeline.layout import RunLayout
    from pipeline.orchestrate import Manifest, remove_leftovers

    assert Manifest(RunLayout(run), resolve_config(profile="tiny"), "tiny").data["stages"]["export"]["status"] == \
        "interrupted"
    remove_leftovers(RunLayout(run).export)
    assert not stray.exists() and (run / "export" / "model.onnx").exists()


def test_an_empty_class_folder_is_refused_by_name(tmp_path):
    from pipeline.errors import BadInputError
    from pipeline.training.data import load_dataset
    from tests.test_data import _write_imagefolder

    _write_imagefolder(tmp_path)
    (tmp_path / "train" / "bird").mkdir()
    with pytest.raises(BadInputError, match=r"train/bird holds no images \(1 empty class folder\(s\): bird\)"):
        load_dataset(f"imagefolder:{tmp_path}", image_size=32)


@pytest.mark.parametrize("sidecar,content", [("student/metrics.json", "{not json"),
                                             ("student/metrics.json", '{"arch": {"num_classes": 10}}'),
                                             ("fused/model.json", '{"zoo_name": "shufflenetv2_x1_0"}')])
def test_a_malformed_sidecar_is_one_line(tiny_run, tmp_path, sidecar, content):
    run = clone_run(tiny_run, tmp_path / "run")
    _replace(run / sidecar, content.encode())
    command = ["fuse", "--fp32-tol", "0.5"] if sidecar.startswith("student") else ["export", "--images", "3"]
    result = run_cli(*command, "--run-dir", str(run))
    assert result.returncode == 2, result.stderr
    assert f"error: {run / sidecar}" in result.stderr and "Traceback" not in result.stderr


def test_sigkill_during_export_then_rerun_gives_the_same_files(tiny_run, fashion_root, tmp_path):
    run = clone_run(tiny_run, tmp_path / "run")
    shutil.rmtree(run / "export")
    # the float files are what this test is about: the INT8 step stays out of it
    args = ["export", "--run-dir", str(run), "--data-root", str(fashion_root), "--images", "16", "--no-int8"]
    kill_when_written(args, run / "export" / "model.onnx")  # after the ONNX file, before the IR and the gates
    assert not (run / "export" / "stage.json").exists()
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    # the same model and weights (OpenVINO numbers its XML node names per process, so the .xml text differs)
    for name in ("model.onnx", "openvino/model.bin", "openvino/model_fp16.bin"):
        assert (run / "export" / name).read_bytes() == (tiny_run / "export" / name).read_bytes(), name
    assert read_metadata(run / "export" / "openvino" / "model.xml") == read_metadata(tiny_run / "export" / "model.onnx")
    assert run_cli("verify", str(run / "export")).returncode == 0


def test_a_planted_link_at_a_temporary_name_is_never_written_through(tmp_path):
    """Temporary files get unpredictable names, created exclusively: a link planted where the old fixed name
    (`.NAME.tmp-PID`) pointed elsewhere is left alone, and so is its target."""
    import torch

    from pipeline.training.checkpoint import atomic_save

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    folder = tmp_path / "run"
    folder.mkdir()
    for guess in (f".model.pt.tmp-{os.getpid()}", ".model.pt.tmp", "model.pt.tmp"):
        (folder / guess).symlink_to(victim)
    atomic_save({"w": torch.ones(2)}, folder / "model.pt")
    assert victim.read_text() == "keep me"
    assert torch.load(folder / "model.pt", weights_only=True)["w"].sum() == 2
