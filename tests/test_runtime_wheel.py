"""The kdiff-runtime wheel (runtime/): built from this repository, exactly the device modules of exporters/,
installed with pip into a fresh virtual environment that has no torch, where its console script runs predict,
verify and bench on a real export."""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, shared_dir
from tests.test_layering import imports_of, project_modules

# What the runtime needs; they are linked into the fresh environment from this one (no network, no torch).
RUNTIME_DISTRIBUTIONS = ("numpy", "pillow", "onnxruntime", "flatbuffers", "packaging", "protobuf", "openvino",
                         "openvino-telemetry")


def device_modules() -> set[str]:
    """What `python -m exporters` loads: its subcommands' imports, then everything those import at module level."""
    modules = project_modules()
    seen: set[str] = set()
    # the package's __init__ runs first whatever is imported (it turns the runtimes' telemetry off)
    todo = ["exporters", "exporters.__main__", *imports_of(modules["exporters.__main__"], modules)]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += imports_of(modules[name], modules, top_level_only=True)
    return seen | {"exporters"}


def build_wheel(out: Path) -> Path:
    """The wheel, built by pip from a copy of runtime/ and exporters/ (no stale build/ folder can leak in)."""
    src = out / "src"
    shutil.copytree(ROOT / "runtime", src / "runtime", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    shutil.copytree(ROOT / "exporters", src / "exporters", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(out / "dist"), str(src / "runtime")],
                   check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = (out / "dist").glob("kdiff_runtime-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    with shared_dir(tmp_path_factory, "runtime-wheel") as folder:
        yield build_wheel(folder)


def test_the_wheel_holds_exactly_the_device_modules(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        meta = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    modules = {n[:-3].replace("/", ".").removesuffix(".__init__") for n in names if n.endswith(".py")}
    assert modules == device_modules()
    assert {"exporters.runtime", "exporters.verify", "exporters.bench"} <= modules
    assert not {"exporters.onnx", "exporters.equivalence"} & modules  # build side: they import torch
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    names_required = {r.split(";")[0].split(">")[0].split("=")[0].strip().lower() for r in requires}
    assert names_required == {"numpy", "pillow", "onnxruntime", "openvino"}
    assert all("extra ==" in r for r in requires if r.lower().startswith("openvino"))
    assert "kdiff-runtime = exporters.__main__:main" in entry_points


def link_distributions(site: Path, names: tuple[str, ...]) -> None:
    """Make these installed distributions (their files and dist-info) visible in another environment."""
    for name in names:
        dist = importlib.metadata.distribution(name)
        base = Path(dist.locate_file(""))
        for top in {Path(str(f)).parts[0] for f in dist.files or ()}:
            if top != ".." and not (site / top).exists():
                (site / top).symlink_to(base / top)


@pytest.fixture(scope="module")
def device_env(wheel, tmp_path_factory) -> Path:
    """A fresh venv where pip installed the wheel, its dependencies resolved offline (--no-index)."""
    env = tmp_path_factory.mktemp("device-venv") / "venv"
    venv.EnvBuilder(with_pip=True).create(env)
    python = env / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    link_distributions(site, RUNTIME_DISTRIBUTIONS)
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index",
                              "--find-links", str(wheel.parent), "kdiff-runtime[openvino]"],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    yield env
    shutil.rmtree(env.parent, ignore_errors=True)


def in_env(env: Path, *args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([*args], capture_output=True, text=True, timeout=300, cwd=env,
                          env={**clean, "PATH": f"{env / 'bin'}:{clean.get('PATH', '')}"})


@pytest.mark.slow
def test_the_installed_runtime_predicts_verifies_and_benches_without_torch(device_env, tiny_run, tmp_path):
    from PIL import Image

    from pipeline.training.data import load_dataset

    assert in_env(device_env, "python", "-c", "import torch").returncode != 0, "torch is in the device venv"
    assert in_env(device_env, "python", "-m", "pip", "check").returncode == 0
    located = in_env(device_env, "python", "-c", "import exporters; print(exporters.__file__)")
    assert str(device_env) in located.stdout, "the runtime must come from the installed wheel, not the checkout"

    test = load_dataset("fashion-mnist", None, False, 32).test
    images = []
    for i in range(6):
        images.append(tmp_path / f"test_{i}.png")
        Image.fromarray(test[i * 101][0].numpy()[0]).save(images[-1])
    export = tiny_run / "export"
    for model in ("model.onnx", "model_int8.onnx", "openvino/model.xml"):
        device = in_env(device_env, "kdiff-runtime", "predict", "--json", "--top-k", "3", "--model",
                        str(export / model), *map(str, images))
        assert device.returncode == 0, device.stderr
        here = subprocess.run([sys.executable, "-m", "exporters", "predict", "--json", "--top-k", "3", "--model",
                               str(export / model), *map(str, images)], capture_output=True, text=True, cwd=ROOT)
        assert [json.loads(x)["index"] for x in device.stdout.splitlines()] == \
            [json.loads(x)["index"] for x in here.stdout.splitlines()] and len(device.stdout.splitlines()) == 6
    verify = in_env(device_env, "kdiff-runtime", "verify", "--json", str(export))
    assert verify.returncode == 0, verify.stderr
    assert all(row["reference"]["met"] for row in json.loads(verify.stdout)["models"])  # compared, not just run
    bench = in_env(device_env, "kdiff-runtime", "bench", "--model", str(export / "model_int8.onnx"),
                   "--batch-sizes", "1", "--iterations", "3", "--warmup", "1", "--json", "-")
    assert bench.returncode == 0, bench.stderr
    assert "p50 ms" in bench.stdout and json.loads(bench.stdout[bench.stdout.index("\n{") + 1:])["results"]
