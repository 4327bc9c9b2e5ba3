"""torchvision Swin Transformers whose attention window adapts to the input size.

torchvision uses one window (7) in every stage and pads each stage's token
grid up to a multiple of it: a 32x32 input (8x8 tokens after 4x4 patches)
is padded to 14x14 in stage 1 and the 1x1 grid of stage 4 to 7x7, most of the
attention compute going to padding. Here each stage gets the largest window
that divides its grid and does not exceed the requested one, so nothing is
padded; at 224x224 (grids 56/28/14/7) this is torchvision's own window 7.
The module is still a ``torchvision.models.SwinTransformer`` with the same
state-dict keys; only the relative-position tables of changed windows differ
in shape.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any

from torch import nn
from torchvision.models.swin_transformer import SwinTransformer, SwinTransformerBlock

from models.errors import ModelError

# torchvision's sizes for swin_t / swin_s / swin_b.
SWIN_SIZES: dict[str, dict[str, Any]] = {
    "swin_t": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], stochastic_depth_prob=0.2),
    "swin_s": dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], stochastic_depth_prob=0.3),
    "swin_b": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], stochastic_depth_prob=0.5),
}
PATCH = 4


def stage_grids(image_size: int, num_stages: int = 4, patch: int = PATCH) -> list[int]:
    """Token-grid side of each stage (patch merging pads odd grids up)."""
    grid = math.ceil(image_size / patch)
    grids = [grid]
    for _ in range(num_stages - 1):
        grid = math.ceil(grid / 2)
        grids.append(grid)
    return grids


def stage_windows(image_size: int, max_window: int = 7, num_stages: int = 4) -> list[int]:
    """Largest window <= max_window that divides each stage's grid (no padding)."""
    return [max(w for w in range(1, min(max_window, g) + 1) if g % w == 0) for g in stage_grids(image_size, num_stages)]


def _block_with_stage_window(windows_by_dim: dict[int, int], dim: int, num_heads: int, window_size: list[int],
                             shift_size: list[int], **kwargs: Any) -> nn.Module:
    """SwinTransformer's block factory, with the window chosen for this stage (known by its width)."""
    w = windows_by_dim[dim]
    shift = 0 if shift_size[0] == 0 else w // 2
    return SwinTransformerBlock(dim, num_heads, window_size=[w, w], shift_size=[shift, shift], **kwargs)


def resolve_swin_options(image_size: int, options: dict[str, Any]) -> dict[str, Any]:
    """The options with ``window_per_stage`` chosen for ``image_size`` when it was left open."""
    if options.get("window_per_stage") is None:
        options["window_per_stage"] = stage_windows(image_size, int(options.get("window", 7)))
    return options


def build_swin(variant: str, num_classes: int, image_size: int, options: dict[str, Any]) -> tuple[nn.Module, dict]:
    sizes = dict(SWIN_SIZES[variant])
    drop_path = options.get("drop_path")
    if drop_path is not None:
        sizes["stochastic_depth_prob"] = float(drop_path)
    windows = options.get("window_per_stage")
    if windows is None:
        windows = stage_windows(image_size, int(options.get("window", 7)), len(sizes["depths"]))
    elif len(windows) != len(sizes["depths"]) or min(windows) < 1:
        raise ModelError(f"window_per_stage needs {len(sizes['depths'])} positive sizes (got {windows})")
    windows = [int(w) for w in windows]
    windows_by_dim = {sizes["embed_dim"] * 2**i: w for i, w in enumerate(windows)}
    model = SwinTransformer(
        patch_size=[PATCH, PATCH],
        window_size=[windows[0], windows[0]],
        num_classes=num_classes,
        block=partial(_block_with_stage_window, windows_by_dim),
        **sizes,
    )
    arch = {"window_per_stage": windows, "token_grid_per_stage": stage_grids(image_size, len(windows)),
            "drop_path": sizes["stochastic_depth_prob"]}
    return model, arch
