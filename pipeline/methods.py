"""Distillation methods, found by name through a registry.

A method is one ``nn.Module`` class with one job: given the student's (and,
when it needs one, the teacher's) logits and feature taps plus the labels,
return a dict of named loss tensors; the training loss is their sum. A
method owns its training-only modules (projectors and the like), which live
in the training task and never in the saved student.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import unknown_name

_METHODS: dict[str, type["KDMethod"]] = {}


def register_method(name: str) -> Callable[[type["KDMethod"]], type["KDMethod"]]:
    def add(cls: type["KDMethod"]) -> type["KDMethod"]:
        if name in _METHODS:
            raise ValueError(f"method '{name}' registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return add


def method_names() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> type["KDMethod"]:
    if name not in _METHODS:
        raise unknown_name("method", name, method_names())
    return _METHODS[name]


class KDMethod(nn.Module):
    name = "base"
    needs_teacher = True

    def __init__(self, label_smoothing: float = 0.0, **options: Any):
        super().__init__()
        self.label_smoothing = label_smoothing

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def losses(self, *, student_logits: torch.Tensor, labels: torch.Tensor,
               student_feats: dict[str, torch.Tensor] | None = None, teacher_logits: torch.Tensor | None = None,
               teacher_feats: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError


@register_method("none")
class StudentAlone(KDMethod):
    """No teacher: the multi-branch student trained with cross-entropy alone (the baseline)."""

    needs_teacher = False

    def losses(self, *, student_logits, labels, **_: Any) -> dict[str, torch.Tensor]:
        return {"ce": self.cross_entropy(student_logits, labels)}


class DistillTask(nn.Module):
    """The engine's task for the distill stage: the student (saved) plus the method (training only)."""

    def __init__(self, student: nn.Module, method: KDMethod):
        super().__init__()
        self.model = student
        self.method = method

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.model(images)
        losses = self.method.losses(student_logits=logits, labels=labels)
        losses["loss"] = sum(losses.values())
        return logits, losses
