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
from exporters.latency import BACKENDS, DEVICES, Budget, Variant, measure_target, ratios, targets_for
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


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise BadInputError(f"batch sizes must be integers separated by commas, got '{text}'") from None
    if not sizes or min(sizes) < 1:
        raise BadInputError(f"batch sizes must be >= 1, got '{text}'")
    return sizes


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
    result = {
        "machine": machine_info(),
        "load": load,
        "model": {"architecture": info["architecture"], "input_size": info["input_size"]},
        "budget": {"threads": budget.threads, "warmup": budget.warmup, "iterations": budget.iterations,
                   "duration_s": None if budget.iterations else budget.duration, "slice_s": budget.slice_s, "rewarm": budget.rewarm},
        "batch_sizes": list(batch_sizes),
        "results": rows,
        "ratios": ratios(rows, "fused", "stock") + ratios(rows, "fused", "unfused") + ratios(rows, "int8", "fused"),
    }
    atomic_write_json(stage.folder.latency, result)
    log.info("bench:\n%s", format_table(result))
    return stage.mark_complete(settings_hash, list(STAGE.outputs),
                               {"rows": len(rows), "skipped": sum(r["status"] == "skipped" for r in rows)})


# When a latency figure says more about the machine than about the model.
SPREAD_LIMIT = 1.5  # p90 / p50 above this: calls of the same model took very different times
LOAD_LIMIT = 0.10  # share of the benchmark's cores that other processes used while it measured


def noisy(row: dict[str, Any]) -> str | None:
    """Why a measured row's latency is not to be trusted (its spread), or None."""
    if row.get("status") != "ok" or not row.get("p50_ms"):
        return None
    spread = row["p90_ms"] / row["p50_ms"]
    if spread > SPREAD_LIMIT or row["std_ms"] > row["mean_ms"] / 2:
        return f"p90 {spread:.1f}x p50, std {row['std_ms']:.3g} ms on a mean of {row['mean_ms']:.3g} ms"
    return None


def load_warning(result: dict[str, Any]) -> str | None:
    """A sentence when other processes used the benchmark's cores while it measured, else None."""
    load = result.get("load") or {}
    other = load.get("other_busy")
    if other is None or other <= LOAD_LIMIT:
        return None
    return (f"other processes used {100 * other:.0f}% of the {load['cores']} cores' time while the benchmark ran "
            f"(load average {load.get('loadavg_1m')}): every figure is slower and noisier than on an idle machine")


def format_table(result: dict[str, Any]) -> str:
    machine = result["machine"]
    gpu = machine.get("gpu")
    def target_of(r: dict[str, Any]) -> str:
        return f"{r['backend']}" + (f"[{r['provider']}]" if r["provider"] else "") + f"/{r['device']}"

    width = max([len("target"), *(len(target_of(r)) for r in result["results"])]) + 2  # the longest name fits
    lines = [f"latency of {result['model']['architecture']} {'x'.join(map(str, result['model']['input_size']))} "
             f"on {machine['cpu']} ({machine['usable_cores']} cores usable; ISA {', '.join(machine['isa']) or '-'})"
             + (f", GPU {gpu['name']}" if gpu else ", no GPU") + f"; {result['budget']['threads']} threads per backend",
             f"{'target':<{width}}{'variant':<9}{'batch':>6}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}"
             f"{'mean+-std ms':>18}{'img/s':>10}"]
    skipped_targets: set[tuple[str, str]] = set()
    for r in result["results"]:
        target = target_of(r)
        if r["status"] != "ok":
            if (target, r["reason"]) not in skipped_targets:  # one line per unavailable target
                skipped_targets.add((target, r["reason"]))
                lines.append(f"{target:<{width}}skipped: {r['reason']}")
            continue
        lines.append(f"{target:<{width}}{r['variant']:<9}{r['batch']:>6}{r['p50_ms']:>10.3f}{r['p90_ms']:>10.3f}"
                     f"{r['p99_ms']:>10.3f}{r['mean_ms']:>10.3f}+-{r['std_ms']:<6.3f}{r['throughput_ips']:>10.1f}")
    warning = load_warning(result)
    if warning:
        lines.append(f"warning: {warning}")
    shaky = [r for r in result["results"] if noisy(r)]
    if shaky:
        lines.append(f"warning: {len(shaky)} figures spread widely (p90 > {SPREAD_LIMIT}x p50 or std > mean/2): "
                     + ", ".join(f"{target_of(r)} {r['variant']} b{r['batch']}" for r in shaky))
    if result["ratios"]:
        lines.append("p50 ratios: " + "; ".join(
            f"{q['backend']}/{q['device']} b{q['batch']} {q['ratio']} {q['p50_ratio']:.3f}" for q in result["ratios"]))
    return "\n".join(lines)


def run_configured_bench(layout: RunLayout, b: BenchConfig, reuse: bool) -> dict[str, Any]:
    """The measurement the config's ``bench`` section describes (`pipeline bench` and `pipeline run` alike)."""
    budget = Budget(threads=b.threads or usable_cores(), warmup=b.warmup, iterations=b.iterations, duration=b.duration)
    return run_bench(layout, tuple(b.backends), parse_devices(b.device), tuple(b.batch_sizes), budget, reuse=reuse)


def run_bench_stage(run: StageRun) -> dict[str, Any]:
    return run_configured_bench(run.layout, run.cfg.bench, reuse=True)


STAGE = StageSpec(name="bench", folder=lambda layout: layout.bench, run=run_bench_stage,
                  inputs=lambda layout: [layout.fused.model, layout.student.model], outputs=("latency.json",))
