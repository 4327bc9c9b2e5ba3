"""What a device reads can be hostile (issue 25): an export folder from the network, images from a camera or a
user, a run directory others can write. Each finding of the audit has a test here; the property-based fuzz over
the same inputs is in tests/test_fuzz_device_inputs.py."""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, clone_run, run_cli

PY = sys.executable


def runtime(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 120
            ) -> subprocess.CompletedProcess:
    """``python -m exporters ARGS`` as the runtime image runs it (a subprocess, the working directory ``cwd``)."""
    return subprocess.run([PY, "-m", "exporters", *args], capture_output=True, text=True, cwd=cwd or ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=timeout)


def one_line_failure(result: subprocess.CompletedProcess, code: int = 2) -> str:
    """The first stderr line of a failed command that printed no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.splitlines()[0]


def png(path: Path, width: int, height: int) -> Path:
    """A tiny PNG file whose header declares ``width`` x ``height`` grey pixels (the data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def good_image(path: Path, seed: int = 0) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)).save(path, "PNG")
    return path


@pytest.fixture(scope="module")
def export(tiny_run, tmp_path_factory) -> Path:
    """A private copy of the tiny run's export folder (hard links: the tests replace files, never write into them)."""
    return clone_run(tiny_run, tmp_path_factory.mktemp("hostile") / "run") / "export"


def copy_export(export: Path, dest: Path) -> Path:
    shutil.copytree(export, dest, copy_function=os.link)
    return dest


def write_manifest(folder: Path, manifest: object) -> None:
    target = folder / "manifest.json"
    target.unlink()
    if isinstance(manifest, bytes):
        target.write_bytes(manifest)
    else:
        target.write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))


# ----------------------------------------------------------------------------- 1. no foreign code


def test_a_module_planted_in_the_working_directory_never_runs(export, tmp_path):
    """`python -m exporters` from a folder of images holding a numpy.py (and json.py, argparse.py): before, the
    planted numpy ran (exit 42); now the working directory is off sys.path before anything is imported."""
    images = tmp_path / "images"
    images.mkdir()
    good_image(images / "a.png")
    marker = tmp_path / "ran"
    for name in ("numpy", "json", "argparse", "PIL"):
        (images / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write({name!r})\nraise SystemExit(42)\n")
    result = runtime("predict", "--model", str(export / "model.onnx"), "a.png", cwd=images)
    assert result.returncode == 0 and result.stdout.startswith("a.png: "), result.stderr
    assert not marker.exists()
    result = runtime("verify", str(export), cwd=images)
    assert result.returncode == 0 and not marker.exists(), result.stderr
    # the image also sets PYTHONSAFEPATH, which keeps a planted exporters/ folder out as well
    assert "PYTHONSAFEPATH=1" in (ROOT / "Dockerfile.runtime").read_text()


# ----------------------------------------------------------------------------- 2. verify is confined to its folder


def _listed(manifest: dict, path: str, source: Path) -> dict:
    """``manifest`` with one more artifact at ``path`` whose size and hash are those of ``source``."""
    from exporters.verify import file_sha256

    entry = {"path": path, "bytes": source.stat().st_size, "sha256": file_sha256(source)}
    return {**manifest, "artifacts": [*manifest["artifacts"], entry]}


@pytest.mark.parametrize("path", ["../outside.txt", "/ABSOLUTE", "openvino/../../outside.txt", "./model.onnx",
                                  "link-out"])
def test_verify_reads_nothing_outside_its_folder(export, tmp_path, path):
    """Before, `../x` and absolute entries were read and reported ok, and a link leaving the folder passed."""
    folder = copy_export(export, tmp_path / "export")
    outside = tmp_path / "outside.txt"
    outside.write_text("a file the folder must not vouch for\n")
    path = path.replace("/ABSOLUTE", str(outside))
    if path == "link-out":
        (folder / "link-out").symlink_to(outside)
    manifest = json.loads((folder / "manifest.json").read_text())
    write_manifest(folder, _listed(manifest, path, outside))
    line = one_line_failure(runtime("verify", str(folder)))
    assert "leaves the folder" in line or "link that leaves the folder" in line, line


def test_verify_never_prints_a_file_it_must_not_read(export, tmp_path):
    """A mismatching `../../etc/shadow`-style entry printed that file's size and hash prefix."""
    from exporters.verify import file_sha256

    folder = copy_export(export, tmp_path / "export")
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["artifacts"].append({"path": "../secret", "bytes": 1, "sha256": "0" * 64})
    write_manifest(folder, manifest)
    result = runtime("verify", str(folder))
    assert "leaves the folder" in one_line_failure(result)
    assert "7 bytes" not in result.stderr + result.stdout and file_sha256(secret)[:16] not in result.stderr


@pytest.mark.parametrize("content", [
    {"artifacts": [{"bytes": 1, "sha256": "0" * 64}]},  # an entry without a path
    {"artifacts": ["model.onnx"]},  # an entry that is a string
    {"artifacts": [{"path": "model.onnx", "bytes": "5", "sha256": "x"}]},
    {"artifacts": [{"path": "model.onnx\nok  forged", "bytes": 1, "sha256": "0" * 64}]},
    {"artifacts": [], "metadata": {}},
    {"artifacts": [{"path": "model.onnx", "bytes": 1, "sha256": "0" * 64}], "metadata": ["x"]},
    "[" * 200_000 + "]" * 200_000,  # 200k nested levels
    b"\xff\xfe\x00 not json",
    [],
])
def test_a_malformed_manifest_is_one_line_exit_2(export, tmp_path, content):
    folder = copy_export(export, tmp_path / "export")
    write_manifest(folder, content)
    line = one_line_failure(runtime("verify", str(folder)))
    assert line.startswith("error: ") and "manifest.json" in line, line


def test_a_file_the_manifest_does_not_list_fails_verify(export, tmp_path):
    """Files the manifest did not list were ignored, among them a stale INT8 model beside a manifest that no
    longer lists it (what an interrupted INT8 step left) and planted ONNX external data."""
    folder = copy_export(export, tmp_path / "export")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["artifacts"] = [a for a in manifest["artifacts"] if "int8" not in a["path"]]
    write_manifest(folder, manifest)
    line = one_line_failure(runtime("verify", str(folder)), code=3)
    assert "does not list" in line and "model_int8.onnx" in line, line
    for name in ("model_int8.onnx", "openvino/model_int8.xml", "openvino/model_int8.bin"):
        (folder / name).unlink()
    (folder / "model.onnx.data").write_bytes(b"\0" * 64)
    line = one_line_failure(runtime("verify", str(folder)), code=3)
    assert "model.onnx.data" in line, line
    (folder / "model.onnx.data").unlink()
    result = runtime("verify", str(folder))
    assert result.returncode == 0, result.stderr
    assert "--  stage.json: a record of the export stage" in result.stdout  # reported, not silently skipped


def test_onnx_external_data_is_listed_by_export_and_checked_by_verify(export, tmp_path):
    """A model stored with external data: export's manifest lists and hashes the data file, so a rewritten one
    (which changed the prediction while verify said ok) fails verify."""
    import onnx

    from pipeline.config import ExportConfig
    from pipeline.layout import StageFolder
    from pipeline.stages.export import build_manifest, export_settings

    folder = copy_export(export, tmp_path / "export")
    proto = onnx.load(str(folder / "model.onnx"))
    (folder / "model.onnx").unlink()
    onnx.save_model(proto, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    old = json.loads((folder / "manifest.json").read_text())
    manifest = build_manifest(StageFolder(folder), [a["path"] for a in old["artifacts"]], old["metadata"],
                              export_settings(ExportConfig()))
    new = {a["path"]: a for a in manifest["artifacts"]}
    assert "model.onnx.data" in new
    # the rebuilt entries (sizes and hashes) with what the export added to them (the INT8 models' quantization)
    write_manifest(folder, {**old, "artifacts": [{**a, **new[a["path"]]} for a in old["artifacts"]]
                            + [new["model.onnx.data"]]})
    assert runtime("verify", str(folder)).returncode == 0
    data = bytearray((folder / "model.onnx.data").read_bytes())
    data[100:104] = b"\x00\x00\x80\x7f"  # one weight becomes +inf
    (folder / "model.onnx.data").write_bytes(bytes(data))
    line = one_line_failure(runtime("verify", str(folder)), code=3)
    assert "model.onnx.data does not match manifest.json" in line, line


# ----------------------------------------------------------------------------- 3. the run lock


@pytest.mark.parametrize("plant", ["link", "fifo", "folder"])
def test_a_planted_lock_is_refused_and_its_target_untouched(tmp_path, plant):
    """A `.lock` planted as a link to another file got that file truncated and overwritten."""
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    if plant == "link":
        (run / ".lock").symlink_to(victim)
    elif plant == "fifo":
        os.mkfifo(run / ".lock")
    else:
        (run / ".lock").mkdir()
    result = run_cli("fuse", "--run-dir", str(run))
    line = one_line_failure(result)
    assert "refusing the lock file" in line, line
    assert victim.read_text() == "precious\n"


# ----------------------------------------------------------------------------- 4. verify RUN_DIR


def test_pipeline_verify_on_a_run_directory_verifies_its_export_folder(export):
    """Every finished run failed: the run's own manifest.json was read as an export manifest."""
    run = export.parent
    result = run_cli("verify", str(run))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith(f"verified: {export} ")


# ----------------------------------------------------------------------------- 5. metadata against the model


def _with_metadata(export: Path, dest: Path, raw: bool = False, **changes: object) -> Path:
    """A copy of model.onnx whose kdiff.* metadata has ``changes`` (JSON-encoded unless ``raw``)."""
    import onnx

    proto = onnx.load(str(export / "model.onnx"))
    for entry in proto.metadata_props:
        key = entry.key.removeprefix("kdiff.")
        if key in changes:
            entry.value = changes[key] if raw else json.dumps(changes[key])
    onnx.save_model(proto, str(dest))
    return dest


METADATA_CASES = {
    "input_size_huge": ({"input_size": [3, 8000, 8000]}, "input_size"),  # allocated 6 GB before a traceback
    "input_size_text": ({"input_size": "3x32x32"}, "input_size"),
    "input_size_graph": ({"input_size": [3, 64, 64]}, "graph's input"),
    "mean_text": ({"mean": "abc"}, "mean"),
    "std_zero": ({"std": [0, 0, 0]}, "std"),
    "std_nan": ({"std": [float("nan")] * 3}, "std"),
    "labels_short": ({"classes": ["a", "b"]}, "classes"),  # an IndexError before
    "labels_numbers": ({"classes": list(range(10))}, "classes"),
    "preprocessing_list": ({"preprocessing": [1, 2]}, "preprocessing"),
    "preprocessing_color": ({"preprocessing": {"color": 5}}, "preprocessing"),
    "layout": ({"layout": "NHWC"}, "layout"),
}


@pytest.mark.parametrize("case", sorted(METADATA_CASES))
def test_malformed_metadata_is_one_line_exit_2(export, tmp_path, case):
    changes, field = METADATA_CASES[case]
    model = _with_metadata(export, tmp_path / "model.onnx", **changes)
    line = one_line_failure(runtime("predict", "--model", str(model), str(good_image(tmp_path / "a.png"))))
    assert field in line, line


def test_metadata_that_is_not_utf8_is_one_line_exit_2(export, tmp_path):
    placeholder = "Q" * 12
    model = _with_metadata(export, tmp_path / "model.onnx", raw=True, architecture=placeholder)
    model.write_bytes(model.read_bytes().replace(placeholder.encode(), b"\xff\xfe" * 6))
    line = one_line_failure(runtime("predict", "--model", str(model), str(good_image(tmp_path / "a.png"))))
    assert "UTF-8" in line, line


# ----------------------------------------------------------------------------- 6. images


def test_a_bad_image_never_stops_the_others(export, tmp_path):
    """A PNG declaring 50000 x 50000 aborted the batch with a traceback; one just under Pillow's limit took 2.5 GB;
    a FIFO hung forever; a newline in a name broke the one-line-per-image output."""
    images = tmp_path / "images"
    images.mkdir()
    bomb, under = png(images / "bomb.png", 50000, 50000), png(images / "under.png", 9400, 9400)
    fifo = images / "fifo.png"
    os.mkfifo(fifo)
    odd = good_image(images / "new\nline\x1b[2J.png", 1)
    goods = [good_image(images / f"good{i}.png", i) for i in range(2)]
    order = [goods[0], bomb, under, fifo, odd, images, goods[1]]
    for cli in ("exporters", "pipeline"):
        args = ["predict", "--model", str(export / "model.onnx"), *map(str, order)]
        result = runtime(*args) if cli == "exporters" else run_cli(*args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        answers = result.stdout.splitlines()
        assert [a.split(": ")[0] for a in answers] == [str(goods[0]), str(odd).replace("\n", "\\n").replace(
            "\x1b", "\\x1b"), str(goods[1])], answers
        errors = [line for line in result.stderr.splitlines() if "capped" not in line]
        assert len(errors) == 5 and "4 of 7 images" in errors[-1], errors
        assert "over the pixel budget" in errors[0] and "over the pixel budget" in errors[1], errors
        assert "not a regular file" in errors[2] and "is a folder" in errors[3], errors


def test_the_pixel_budget_is_configurable(export, tmp_path):
    image = good_image(tmp_path / "a.png")  # 28 x 28 = 784 pixels
    result = runtime("predict", "--model", str(export / "model.onnx"), "--max-pixels", "700", str(image))
    assert "over the pixel budget of 700" in one_line_failure(result)
    assert runtime("predict", "--model", str(export / "model.onnx"), "--max-pixels", "784", str(image)).returncode == 0


def test_hostile_images_stay_within_bounded_memory(export, tmp_path):
    """Peak memory of a predict over decompression bombs stays that of a plain predict (it took 2.5 GB for one
    image just under Pillow's limit). Measured as the runtime process's own peak RSS (VmHWM), printed by a
    wrapper as it exits (a child's ru_maxrss would count this test process, which it was forked from)."""
    bombs = [png(tmp_path / "bomb.png", 50000, 50000), png(tmp_path / "under.png", 13000, 13000),
             png(tmp_path / "wide.png", 16_000_000, 1)]
    wrapper = ("import re, runpy, sys\n"
               "sys.argv = ['exporters', *sys.argv[1:]]\n"
               "try:\n    runpy.run_module('exporters', run_name='__main__')\n"
               "except SystemExit as exc:\n    code = exc.code\n"
               "print('peak', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1), "
               "file=sys.stderr)\n"
               "sys.exit(code)\n")
    result = subprocess.run([PY, "-c", wrapper, "predict", "--model", str(export / "model.onnx"), *map(str, bombs)],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    peak_kb = int(result.stderr.splitlines()[-1].split()[1])
    assert peak_kb < 400 * 1024, f"peak RSS {peak_kb / 1024:.0f} MiB"


# ----------------------------------------------------------------------------- 7. the teacher is read once


def test_the_teacher_that_is_hashed_is_the_teacher_that_is_loaded(stripes_teacher, stripes_root, tmp_path,
                                                                   monkeypatch):
    """Swapped between hashing and loading, the record named one teacher while the student learned from another.
    Here the swap happens at the worst moment (just before the loader runs); the teacher loaded must still be
    the one whose bytes were hashed."""
    import torch

    import pipeline.stages.distill as distill
    from tests.conftest import TINY

    run = clone_run(stripes_teacher, tmp_path / "run")
    ckpt = run / "teacher" / "model.pt"
    original = torch.load(ckpt, weights_only=True)
    loaded = {}
    real_loader = distill.load_teacher

    class Stop(Exception):
        pass

    def swap_then_load(path, *args, **kwargs):
        ckpt.unlink()  # an attacker (or another command) replaces the file between the hash and the load
        torch.save({k: torch.zeros_like(v) for k, v in original.items()}, ckpt)
        model, meta = real_loader(path, *args, **kwargs)
        loaded.update(model.state_dict())
        raise Stop()

    monkeypatch.setattr(distill, "load_teacher", swap_then_load)
    result = run_cli("distill", "--method", "kd", "--student", "shufflenetv2_x0_5", "--data-root", str(stripes_root),
                     "--run-dir", str(run), "--epochs", "1", *TINY)
    assert "Stop" in result.stderr, result.stderr  # the loader ran
    assert loaded and all(torch.equal(loaded[k], original[k]) for k in original)


# ----------------------------------------------------------------------------- 8. threads and SIGTERM


def test_threads_are_capped_at_the_usable_cores(export, tmp_path):
    image = good_image(tmp_path / "a.png")
    started = time.monotonic()
    result = runtime("predict", "--model", str(export / "model.onnx"), "--threads", "5000", str(image))
    assert result.returncode == 0, result.stderr
    assert f"--threads 5000 capped at {len(os.sched_getaffinity(0))}" in result.stderr
    assert time.monotonic() - started < 30


def test_sigterm_is_handled_like_sigint(export, tmp_path):
    """SIGTERM exited 143 silently; now it says so (as SIGINT does, with the shell's exit code 143) from wherever
    the command is: here in the middle of classifying 10000 images, once ONNX Runtime is loaded."""
    good_image(tmp_path / "a.png")
    for cli in ("exporters", "pipeline"):
        child = subprocess.Popen([PY, "-m", cli, "predict", "--model", str(export / "model.onnx"), *["a.png"] * 10000],
                                 cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None and not _loaded(child.pid, "onnxruntime"):
            time.sleep(0.02)
        time.sleep(1.0)  # past the imports (a signal inside an extension's initialisation is its ImportError)
        assert child.poll() is None, "finished before the signal"
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=60)
        assert child.returncode == 143, (cli, child.returncode, err)
        assert err.strip().splitlines()[-1].startswith("terminated"), err
        assert "Traceback" not in err and out == ""


def _loaded(pid: int, library: str) -> bool:
    """Whether process ``pid`` has mapped a shared library whose path contains ``library``."""
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False
