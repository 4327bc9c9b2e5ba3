"""The export stage (``pipeline export``): ONNX and OpenVINO IR of the fused student, proven equal to it.

Reads ``RUN_DIR/fused/``; writes ``RUN_DIR/export/``: ``model.onnx``,
``openvino/model.{xml,bin}`` (exact FP32) and ``openvino/model_fp16.{xml,bin}``,
``equivalence.json`` and ``manifest.json`` (sha256 of every artifact, the
input spec and the metadata every artifact carries). The gates compare ONNX
Runtime (CPU provider) and OpenVINO (CPU, f32 inference precision) with the
fused PyTorch model on real held-out images at batch sizes 1 and 7; OpenVINO's
default precision and the FP16 IR are measured and reported, not gated. A
failed gate exits with code 3 and leaves no artifact behind.

Then, unless ``int8`` is off, each format's INT8 twin (``model_int8.onnx``,
``openvino/model_int8.{xml,bin}``, :mod:`exporters.quantize`) is calibrated on
images of the training split and judged on the student's test images against
its own float file: top-1 drop and top-1 agreement, written to ``int8.json``.
A failed INT8 gate exits with code 3 too, removes the INT8 files and leaves the
float artifacts as they were, with their manifest: they stay shippable.
"""
from __future__ import annotations

import logging
import platform
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import torch

from exporters import metadata as md
from exporters.equivalence import Comparison, Tolerances, compare_runner, gate, judge
from exporters.errors import GateFailedError
from exporters.formats import (
    ONNX_FILE,
    ExportFormat,
    ExportJob,
    format_names,
    format_of,
    get_format,
    with_requirements,
)
from exporters.quantize import Int8Result, Int8Settings, judge_int8, predictions, quantization_meta
from exporters.reference import REFERENCE, write_reference
from exporters.sessions import RuntimeOptions
from exporters.verify import check_hashes, is_model_file, read_manifest
from pipeline.config import ExportConfig
from pipeline.errors import BadInputError, parse_list
from pipeline.layout import RunLayout, StageFolder
from pipeline.machine import cpu_identity
from pipeline.stages.base import Stage, StageRun, StageSpec, evaluated_on
from pipeline.stages.loaders import dataset_of, fused_info, held_out, load_fused, run_seed
from pipeline.training.checkpoint import atomic_write_json, file_sha256, read_json, settings_digest
from pipeline.training.data import preprocessing_spec

log = logging.getLogger(__name__)

GATE_BATCH_SIZES = (1, 7)


def _formats() -> tuple[str, ...]:
    return format_names()


@dataclass
class ExportSettings:
    formats: tuple[str, ...] = field(default_factory=_formats)
    opset: int | None = None
    exporter: str = "dynamo"
    images: int = 64
    tolerances: Tolerances = field(default_factory=Tolerances)
    int8: Int8Settings | None = field(default_factory=Int8Settings)  # None: no INT8 artifacts
    int8_eval_images: int | None = None  # None: the images the student was tested on
    reference_images: int = 32  # held-out images whose answers reference.npz records (what verify compares)

    def as_dict(self) -> dict[str, Any]:
        """The settings of the float artifacts (the INT8 step's are :meth:`int8_dict`)."""
        return {"formats": list(self.formats), "opset": self.opset, "exporter": self.exporter, "images": self.images,
                "tolerances": vars(self.tolerances), "reference_images": self.reference_images}

    def int8_dict(self) -> dict[str, Any] | None:
        return None if self.int8 is None else {**self.int8.as_dict(), "eval_images": self.int8_eval_images}


def parse_formats(text: str) -> tuple[str, ...]:
    return parse_list(text, format_names(), "export format(s)")


# --------------------------------------------------------------------------- gates

def gate_artifacts(model: torch.nn.Module, folder: StageFolder, formats: Sequence[str], images: torch.Tensor,
                   tol: Tolerances) -> tuple[list[Comparison], list[Comparison]]:
    """(gated comparisons, reported-only comparisons): every check each requested format declares."""
    gated, reported = [], []
    for fmt in (get_format(name) for name in formats):
        for check in fmt.checks:
            session = fmt.open(folder / check.file, check.options)
            results = compare_runner(check.label, model, session.run, images, check.batch_sizes or GATE_BATCH_SIZES)
            (gated if check.gated else reported).extend(results)
    for c in gated + reported:
        judge(c, tol)  # reported ones get the tolerance they would have had; not enforced
    return gated, reported


def log_comparisons(comparisons: Sequence[Comparison], enforced: bool) -> None:
    for c in comparisons:
        verdict = ("ok" if c.passed else "FAILED") if enforced else "reported"
        log.info("export: %-40s max abs diff %.2e (tol %.1e), top-1 agreement %.1f%% -> %s", c.name, c.max_abs_diff,
                 c.tolerance, c.top1_agreement, verdict)


# --------------------------------------------------------------------------- stage

def artifact_list(folder: StageFolder, formats: Sequence[ExportFormat]) -> list[str]:
    files = [name for fmt in formats for name in fmt.files]
    extra = [f"{name}.data" for name in files if name.endswith(".onnx") and (folder / f"{name}.data").exists()]
    return files + extra  # an ONNX model over 2 GB keeps its weights in NAME.onnx.data


def made_by(layout: RunLayout) -> dict[str, str]:
    """The settings fingerprints of the stages that made the fused student, from their records (a file's
    provenance; the run's config.yaml also holds settings that do not shape the model)."""
    records = {"distill": layout.student.marker, "fuse": layout.fused.marker}
    return {stage: str((read_json(path) or {}).get("settings_hash", "")) for stage, path in records.items()}


def run_export(layout: RunLayout, settings: ExportSettings, data_root: str | None = None,
               verify_only: bool = False) -> dict[str, Any]:
    """Export (or with ``verify_only`` re-check existing artifacts); raises GateFailedError on a failed gate.

    The float artifacts and the INT8 step are judged up to date separately: ``stage.json`` holds the float
    artifacts' settings hash and, once the INT8 twins passed their gate, the INT8 settings' hash. Changing only
    the INT8 settings (or a failed INT8 gate) never rewrites the float files."""
    from exporters.onnx import INPUT_NAME, OUTPUT_NAME

    info = fused_info(layout)
    stage = Stage(layout.export, "export")
    fused_sha = file_sha256(layout.fused.model)
    size, dataset = info["input_size"][-1], dataset_of(layout, info)
    meta = md.build(info, input_name=INPUT_NAME, output_name=OUTPUT_NAME, source_sha256=fused_sha,
                    made_by=made_by(layout), preprocessing=preprocessing_spec(dataset, size, info["mean"], info["std"]))
    settings_hash = settings_digest({"settings": settings.as_dict(), "fused": fused_sha, "metadata": meta})
    int8_hash = settings_digest({"int8": settings.int8_dict(), "float": settings_hash}) if settings.int8 else None
    to_write = with_requirements(settings.formats)
    done = None if verify_only else stage.finished(settings_hash)
    if done is not None and done.get("int8_hash") == int8_hash and done.get("int8_passed", True):
        log.info("export: artifacts are up to date with the fused student; skipping")
        return done
    if done is not None:
        log.info("export: the float artifacts are up to date; only the INT8 step runs")
        files = artifact_list(stage.folder, to_write)
        return finish_int8(layout, stage, settings, settings_hash, int8_hash, to_write, files, meta, info, dataset,
                           data_root, {k: done[k] for k in ("formats", "opset", "equivalence_passed") if k in done},
                           reference_inputs(dataset, size, data_root, settings.reference_images))
    model, info = load_fused(layout)
    if not verify_only:
        stage.marker.unlink(missing_ok=True)
        job = ExportJob(model, stage.dir, meta, settings.opset, settings.exporter)
        for fmt in to_write:
            fmt.write(job)
    else:  # the files must still be the ones the manifest lists before their numbers mean anything
        missing = [name for name in artifact_list(stage.folder, to_write) if not (stage.folder / name).exists()]
        if missing:
            raise BadInputError(f"nothing to verify: {stage.folder / missing[0]} does not exist; run `pipeline export`")
        check_hashes(stage.dir, read_manifest(stage.dir))

    images = held_out({"dataset": dataset, "image_size": size},
                      data_root, settings.images)[0]
    gated, reported = gate_artifacts(model, stage.folder, settings.formats, images, settings.tolerances)
    log_comparisons(gated, enforced=True)
    log_comparisons(reported, enforced=False)
    passed = all(c.passed for c in gated)
    report = {"passed": passed, "tolerances": vars(settings.tolerances), "images": len(images),
              "batch_sizes": list(GATE_BATCH_SIZES), "gated": [c.as_dict() for c in gated],
              "reported": [c.as_dict() for c in reported]}
    atomic_write_json(stage.folder.verify_report if verify_only else stage.folder.equivalence, report)
    files = artifact_list(stage.folder, to_write)
    if not passed:
        stage.marker.unlink(missing_ok=True)
        if not verify_only:  # a model that failed its gate is never left where it could be shipped
            for path in [stage.folder / name for name in [*files, REFERENCE]] + [stage.folder.manifest]:
                path.unlink(missing_ok=True)
    gate(gated, "export")
    if verify_only:
        log.info("export: the artifacts in %s still match the fused student", stage.dir)
        return report
    inputs = reference_inputs(dataset, size, data_root, settings.reference_images)
    manifest = write_manifest(stage.folder, files, meta, settings, inputs)
    summary = {"formats": list(settings.formats), "opset": manifest["onnx"]["opset"], "equivalence_passed": True}
    stage.mark_complete(settings_hash, files + list(OUTPUTS), summary)  # the float artifacts are final
    return finish_int8(layout, stage, settings, settings_hash, int8_hash, to_write, files, meta, info, dataset,
                       data_root, summary, inputs)


def finish_int8(layout: RunLayout, stage: Stage, settings: ExportSettings, settings_hash: str, int8_hash: str | None,
                formats: Sequence[ExportFormat], files: list[str], meta: dict[str, Any], info: dict[str, Any],
                dataset: str, data_root: str | None, summary: dict[str, Any], inputs: np.ndarray) -> dict[str, Any]:
    """The INT8 step after the float artifacts are final: quantize, judge, and list what passed in the manifest
    and ``stage.json`` (with each listed model's answers to ``inputs`` in ``reference.npz``); with INT8 off,
    remove what an earlier run left. The float files are never touched."""
    int8_files = [name for fmt in formats if fmt.int8 for name in fmt.int8.files]

    def float_only(record: dict[str, Any]) -> dict[str, Any]:
        """No INT8 file left to ship; the manifest and stage.json list the float artifacts alone."""
        for name in int8_files:
            (stage.folder / name).unlink(missing_ok=True)
        write_manifest(stage.folder, files, meta, settings, inputs)
        return stage.mark_complete(settings_hash, files + list(OUTPUTS), record)

    stage.folder.int8_report.unlink(missing_ok=True)
    for leftover in stage.dir.glob(".int8-*"):  # the scratch folder of an INT8 step that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    if settings.int8 is None:
        return float_only(summary)
    # Until new INT8 files pass their gate the folder holds, and its manifest lists, the float artifacts alone: a
    # step killed half-way (SIGTERM, SIGKILL, a crash) leaves nothing stale beside them, and a rerun redoes it.
    float_only(summary)
    results, tags = quantize_and_judge(layout, stage.folder, formats, settings, meta, info, dataset, data_root)
    if not all(r.passed for r in results):
        float_only({**summary, "int8_passed": False})
        failed = "; ".join(r.describe() for r in results if not r.passed)
        raise GateFailedError(f"export INT8 accuracy gate failed: {failed}. The INT8 files were removed; the float "
                              f"artifacts in {stage.dir} passed their gates and are the ones to ship")
    write_manifest(stage.folder, files + int8_files, meta, settings, inputs, {
        "quantization": tags, "int8": [r.as_dict() for r in results],
        "int8_checked_on": cpu_identity()})  # INT8 answers depend on the CPU's kernels (VNNI, AMX, NEON...)
    int8 = {r.file: {"top1": r.int8_top1, "drop": r.drop, "agreement": r.agreement} for r in results}
    return stage.mark_complete(settings_hash, files + list(OUTPUTS) + int8_files + ["int8.json"],
                               {**summary, "int8_hash": int8_hash, "int8": int8})


def quantize_and_judge(layout: RunLayout, folder: StageFolder, formats: Sequence[ExportFormat],
                       settings: ExportSettings, meta: dict[str, Any], info: dict[str, Any], dataset: str,
                       data_root: str | None) -> tuple[list[Int8Result], dict[str, dict[str, Any]]]:
    """Write each format's INT8 twin, calibrated on training images, and judge it against its float file on the
    student's test images; ``int8.json`` records the verdicts (written whether they pass or not). Returns the
    verdicts and the ``quantization`` metadata of each INT8 model file."""
    int8 = settings.int8
    assert int8 is not None
    seed, size = run_seed(layout), info["input_size"][-1]
    fused_metrics = read_json(layout.fused.metrics) or {}
    split = evaluated_on(fused_metrics.get("validation"))  # the images the student and fused top-1 were measured on
    where = {"dataset": dataset, "image_size": size, "validation": split["validation"]}
    calibration = held_out(where, data_root, int8.calibration_images, seed, split="train")[0].numpy()
    count = settings.int8_eval_images or fused_metrics.get("test_images") or 10**9
    images, labels = (t.numpy() for t in held_out(where, data_root, count, seed))
    results, tags = [], {}
    for fmt in formats:
        if fmt.int8 is None:
            continue
        variant = fmt.int8
        tags[variant.model_file] = quantization_meta(int8, variant.tool, calibration, seed)
        variant.quantize(folder / variant.source, folder / variant.model_file, calibration, int8,
                         {**meta, "quantization": tags[variant.model_file]})
        exact = fmt.open(folder / variant.source, RuntimeOptions(precision="f32")).run
        results.append(judge_int8(variant.model_file, variant.source,
                                  predictions(fmt.open(folder / variant.model_file).run, images),
                                  predictions(exact, images), labels, int8))
    for r in results:
        log.info("export: INT8 %s -> %s", r.describe(), "ok" if r.passed else "FAILED")
    atomic_write_json(folder.int8_report, {
        "passed": all(r.passed for r in results), "settings": int8.as_dict(), "calibration": {
            "images": len(calibration), "split": "train", "seed": seed}, "test_images": len(labels), **split,
        "rule": int8.rule(), "checked_on": cpu_identity(),
        "results": [r.as_dict() for r in results]})
    return results, tags


def reference_inputs(dataset: str, size: int, data_root: str | None, count: int) -> np.ndarray:
    """The inputs of ``reference.npz``: ``count`` held-out images, drawn as the equivalence gates draw theirs (same
    split, same seed), preprocessed as the runtime feeds them (float32 N x C x H x W)."""
    return held_out({"dataset": dataset, "image_size": size}, data_root, count)[0].numpy().astype(np.float32)


def write_manifest(folder: StageFolder, files: Sequence[str], meta: dict[str, Any], settings: ExportSettings,
                   inputs: np.ndarray, int8: dict[str, Any] | None = None) -> dict[str, Any]:
    """``reference.npz`` (each model file's answers to ``inputs`` here), then ``manifest.json`` listing ``files``
    and it. ``int8``: the INT8 step's ``quantization`` tags per model file, and its other manifest fields."""
    models = [name for name in files if is_model_file(name)]
    logits = {name: format_of(folder / name).open(folder / name, RuntimeOptions(precision="f32")).run(inputs)
              for name in models}
    write_reference(folder / REFERENCE, inputs, logits)
    manifest = build_manifest(folder, [*files, REFERENCE], meta, settings)
    extra = dict(int8 or {})
    tags = extra.pop("quantization", {})
    for artifact in manifest["artifacts"]:  # what an INT8 model carries beside the shared metadata
        if artifact["path"] in tags:
            artifact["quantization"] = tags[artifact["path"]]
    manifest.update(extra)
    atomic_write_json(folder.manifest, manifest)
    return manifest


def build_manifest(folder: StageFolder, files: Sequence[str], meta: dict[str, Any],
                   settings: ExportSettings) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import openvino

    proto = onnx.load(str(folder / ONNX_FILE), load_external_data=False)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    c, h, w = meta["input_size"]
    files = [*files, *external_data_files(folder, files)]  # the runtime loads them: verify must check them too
    artifacts = [{"path": name, "bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
                 for name in files]
    return {
        "artifacts": with_checked_on(artifacts, read_json(folder.manifest)),
        "input": {"name": meta["input_name"], "shape": ["batch", c, h, w], "dtype": "float32",
                  "layout": meta["layout"], "channel_order": meta["channel_order"], "mean": meta["mean"],
                  "std": meta["std"], "pixel_scale": meta["pixel_scale"], "fit": meta["fit"],
                  "preprocessing": meta.get("preprocessing")},
        "output": {"name": meta["output_name"], "shape": ["batch", len(meta["classes"])], "meaning": meta["output"]},
        "classes": meta["classes"],
        "metadata": meta,
        "onnx": {"opset": opset, "exporter": settings.exporter, "ir_version": proto.ir_version},
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     "openvino": openvino.__version__},
    }


def with_checked_on(artifacts: list[dict[str, Any]], previous: Any) -> list[dict[str, Any]]:
    """Each artifact with ``checked_on``: the CPU architectures its checks ran on. This machine's (the export's
    gates ran every file here), then those the previous manifest recorded for the very same bytes (a device-side
    check, ``exporters.verify.record_check``, that a re-export of unchanged files keeps)."""
    here = platform.machine()
    earlier = {a.get("path"): a for a in (previous or {}).get("artifacts", []) if isinstance(a, dict)} \
        if isinstance(previous, dict) and isinstance(previous.get("artifacts"), list) else {}
    for artifact in artifacts:
        old = earlier.get(artifact["path"], {})
        kept = old.get("checked_on") if old.get("sha256") == artifact["sha256"] else None
        archs = [a for a in kept if isinstance(a, str)] if isinstance(kept, list) else []
        artifact["checked_on"] = [here, *(a for a in dict.fromkeys(archs) if a != here)]
    return artifacts


def external_data_files(folder: StageFolder, files: Sequence[str]) -> list[str]:
    """The external-data files (``model.onnx.data``) the listed ONNX models load, relative to the folder."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data  # every tensor, subgraphs too

    found: list[str] = []
    for name in files:
        if not name.endswith(".onnx"):
            continue
        for tensor in _get_all_tensors(onnx.load(str(folder / name), load_external_data=False)):
            if uses_external_data(tensor):
                location = next((e.value for e in tensor.external_data if e.key == "location"), "")
                if not location or PurePosixPath(location).is_absolute() or ".." in PurePosixPath(location).parts:
                    raise BadInputError(f"{folder / name} names external data {location!r} outside its folder")
                relative = (PurePosixPath(name).parent / location).as_posix()
                if relative not in files and relative not in found:
                    found.append(relative)
    return found


def export_settings(e: ExportConfig) -> ExportSettings:
    """The export stage's settings from the config's ``export`` section."""
    int8 = (Int8Settings(e.calibration_images, e.int8_preset, e.int8_max_drop, e.int8_min_agreement,
                         saturation_safe=e.int8_saturation_safe, confidence=e.int8_confidence) if e.int8 else None)
    return ExportSettings(tuple(e.formats), e.opset, e.exporter, e.images,
                          Tolerances(fp32_rel=e.fp32_tol, min_top1_agreement=e.min_top1_agreement), int8,
                          e.int8_eval_images, e.reference_images)


def run_export_stage(run: StageRun) -> dict[str, Any]:
    return run_export(run.layout, export_settings(run.cfg.export), run.cfg.data.data_root)


OUTPUTS = ("manifest.json", "equivalence.json", REFERENCE)
STAGE = StageSpec(name="export", folder=lambda layout: layout.export, run=run_export_stage,
                  inputs=lambda layout: [layout.fused.model], outputs=OUTPUTS)
