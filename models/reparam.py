"""Multi-branch students and model-level fusion.

:func:`build_multibranch_student` takes a zoo student and replaces the conv+BN
at each distillation point with a :class:`BranchConvBN` (and, optionally,
every other eligible conv+BN with a RepVGG/DBB block). :func:`fuse_model`
deep-copies such a model and puts a plain conv and BN back into each block's
slots, giving the stock torchvision architecture.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.blocks import BranchConvBN, RepBlock, RepConvBN, rep_eligible
from models.errors import ModelError
from models.registry import build_model, get_spec

POINT_COUNTS = {"single": 1, "multi": 3}  # distillation points of each set (exactly: fewer is an error)
POINT_SETS = tuple(POINT_COUNTS)
POINT_TAPS = ("final", "stage4", "stage3", "stage2")  # where distillation points are looked for, last first
REP_STYLES = ("none", "repvgg", "dbb")


def conv_bn_pairs(module: nn.Module, prefix: str = "") -> list[tuple[str, str]]:
    """(conv path, bn path) of every Conv2d immediately followed by a BatchNorm2d in its parent, in order."""
    pairs = []
    children = list(module.named_children())
    for (name, child), (next_name, next_child) in zip(children, children[1:]):
        if type(child) is nn.Conv2d and type(next_child) is nn.BatchNorm2d:
            pairs.append((prefix + name, prefix + next_name))
    for name, child in children:
        pairs.extend(conv_bn_pairs(child, f"{prefix}{name}."))
    return sorted(pairs, key=lambda p: _order(module, p[0]))


def _order(root: nn.Module, path: str) -> int:
    for i, (name, _) in enumerate(root.named_modules()):
        if name == path:
            return i
    return -1


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


@dataclass(frozen=True)
class DistillPoint:
    """A distillation point: the tap it pairs with and the conv/BN slots of its branch block."""

    tap: str
    conv: str
    bn: str


def distill_points(name: str, points: str = "single") -> list[DistillPoint]:
    """Where the branch blocks go, last first: the final feature conv, then (multi) the two stages before."""
    if points not in POINT_SETS:
        raise ModelError(f"unknown distillation points '{points}'; valid: {', '.join(POINT_SETS)}")
    spec = get_spec(name, "student")
    model, _, _ = build_model(spec.name, 10, spec.default_image_size)
    wanted = POINT_COUNTS[points]
    chosen, seen = [], set()
    for tap in POINT_TAPS:
        module_path = spec.taps[tap].module if tap in spec.taps else None
        if module_path is None or module_path in seen:
            continue
        seen.add(module_path)
        pairs = conv_bn_pairs(model.get_submodule(module_path), module_path + ".")
        if not pairs:
            continue
        chosen.append(DistillPoint(tap, *pairs[-1]))
        if len(chosen) == wanted:
            return chosen
    found = ", ".join(f"{p.tap} ({p.conv})" for p in chosen) or "none"
    raise ModelError(f"student {spec.name} lacks the distillation point(s) that points '{points}' needs: "
                     f"{wanted} conv+BN layer(s) in its taps {', '.join(POINT_TAPS)} (last first), found {found}")


def build_multibranch_student(name: str, num_classes: int, image_size: int | None = None, m: int = 4,
                              points: str = "single", rep_blocks: str = "none") -> tuple[nn.Module, dict[str, Any]]:
    """A zoo student with branch blocks at its distillation points (and optional rep blocks elsewhere)."""
    if rep_blocks not in REP_STYLES:
        raise ModelError(f"unknown rep-blocks '{rep_blocks}'; valid: {', '.join(REP_STYLES)}")
    if not 1 <= m <= 8:
        raise ModelError(f"branch count m must be in 1..8 (got {m})")
    model, spec, arch = build_model(name, num_classes, image_size, role="student")
    chosen = distill_points(spec.name, points)
    for point in chosen:
        block = BranchConvBN(model.get_submodule(point.conv), model.get_submodule(point.bn), m)
        _set(model, point.conv, block)
        _set(model, point.bn, nn.Identity())
        block.bn_slot = point.bn
    replaced = 0
    if rep_blocks != "none":
        taken = {p.conv for p in chosen}
        for conv_path, bn_path in conv_bn_pairs(model):
            conv = model.get_submodule(conv_path)
            adds_branch = conv.kernel_size[0] > 1 or (conv.in_channels == conv.out_channels and conv.stride[0] == 1)
            if conv_path in taken or not rep_eligible(conv) or not adds_branch:
                continue
            block = RepConvBN(conv, model.get_submodule(bn_path), rep_blocks)
            _set(model, conv_path, block)
            _set(model, bn_path, nn.Identity())
            block.bn_slot = bn_path
            replaced += 1
    arch.update({"multibranch": {"m": m, "points": points, "rep_blocks": rep_blocks, "rep_blocks_replaced": replaced,
                                 "distill_points": [vars(p) for p in chosen]}})
    return model, arch


def branch_blocks(model: nn.Module) -> dict[str, BranchConvBN]:
    """The branch blocks of a multi-branch model by path (their ``branch_outputs`` feed the loss)."""
    inner = getattr(model, "module", model)
    return {name: m for name, m in inner.named_modules() if isinstance(m, BranchConvBN)}


@torch.no_grad()
def fuse_model(model: nn.Module) -> nn.Module:
    """Deep copy with every re-parameterizable block replaced by a plain conv + BN (eval mode)."""
    fused = copy.deepcopy(getattr(model, "module", model)).eval()
    blocks = [(name, m) for name, m in fused.named_modules() if isinstance(m, RepBlock)]
    for name, block in blocks:
        conv, bn = block.fused_layers()
        _set(fused, name, conv)
        _set(fused, block.bn_slot, bn)
    return fused
