"""Failure classes of the pipeline, each with its own process exit code.

The CLI turns any of these into one line on stderr (no traceback unless
``--debug``) and exits with the class's code, so scripts can tell a bad
input from a failed equivalence gate or a diverged training run.
"""
from __future__ import annotations

from collections.abc import Sequence

from exporters.errors import ExportError, ExporterError, GateFailedError, InputError


class PipelineError(Exception):
    """Base class: a failure the user can act on, reported in one line."""

    exit_code = 1


class BadInputError(PipelineError):
    """Unknown names, invalid settings, missing or corrupt files."""

    exit_code = 2


class TrainingDivergedError(PipelineError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = 4


class StorageError(PipelineError):
    """A file could not be written: disk full, read-only or not permitted. Finished files are intact
    (every write goes to a temporary file that is renamed into place)."""

    exit_code = 6


class RankFailedError(PipelineError):
    """Under torchrun: another rank stalled, died or failed (rank 0's failure keeps its own exit code)."""

    exit_code = 7

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


# Everything the CLI reports in one line with the failure's own exit code (GateFailedError: 3, ExportError: 5
# and the runtime's InputError: 2 come from :mod:`exporters.errors`).
FAILURES = (PipelineError, ExporterError)
__all__ = ["BadInputError", "ExportError", "ExporterError", "FAILURES", "GateFailedError", "InputError",
           "PipelineError", "RankFailedError", "StorageError", "TrainingDivergedError", "parse_list", "storage_error",
           "unknown_name"]

STORAGE_ERRNOS = {"EROFS", "ENOSPC", "EDQUOT", "EACCES", "EPERM", "EFBIG"}


def storage_error(exc: OSError) -> StorageError | None:
    """The StorageError for an OSError that means 'cannot write here', else None."""
    import errno

    if errno.errorcode.get(exc.errno or -1) not in STORAGE_ERRNOS:
        return None
    where = f" {exc.filename}" if exc.filename else ""
    return StorageError(f"cannot write{where}: {exc.strerror or exc}; free some space or make the run directory "
                        "writable, then rerun the same command (finished stages are kept)")


def unknown_name(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> BadInputError:
    """The standard error for a name that is not registered."""
    return BadInputError(f"unknown {kind} '{name}'; valid: {', '.join(sorted(valid))}")


def parse_list(text: str, valid: Sequence[str], what: str) -> tuple[str, ...]:
    """Comma-separated names, deduplicated and lower-cased; unknown or no names are a BadInputError."""
    names = tuple(dict.fromkeys(p.strip().lower() for p in text.split(",") if p.strip()))
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise BadInputError(f"unknown {what} {', '.join(unknown) or '(none given)'}; valid: {', '.join(valid)}")
    return names
