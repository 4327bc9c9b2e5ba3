"""Failures of the exporters, each with the process exit code a command-line tool should use.

``exporters`` imports nothing from ``pipeline`` (it is the part that ships), so it
has its own error types; the pipeline's CLI reports them like its own failures.
"""
from __future__ import annotations

import signal
import threading


class ExporterError(Exception):
    """Base class: a failure the user can act on, reported in one line."""

    exit_code = 1


class InputError(ExporterError, ValueError):
    """An input the model cannot take: wrong shape, channel count, unreadable image, unusable model file."""

    exit_code = 2


class GateFailedError(ExporterError):
    """A numerical equivalence check failed."""

    exit_code = 3


class ExportError(ExporterError):
    """An exporter or runtime failed to produce or load an artifact."""

    exit_code = 5


def printable(text: object) -> str:
    """``text`` with every character that is not printable (newlines, control characters, the surrogates that stand
    for undecodable bytes of a file name) and the backslash escaped, so that a hostile file name cannot break a
    one-line message or the one-line-per-image output."""
    return "".join(c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii")
                   for c in str(text))


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, as SIGINT raises KeyboardInterrupt: the same cleanup runs (``finally``
    blocks, atomic writes abandoned, a stage left unfinished) and the command says so, exiting 143."""

    exit_code = 128 + signal.SIGTERM


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def handle_sigterm() -> None:
    """Make SIGTERM (``docker stop``, ``kill``, a scheduler's timeout) behave as SIGINT (in the main thread; a
    command run from another thread keeps the process's handler)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def interruption(exc: KeyboardInterrupt) -> tuple[str, int]:
    """What a command says and its exit code when stopped: ("terminated", 143) after SIGTERM, ("interrupted", 130)
    after SIGINT (the shell's 128 + signal number)."""
    if isinstance(exc, Terminated):
        return "terminated", Terminated.exit_code
    return "interrupted", 128 + signal.SIGINT
