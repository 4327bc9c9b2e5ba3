"""Latency measurement of one model on one backend and device, several variants interleaved.

A *target* is a backend on a device (torch eager, ONNX Runtime with an
execution provider, OpenVINO on a device). Every backend gets the same thread
budget. Variants of a model (fused, unfused, stock) are timed in interleaved
rounds, so that a noisy shared machine slows them alike and their ratios stay
meaningful; warm-up calls are excluded. A target that is not available here is
returned as ``skipped`` with the reason, never left out.

Torch is imported only to time the torch backend: ONNX Runtime and OpenVINO files are timed without it
(``python -m exporters bench`` on a device).
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exporters.errors import InputError
from exporters.sessions import RuntimeOptions, open_session

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "openvino")
DEVICES = ("cpu", "cuda")
Runner = Callable[[np.ndarray], Callable[[], Any]]  # bind(batch) -> the call to time


@dataclass(frozen=True)
class Target:
    backend: str
    device: str  # cpu | cuda
    provider: str = ""  # ONNX Runtime execution provider / OpenVINO device name

    @property
    def label(self) -> str:
        return f"{self.backend}[{self.provider}]" if self.provider else self.backend


@dataclass
class Variant:
    """One model to time: the torch module and, for the other backends, its ONNX file and/or OpenVINO IR. An INT8
    artifact has no torch module: torch skips it; an IR alone is timed by OpenVINO only."""
    name: str
    module: torch.nn.Module | None
    onnx: Path | None = None
    ir: Path | None = None


@dataclass
class Budget:
    threads: int
    warmup: int = 10
    iterations: int | None = None  # per variant; None: run for `duration` seconds in total
    duration: float = 3.0
    # Each interleaved round gives every variant a time slice: long enough for its runtime's thread pool to be
    # awake and its weights in cache (a few calls per turn measured cold pools: up to 1.4x on a quiet machine and
    # 3-4x under load for a 0.2 ms model), short enough that slow drifts of the machine's load hit every variant.
    slice_s: float = 0.25  # seconds per variant per round
    rewarm: int = 3  # untimed calls at the start of each slice


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise InputError(f"batch sizes must be integers separated by commas, got '{text}'") from None
    if not sizes or min(sizes) < 1:
        raise InputError(f"batch sizes must be >= 1, got '{text}'")
    return sizes


def targets_for(backends: Sequence[str], devices: Sequence[str]) -> list[Target]:
    targets = []
    for device in devices:
        for backend in backends:
            if backend == "torch":
                targets.append(Target("torch", device))
            elif backend == "onnxruntime":
                if device == "cpu":
                    targets.append(Target("onnxruntime", "cpu", "CPUExecutionProvider"))
                else:
                    targets += [Target("onnxruntime", "cuda", "CUDAExecutionProvider"),
                                Target("onnxruntime", "cuda", "TensorrtExecutionProvider")]
            elif backend == "openvino":
                targets.append(Target("openvino", device, "CPU" if device == "cpu" else "GPU"))
    return targets


def unavailable_reason(target: Target) -> str | None:
    """Why ``target`` cannot run here, or None when it can."""
    if target.backend == "torch":
        import torch

        if target.device == "cuda" and not torch.cuda.is_available():
            return "torch.cuda.is_available() is False: no CUDA device or driver (or a CPU-only torch build)"
        return None
    if target.backend == "onnxruntime":
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime is not installed"
        if target.provider not in ort.get_available_providers():
            hint = " (install onnxruntime-gpu)" if target.provider == "CUDAExecutionProvider" else \
                " (needs onnxruntime-gpu built with TensorRT and the TensorRT libraries)"
            return f"this onnxruntime has no {target.provider}{hint}; available: {ort.get_available_providers()}"
        if target.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                return "no CUDA device"
        return None
    try:
        import openvino as ov
    except ImportError:
        return "openvino is not installed (pip install openvino, or the runtime's [openvino] extra)"

    devices = ov.Core().available_devices
    if not any(d.split(".")[0] == target.provider for d in devices):
        return f"OpenVINO sees no {target.provider} device; available: {devices}"
    return None


def make_runner(target: Target, variant: Variant, threads: int) -> Runner:
    """A function that binds an input batch once and returns the call to time.

    Binding outside the timed call (OpenVINO: a tensor sharing the batch's memory; ONNX Runtime:
    IO binding; torch: a zero-copy view) keeps the per-call conversion of the Python API out of
    the figures, as OpenVINO's ``benchmark_app`` does. The runtimes' sessions are opened with the
    latency options of :class:`exporters.sessions.RuntimeOptions`.
    """
    if target.backend == "torch":
        import torch

        if variant.module is None:
            raise ValueError(f"variant {variant.name} has no torch module")
        device = torch.device(target.device)
        module = variant.module.to(device).eval()

        def bind_torch(batch: np.ndarray) -> Callable[[], Any]:
            x = torch.from_numpy(batch).to(device)

            def run() -> Any:
                with torch.inference_mode():
                    out = module(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                return out

            return run

        return bind_torch
    path = model_file(target, variant)
    if path is None:
        raise ValueError(f"variant {variant.name} has no file for {target.label}")
    options = RuntimeOptions(threads=threads, device=target.device, latency=True,
                             provider=target.provider if target.backend == "onnxruntime" else None)
    return open_session(path, target.backend, options).bind


def model_file(target: Target, variant: Variant) -> Path | None:
    """The file ``target`` times for ``variant``: OpenVINO its IR when there is one, else the ONNX file."""
    if target.backend == "openvino" and variant.ir is not None:
        return variant.ir
    return variant.onnx


def summarize(times_s: Sequence[float], batch: int) -> dict[str, float]:
    ms = np.asarray(times_s) * 1e3
    return {"iterations": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
            "std_ms": float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
            "throughput_ips": float(batch / (ms.mean() / 1e3))}


def time_interleaved(runners: Mapping[str, Runner], batch: np.ndarray, budget: Budget) -> dict[str, list[float]]:
    """Per-call wall times (seconds) of every runner, in interleaved rounds (a time slice each) after warm-up."""
    calls = {name: bind(batch) for name, bind in runners.items()}
    for call in calls.values():
        for _ in range(budget.warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    start = time.perf_counter()
    while True:
        for name, call in calls.items():
            for _ in range(budget.rewarm):
                call()
            slice_end = time.perf_counter() + budget.slice_s
            while True:
                t0 = time.perf_counter()
                call()
                t1 = time.perf_counter()
                times[name].append(t1 - t0)
                if t1 >= slice_end or (budget.iterations is not None and len(times[name]) >= budget.iterations):
                    break
        done = min(len(t) for t in times.values())
        if budget.iterations is not None:
            if done >= budget.iterations:
                break
        elif time.perf_counter() - start >= budget.duration and done >= 3:
            break
    return times


def measure_target(target: Target, variants: Sequence[Variant], batch_sizes: Sequence[int], image_size: int,
                   budget: Budget) -> list[dict[str, Any]]:
    """One result row per (variant, batch size): timings, or ``skipped`` with the reason."""
    base = {"backend": target.backend, "device": target.device, "provider": target.provider,
            "threads": budget.threads}
    if target.backend == "torch":  # (an INT8 artifact exists only as a runtime file)
        variants = [v for v in variants if v.module is not None]
    reason = unavailable_reason(target)
    if reason is not None:
        return [{**base, "variant": v.name, "batch": b, "status": "skipped", "reason": reason}
                for v in variants for b in batch_sizes]
    usable = [v for v in variants if target.backend == "torch" or model_file(target, v) is not None]
    rows = [{**base, "variant": v.name, "batch": b, "status": "skipped", "reason": "no exported file for this variant"}
            for v in variants if v not in usable for b in batch_sizes]
    if "torch" in sys.modules:  # torch's own pool, when loaded, gets the same budget (it competes for the cores)
        sys.modules["torch"].set_num_threads(budget.threads)
    try:
        runners = {v.name: make_runner(target, v, budget.threads) for v in usable}
    except Exception as exc:  # a runtime that refuses the model is a result, not a crash of the benchmark
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return rows + [{**base, "variant": v.name, "batch": b, "status": "skipped", "reason": reason}
                       for v in usable for b in batch_sizes]
    gen = np.random.default_rng(0)
    for batch_size in batch_sizes:
        batch = gen.standard_normal((batch_size, 3, image_size, image_size), dtype=np.float32)
        times = time_interleaved(runners, batch, budget)
        for name, series in times.items():
            rows.append({**base, "variant": name, "batch": batch_size, "status": "ok", **summarize(series, batch_size)})
            log.info("bench: %-28s %-8s batch %-3d p50 %8.3f ms", f"{target.label}/{target.device}", name,
                     batch_size, rows[-1]["p50_ms"])
    return rows


def ratios(rows: Sequence[dict[str, Any]], numerator: str, denominator: str) -> list[dict[str, Any]]:
    """p50 ratios of two variants for every target and batch size where both were measured."""
    index = {(r["backend"], r["provider"], r["device"], r["batch"], r["variant"]): r for r in rows
             if r["status"] == "ok"}
    out = []
    for (backend, provider, device, batch, variant), row in index.items():
        if variant != numerator:
            continue
        other = index.get((backend, provider, device, batch, denominator))
        if other:
            out.append({"backend": backend, "provider": provider, "device": device, "batch": batch,
                        "ratio": f"{numerator}/{denominator}", "p50_ratio": row["p50_ms"] / other["p50_ms"]})
    return out


def latency_result(machine: dict[str, Any], model: dict[str, Any], budget: Budget, batch_sizes: Sequence[int],
                   rows: list[dict[str, Any]], ratio_rows: list[dict[str, Any]],
                   load: dict[str, Any] | None = None) -> dict[str, Any]:
    """One measurement as ``bench/latency.json`` and ``python -m exporters bench --json`` write it (``load``: what
    other processes used of the cores meanwhile, where it was measured)."""
    return {
        "machine": machine,
        "load": load,
        "model": model,
        "budget": {"threads": budget.threads, "warmup": budget.warmup, "iterations": budget.iterations,
                   "duration_s": None if budget.iterations else budget.duration, "slice_s": budget.slice_s,
                   "rewarm": budget.rewarm},
        "batch_sizes": list(batch_sizes),
        "results": rows,
        "ratios": ratio_rows,
    }


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
    """The measurement as a table: one line per target, variant and batch size (one per unavailable target), with
    warnings where a figure says more about the machine than about the model."""
    machine = result["machine"]
    gpu = machine.get("gpu")
    def target_of(r: dict[str, Any]) -> str:
        return f"{r['backend']}" + (f"[{r['provider']}]" if r["provider"] else "") + f"/{r['device']}"

    width = max([len("target"), *(len(target_of(r)) for r in result["results"])]) + 2  # the longest name fits
    lines = [f"latency of {result['model']['architecture']} {'x'.join(map(str, result['model']['input_size']))} "
             f"on {machine['cpu']} ({machine.get('arch', '?')}, {machine['usable_cores']} cores usable; ISA "
             f"{', '.join(machine['isa']) or '-'})"
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
