"""The model zoo: every teacher and student by name, built from torchvision.

A :class:`ModelSpec` says how to build a model, which submodule is its
classifier, where its named feature taps are, and which precision trains it
fastest on a CPU. Specs are registered with :func:`register`; names and
aliases resolve through :func:`get_spec`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from models.errors import ModelError, unknown_name
from models.taps import TapSpec

Builder = Callable[[int, int, dict[str, Any]], tuple[nn.Module, dict[str, Any]]]


@dataclass(frozen=True)
class ModelSpec:
    """Everything the pipeline needs to know about one architecture.

    ``builder(num_classes, image_size, options)`` returns the module and the
    architecture choices it made (recorded in the run's config).
    ``cpu_precision`` is the autocast dtype that trains fastest on a CPU
    (measured by ``benchmarks/precision.py``): bf16 helps transformers, and
    slows the depthwise/grouped convolutions of small CNNs.
    """

    name: str
    role: Literal["teacher", "student"]
    torchvision_name: str
    builder: Builder
    classifier: str
    taps: dict[str, TapSpec]
    aliases: tuple[str, ...] = ()
    cpu_precision: Literal["fp32", "bf16"] = "fp32"
    default_image_size: int = 224
    adaptable_keys: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ModelSpec] = {}
_ALIASES: dict[str, str] = {}


def register(spec: ModelSpec) -> ModelSpec:
    for key in (spec.name, *spec.aliases):
        if key in _REGISTRY or key in _ALIASES:
            raise ValueError(f"model name '{key}' registered twice")
    _REGISTRY[spec.name] = spec
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name
    return spec


def _ensure_loaded() -> None:
    # The zoo modules register themselves on import.
    import models.zoo  # noqa: F401


def model_names(role: str | None = None, with_aliases: bool = False) -> list[str]:
    _ensure_loaded()
    names = [s.name for s in _REGISTRY.values() if role is None or s.role == role]
    if with_aliases:
        names += [a for a, n in _ALIASES.items() if role is None or _REGISTRY[n].role == role]
    return sorted(names)


def get_spec(name: str, role: str | None = None) -> ModelSpec:
    """Resolve a name or alias; ``role`` limits the search to teachers or students."""
    _ensure_loaded()
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    spec = _REGISTRY.get(key)
    if spec is None or (role is not None and spec.role != role):
        raise unknown_name(role or "model", name, model_names(role, with_aliases=True))
    return spec


def build_model(
    name: str, num_classes: int, image_size: int | None = None, role: str | None = None, **options: Any
) -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    """Build a randomly initialised model; returns (module, spec, architecture choices)."""
    spec = get_spec(name, role)
    if num_classes < 2:
        raise ModelError(f"num_classes must be >= 2 (got {num_classes})")
    size = image_size or spec.default_image_size
    if size < 16:
        raise ModelError(f"image_size must be >= 16 (got {size})")
    unknown = set(options) - set(spec.options)
    if unknown:
        raise ModelError(f"model {spec.name} has no option(s) {sorted(unknown)}; valid: {sorted(spec.options)}")
    merged = {**spec.options, **{k: v for k, v in options.items() if v is not None}}
    module, arch = spec.builder(num_classes, size, merged)
    arch = {"name": spec.name, "torchvision_name": spec.torchvision_name, "num_classes": num_classes,
            "image_size": size, **arch}
    return module, spec, arch
