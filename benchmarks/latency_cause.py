"""Where a small model's latency goes: each suspect measured alone, side by side, on one fused ShuffleNetV2.

    python benchmarks/latency_cause.py --image-size 32 --rounds 2

Per round (ms, medians): OpenVINO's ``benchmark_app`` on the IR reshaped to a static shape (``-shape``) and left
dynamic (``-data_shape``); our OpenVINO session alone; ONNX Runtime's bare loop with and without spinning threads
and our ONNX Runtime session alone; then ``pipeline bench``'s interleaving of four variants with tiny turns (about
the old 5-call chunks) and with the current time slices. The results file
``benchmarks/results/2026-12-05-latency-vs-runtimes.md`` reads them.
"""
from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from exporters.latency import Budget, Target, measure_target
from exporters.sessions import RuntimeOptions, open_session
from latency import (bare_onnxruntime, benchmark_app_command, benchmark_app_median, build_variants, loop_median,
                     parse_benchmark_app)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    size, threads = args.image_size, args.threads
    variants = build_variants("shufflenetv2", size, Path(tempfile.mkdtemp(prefix="latency-cause-")), True)
    fused = variants[0]
    batch = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    for round_ in range(args.rounds):
        figures = {
            "benchmark_app static (-shape)": benchmark_app_median(fused.ir, size, threads, args.seconds),
            "benchmark_app dynamic (-data_shape)": parse_benchmark_app(subprocess.run(
                benchmark_app_command(fused.ir, size, threads, args.seconds, shape_flag="-data_shape"),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=True).stdout),
            "ours OpenVINO alone": loop_median(open_session(fused.ir, "openvino", RuntimeOptions(
                threads=threads, latency=True)).bind(batch), args.seconds),
            "ORT bare loop (spinning)": loop_median(bare_onnxruntime(fused.onnx, batch, threads, True), args.seconds),
            "ORT bare loop (no spinning)": loop_median(bare_onnxruntime(fused.onnx, batch, threads, False),
                                                       args.seconds),
            "ours ORT alone": loop_median(open_session(fused.onnx, "onnxruntime", RuntimeOptions(
                threads=threads, latency=True)).bind(batch), args.seconds),
        }
        print(f"round {round_ + 1}, {size}x{size}, {threads} threads: "
              + "; ".join(f"{k} {v:.3f}" for k, v in figures.items()), flush=True)
        for label, budget in (("tiny turns (~the old 5-call chunks)", Budget(threads, duration=4.0, slice_s=0.001,
                                                                             rewarm=0)),
                              ("0.25 s slices (now)", Budget(threads, duration=4.0))):
            for target in (Target("openvino", "cpu", "CPU"), Target("onnxruntime", "cpu", "CPUExecutionProvider")):
                rows = measure_target(target, variants, [1], size, budget)
                print(f"  interleaved, {label}, {target.backend}: "
                      + "; ".join(f"{r['variant']} {r['p50_ms']:.3f}" for r in rows if r["status"] == "ok"),
                      flush=True)


if __name__ == "__main__":
    main()
