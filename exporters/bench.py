"""Latency of exported model files where they run: ``python -m exporters bench --model FILE`` (and
``kdiff-runtime bench``), torch-free, with the timing code of ``pipeline bench`` (:mod:`exporters.latency`).

Each file is timed by the runtime of its format (``.onnx``: ONNX Runtime, ``.xml``: OpenVINO) on the CPU, several
files of one runtime in interleaved rounds; warm-up calls are excluded; p50/p90/p99 per batch size. The input is
random pixels of the size the file's metadata names. Figures from an emulated CPU (qemu) are not latencies.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from exporters.errors import InputError
from exporters.formats import format_of, read_metadata
from exporters.latency import Budget, Target, Variant, latency_result, measure_target, ratios
from exporters.machine import machine_info

log = logging.getLogger(__name__)


def _metadata(path: Path) -> dict[str, Any]:
    try:
        meta = read_metadata(path)
    except ImportError as exc:  # e.g. an .xml on a device without OpenVINO
        raise InputError(f"{path}: {exc.name} is not installed (pip install 'kdiff-runtime[openvino]')") from None
    size = meta.get("input_size")
    if not size or len(size) != 3 or size[1] != size[2]:
        raise InputError(f"{path} names no square C x H x W input_size in its metadata; export it with "
                         "`pipeline export`")
    return meta


def bench_files(models: Sequence[str | Path], budget: Budget, batch_sizes: Sequence[int] = (1, 32)) -> dict[str, Any]:
    """Time every model file; the result has the shape of ``bench/latency.json`` (rows per file and batch size,
    p50 ratios of every other file to the first one of its runtime)."""
    paths = [Path(m) for m in models]
    if not paths:
        raise InputError("no model file given")
    for path in paths:
        if not path.is_file():
            raise InputError(f"model file {path} does not exist")
    names = [p.name if [q.name for q in paths].count(p.name) == 1 else str(p) for p in paths]
    metas = {name: _metadata(path) for name, path in zip(names, paths)}
    sizes = {name: [int(v) for v in meta["input_size"]] for name, meta in metas.items()}
    if len({tuple(s) for s in sizes.values()}) > 1:
        raise InputError("the files take different input sizes: " + ", ".join(f"{n} {s}" for n, s in sizes.items()))
    input_size = next(iter(sizes.values()))
    architecture = ", ".join(sorted({str(meta.get("architecture", "?")) for meta in metas.values()}))
    by_runtime: dict[str, list[Variant]] = {}
    for name, path in zip(names, paths):
        runtime = format_of(path).runtime
        variant = Variant(name, None, ir=path) if runtime == "openvino" else Variant(name, None, onnx=path)
        by_runtime.setdefault(runtime, []).append(variant)
    rows: list[dict[str, Any]] = []
    ratio_rows: list[dict[str, Any]] = []
    for runtime, variants in by_runtime.items():
        provider = "CPU" if runtime == "openvino" else "CPUExecutionProvider"
        rows += measure_target(Target(runtime, "cpu", provider), variants, batch_sizes, input_size[-1], budget)
        for other in variants[1:]:
            ratio_rows += ratios([r for r in rows if r["backend"] == runtime], other.name, variants[0].name)
    for row in rows:
        if row["status"] != "ok":
            raise InputError(f"{row['backend']} cannot time {row['variant']}: {row['reason']}")
    return latency_result(machine_info(), {"architecture": architecture, "input_size": input_size},
                          budget, batch_sizes, rows, ratio_rows)
