"""The export stage (``pipeline export``): ONNX and OpenVINO IR of the fused student, proven equal to it.

Reads ``RUN_DIR/fused/``; writes ``RUN_DIR/export/``: ``model.onnx``,
``openvino/model.{xml,bin}`` (exact FP32) and ``openvino/model_fp16.{xml,bin}``,
``equivalence.json`` and ``manifest.json`` (sha256 of every artifact, the
input spec and the metadata every artifact carries). The gates compare ONNX
Runtime (CPU provider) and OpenVINO (CPU, f32 inference precision) with the
fused PyTorch model on real held-out images at batch sizes 1 and 7; OpenVINO's
default precision and the FP16 IR are measured and reported, not gated. A
failed gate exits with code 3 and leaves no artifact behind.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporters import metadata as md
from pipeline.checkpoint import atomic_write_json, file_sha256, load_weights_into, read_json, settings_digest
from pipeline.equivalence import Comparison, Tolerances, compare_outputs, gate, judge
from pipeline.errors import BadInputError, parse_list
from pipeline.fuse import held_out_images
from pipeline.stage import Stage

log = logging.getLogger(__name__)

FORMATS = ("onnx", "openvino")
GATE_BATCH_SIZES = (1, 7)
ONNX_FILE = "model.onnx"
IR_FILE, IR_FP16_FILE = "openvino/model.xml", "openvino/model_fp16.xml"


@dataclass
class ExportSettings:
    formats: tuple[str, ...] = FORMATS
    opset: int | None = None
    exporter: str = "dynamo"
    images: int = 64
    tolerances: Tolerances = field(default_factory=Tolerances)

    def as_dict(self) -> dict[str, Any]:
        return {"formats": list(self.formats), "opset": self.opset, "exporter": self.exporter, "images": self.images,
                "tolerances": vars(self.tolerances)}


def parse_formats(text: str) -> tuple[str, ...]:
    return parse_list(text, FORMATS, "export format(s)")


def load_fused(run_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The fused student as its stock torchvision class, and its ``model.json``."""
    from models import ModelError, build_model

    fused_dir = Path(run_dir) / "fused"
    info = read_json(fused_dir / "model.json")
    record = read_json(fused_dir / "stage.json")
    if not isinstance(info, dict) or not isinstance(record, dict) or record.get("status") != "complete":
        raise BadInputError(f"no fused student in {fused_dir} (model.json or stage.json missing); "
                            "run `pipeline fuse` first")
    try:
        model, _, _ = build_model(info["zoo_name"], info["num_classes"], info["input_size"][-1], role="student")
    except ModelError as exc:
        raise BadInputError(f"cannot rebuild the fused student of {fused_dir}: {exc}") from None
    load_weights_into(model, fused_dir / "model.pt", "fused student", fused_dir / "model.json")
    return model.float().eval(), info


def dataset_of(run_dir: Path, info: dict[str, Any]) -> str:
    if "dataset" in info:
        return info["dataset"]
    student = read_json(Path(run_dir) / "student" / "metrics.json") or {}
    if "dataset" not in student:
        raise BadInputError(f"cannot tell which dataset {run_dir} was trained on (no student/metrics.json)")
    return student["dataset"]


# --------------------------------------------------------------------------- gates

Runner = Callable[[np.ndarray], np.ndarray]


def onnxruntime_runner(path: Path, threads: int | None = None, provider: str = "CPUExecutionProvider") -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=[provider])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})[0]


def openvino_runner(path: Path, config: dict[str, Any] | None = None, device: str = "CPU") -> Runner:
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), device, config or {})
    request = compiled.create_infer_request()
    return lambda batch: request.infer([batch])[0].copy()


def compare_runner(name: str, reference: torch.nn.Module, runner: Runner, images: torch.Tensor,
                   batch_sizes: Sequence[int]) -> list[Comparison]:
    """The runner vs the fused PyTorch model at each batch size, over all ``images``."""
    with torch.no_grad():
        expected = reference(images)
    results = []
    for batch in batch_sizes:
        outputs = [runner(np.ascontiguousarray(chunk.numpy())) for chunk in images.split(batch)]
        got = torch.from_numpy(np.concatenate(outputs)).double()
        results.append(compare_outputs(f"{name}, batch {batch}", expected, got, "float32"))
    return results


def gate_artifacts(model: torch.nn.Module, export_dir: Path, formats: Sequence[str], images: torch.Tensor,
                   tol: Tolerances) -> tuple[list[Comparison], list[Comparison]]:
    """(gated comparisons, reported-only comparisons) for the artifacts in ``export_dir``."""
    gated, reported = [], []
    if "onnx" in formats:
        gated += compare_runner("onnxruntime CPU", model, onnxruntime_runner(export_dir / ONNX_FILE), images,
                                GATE_BATCH_SIZES)
    if "openvino" in formats:
        ir, ir16 = export_dir / IR_FILE, export_dir / IR_FP16_FILE
        gated += compare_runner("openvino CPU f32", model,
                                openvino_runner(ir, {"INFERENCE_PRECISION_HINT": "f32"}), images, GATE_BATCH_SIZES)
        reported += compare_runner("openvino CPU default precision", model, openvino_runner(ir), images, (7,))
        reported += compare_runner("openvino CPU FP16 IR", model, openvino_runner(ir16), images, (7,))
    for c in gated:
        judge(c, tol)
    for c in reported:
        judge(c, tol)  # fills in the tolerance it would have had; not enforced
    return gated, reported


def log_comparisons(comparisons: Sequence[Comparison], enforced: bool) -> None:
    for c in comparisons:
        verdict = ("ok" if c.passed else "FAILED") if enforced else "reported"
        log.info("export: %-40s max abs diff %.2e (tol %.1e), top-1 agreement %.1f%% -> %s", c.name, c.max_abs_diff,
                 c.tolerance, c.top1_agreement, verdict)


# --------------------------------------------------------------------------- stage

def artifact_list(export_dir: Path, formats: Sequence[str]) -> list[str]:
    files = [ONNX_FILE]
    if "openvino" in formats:
        files += [IR_FILE, IR_FILE.replace(".xml", ".bin"), IR_FP16_FILE, IR_FP16_FILE.replace(".xml", ".bin")]
    if (export_dir / (ONNX_FILE + ".data")).exists():
        files.append(ONNX_FILE + ".data")
    return files


def write_artifacts(model: torch.nn.Module, export_dir: Path, formats: Sequence[str], meta: dict[str, Any],
                    settings: ExportSettings) -> None:
    from exporters.onnx import export_onnx

    input_size = tuple(meta["input_size"])
    # the IR is converted from the ONNX file, so ONNX is always written
    export_onnx(model, export_dir / ONNX_FILE, input_size, meta, settings.opset, settings.exporter)
    if "openvino" in formats:
        from exporters.openvino import convert_onnx, save_ir

        ir = convert_onnx(export_dir / ONNX_FILE, meta)
        save_ir(ir, export_dir / IR_FILE, compress_to_fp16=False)
        save_ir(ir, export_dir / IR_FP16_FILE, compress_to_fp16=True)


def run_export(run_dir: Path, settings: ExportSettings, data_root: str | None = None,
               verify_only: bool = False) -> dict[str, Any]:
    """Export (or with ``verify_only`` re-check existing artifacts); raises GateFailedError on a failed gate."""
    from exporters.onnx import INPUT_NAME, OUTPUT_NAME

    run_dir = Path(run_dir)
    model, info = load_fused(run_dir)
    stage = Stage(run_dir, "export")
    fused_sha = file_sha256(run_dir / "fused" / "model.pt")
    config = run_dir / "config.yaml"
    meta = md.build(info, input_name=INPUT_NAME, output_name=OUTPUT_NAME, source_sha256=fused_sha,
                    config_sha256=file_sha256(config) if config.exists() else None)
    settings_hash = settings_digest({"settings": settings.as_dict(), "fused": fused_sha, "metadata": meta})
    if not verify_only:
        done = stage.finished(settings_hash)
        if done is not None:
            log.info("export: artifacts are up to date with the fused student; skipping")
            return done
        stage.marker.unlink(missing_ok=True)
        write_artifacts(model, stage.dir, settings.formats, meta, settings)
    elif not (stage.dir / ONNX_FILE).exists():
        raise BadInputError(f"nothing to verify: {stage.dir / ONNX_FILE} does not exist; run `pipeline export`")

    images = held_out_images({"dataset": dataset_of(run_dir, info), "image_size": info["input_size"][-1]},
                             data_root, settings.images)
    gated, reported = gate_artifacts(model, stage.dir, settings.formats, images, settings.tolerances)
    log_comparisons(gated, enforced=True)
    log_comparisons(reported, enforced=False)
    passed = all(c.passed for c in gated)
    report = {"passed": passed, "tolerances": vars(settings.tolerances), "images": len(images),
              "batch_sizes": list(GATE_BATCH_SIZES), "gated": [c.as_dict() for c in gated],
              "reported": [c.as_dict() for c in reported]}
    atomic_write_json(stage.dir / ("verify.json" if verify_only else "equivalence.json"), report)
    files = artifact_list(stage.dir, settings.formats)
    if not passed:
        stage.marker.unlink(missing_ok=True)
        if not verify_only:  # a model that failed its gate is never left where it could be shipped
            for name in files + ["manifest.json"]:
                (stage.dir / name).unlink(missing_ok=True)
    gate(gated, "export")
    if verify_only:
        log.info("export: the artifacts in %s still match the fused student", stage.dir)
        return report

    manifest = build_manifest(stage.dir, files, meta, settings)
    atomic_write_json(stage.dir / "manifest.json", manifest)
    return stage.mark_complete(settings_hash, files + ["manifest.json", "equivalence.json"],
                               {"formats": list(settings.formats), "opset": manifest["onnx"]["opset"],
                                "equivalence_passed": True})


def build_manifest(export_dir: Path, files: Sequence[str], meta: dict[str, Any],
                   settings: ExportSettings) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import openvino

    proto = onnx.load(str(export_dir / ONNX_FILE), load_external_data=False)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    c, h, w = meta["input_size"]
    return {
        "artifacts": [{"path": name, "bytes": (export_dir / name).stat().st_size,
                       "sha256": file_sha256(export_dir / name)} for name in files],
        "input": {"name": meta["input_name"], "shape": ["batch", c, h, w], "dtype": "float32",
                  "layout": meta["layout"], "channel_order": meta["channel_order"], "mean": meta["mean"],
                  "std": meta["std"], "pixel_scale": meta["pixel_scale"], "fit": meta["fit"]},
        "output": {"name": meta["output_name"], "shape": ["batch", len(meta["classes"])], "meaning": meta["output"]},
        "classes": meta["classes"],
        "metadata": meta,
        "onnx": {"opset": opset, "exporter": settings.exporter, "ir_version": proto.ir_version},
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     "openvino": openvino.__version__},
    }
