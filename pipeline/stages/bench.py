"""The bench stage (``pipeline bench``): latency of the fused, unfused and stock student per backend and device.

Reads ``RUN_DIR/fused``, ``RUN_DIR/student`` and (when present)
``RUN_DIR/export``; writes ``RUN_DIR/bench/latency.json`` (machine info, the
budget, one row per target x variant x batch size, fused/stock and
fused/unfused ratios) and logs the table. ``stock`` is the torchvision
network the student is built on, freshly initialised: the same architecture
as the fused student, so fused/stock ~ 1 shows that fusion left nothing behind.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from exporters.formats import IR_FILE, IR_INT8_FILE, ONNX_FILE, ONNX_INT8_FILE
from exporters.latency import (BACKENDS, DEVICES, Budget, Variant, format_table, latency_result, measure_target,
                               parse_batch_sizes, ratios, targets_for)
from models import build_model
from pipeline.config import BenchConfig
from pipeline.errors import BadInputError, parse_list
from pipeline.layout import RunLayout
from pipeline.machine import machine_info, other_load, usable_cores
from pipeline.stages.base import Stage, StageRun, StageSpec
from pipeline.stages.loaders import load_fused, load_student
from pipeline.training.checkpoint import atomic_write_json, file_sha256, settings_digest

log = logging.getLogger(__name__)


def parse_devices(text: str) -> tuple[str, ...]:
    return DEVICES if text.strip().lower() == "all" else parse_list(text, DEVICES, "device")


def module_digest(module: torch.nn.Module, meta: dict[str, Any]) -> str:
    """sha256 of what an ONNX export of ``module`` depends on: its class, every tensor of its state (name, dtype,
    shape, bytes), the export's metadata and the torch version."""
    h = hashlib.sha256(f"{type(module).__qualname__}|{json.dumps(meta, sort_keys=True)}|{torch.__version__}".encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def export_variant_onnx(module: torch.nn.Module, path: Path, meta: dict[str, Any]) -> Path:
    """The variant's ONNX file, exported again only when the module or the settings changed since the file was
    written (``NAME.source.json`` beside it records the module's digest and the file's sha256): a rerun of the
    bench after a bench setting changed skips the exporter (about 10 s a variant)."""
    from exporters.onnx import export_onnx

    source = {"module": module_digest(module, meta)}
    stamp = path.with_suffix(".source.json")
    if path.is_file() and stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == {**source, "sha256": file_sha256(path)}:
                log.info("bench: %s is up to date with its model; not exported again", path)
                return path
        except (OSError, ValueError):
            pass  # unreadable: export again
    export_onnx(module, path, tuple(meta["input_size"]), meta)
    atomic_write_json(stamp, {**source, "sha256": file_sha256(path)})
    return path


def load_variants(layout: RunLayout, work_dir: Path, need_onnx: bool) -> tuple[list[Variant], dict[str, Any]]:
    """fused, unfused and stock versions of the run's student, with ONNX files when ``need_onnx``."""
    fused, info = load_fused(layout)
    unfused, _ = load_student(layout)
    with torch.random.fork_rng():  # seeded: the same stock weights every time (its ONNX file is then reusable)
        torch.manual_seed(0)
        stock, _, _ = build_model(info["zoo_name"], info["num_classes"], info["input_size"][-1], role="student")
    variants = [Variant("fused", fused), Variant("unfused", unfused.float().eval()), Variant("stock", stock.eval())]
    if need_onnx:
        export = layout.export
        exported = export.marker.exists() and (export / ONNX_FILE).exists()
        meta = {"architecture": info["architecture"], "input_size": info["input_size"]}
        for variant in variants:
            if variant.name == "fused" and exported:
                variant.onnx = export / ONNX_FILE
                variant.ir = export / IR_FILE if (export / IR_FILE).exists() else None
            else:
                variant.onnx = export_variant_onnx(variant.module, work_dir / f"{variant.name}.onnx", meta)
        int8 = int8_variant(layout)
        if int8 is not None:
            variants.insert(1, int8)
    return variants, info


def int8_variant(layout: RunLayout) -> Variant | None:
    """The export stage's INT8 artifacts (they passed its accuracy gate) as one variant, when the stage made them."""
    export = layout.export
    if not (export.marker.exists() and (export / ONNX_INT8_FILE).exists()):
        return None
    return Variant("int8", None, export / ONNX_INT8_FILE,
                   export / IR_INT8_FILE if (export / IR_INT8_FILE).exists() else None)


def int8_digests(layout: RunLayout) -> dict[str, str]:
    """sha256 of the INT8 files a measurement times, the IR's weights included (a new quantization is a new
    measurement)."""
    int8 = int8_variant(layout)
    files = [] if int8 is None else [p for p in (int8.onnx, int8.ir, int8.ir and int8.ir.with_suffix(".bin")) if p]
    return {layout.relative(path): file_sha256(path) for path in files}


def run_bench(layout: RunLayout, backends: Sequence[str] = BACKENDS, devices: Sequence[str] = ("cpu",),
              batch_sizes: Sequence[int] = (1, 32), budget: Budget | None = None,
              reuse: bool = False) -> dict[str, Any]:
    """Measure and write ``bench/latency.json``; with ``reuse``, a finished measurement of the same
    fused student with the same settings is kept (``pipeline run``), otherwise it is always remeasured."""
    budget = budget or Budget(threads=usable_cores())
    stage = Stage(layout.bench, "bench")
    if not layout.fused.model.is_file():
        raise BadInputError(f"no fused student in {layout.fused.path}; run `pipeline fuse` first")
    int8 = int8_digests(layout)
    settings_hash = settings_digest({"backends": list(backends), "devices": list(devices),
                                     "batch_sizes": list(batch_sizes), "budget": vars(budget),
                                     "fused": file_sha256(layout.fused.model),
                                     **({"int8": int8} if int8 else {})})
    done = stage.finished(settings_hash) if reuse else None
    if done is not None:
        log.info("bench: measured already for this fused student and these settings; skipping")
        return done
    stage.marker.unlink(missing_ok=True)
    variants, info = load_variants(layout, stage.folder / "onnx", need_onnx=any(b != "torch" for b in backends))
    size = info["input_size"][-1]
    rows: list[dict[str, Any]] = []
    with other_load() as load:
        for target in targets_for(backends, devices):
            rows += measure_target(target, variants, batch_sizes, size, budget)
    result = latency_result(machine_info(), {"architecture": info["architecture"], "input_size": info["input_size"]},
                            budget, batch_sizes, rows, ratios(rows, "fused", "stock") + ratios(rows, "fused", "unfused")
                            + ratios(rows, "int8", "fused"), load=load)
    atomic_write_json(stage.folder.latency, result)
    log.info("bench:\n%s", format_table(result))
    return stage.mark_complete(settings_hash, list(STAGE.outputs),
                               {"rows": len(rows), "skipped": sum(r["status"] == "skipped" for r in rows)})


def run_configured_bench(layout: RunLayout, b: BenchConfig, reuse: bool) -> dict[str, Any]:
    """The measurement the config's ``bench`` section describes (`pipeline bench` and `pipeline run` alike)."""
    budget = Budget(threads=b.threads or usable_cores(), warmup=b.warmup, iterations=b.iterations, duration=b.duration)
    return run_bench(layout, tuple(b.backends), parse_devices(b.device), tuple(b.batch_sizes), budget, reuse=reuse)


def run_bench_stage(run: StageRun) -> dict[str, Any]:
    return run_configured_bench(run.layout, run.cfg.bench, reuse=True)


STAGE = StageSpec(name="bench", folder=lambda layout: layout.bench, run=run_bench_stage,
                  inputs=lambda layout: [layout.fused.model, layout.student.model], outputs=("latency.json",))
