"""What a measurement or a check ran on, torch-free: CPU model, architecture, cores, the ISA flags that pick the
runtimes' kernels, and the runtimes' versions. ``pipeline.machine`` adds the GPU and torch on top."""
from __future__ import annotations

import importlib
import os
import platform
from typing import Any

# The instruction-set extensions that decide which kernels the runtimes pick (bf16/int8 paths especially).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
             "amx_tile", "amx_bf16", "amx_int8", "neon", "asimd", "asimddp", "i8mm", "sve")
RUNTIMES = ("onnxruntime", "openvino")


def cpuinfo() -> tuple[str, set[str]]:
    """The CPU's model name and its feature flags, from /proc/cpuinfo (x86 ``flags``, ARM ``Features``)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


def cpu_identity() -> dict[str, Any]:
    """The CPU a check ran on: model, architecture and the ISA flags that pick the runtimes' kernels (INT8 answers
    differ between VNNI, AMX, plain AVX2 and ARM's NEON/dot-product paths)."""
    model, flags = cpuinfo()
    return {"cpu": model, "arch": platform.machine(), "isa": sorted(f for f in ISA_FLAGS if f in flags)}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def runtime_versions() -> dict[str, str | None]:
    """The installed runtimes' versions (None: not installed, e.g. a device without OpenVINO)."""
    versions: dict[str, str | None] = {}
    for name in RUNTIMES:
        try:
            versions[name] = importlib.import_module(name).__version__
        except ImportError:
            versions[name] = None
    return versions


def machine_info() -> dict[str, Any]:
    cpu = cpu_identity()
    return {"cpu": cpu["cpu"], "arch": cpu["arch"], "logical_cores": os.cpu_count(), "usable_cores": usable_cores(),
            "isa": cpu["isa"], "platform": platform.platform(), "python": platform.python_version(), "gpu": None,
            "versions": runtime_versions()}
