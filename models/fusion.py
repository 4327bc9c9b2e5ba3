"""Fusion algebra: pure functions on tensors that turn linear branches into one convolution.

Every function works on raw weight tensors (no modules), in any float dtype,
and handles stride-independent kernel algebra: a conv's stride, padding and
groups are properties of the layer the fused kernel goes into, and the
functions below only require that the branches being summed share them
(with kernels padded, centred, to a common size).

Conventions: a conv kernel has shape ``(out, in / groups, k, k)``; a bias has
shape ``(out,)``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def fold_bn(kernel: Tensor, bias: Tensor | None, mean: Tensor, var: Tensor, gamma: Tensor | None,
            beta: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """Conv followed by BatchNorm (eval mode) as one conv: ``K' = K * g / s``, ``b' = beta + (b - mean) * g / s``."""
    gamma = torch.ones_like(var) if gamma is None else gamma
    beta = torch.zeros_like(var) if beta is None else beta
    bias = torch.zeros_like(mean) if bias is None else bias
    scale = gamma / torch.sqrt(var + eps)
    return kernel * scale.reshape(-1, 1, 1, 1), beta + (bias - mean) * scale


def pad_kernel(kernel: Tensor, size: int) -> Tensor:
    """Zero-pad a ``k x k`` kernel to ``size x size``, centred (k and size both odd, or equal)."""
    k = kernel.shape[-1]
    if k == size:
        return kernel
    if size < k or (size - k) % 2:
        raise ValueError(f"cannot centre a {k}x{k} kernel in {size}x{size}")
    p = (size - k) // 2
    return F.pad(kernel, (p, p, p, p))


def identity_kernel(channels: int, groups: int = 1, size: int = 1, dtype=torch.float32, device=None) -> Tensor:
    """The kernel of a conv that returns its input (in == out channels; groups and depthwise too)."""
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, size, size, dtype=dtype, device=device)
    c = size // 2
    kernel[torch.arange(channels), torch.arange(channels) % per_group, c, c] = 1
    return kernel


def avgpool_kernel(channels: int, groups: int = 1, size: int = 3, dtype=torch.float32, device=None) -> Tensor:
    """The kernel of a conv equal to per-channel ``size x size`` average pooling (count_include_pad=True)."""
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, size, size, dtype=dtype, device=device)
    kernel[torch.arange(channels), torch.arange(channels) % per_group] = 1.0 / (size * size)
    return kernel


def merge_1x1_kxk(k1: Tensor, b1: Tensor, k2: Tensor, b2: Tensor, groups: int = 1) -> tuple[Tensor, Tensor]:
    """A 1x1 conv (k1, b1) followed by a kxk conv (k2, b2), both with ``groups``, as one kxk conv.

    Exact when the kxk conv's zero padding is replaced by padding with the
    1x1 conv's output bias (or when it has no padding): the caller's layer
    must do that (see :class:`models.blocks.BiasPad`).
    """
    out2, in2_g = k2.shape[:2]
    out1, in1_g = k1.shape[:2]
    o1, o2 = out1 // groups, out2 // groups
    kernels, biases = [], []
    for g in range(groups):
        a = k1[g * o1:(g + 1) * o1, :, 0, 0]  # o1 x in1_g
        w = k2[g * o2:(g + 1) * o2]  # o2 x o1 x k x k
        kernels.append(torch.einsum("omhw,mi->oihw", w, a))
        biases.append(b2[g * o2:(g + 1) * o2] + torch.einsum("omhw,m->o", w, b1[g * o1:(g + 1) * o1]))
    return torch.cat(kernels), torch.cat(biases)


def sum_branches(kernels: Sequence[Tensor], biases: Sequence[Tensor],
                 weights: Sequence[float] | None = None) -> tuple[Tensor, Tensor]:
    """Weighted sum of parallel branches (kernels padded, centred, to the largest size)."""
    if not kernels:
        raise ValueError("no branches to sum")
    size = max(k.shape[-1] for k in kernels)
    weights = [1.0] * len(kernels) if weights is None else list(weights)
    if len(weights) != len(kernels) or len(biases) != len(kernels):
        raise ValueError("one weight and one bias per kernel")
    kernel = sum(w * pad_kernel(k, size) for w, k in zip(weights, kernels))
    bias = sum(w * b for w, b in zip(weights, biases))
    return kernel, bias
