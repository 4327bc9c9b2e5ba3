"""What a latency figure was measured on: :mod:`exporters.machine` (CPU model, cores, ISA flags, the runtimes)
plus the GPU and torch."""
from __future__ import annotations

import shutil
import subprocess
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
