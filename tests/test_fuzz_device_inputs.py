"""Property-based fuzz (hypothesis) over what a device reads: manifests, model metadata and image headers.

For every generated input the runtime's command line answers with an exit code from the documented set and at
most one error line per failure, never a traceback, and an image never costs more than a bounded amount of
memory (the process's peak RSS, reset before each example through /proc/self/clear_refs). The example counts
keep the module well under a minute on 2 cores; the tiny run's export folder is shared with the other tests.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import clone_run

EXIT_CODES = {0, 2, 3}  # ok, bad input, a file that differs from (or is missing from) its manifest
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MEMORY_BOUND_MB = 300  # above the process's resting size, per image


def call_runtime(*args: str) -> tuple[int, str, str]:
    """``python -m exporters ARGS`` in this process: (exit code, stdout, stderr); any exception fails the test."""
    from exporters.__main__ import main

    out, err, on_term = io.StringIO(), io.StringIO(), signal.getsignal(signal.SIGTERM)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code
    finally:
        signal.signal(signal.SIGTERM, on_term)
    return code, out.getvalue(), err.getvalue()


def assert_answered(code: int, stderr: str) -> None:
    assert code in EXIT_CODES, (code, stderr)
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(stderr.splitlines()), stderr  # every line is one error line


@pytest.fixture(scope="module")
def export(tiny_run, tmp_path_factory) -> Path:
    return clone_run(tiny_run, tmp_path_factory.mktemp("fuzz") / "run") / "export"


# ----------------------------------------------------------------------------- manifests

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4), max_leaves=12)
paths = st.one_of(st.sampled_from(["model.onnx", "openvino/model.xml", "openvino/model.bin", "model_int8.onnx",
                                   "../model.onnx", "/etc/hostname", "openvino/../model.onnx", "stage.json", "",
                                   ".", "openvino", "model.onnx/x", "nul\0", "a\nb"]), st.text(max_size=30))
entries = st.fixed_dictionaries({}, optional={"path": paths | json_values, "bytes": st.integers(-1, 10**7) | json_values,
                                              "sha256": st.text("0123456789abcdef", min_size=64, max_size=64)
                                              | json_values, "quantization": json_values})
manifests = st.one_of(json_values, st.fixed_dictionaries({"artifacts": st.lists(entries | json_values, max_size=6)},
                                                         optional={"metadata": json_values}))


def test_fuzzed_manifests_get_a_documented_answer(export, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(export, folder, copy_function=os.link)
    real = json.loads((folder / "manifest.json").read_text())

    @FUZZ
    @given(manifest=manifests, keep=st.integers(0, len(real["artifacts"])))
    def check(manifest, keep):
        if isinstance(manifest, dict) and isinstance(manifest.get("artifacts"), list):
            manifest["artifacts"] = real["artifacts"][:keep] + manifest["artifacts"]  # real entries, then fuzz
        (folder / "manifest.json").unlink()  # a hard link to the shared run's manifest: never write through it
        (folder / "manifest.json").write_text(json.dumps(manifest))
        code, _, stderr = call_runtime("verify", str(folder))
        assert_answered(code, stderr)

    check()


# ----------------------------------------------------------------------------- metadata

metadata_fields = st.sampled_from(["input_size", "classes", "mean", "std", "preprocessing", "layout",
                                   "channel_order", "input_name", "output_name", "architecture"])
metadata_values = st.one_of(json_values, st.lists(st.integers(-5, 10**6), max_size=4),
                            st.lists(st.floats(), max_size=4), st.lists(st.text(max_size=5), max_size=12),
                            st.fixed_dictionaries({}, optional={k: json_values for k in (
                                "color", "crop", "size", "channels", "mean", "std")}))


def test_fuzzed_metadata_gets_a_documented_answer(export, tmp_path):
    import onnx
    from PIL import Image

    proto = onnx.load(str(export / "model.onnx"))
    image = tmp_path / "a.png"
    Image.new("L", (28, 28), 128).save(image)

    @FUZZ
    @given(changes=st.dictionaries(metadata_fields, metadata_values, min_size=1, max_size=3),
           raw=st.booleans())
    def check(changes, raw):
        model = onnx.ModelProto()
        model.CopyFrom(proto)
        for entry in model.metadata_props:
            key = entry.key.removeprefix("kdiff.")
            if key in changes:  # raw: the value as text, as another tool might have written it
                entry.value = str(changes[key]) if raw else json.dumps(changes[key])
        path = tmp_path / "model.onnx"
        path.write_bytes(model.SerializeToString())
        code, stdout, stderr = call_runtime("predict", "--model", str(path), str(image))
        assert_answered(code, stderr)
        assert (code == 0) == (stdout.count("\n") == 1), (stdout, stderr)

    check()


# ----------------------------------------------------------------------------- image headers


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, depth: int, color: int, body: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(body))
            + _chunk(b"IEND", b""))


def _gif(width: int, height: int, body: bytes) -> bytes:
    return b"GIF89a" + struct.pack("<HHBBB", width, height, 0xF7, 0, 0) + body


def _bmp(width: int, height: int, depth: int, body: bytes) -> bytes:
    info = struct.pack("<iiHHIIiiII", width, height, 1, depth, 0, len(body), 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + len(body), 0, 0, 54) + struct.pack("<I", 40) + info + body


sides = st.one_of(st.integers(0, 64), st.integers(0, 2**31 - 1), st.sampled_from([50000, 9400, 16_000_000, 1]))
bodies = st.binary(max_size=256)
image_files = st.one_of(
    st.builds(_png, sides, sides, st.sampled_from([1, 2, 4, 8, 16, 3, 0]), st.sampled_from([0, 2, 3, 4, 6, 1]),
              bodies),
    st.builds(_gif, st.integers(0, 65535), st.integers(0, 65535), bodies),
    st.builds(_bmp, st.integers(-2**31, 2**31 - 1), st.integers(-2**31, 2**31 - 1),
              st.sampled_from([1, 4, 8, 16, 24, 32, 0]), bodies),
    st.binary(max_size=512))


def _peak_rss_mb() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0); False where the kernel or a sandbox does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def test_fuzzed_image_headers_get_a_documented_answer_in_bounded_memory(export, tmp_path):
    from PIL import Image

    from exporters.runtime import Classifier

    classifier = Classifier(export / "model.onnx")
    good = tmp_path / "good.png"
    Image.new("L", (28, 28), 200).save(good)
    classifier.classify([good])  # the sessions' buffers exist before the first measurement
    if not _reset_peak_rss():
        pytest.skip("/proc/self/clear_refs is not writable here: the memory bound cannot be measured")

    @settings(FUZZ, max_examples=100)
    @given(data=image_files)
    def check(data):
        bad = tmp_path / "fuzzed.img"
        bad.write_bytes(data)
        failures: list[tuple[str, str]] = []
        measured = _reset_peak_rss()
        resting = _peak_rss_mb()
        predictions = classifier.classify([bad, good], failures=failures)
        grown = _peak_rss_mb() - resting
        assert predictions[-1].source == str(good)  # the good image is classified whatever came before it
        assert len(predictions) + len(failures) == 2
        assert all("\n" not in reason for _, reason in failures)
        assert grown < MEMORY_BOUND_MB or not measured, f"an image of {len(data)} bytes took {grown:.0f} MB"

    check()
