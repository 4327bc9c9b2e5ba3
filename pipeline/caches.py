"""Where the libraries we use keep their caches during a command that writes a run directory: inside it.

Left alone, torch's exporter creates ``$TMPDIR/torchinductor_$USER`` and matplotlib writes its font list to
``~/.cache/matplotlib`` (and creates ``~/.config/matplotlib``): files outside the run that nobody asked for.
A setting the user made themselves (the variable already set) is kept. A run directory that a command created only
for these caches (it failed before writing anything) is removed again.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from pipeline.layout import RunLayout

# environment variable -> folder under RUN_DIR/.cache. On a GPU, also CUDA's kernel JIT cache (~/.nv/ComputeCache)
# and Triton's (~/.triton/cache); both are read when CUDA or Triton first starts, after this is set.
CACHE_VARIABLES = {"TORCHINDUCTOR_CACHE_DIR": "torchinductor", "MPLCONFIGDIR": "matplotlib",
                   "CUDA_CACHE_PATH": "cuda", "TRITON_CACHE_DIR": "triton"}


@contextlib.contextmanager
def caches_in(run_dir: Path) -> Iterator[None]:
    """Point the caches at ``RUN_DIR/.cache/`` for the block: environment variables only, the folders are made
    by the libraries when they write there. Enter it before torch's compiler modules are imported (importing
    ``torch._dynamo`` creates its cache folder)."""
    run_dir = Path(run_dir)
    cache, fresh = RunLayout(run_dir).cache, not run_dir.exists()
    before = {name: os.environ.get(name) for name in CACHE_VARIABLES}
    for name, folder in CACHE_VARIABLES.items():
        if before[name] is None:
            os.environ[name] = str((cache / folder).resolve())
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if fresh and run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {cache.name}:
            shutil.rmtree(run_dir, ignore_errors=True)  # made only for the caches (a command that wrote nothing)
