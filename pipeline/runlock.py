"""One writer per run directory: an advisory lock held for the whole command.

Two commands writing one run directory would each redo the other's stages and
leave a manifest whose hashes disagree with the files. The lock (``fcntl.flock``
on ``RUN_DIR/.lock``) is released by the kernel when the holder exits, however
it exits, so a killed run never leaves a stale lock; the file keeps the
holder's pid, host and start time for the error message of the next one.

Under torchrun only rank 0 holds the lock, and :func:`hold_run_dir` checks at
once that every rank sees the directory rank 0 holds: a multi-node run needs it
on a shared file system, and ranks that each see a directory of their own would
otherwise all train and write.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import FAILURES, BadInputError, RankFailedError
from pipeline.layout import RunLayout

if TYPE_CHECKING:
    from pipeline.training.distributed import DistContext

MARKER = ".rank0-token"  # written by rank 0, read by the other ranks, removed once they have looked
MARKER_PATIENCE_S = 5.0  # a network file system may show a new file on another node a little later


class RunDirBusyError(BadInputError):
    """Another command holds the run directory."""


@contextlib.contextmanager
def hold_run_dir(layout: RunLayout, ctx: "DistContext | None" = None) -> Iterator[None]:
    """Hold ``layout``'s lock for the block (rank 0 of a torchrun group: the others check that they see the same
    directory); raises RunDirBusyError at once when another process holds it."""
    if ctx is None or not ctx.distributed:
        with _lock(layout):
            yield
        return
    with contextlib.ExitStack() as held:
        news: tuple[str, ...] = ("ok", "")
        if ctx.is_main:
            try:
                held.enter_context(_lock(layout))
                news = ("ok", secrets.token_hex(16))
                (layout.root / MARKER).write_text(news[1])
            except (*FAILURES, OSError) as exc:  # the other ranks would wait for the token until they time out
                ctx.broadcast(("failed", str(getattr(exc, "exit_code", 6)), str(exc).splitlines()[0]))
                raise
        news = ctx.broadcast(news)
        if news[0] == "failed":
            raise RankFailedError(f"rank {ctx.rank}: rank 0 cannot take the run directory: {news[2]}",
                                  exit_code=int(news[1]))
        blind = [rank for rank, seen in enumerate(ctx.gather(ctx.is_main or _sees(layout.root / MARKER, news[1])))
                 if not seen]
        if ctx.is_main:
            (layout.root / MARKER).unlink(missing_ok=True)
        if blind:
            raise BadInputError(f"rank {', '.join(map(str, blind))} cannot see the run directory {layout.root} that "
                                "rank 0 holds (its marker file is not there): a multi-node run needs the run "
                                "directory on a file system every node mounts at the same path; nothing was trained")
        yield


def _sees(marker: Path, token: str) -> bool:
    deadline = time.monotonic() + MARKER_PATIENCE_S
    while True:
        with contextlib.suppress(OSError):
            if marker.read_text() == token:
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


@contextlib.contextmanager
def _lock(layout: RunLayout) -> Iterator[None]:
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
