"""The model zoo: every teacher and student by name, built from torchvision.

A :class:`ModelSpec` (:mod:`models.spec`) says how to build a model, which
submodule is its classifier and where its named feature taps are. The zoo
(:mod:`models.zoo`) registers every spec; names and aliases resolve through
:func:`get_spec`.
"""
from __future__ import annotations

from typing import Any

from torch import nn

import models.zoo  # noqa: F401  (the zoo registers every architecture on import)
from models.errors import ModelError, unknown_name
from models.spec import _ALIASES, _REGISTRY, ModelSpec, register, unregister

__all__ = ["ModelSpec", "build_model", "get_spec", "model_names", "register", "resolved_options", "unregister"]


def model_names(role: str | None = None, with_aliases: bool = False) -> list[str]:
    names = [s.name for s in _REGISTRY.values() if role is None or s.role == role]
    if with_aliases:
        names += [a for a, n in _ALIASES.items() if role is None or _REGISTRY[n].role == role]
    return sorted(names)


def get_spec(name: str, role: str | None = None) -> ModelSpec:
    """Resolve a name or alias; ``role`` limits the search to teachers or students."""
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    spec = _REGISTRY.get(key)
    if spec is None or (role is not None and spec.role != role):
        raise unknown_name(role or "model", name, model_names(role, with_aliases=True))
    return spec


def resolved_options(name: str, image_size: int, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with what the model would choose for ``image_size`` filled in (unchanged when nothing is left
    to choose)."""
    spec = get_spec(name)
    return dict(spec.resolve(image_size, dict(options))) if spec.resolve else dict(options)


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
