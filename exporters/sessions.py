"""Inference sessions on exported artifacts: ONNX Runtime for ``.onnx``, OpenVINO for ``.xml`` (or ``.onnx``).

The one place where runtime sessions are configured: the export gates, the
latency benchmark, ``pipeline predict`` and the shipped runtime all open their
models here. Needs numpy and the runtime itself, never torch.
"""
from __future__ import annotations

import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exporters import metadata as md
from exporters.errors import InputError

RT_SECTION = "kdiff"  # OpenVINO rt_info section that holds the metadata
log = logging.getLogger(__name__)

# OpenVINO CPU plugin's switch for its low-precision transformations (the pass pipeline that turns an INT8 IR's
# FakeQuantize nodes into integer kernels); False runs the quantizers as float operations.
LOW_PRECISION_TRANSFORMS = "LP_TRANSFORMS_MODE"
ARM_MACHINES = ("aarch64", "arm64")


def int8_kernels_trusted(machine: str | None = None) -> bool:
    """Whether OpenVINO's CPU plugin may run an INT8 IR through its integer kernels on this CPU architecture.

    Not on ARM (OpenVINO 2026.4): there its low-precision path runs each quantized convolution whose output
    quantizer differs in sign from its input's (in ShuffleNetV2: every pointwise convolution after a depthwise one,
    signed in and unsigned out after its ReLU, and the first one) in float16 with the dequantization scales folded
    into the weights (the plugin's ``FallbackUnsupportedLPConvToFP16``), whatever inference precision was asked
    for: 27 of the 37 convolutions of the default student. Measured on the default run's
    student under emulation (``benchmarks/results/2026-12-07-arm64.md``): 79% top-1 agreement with x86 and logits
    off by up to 8.9; with the transformations off the quantizers run as float operations and give the answers
    the x86 gate checked (99.8% agreement, logits within 0.14: two CPUs' float sums round a few values to the
    neighbouring quantization level)."""
    return (machine or platform.machine()).lower() not in ARM_MACHINES


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
    input_shape: list[int | None]  # the graph's first input and output; None: a dynamic dimension
    output_shape: list[int | None]

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
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if not inputs or not outputs:
            raise InputError(f"{path} has no input or no output")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self.input_shape, self.output_shape = _static(inputs[0].shape), _static(outputs[0].shape)
        try:
            self.metadata = md.decode(self.session.get_modelmeta().custom_metadata_map)
        except UnicodeDecodeError:  # the file's metadata is not UTF-8 text
            raise InputError(f"{path}: its metadata is not valid UTF-8 text; re-export it") from None

    def run_all(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.input_name: batch})

    def bind(self, batch: np.ndarray) -> Callable[[], Any]:
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, batch)
        binding.bind_output(self.output_name, "cuda" if self.device == "cuda" else "cpu")
        return lambda: (self.session.run_with_iobinding(binding), binding.synchronize_outputs())


class OpenVINOSession(Session):
    """An OpenVINO model compiled once per input shape.

    The IR's batch axis is dynamic, and OpenVINO runs a dynamic-shape model through shape inference and
    memory planning on every call: measured on a 32x32 ShuffleNetV2 (2 threads), 0.47-0.49 ms a call against
    0.36-0.37 ms for the same IR reshaped to a static [1, 3, 32, 32] (``benchmark_app -data_shape`` vs
    ``-shape``; 1.9 vs 1.8 ms at 224x224). So each new input shape gets its own static copy of the model, compiled
    on first use and kept (a device that classifies one image at a time compiles once).
    """

    MAX_SHAPES = 4  # compiled copies kept; a fifth shape replaces the oldest

    def __init__(self, path: Path, options: RuntimeOptions):
        import openvino as ov

        self._ov, self._core = ov, ov.Core()
        try:
            self.model = self._core.read_model(str(path))
        except Exception as exc:  # OpenVINO raises generic errors for bad files
            raise InputError(f"OpenVINO cannot read {path}: {_first_line(exc)}") from None
        self.metadata = metadata_of(self.model)
        self.input_shape = [d.get_length() if d.is_static else None for d in self.model.input(0).get_partial_shape()]
        self.output_shape = [d.get_length() if d.is_static else None
                             for d in self.model.output(0).get_partial_shape()]
        self.device = "GPU" if options.device == "cuda" else "CPU"
        self.config: dict[str, Any] = {}
        if options.latency:
            self.config.update(PERFORMANCE_HINT="LATENCY", NUM_STREAMS=1)
        if options.threads and self.device == "CPU":
            self.config["INFERENCE_NUM_THREADS"] = options.threads
        if options.precision:
            self.config["INFERENCE_PRECISION_HINT"] = options.precision
        if self.device == "CPU" and not int8_kernels_trusted() and any(
                op.get_type_name() == "FakeQuantize" for op in self.model.get_ops()):
            self.config[LOW_PRECISION_TRANSFORMS] = False
        self._requests: dict[tuple[int, ...], Any] = {}
        if not self.model.is_dynamic():  # compile now: a broken file or device fails at open, not at first call
            self._request_for(tuple(self.model.input(0).get_shape()))

    def _request_for(self, shape: tuple[int, ...]) -> Any:
        """The infer request of the model compiled for inputs of ``shape``."""
        if shape not in self._requests:
            model = self.model
            if model.is_dynamic():
                model = model.clone()
                model.reshape({model.input(0).get_any_name(): self._ov.PartialShape(list(shape))})
            if len(self._requests) >= self.MAX_SHAPES:
                self._requests.pop(next(iter(self._requests)))
            self._requests[shape] = self._compile(model).create_infer_request()
        return self._requests[shape]

    def _compile(self, model: Any) -> Any:
        try:
            return self._core.compile_model(model, self.device, self.config)
        except RuntimeError as exc:
            if LOW_PRECISION_TRANSFORMS not in self.config or LOW_PRECISION_TRANSFORMS not in str(exc):
                raise
            # an OpenVINO without the switch: its own INT8 path, which `verify` then judges against the reference
            log.warning("this OpenVINO (%s) has no %s: its INT8 kernels run on %s, which gave other answers than "
                        "x86 in OpenVINO 2026.4; run `verify` on the export folder here", self._ov.__version__,
                        LOW_PRECISION_TRANSFORMS, platform.machine())
            del self.config[LOW_PRECISION_TRANSFORMS]
            return self._core.compile_model(model, self.device, self.config)

    def run_all(self, batch: np.ndarray) -> list[np.ndarray]:
        request = self._request_for(tuple(batch.shape))
        results = request.infer([batch])
        return [results[i].copy() for i in range(len(request.model_outputs))]

    def bind(self, batch: np.ndarray) -> Callable[[], Any]:
        request = self._request_for(tuple(batch.shape))
        request.set_input_tensor(self._ov.Tensor(batch, shared_memory=True))
        return request.infer


def _static(shape: Any) -> list[int | None]:
    """ONNX Runtime's shape (ints, and names or None for dynamic dimensions) as ints and None."""
    return [d if isinstance(d, int) and d >= 0 else None for d in shape]


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
