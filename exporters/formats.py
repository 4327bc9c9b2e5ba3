"""Export formats behind one seam, registered in one place.

A format says which files it writes into the export folder, how to write them
from the fused student, which runtime opens its model file, how to read back
the metadata it carries, and which equivalence checks its artifacts must pass
(gated) or only report. The export stage, its gates, the latency benchmark,
``pipeline predict`` and the shipped runtime all go through this table.

Adding a format: a module ``exporters/NAME.py`` that writes the files, and one
``register_format(ExportFormat(...))`` entry below (see docs/architecture.md).
Importing this module needs neither torch nor the runtimes; writers import
what they need when they run.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporters import metadata as md
from exporters.errors import InputError
from exporters.quantize import Int8Settings, quantize_onnx, quantize_openvino
from exporters.sessions import RuntimeOptions, Session, metadata_of, open_session

ONNX_FILE, ONNX_INT8_FILE = "model.onnx", "model_int8.onnx"
IR_FILE, IR_FP16_FILE, IR_INT8_FILE = "openvino/model.xml", "openvino/model_fp16.xml", "openvino/model_int8.xml"


@dataclass
class ExportJob:
    """What a writer gets: the fused float32 model (eval mode), where to write, and the metadata to embed."""

    model: Any  # torch.nn.Module
    export_dir: Path
    meta: dict[str, Any]
    opset: int | None = None
    exporter: str = "dynamo"


@dataclass(frozen=True)
class Check:
    """One equivalence check of an artifact against the fused PyTorch model."""

    label: str
    file: str
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    gated: bool = True  # False: measured and reported, never enforced
    batch_sizes: tuple[int, ...] | None = None  # None: the gate's batch sizes


@dataclass(frozen=True)
class Int8Variant:
    """A format's post-training INT8 twin (:mod:`exporters.quantize`), made from the format's float model file."""

    files: tuple[str, ...]  # files[0] is the model file
    source: str  # the float model file it is quantized from (and judged against)
    tool: str  # what made it, as its metadata says
    quantize: Callable[[Path, Path, Any, Int8Settings, dict[str, Any]], Path]  # (source, target, images, settings, meta)

    @property
    def model_file(self) -> str:
        return self.files[0]


@dataclass(frozen=True)
class ExportFormat:
    name: str  # as in --formats
    runtime: str  # the runtime that opens its model file (a `pipeline bench` backend)
    files: tuple[str, ...]  # relative to the export folder; files[0] is the model file
    write: Callable[[ExportJob], None]
    read_metadata: Callable[[Path], dict[str, Any]]
    checks: tuple[Check, ...] = ()
    requires: tuple[str, ...] = ()  # formats whose files this one is made from
    int8: Int8Variant | None = None  # written after the float gates pass, behind the INT8 accuracy gate

    @property
    def model_file(self) -> str:
        return self.files[0]

    def open(self, path: Path, options: RuntimeOptions | None = None) -> Session:
        return open_session(path, self.runtime, options)


_FORMATS: dict[str, ExportFormat] = {}


def register_format(fmt: ExportFormat) -> ExportFormat:
    if fmt.name in _FORMATS:
        raise ValueError(f"export format '{fmt.name}' registered twice")
    _FORMATS[fmt.name] = fmt
    return fmt


def format_names() -> tuple[str, ...]:
    return tuple(_FORMATS)


def get_format(name: str) -> ExportFormat:
    if name not in _FORMATS:
        raise InputError(f"unknown export format '{name}'; valid: {', '.join(_FORMATS)}")
    return _FORMATS[name]


def with_requirements(names: Sequence[str]) -> list[ExportFormat]:
    """The formats to write for ``names``, each after the formats it is made from (registry order)."""
    wanted: set[str] = set()

    def add(name: str) -> None:
        if name not in wanted:
            wanted.add(name)
            for required in get_format(name).requires:
                add(required)

    for name in names:
        add(name)
    return [fmt for fmt in _FORMATS.values() if fmt.name in wanted]


def format_of(path: str | Path) -> ExportFormat:
    """The format whose model file has this suffix (``.onnx``, ``.xml``)."""
    suffix = Path(path).suffix.lower()
    for fmt in _FORMATS.values():
        if Path(fmt.model_file).suffix == suffix:
            return fmt
    valid = ", ".join(f"{Path(f.model_file).suffix} ({f.runtime})" for f in _FORMATS.values())
    raise InputError(f"{path}: unknown model format '{suffix}'; valid: {valid}")


def open_artifact(path: str | Path, options: RuntimeOptions | None = None) -> Session:
    """Open an exported model file with the runtime its format names."""
    return format_of(path).open(Path(path), options)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``kdiff.*`` metadata an artifact carries (weights are not loaded where the format allows)."""
    return format_of(path).read_metadata(Path(path))


# --------------------------------------------------------------------------- ONNX

def _write_onnx(job: ExportJob) -> None:
    from exporters.onnx import export_onnx

    export_onnx(job.model, job.export_dir / ONNX_FILE, tuple(job.meta["input_size"]), job.meta, job.opset,
                job.exporter)


def _onnx_metadata(path: Path) -> dict[str, Any]:
    try:
        import onnx
    except ImportError:  # the runtime image ships ONNX Runtime alone: it reads the same properties
        return open_session(path, "onnxruntime").metadata
    proto = onnx.load(str(path), load_external_data=False)
    return md.decode({p.key: p.value for p in proto.metadata_props})


register_format(ExportFormat(
    name="onnx", runtime="onnxruntime", files=(ONNX_FILE,), write=_write_onnx, read_metadata=_onnx_metadata,
    checks=(Check("onnxruntime CPU", ONNX_FILE),),
    int8=Int8Variant(files=(ONNX_INT8_FILE,), source=ONNX_FILE, quantize=quantize_onnx,
                     tool="onnxruntime.quantization.quantize_static (QDQ, per-channel int8 weights)")))


# --------------------------------------------------------------------------- OpenVINO IR

def _write_openvino(job: ExportJob) -> None:
    from exporters.openvino import convert_onnx, save_ir

    ir = convert_onnx(job.export_dir / ONNX_FILE, job.meta)  # the IR is converted from the ONNX file
    save_ir(ir, job.export_dir / IR_FILE, compress_to_fp16=False)
    save_ir(ir, job.export_dir / IR_FP16_FILE, compress_to_fp16=True)


def _openvino_metadata(path: Path) -> dict[str, Any]:
    import openvino as ov

    try:
        return metadata_of(ov.Core().read_model(str(path)))
    except RuntimeError as exc:
        raise InputError(f"OpenVINO cannot read {path}: {str(exc).strip().splitlines()[0]}") from None


register_format(ExportFormat(
    name="openvino", runtime="openvino", requires=("onnx",), write=_write_openvino, read_metadata=_openvino_metadata,
    files=(IR_FILE, IR_FILE.replace(".xml", ".bin"), IR_FP16_FILE, IR_FP16_FILE.replace(".xml", ".bin")),
    checks=(Check("openvino CPU f32", IR_FILE, RuntimeOptions(precision="f32")),
            # OpenVINO's default precision (bf16 on CPUs with AMX/AVX512-BF16) and the FP16 IR: reported only
            Check("openvino CPU default precision", IR_FILE, gated=False, batch_sizes=(7,)),
            Check("openvino CPU FP16 IR", IR_FP16_FILE, gated=False, batch_sizes=(7,))),
    int8=Int8Variant(files=(IR_INT8_FILE, IR_INT8_FILE.replace(".xml", ".bin")), source=IR_FILE,
                     quantize=quantize_openvino, tool="nncf.quantize (OpenVINO IR)")))
