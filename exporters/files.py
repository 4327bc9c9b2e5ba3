"""Opening a file that came from outside: only a regular file, and without blocking on anything else.

A FIFO among the images (or in place of a manifest) would block ``open`` forever, a device would never end; a
folder is not a file. The check is made on the opened descriptor, so nothing can be swapped in between.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from exporters.errors import InputError, printable


def open_regular(path: str | Path, what: str) -> BinaryIO:
    """A binary file object on ``path``; InputError (naming it as ``what``) when it is not a regular file.
    A missing file raises FileNotFoundError, for the caller to word."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
        raise InputError(f"{what} {printable(path)} is {kind}; only regular files are read")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")
