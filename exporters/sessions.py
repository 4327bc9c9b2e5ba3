"""Inference sessions on exported artifacts: ONNX Runtime for ``.onnx``, OpenVINO for ``.xml`` (or ``.onnx``).

The one place where runtime sessions are configured: the export gates, the
latency benchmark, ``pipeline predict`` and the shipped runtime all open their
models here. Needs numpy and the runtime itself, never torch.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exporters import metadata as md
from exporters.errors import InputError

RT_SECTION = "kdiff"  # OpenVINO rt_info section that holds the metadata


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run a model.

    ``latency``: tuned for one request at a time, as a latency benchmark or an
    edge device runs it (ONNX Runtime: one inter-op thread and idle workers that
    do not spin, so sessions side by side do not steal each other's cores;
    OpenVINO: the LATENCY hint with one stream). ``precision`` is OpenVINO's
    inference precision (``f32``; None: the device's default, bf16 on CPUs with
    AMX or AVX512-BF16).
    """

    threads: int | None = None
    device: str = "cpu"  # cpu | cuda
    provider: str | None = None  # ONNX Runtime execution provider (default: the device's)
    precision: str | None = None
    latency: bool = False


class Session:
    """A loaded model: ``run`` for the logits, ``bind`` for a timed call on a fixed input."""

    metadata: dict[str, Any]

    def run_all(self, batch: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.run_all(batch)[0]

    def bind(self, batch: np.ndarray) -> Callable[[], Any]:
        """The call to time: input bound once, outside the call (as OpenVINO's ``benchmark_app`` does)."""
        return lambda: self.run_all(batch)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class OnnxRuntimeSession(Session):
    def __init__(self, path: Path, options: RuntimeOptions):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if options.threads:
            so.intra_op_num_threads = options.threads
        if options.latency:
            so.inter_op_num_threads = 1
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        provider = options.provider or ("CUDAExecutionProvider" if options.device == "cuda" else "CPUExecutionProvider")
        self.device = options.device
        try:
            self.session = ort.InferenceSession(str(path), so, providers=[provider])
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise InputError(f"onnxruntime cannot load {path}: {_first_line(exc)}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.metadata = md.decode(self.session.get_modelmeta().custom_metadata_map)

    def run_all(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.input_name: batch})

    def bind(self, batch: np.ndarray) -> Callable[[], Any]:
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, batch)
        binding.bind_output(self.output_name, "cuda" if self.device == "cuda" else "cpu")
        return lambda: (self.session.run_with_iobinding(binding), binding.synchronize_outputs())


class OpenVINOSession(Session):
    def __init__(self, path: Path, options: RuntimeOptions):
        import openvino as ov

        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except Exception as exc:  # OpenVINO raises generic errors for bad files
            raise InputError(f"OpenVINO cannot read {path}: {_first_line(exc)}") from None
        self.metadata = metadata_of(model)
        device = "GPU" if options.device == "cuda" else "CPU"
        config: dict[str, Any] = {}
        if options.latency:
            config.update(PERFORMANCE_HINT="LATENCY", NUM_STREAMS=1)
        if options.threads and device == "CPU":
            config["INFERENCE_NUM_THREADS"] = options.threads
        if options.precision:
            config["INFERENCE_PRECISION_HINT"] = options.precision
        self._ov = ov
        self.compiled = core.compile_model(model, device, config)
        self.request = self.compiled.create_infer_request()

    def run_all(self, batch: np.ndarray) -> list[np.ndarray]:
        results = self.request.infer([batch])
        return [results[i].copy() for i in range(len(self.compiled.outputs))]

    def bind(self, batch: np.ndarray) -> Callable[[], Any]:
        self.request.set_input_tensor(self._ov.Tensor(batch, shared_memory=True))
        return self.request.infer


def metadata_of(model: Any) -> dict[str, Any]:
    """The ``kdiff.*`` metadata in an OpenVINO model's rt_info (empty when it has none)."""
    if not model.has_rt_info([RT_SECTION]):
        return {}
    section = model.get_rt_info([RT_SECTION])
    # OpenVINO releases differ in what they return here: an OVAny to convert, or plain values
    items = section.astype(dict) if hasattr(section, "astype") else dict(section)
    return md.decode({md.PREFIX + key: (value.astype(str) if hasattr(value, "astype") else str(value))
                      for key, value in items.items()})


RUNTIMES: dict[str, type[Session]] = {"onnxruntime": OnnxRuntimeSession, "openvino": OpenVINOSession}


def open_session(path: str | Path, runtime: str, options: RuntimeOptions | None = None) -> Session:
    """Open ``path`` with the named runtime (``onnxruntime`` or ``openvino``)."""
    path = Path(path)
    if runtime not in RUNTIMES:
        raise InputError(f"unknown runtime '{runtime}'; valid: {', '.join(RUNTIMES)}")
    if not path.is_file():
        raise InputError(f"model file {path} does not exist")
    return RUNTIMES[runtime](path, options or RuntimeOptions())
