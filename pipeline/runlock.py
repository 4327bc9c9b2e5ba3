"""One writer per run directory: an advisory lock held for the whole command.

Two commands writing one run directory would each redo the other's stages and
leave a manifest whose hashes disagree with the files. The lock (``fcntl.flock``
on ``RUN_DIR/.lock``) is released by the kernel when the holder exits, however
it exits, so a killed run never leaves a stale lock; the file keeps the
holder's pid, host and start time for the error message of the next one.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
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
    fd = _open_lock(layout.lock)
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


def _open_lock(path: Path) -> int:
    """The lock file, opened without following a link and only when it is a regular file: a ``.lock`` planted as a
    link to another file (a run directory others can write) must not get that file truncated and overwritten."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
    refused = (f"refusing the lock file {path}: it is not a regular file (a link, folder, FIFO or device was put in "
               "its place); remove it and run again")
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise BadInputError(refused) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BadInputError(refused)
    return fd


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        return f"pid {h['pid']} on {h['host']} (since {h['started']})"
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return "another process"
