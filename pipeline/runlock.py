"""One writer per run directory: an advisory lock held for the whole command.

Two commands writing one run directory would each redo the other's stages and
leave a manifest whose hashes disagree with the files. The lock (``fcntl.flock``
on ``RUN_DIR/.lock``) is released by the kernel when the holder exits, however
it exits, so a killed run never leaves a stale lock; the file keeps the
holder's pid, host and start time for the error message of the next one.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import BadInputError
from pipeline.layout import RunLayout


class RunDirBusyError(BadInputError):
    """Another command holds the run directory."""


@contextlib.contextmanager
def hold_run_dir(layout: RunLayout) -> Iterator[None]:
    """Hold ``layout``'s lock for the block; raises RunDirBusyError at once when another process holds it."""
    layout.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(layout.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirBusyError(f"run directory {layout.root} is in use by {_holder(layout.lock)}; wait for it to "
                                  "finish or choose another --run-dir") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        return f"pid {h['pid']} on {h['host']} (since {h['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
