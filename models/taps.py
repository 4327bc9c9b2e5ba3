"""Named feature taps: one interface to read intermediate features of any zoo model.

Taps are forward hooks on named submodules, so the model itself (and its
state-dict keys) stays the stock torchvision module. Every tap is returned in
NCHW layout; torchvision Swin stages produce NHWC and are permuted here.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from models.errors import unknown_name


@dataclass(frozen=True)
class TapSpec:
    """Where a named feature lives: a submodule path and its output layout."""

    module: str
    layout: Literal["NCHW", "NHWC"] = "NCHW"


def to_nchw(feature: torch.Tensor, layout: str) -> torch.Tensor:
    return feature.permute(0, 3, 1, 2) if layout == "NHWC" else feature


class FeatureTaps:
    """Capture named features during a forward pass.

    Usage::

        with FeatureTaps(model, spec.taps, ["stage3", "stage4"]) as taps:
            logits = model(x)
        feats = taps.features  # {"stage3": NCHW tensor, "stage4": NCHW tensor}

    The captured tensors keep their autograd graph, so losses on them train
    the model. ``model`` may be wrapped (DDP): submodule paths are resolved on
    the wrapped module.
    """

    def __init__(self, model: nn.Module, taps: dict[str, TapSpec], names: Iterable[str] | None = None):
        names = list(taps) if names is None else list(names)
        for name in names:
            if name not in taps:
                raise unknown_name("feature tap", name, taps)
        inner = getattr(model, "module", model)
        self._targets = {name: (inner.get_submodule(taps[name].module), taps[name].layout) for name in names}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.features: dict[str, torch.Tensor] = {}

    def __enter__(self) -> "FeatureTaps":
        for name, (module, layout) in self._targets.items():
            self._handles.append(module.register_forward_hook(self._hook(name, layout)))
        return self

    def _hook(self, name: str, layout: str):
        def capture(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            self.features[name] = to_nchw(output, layout)

        return capture

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
