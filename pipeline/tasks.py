"""Training tasks: what the engine optimises for a stage (see :func:`pipeline.engine.fit`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SupervisedTask(nn.Module):
    """Plain cross-entropy training of one network (teacher fine-tuning, student alone)."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.model(images)
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return logits, {"loss": ce, "ce": ce}
