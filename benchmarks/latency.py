"""Deployment latency, side by side in one run: torch eager vs ONNX Runtime vs OpenVINO, fused vs stock,
and our timing against the runtimes' own: OpenVINO's ``benchmark_app`` on the same IR and thread count, and a
bare ONNX Runtime loop (a default session, ``session.run`` on a numpy array) on the same file.

    python benchmarks/latency.py --student shufflenetv2 --image-size 224 --seconds 5

The student is built with its branches (m=4), given random BatchNorm statistics
(so fusion has real work to do), fused, and exported with the pipeline's own
exporters; the timing is the same code as ``pipeline bench`` (interleaved
variants, warm-up excluded, one thread budget for every backend). Weights do not
change latency, so no training is needed. ``benchmark_app`` and our OpenVINO
runner alternate for --rounds rounds so machine noise hits both alike; so do the bare ONNX Runtime loop and ours.
"""
from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


import numpy as np

from exporters.onnx import export_onnx
from exporters.quantize import Int8Settings, quantize_onnx, quantize_openvino
from exporters.openvino import convert_onnx, save_ir
from models import build_model
from models.reparam import build_multibranch_student, fuse_model
from exporters.equivalence import randomize_bn_statistics
from exporters.latency import Budget, Target, Variant, measure_target, ratios
from pipeline.machine import machine_info, usable_cores


def build_variants(student: str, size: int, out: Path, int8: bool) -> list[Variant]:
    multi, arch = build_multibranch_student(student, 10, size, 4, "single", "none")
    multi = randomize_bn_statistics(multi).eval()
    fused = fuse_model(multi).eval()
    stock, _, _ = build_model(student, 10, size, role="student")
    meta = {"architecture": arch["torchvision_name"], "input_size": [3, size, size], "input_name": "images"}
    variants = []
    for name, module in (("fused", fused), ("unfused", multi), ("stock", stock.eval())):
        variants.append(Variant(name, module, export_onnx(module, out / f"{name}.onnx", (3, size, size), meta)))
    variants[0].ir = save_ir(convert_onnx(variants[0].onnx, meta), out / "fused.xml", compress_to_fp16=False)
    if int8:  # the export stage's quantizers; random calibration images: weights and ranges do not change latency
        calibration = np.random.default_rng(0).standard_normal((32, 3, size, size), dtype=np.float32)
        settings = Int8Settings(calibration_images=len(calibration))
        variants.insert(1, Variant("int8", None, quantize_onnx(variants[0].onnx, out / "int8.onnx", calibration,
                                                                 settings, meta),
                                   quantize_openvino(variants[0].ir, out / "int8.xml", calibration, settings, meta)))
    return variants


def benchmark_app_command(ir: Path, size: int, threads: int, seconds: float, shape_flag: str = "-shape") -> list[str]:
    """OpenVINO's ``benchmark_app`` on ``ir`` at batch 1: one sync request, one stream, ``threads`` threads.
    ``-shape`` reshapes the model to a static shape first; ``-data_shape`` feeds that shape to the model as it is."""
    exe = shutil.which("benchmark_app") or str(Path(sys.executable).with_name("benchmark_app"))
    return [exe, "-m", str(ir), "-d", "CPU", "-hint", "none", "-api", "sync", "-nstreams", "1",
            "-nthreads", str(threads), "-t", str(max(1, round(seconds))), shape_flag, f"images[1,3,{size},{size}]"]


def parse_benchmark_app(text: str) -> float:
    """The median latency in ms from ``benchmark_app``'s report (small models: reported in microseconds)."""
    match = re.search(r"Median:\s+([\d.]+)\s*(ms|us)", text)
    if not match:
        raise RuntimeError(f"no median in benchmark_app output:\n{text[-2000:]}")
    return float(match.group(1)) / (1000.0 if match.group(2) == "us" else 1.0)


def benchmark_app_median(ir: Path, size: int, threads: int, seconds: float) -> float:
    command = benchmark_app_command(ir, size, threads, seconds)
    return parse_benchmark_app(subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                              check=True).stdout)


def loop_median(call: Callable[[], object], seconds: float, warmup: int = 50) -> float:
    """Median ms of ``call`` in a plain timed loop, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        call()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def bare_onnxruntime(onnx: Path, batch: np.ndarray, threads: int, spinning: bool = True) -> Callable[[], object]:
    """The simplest ONNX Runtime program: a default session with the thread count set, ``run`` on a numpy array
    (what ``onnxruntime_perf_test`` would time; it is not in the Python wheel)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: batch}
    return lambda: session.run(None, feed)


def bare_onnxruntime_median(onnx: Path, size: int, threads: int, seconds: float) -> float:
    batch = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    return loop_median(bare_onnxruntime(onnx, batch, threads), seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="shufflenetv2")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=usable_cores())
    parser.add_argument("--seconds", type=float, default=5.0, help="timing per backend (all variants together)")
    parser.add_argument("--batch-sizes", default="1")
    parser.add_argument("--rounds", type=int, default=5, help="alternations of ours vs benchmark_app")
    parser.add_argument("--out", type=Path, help="keep the exported files here (default: a temporary folder)")
    parser.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the INT8 artifacts of the export stage's quantizers (default on)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    out = args.out or Path(tempfile.mkdtemp(prefix="latency-"))
    out.mkdir(parents=True, exist_ok=True)
    variants = build_variants(args.student, args.image_size, out, args.int8)
    budget = Budget(threads=args.threads, warmup=10, duration=args.seconds)
    rows = []
    for target in (Target("torch", "cpu"), Target("onnxruntime", "cpu", "CPUExecutionProvider"),
                   Target("openvino", "cpu", "CPU")):
        rows += measure_target(target, variants, batches, args.image_size, budget)

    machine = machine_info()
    print(f"\n{args.student} {args.image_size}x{args.image_size}, {args.threads} threads per backend, "
          f"{machine['cpu']} ({machine['usable_cores']} usable cores; ISA {', '.join(machine['isa'])})")
    print(f"{'backend':<14}{'variant':<9}{'batch':>6}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for r in rows:
        print(f"{r['backend']:<14}{r['variant']:<9}{r['batch']:>6}{r['p50_ms']:>10.3f}{r['p90_ms']:>10.3f}"
              f"{r['p99_ms']:>10.3f}{r['mean_ms']:>10.3f}")
    p50 = {(r["backend"], r["variant"], r["batch"]): r["p50_ms"] for r in rows}
    for b in batches:
        best = min(p50[("onnxruntime", "fused", b)], p50[("openvino", "fused", b)])
        print(f"batch {b}: best of ONNX Runtime / OpenVINO (fused) / torch eager (fused) p50 = "
              f"{best / p50[('torch', 'fused', b)]:.3f}  (goal <= 0.30)")
    for q in ratios(rows, "fused", "stock"):
        print(f"fused/stock p50 {q['backend']:<12} batch {q['batch']}: {q['p50_ratio']:.3f}  (goal 1.00 +- 0.03)")
    for q in ratios(rows, "unfused", "fused"):
        print(f"unfused/fused p50 {q['backend']:<12} batch {q['batch']}: {q['p50_ratio']:.3f}")
    for q in ratios(rows, "int8", "fused"):
        print(f"int8/fused p50 {q['backend']:<12} batch {q['batch']}: {q['p50_ratio']:.3f}"
              + ("  (goal <= 0.60 on a CPU with VNNI)" if q["backend"] == "openvino" else ""))

    # ours vs the runtimes' own loops on the same file, alternating rounds (float and, with --int8, INT8 files)
    steady = Budget(threads=args.threads, warmup=50, duration=args.seconds)  # benchmark_app warms up too
    references = [("OpenVINO", Target("openvino", "cpu", "CPU"), "ir", "benchmark_app",
                   lambda v: benchmark_app_median(v.ir, args.image_size, args.threads, args.seconds)),
                  ("ONNX Runtime", Target("onnxruntime", "cpu", "CPUExecutionProvider"), "onnx", "bare session loop",
                   lambda v: bare_onnxruntime_median(v.onnx, args.image_size, args.threads, args.seconds))]
    for runtime, target, file_kind, reference, timed in references:
        for variant in (v for v in variants if getattr(v, file_kind) is not None and v.name in ("fused", "int8")):
            ours, theirs = [], []
            for _ in range(args.rounds):
                ours.append(measure_target(target, [variant], [1], args.image_size, steady)[0]["p50_ms"])
                theirs.append(timed(variant))
            ratio = statistics.median(ours) / statistics.median(theirs)
            print(f"{runtime} batch 1 on {getattr(variant, file_kind).name}: ours p50 {statistics.median(ours):.3f} "
                  f"ms (rounds {', '.join(f'{x:.3f}' for x in ours)}), {reference} median "
                  f"{statistics.median(theirs):.3f} ms (rounds {', '.join(f'{x:.3f}' for x in theirs)}); "
                  f"ours/{reference} = {ratio:.3f} (goal 0.8-1.25)")


if __name__ == "__main__":
    main()
