"""The shipped side stands alone: predict and verify load no torch, the exporters/ folder runs copied on its own,
the IR runs at the gated precision, and the ONNX file carries no trace of the build machine."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, run_cli

# Makes `import torch` (and, for the copied runtime, `import pipeline` / `import models`) fail in a subprocess.
POISON = """
import sys
class _Poison:
    def __init__(self, names): self.names = names
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in self.names:
            raise ImportError(name + ' must not be imported here')
sys.meta_path.insert(0, _Poison({names!r}))
"""


def _run_poisoned(code: str, names: tuple[str, ...], cwd: Path, *flags: str) -> subprocess.CompletedProcess:
    script = POISON.format(names=set(names)) + code
    return subprocess.run([sys.executable, *flags, "-c", script], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def _pngs(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(count):
        files.append(folder / f"img_{i}.png")
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(files[-1])
    return files


def test_predict_and_verify_import_no_torch_even_on_errors(tiny_run, tmp_path):
    model = tiny_run / "export" / "model.onnx"
    good = _pngs(tmp_path / "images", 2)
    bad = tmp_path / "images" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    cli = "import sys; from pipeline.cli import main; sys.argv = ['pipeline', *{args!r}]; main()"
    result = _run_poisoned(cli.format(args=["predict", "--model", str(model), *map(str, good)]), ("torch",), ROOT)
    assert result.returncode == 0, result.stderr
    assert all(str(f) in result.stdout for f in good)
    # one unreadable image: reported on its own, the others still classified, exit code 2
    result = _run_poisoned(cli.format(args=["predict", "--model", str(model), str(good[0]), str(bad), str(good[1])]),
                           ("torch",), ROOT)
    assert result.returncode == 2, result.stderr
    assert f"error: cannot read image {bad}" in result.stderr and "1 of 3 images" in result.stderr
    assert str(good[0]) in result.stdout and str(good[1]) in result.stdout and "must not be imported" not in \
        result.stderr
    result = _run_poisoned(cli.format(args=["verify", str(tiny_run / "export")]), ("torch",), ROOT)
    assert result.returncode == 0 and "verified:" in result.stdout, result.stderr


def test_the_exporters_folder_runs_copied_alone(tiny_run, tmp_path):
    """The documented unit is the `exporters/` folder: copied next to a script, with no torch and none of the
    rest of this project importable, it classifies with both artifacts."""
    shutil.copytree(ROOT / "exporters", tmp_path / "exporters", ignore=shutil.ignore_patterns("__pycache__"))
    image = _pngs(tmp_path / "images", 1)[0]
    code = f"""
import sys; sys.path[:0] = [{str(tmp_path)!r}]
import exporters
from exporters.runtime import Classifier
print(exporters.__file__)
for model in ({str(tiny_run / 'export' / 'model.onnx')!r}, {str(tiny_run / 'export' / 'openvino' / 'model.xml')!r}):
    p = Classifier(model).classify([{str(image)!r}], top_k=2)[0]
    print(model.rsplit('.', 1)[1], p.label, round(p.probability, 4))
"""
    # -I: isolated mode, no user site-packages and no PYTHONPATH; the editable install is poisoned too
    result = _run_poisoned(code, ("torch", "torchvision", "pipeline", "models"), tmp_path, "-I")
    assert result.returncode == 0, result.stderr
    where, *lines = result.stdout.split("\n")
    assert where == str(tmp_path / "exporters" / "__init__.py")  # the copy, not this checkout
    assert lines[0].startswith("onnx ") and lines[1].startswith("xml ")
    assert lines[0].split()[1:] == lines[1].split()[1:]  # same label and probability from both runtimes


def test_the_runtime_command_line_answers_as_pipeline_predict_with_onnx_runtime_alone(tiny_run, tmp_path):
    """`python -m exporters` (the runtime image's entrypoint) from a copy of the folder, with torch, the `onnx`
    package, pipeline and models unimportable (the runtime image has numpy, Pillow and onnxruntime only)."""
    shutil.copytree(ROOT / "exporters", tmp_path / "exporters", ignore=shutil.ignore_patterns("__pycache__"))
    images = [str(f) for f in _pngs(tmp_path / "images", 3)]
    export = tiny_run / "export"
    runtime = "import runpy, sys; sys.path[:0] = [{root!r}]; sys.argv = ['exporters', *{args!r}]; " \
              "runpy.run_module('exporters', run_name='__main__')"
    blocked = ("torch", "torchvision", "pipeline", "models", "onnx")
    for model in ("model.onnx", "model_int8.onnx"):
        args = ["predict", "--model", str(export / model), "--top-k", "2", *images]
        inside = _run_poisoned(runtime.format(root=str(tmp_path), args=args), blocked, tmp_path, "-I")
        assert inside.returncode == 0, inside.stderr
        host = run_cli(*args)
        assert host.returncode == 0 and inside.stdout == host.stdout, (inside.stdout, host.stdout)
    verified = _run_poisoned(runtime.format(root=str(tmp_path), args=["verify", str(export)]), blocked, tmp_path,
                             "-I")
    assert verified.returncode == 0 and "verified:" in verified.stdout, verified.stderr
    # a device with ONNX Runtime alone: every file's sha256 is checked, the IR files are said to be left unopened
    verified = _run_poisoned(runtime.format(root=str(tmp_path), args=["verify", str(export)]),
                             (*blocked, "openvino"), tmp_path, "-I")
    assert verified.returncode == 0, verified.stderr
    assert "model_int8.xml: sha256 checked; not opened (openvino is not installed here)" in verified.stdout
    assert "ok  model_int8.bin  sha256" in verified.stdout.replace("openvino/", "")
    missing = _run_poisoned(runtime.format(root=str(tmp_path), args=["predict", "--model", str(tmp_path / "no.onnx"),
                                                                    images[0]]), blocked, tmp_path, "-I")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_every_shipped_file_has_the_permissions_of_a_plainly_written_file(tiny_run):
    """Regression: files written through a temporary file (manifest.json, equivalence.json, int8.json) were 0600,
    so a device user or a container with another uid could read the models but not the manifest that vouches for
    them."""
    from pipeline.training.checkpoint import plain_file_mode

    expected = plain_file_mode()
    modes = {p.relative_to(tiny_run).as_posix(): p.stat().st_mode & 0o777 for p in (tiny_run / "export").rglob("*")
             if p.is_file()}
    assert "export/manifest.json" in modes and "export/model_int8.onnx" in modes
    assert modes == {name: expected for name in modes}


def test_the_ir_runs_at_the_gated_precision(tiny_run):
    from exporters.runtime import Classifier

    batch = np.random.default_rng(1).standard_normal((8, 3, 32, 32), dtype=np.float32)
    onnx_logits = Classifier(tiny_run / "export" / "model.onnx").logits(batch)
    ir_logits = Classifier(tiny_run / "export" / "openvino" / "model.xml").logits(batch)
    scale = max(1.0, float(np.abs(onnx_logits).max()))
    assert np.abs(onnx_logits - ir_logits).max() <= 1e-4 * scale  # the export gate's own tolerance


def test_the_onnx_file_carries_no_build_paths(tiny_run):
    data = (tiny_run / "export" / "model.onnx").read_bytes()
    strings = re.findall(rb"[\x20-\x7e]{6,}", data)
    leaks = [s for s in strings if any(p in s for p in (str(Path.home()).encode(), b"site-packages",
                                                         str(ROOT).encode(), b"stack_trace"))]
    assert not leaks, leaks[:3]


@pytest.mark.parametrize("flags,message", [(["--top-k", "0"], "--top-k"), (["--threads", "-2"], "--threads")])
def test_predict_rejects_nonsense_counts(tiny_run, flags, message, tmp_path):
    image = _pngs(tmp_path, 1)[0]
    result = run_cli("predict", "--model", str(tiny_run / "export" / "model.onnx"), *flags, str(image))
    assert result.returncode == 2 and message in result.stderr


def test_model_names_are_stored_canonical(tiny_run, tmp_path):
    """`swin` and `swin_t` are the same teacher: the saved settings (and so every hash) say `swin_t`."""
    import yaml

    from pipeline.config import resolve_config

    saved = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert saved["teacher"]["model"] == "swin_t" and saved["student"]["model"] == "shufflenetv2_x1_0"
    assert resolve_config(overrides={"teacher": {"model": "swin"}}) == resolve_config()
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert manifest["run"]["teacher"] == "swin_t"
