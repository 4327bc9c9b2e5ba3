"""Distillation methods, found by name through a registry (:mod:`pipeline.methods.base`).

Adding a method: one module here with a ``@register_method("name")`` subclass
of :class:`KDMethod`, and its import below.
"""
from pipeline.methods.base import (KDMethod, check, create_method, get_method, method_names, method_settings,
                                   register_method)
from pipeline.methods import contrastive, feature, kdiffusion, logit  # noqa: F401,E402  (each registers its methods)

__all__ = ["KDMethod", "check", "create_method", "get_method", "method_names", "method_settings", "register_method"]
