"""Training tasks: what the engine optimises for a stage (see :func:`pipeline.training.engine.fit`).

A task is an ``nn.Module`` whose ``forward(images, labels, indices)`` (indices:
the batch's positions in the training set, None outside training) returns
``(logits, {name: loss})`` with the total under ``"loss"``, and whose
``model`` is the network that is evaluated and saved.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.taps import FeatureTaps
from pipeline.methods.base import KDMethod
from pipeline.training.teacher_cache import TeacherOutputCache

log = logging.getLogger(__name__)


class Task(nn.Module):
    """The engine's side of a task: ``model`` is trained, evaluated and saved."""

    model: nn.Module

    def set_progress(self, epochs_done: float) -> None:
        """Called before every training step with the fractional epochs done (for warm-ups and logs)."""


class SupervisedTask(Task):
    """Plain cross-entropy training of one network (teacher fine-tuning, student alone)."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, images: torch.Tensor, labels: torch.Tensor,
                indices: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.model(images)
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return logits, {"loss": ce, "ce": ce}


class FrozenTeacher:
    """The teacher on the side of a distillation: eval mode, no gradients, run once per batch.

    Deliberately not an ``nn.Module`` attribute of the task, so its weights are
    neither trained, synchronised by DDP nor saved in checkpoints.
    """

    def __init__(self, model: nn.Module, precision: str = "fp32", taps: dict | None = None):
        self.model = model.eval().requires_grad_(False)
        self.precision = precision
        self.taps = taps or {}

    def to(self, device: torch.device) -> "FrozenTeacher":
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            return self.model(images).float()

    def with_features(self, images: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and the named NCHW feature taps (float32, no gradients) in one forward pass."""
        if not names:
            return self(images), {}
        with FeatureTaps(self.model, self.taps, names) as taps:
            logits = self(images)
        return logits, {k: v.float() for k, v in taps.features.items()}


class DistillTask(Task):
    """The engine's task for the distill stage: the student (saved) plus the method (training only).

    With a ``teacher_cache`` (:mod:`pipeline.training.teacher_cache`) the
    teacher's outputs in training mode come from the cache, which runs the
    teacher on the images it has not seen yet.
    """

    def __init__(self, student: nn.Module, method: KDMethod, teacher: FrozenTeacher | None = None,
                 point_paths: dict[str, str] | None = None, teacher_cache: TeacherOutputCache | None = None):
        super().__init__()
        self.model = student
        self.method = method
        self.teacher = teacher
        self.teacher_cache = teacher_cache if teacher is not None else None
        self.point_paths = dict(point_paths or {})  # distillation point tap -> branch block path
        self._epoch: int | None = None  # the epoch in progress (for the cache's per-epoch log)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("teacher", "teacher_cache"):  # plain attributes, never submodules (see FrozenTeacher)
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _apply(self, fn, recurse: bool = True):  # .to(device) moves the teacher along
        if self.teacher is not None:
            self.teacher.model._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def set_progress(self, epochs_done: float) -> None:
        self.method.epoch_progress = epochs_done
        if self.teacher_cache is not None and self._epoch is not None and int(epochs_done) != self._epoch:
            log.info("teacher cache after epoch %d: %s", self._epoch + 1, self.teacher_cache.describe())
            self.teacher_cache.reset_counts()
        self._epoch = int(epochs_done)

    def teacher_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The teacher's logits and the method's taps: from the cache while training, else live."""
        names = list(self.method.teacher_taps)
        if self.teacher_cache is not None and self.training:
            return self.teacher_cache.fetch(self.teacher.with_features, images, names)
        return self.teacher.with_features(images, names)

    def forward(self, images: torch.Tensor, labels: torch.Tensor,
                indices: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        teacher_logits, teacher_feats = None, {}
        if self.teacher is not None:
            teacher_logits, teacher_feats = self.teacher_outputs(images)
        logits = self.model(images)
        branches = {tap: self.model.get_submodule(path).branch_outputs for tap, path in self.point_paths.items()}
        losses = self.method.losses(student_logits=logits, labels=labels, teacher_logits=teacher_logits,
                                    teacher_feats=teacher_feats, branches=branches, indices=indices)
        losses["loss"] = sum(losses.values())
        return logits, losses
