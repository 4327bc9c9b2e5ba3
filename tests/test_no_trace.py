"""Nothing is written outside the run directory: a whole run and the predictions of its models leave an empty HOME
and TMPDIR (no telemetry identifiers from ONNX Runtime or OpenVINO, no torch or matplotlib caches). Real commands
in subprocesses; the run is the suite's shared tiny run, made with HOME and TMPDIR pointed at empty folders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_in_scratch

pytestmark = pytest.mark.slow


def written(folder: Path) -> list[str]:
    """Every path under ``folder/home`` and ``folder/tmp``, folders included."""
    return sorted(str(p.relative_to(folder)) for name in ("home", "tmp") for p in (folder / name).rglob("*"))


def test_a_run_writes_nothing_outside_its_run_directory(tiny_run):
    assert written(tiny_run.parent) == []
    # the caches it needed are inside the run
    assert (tiny_run / ".cache" / "matplotlib").is_dir()


def test_predict_writes_nothing_outside(tiny_run, tmp_path):
    image = tmp_path / "shirt.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)).save(image)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    export = tiny_run / "export"
    for module, model in (("pipeline", export / "model_int8.onnx"), ("exporters", export / "openvino" / "model.xml"),
                          ("exporters", export / "model.onnx")):
        result = run_in_scratch(["predict", "--model", str(model), str(image)], scratch, module)
        assert result.returncode == 0, result.stderr
    result = run_in_scratch(["verify", str(export)], scratch, "exporters")
    assert result.returncode == 0, result.stderr
    assert written(scratch) == []


def test_a_command_that_fails_on_bad_input_leaves_no_run_directory_for_its_caches(tmp_path):
    """The caches are placed in the run directory before the settings are checked: a refused command removes it."""
    run = tmp_path / "fresh"
    result = run_in_scratch(["run", "--teacher", "vgg99", "--run-dir", str(run), "--no-progress"], tmp_path)
    assert result.returncode == 2 and "unknown teacher 'vgg99'" in result.stderr
    assert not run.exists() and written(tmp_path) == []
