"""Failures of the exporters, each with the process exit code a command-line tool should use.

``exporters`` imports nothing from ``pipeline`` (it is the part that ships), so it
has its own error types; the pipeline's CLI reports them like its own failures.
"""
from __future__ import annotations


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
