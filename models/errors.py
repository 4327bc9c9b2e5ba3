"""Errors raised by the model zoo (``models`` imports nothing from ``pipeline``).

The CLI reports a :class:`ModelError` as bad input (exit code 2).
"""
from __future__ import annotations

from collections.abc import Iterable


class ModelError(ValueError):
    """A model name, tap name or weight file that cannot be used."""


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> ModelError:
    return ModelError(f"unknown {kind} '{name}'; valid: {', '.join(sorted(valid))}")
