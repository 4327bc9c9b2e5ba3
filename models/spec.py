"""What the zoo knows about one architecture (:class:`ModelSpec`) and the table specs register into.

Lookups by name are :mod:`models.registry`'s; this module only holds the table,
so the zoo can register into it without importing the lookups.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from models.taps import TapSpec

Builder = Callable[[int, int, dict[str, Any]], tuple[nn.Module, dict[str, Any]]]


@dataclass(frozen=True)
class ModelSpec:
    """Everything the pipeline needs to know about one architecture.

    ``builder(num_classes, image_size, options)`` returns the module and the
    architecture choices it made (recorded in the stage's metrics).
    ``resolve(image_size, options)`` returns the options with the choices the
    builder would make for this input size filled in, so that a run's saved
    settings say them before anything is built (Swin: the window of each stage).
    """

    name: str
    role: Literal["teacher", "student"]
    torchvision_name: str
    builder: Builder
    classifier: str
    taps: dict[str, TapSpec]
    aliases: tuple[str, ...] = ()
    default_image_size: int = 224
    adaptable_keys: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    resolve: Callable[[int, dict[str, Any]], dict[str, Any]] | None = None


_REGISTRY: dict[str, ModelSpec] = {}
_ALIASES: dict[str, str] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add a spec under its name and aliases (a name may be registered once)."""
    for key in (spec.name, *spec.aliases):
        if key in _REGISTRY or key in _ALIASES:
            raise ValueError(f"model name '{key}' registered twice")
    _REGISTRY[spec.name] = spec
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name
    return spec


def unregister(name: str) -> None:
    """Remove a spec and its aliases (for specs registered at run time, e.g. by tests)."""
    spec = _REGISTRY.pop(name)
    for alias in spec.aliases:
        _ALIASES.pop(alias, None)
