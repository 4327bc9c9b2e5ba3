"""The teacher's next linear layer after a feature tap (KDiffusion's target guidance, the poster's eq. (9)).

``next_linear(model, tap)`` returns the frozen ``nn.Linear`` whose weights ``w_t``
the guidance term applies to a feature: for the last stage, the classifier,
which reads the spatially averaged feature (Swin: after its final LayerNorm,
which is not linear and is left out; ResNet: after global pooling). Earlier
taps feed a whole stage (patch merging or a strided conv block), which has no
single linear map over the tap's channels: they have no guidance.
"""
from __future__ import annotations

from torch import nn
from torchvision.models import ResNet, SwinTransformer

from models.errors import ModelError


def next_linear(model: nn.Module, tap: str) -> nn.Linear:
    if isinstance(model, SwinTransformer):
        head = model.head
    elif isinstance(model, ResNet):
        head = model.fc
    else:
        raise ModelError(f"no next-layer definition for {type(model).__name__}")
    if tap not in ("stage4", "final"):
        raise ModelError(f"no linear next layer after tap '{tap}' (only after the last stage: stage4)")
    return head
