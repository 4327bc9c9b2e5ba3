"""The frozen "next part" of a teacher after a feature tap (KDiffusion's target guidance).

``next_part(model, tap)`` returns a module mapping that tap's NCHW feature to
what the teacher computes from it next: the logits for the last stage (Swin:
final norm, pooling, head; ResNet: pooling, fc), the next stage's NCHW output
for an intermediate one.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import ResNet, SwinTransformer

from models.errors import ModelError


class _ToNHWC(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class _ToNCHW(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


def next_part(model: nn.Module, tap: str) -> nn.Module:
    if isinstance(model, SwinTransformer):
        f = model.features
        parts = {"stage4": [_ToNHWC(), model.norm, model.permute, model.avgpool, model.flatten, model.head],
                 "stage3": [_ToNHWC(), f[6], f[7], _ToNCHW()], "stage2": [_ToNHWC(), f[4], f[5], _ToNCHW()],
                 "stage1": [_ToNHWC(), f[2], f[3], _ToNCHW()]}
    elif isinstance(model, ResNet):
        parts = {"stage4": [model.avgpool, nn.Flatten(1), model.fc], "stage3": [model.layer4],
                 "stage2": [model.layer3], "stage1": [model.layer2]}
    else:
        raise ModelError(f"no next-part definition for {type(model).__name__}")
    if tap == "final":
        tap = "stage4"
    if tap not in parts:
        raise ModelError(f"no next part after tap '{tap}'; valid: {', '.join(sorted(parts))}")
    return nn.Sequential(*parts[tap])
