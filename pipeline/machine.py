"""What a latency figure was measured on: :mod:`exporters.machine` (CPU model, cores, ISA flags, the runtimes)
plus the GPU and torch."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

from exporters.machine import ISA_FLAGS, cpu_identity, cpuinfo, usable_cores

__all__ = ["ISA_FLAGS", "cpu_identity", "gpu_info", "machine_info", "native_bf16", "usable_cores"]


BF16_ISA = ("amx_bf16", "avx512_bf16", "bf16")  # x86 AMX, x86 AVX512-BF16, ARM BF16 (/proc/cpuinfo names)


def native_bf16(flags: set[str] | None = None) -> bool:
    """Whether the CPU (or the given ISA flags) computes bf16 natively.

    Without it oneDNN emulates bf16 through conversions, which is rarely faster than fp32.
    """
    return bool(set(BF16_ISA) & (cpuinfo()[1] if flags is None else flags))


def gpu_info() -> dict[str, Any] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    info: dict[str, Any] = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                            "cuda": torch.version.cuda}
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
            if out:
                driver, memory = (part.strip() for part in out[0].split(","))
                info.update(driver=driver, memory=memory)
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    return info


def machine_info() -> dict[str, Any]:
    """:func:`exporters.machine.machine_info` with the GPU and torch's version."""
    import torch

    from exporters import machine

    info = machine.machine_info()
    info["gpu"] = gpu_info()
    info["versions"] = {"torch": torch.__version__, **info["versions"]}
    return info


def _busy_seconds(cores: set[int]) -> float | None:
    """CPU seconds spent busy (not idle, not waiting for I/O) on ``cores`` since boot (Linux ``/proc/stat``)."""
    try:
        with open("/proc/stat") as handle:
            rows = [line.split() for line in handle if line.startswith("cpu") and line[3].isdigit()]
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    busy = 0
    for row in rows:
        if int(row[0][3:]) in cores:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in row[1:9])
            busy += user + nice + system + irq + softirq + steal
    return busy / ticks


@contextlib.contextmanager
def other_load() -> Iterator[dict[str, Any]]:
    """How busy this process's cores were with other work while the block ran, filled in when it ends.

    ``other_busy``: the share of those cores' time that other processes used (0: the machine was ours, 0.5:
    others held half of it), measured as the cores' busy time minus this process's CPU time; None where
    ``/proc/stat`` is not available. A latency measured beside such work is slower and noisier than the model.
    """
    try:
        cores = os.sched_getaffinity(0)
    except AttributeError:  # not on Linux
        cores = set(range(os.cpu_count() or 1))
    result: dict[str, Any] = {"cores": len(cores), "other_busy": None, "loadavg_1m": None}
    start_busy, start_own, start = _busy_seconds(cores), sum(os.times()[:2]), time.perf_counter()
    try:
        yield result
    finally:
        end_busy, own, wall = _busy_seconds(cores), sum(os.times()[:2]) - start_own, time.perf_counter() - start
        if start_busy is not None and end_busy is not None and wall > 0:
            other = (end_busy - start_busy - own) / (wall * len(cores))
            result["other_busy"] = round(min(1.0, max(0.0, other)), 3)
        with contextlib.suppress(OSError, AttributeError):
            result["loadavg_1m"] = round(os.getloadavg()[0], 2)
