"""Re-parameterizable blocks: trained with parallel linear branches, fused into one conv + BN.

Each block replaces a torchvision ``Conv2d`` followed by ``BatchNorm2d`` (the
BN's slot becomes ``nn.Identity``) and exposes :meth:`RepBlock.fused_kernel`,
the exact single-convolution equivalent of the block in eval mode. The
model-level :func:`models.reparam.fuse_model` puts a plain conv and a BN back
into the two slots, so the fused network is the stock architecture.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.fusion import avgpool_kernel, fold_bn, identity_kernel, merge_1x1_kxk, sum_branches


def conv_like(conv: nn.Conv2d, kernel_size: int | None = None, padding: int | None = None,
              in_channels: int | None = None, out_channels: int | None = None, groups: int | None = None,
              stride: int | None = None) -> nn.Conv2d:
    """A fresh bias-free conv with ``conv``'s settings, some overridden."""
    k = conv.kernel_size[0] if kernel_size is None else kernel_size
    return nn.Conv2d(conv.in_channels if in_channels is None else in_channels,
                     conv.out_channels if out_channels is None else out_channels, k,
                     stride=conv.stride if stride is None else stride,
                     padding=conv.padding if padding is None else padding,
                     groups=conv.groups if groups is None else groups, bias=False)


def bn_like(bn: nn.BatchNorm2d, channels: int | None = None) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(bn.num_features if channels is None else channels, eps=bn.eps, momentum=bn.momentum)


def conv_bn_kernel(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    return fold_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


def bn_output_bias(bn: nn.BatchNorm2d) -> torch.Tensor:
    """What an eval-mode BN outputs for a zero input."""
    return bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)


class BiasPad(nn.Module):
    """BN followed by padding with the BN's zero-input output, so a 1x1 -> kxk chain fuses exactly."""

    def __init__(self, bn: nn.BatchNorm2d, pad: int):
        super().__init__()
        self.bn, self.pad = bn, pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        if self.pad == 0:
            return y
        fill = bn_output_bias(self.bn).reshape(1, -1, 1, 1)
        return F.pad(y - fill, [self.pad] * 4) + fill


class RepBlock(nn.Module):
    """Base class: a training-time block equal (in eval mode) to one conv with bias."""

    #: path of the BN slot this block emptied (set by the model builder), refilled by fusion
    bn_slot: str = ""
    #: settings of the replaced conv and BN (plain data, not submodules), for the fused layers
    conv_settings: dict
    bn_settings: dict

    def remember(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        self.conv_settings = dict(in_channels=conv.in_channels, out_channels=conv.out_channels,
                                  kernel_size=conv.kernel_size[0], stride=conv.stride[0], groups=conv.groups)
        self.bn_settings = dict(num_features=bn.num_features, eps=bn.eps, momentum=bn.momentum)

    def fused_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def fused_layers(self) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
        """A bias-free conv and a BN that together compute this block exactly (eval mode).

        The BN is an exact identity scale (gamma = sqrt(1 + eps), var = 1) plus the
        fused bias, so the pair drops into torchvision's conv/BN slots.
        """
        kernel, bias = self.fused_kernel()
        k = kernel.shape[-1]
        conv = nn.Conv2d(**{**self.conv_settings, "kernel_size": k}, padding=k // 2, bias=False)
        bn = nn.BatchNorm2d(**self.bn_settings)
        conv = conv.to(kernel.device, kernel.dtype)
        bn = bn.to(kernel.device, kernel.dtype)
        with torch.no_grad():
            conv.weight.copy_(kernel)
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0)
            bn.weight.fill_(math.sqrt(1.0 + bn.eps))
            bn.bias.copy_(bias)
        return conv.eval(), bn.eval()


class BranchConvBN(RepBlock):
    """KDiffusion's distillation layer: ``m`` parallel conv+BN branches whose uniform mean is the output.

    After each training-mode forward, ``branch_outputs`` holds the ``m``
    pre-mean outputs (with gradients) for the distillation loss. The mean of linear branches
    is itself linear, so :meth:`fused_kernel` is exact.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, m: int):
        super().__init__()
        if not 1 <= m <= 8:
            raise ValueError(f"branch count m must be in 1..8 (got {m})")
        self.m = m
        self.remember(conv, bn)
        self.convs = nn.ModuleList(conv_like(conv) for _ in range(m))
        self.bns = nn.ModuleList(bn_like(bn) for _ in range(m))
        with torch.no_grad():  # branch 0 starts from the original layer, the others from fresh inits
            self.convs[0].weight.copy_(conv.weight)
            self.bns[0].load_state_dict(bn.state_dict())
        self.branch_outputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [bn(conv(x)) for conv, bn in zip(self.convs, self.bns)]
        self.branch_outputs = outs if self.training else []  # only training losses read them
        return torch.stack(outs).mean(0)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["branch_outputs"] = []  # activations are not part of the block (and cannot be deep-copied)
        return state

    def fused_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        folded = [conv_bn_kernel(c, b) for c, b in zip(self.convs, self.bns)]
        return sum_branches([k for k, _ in folded], [b for _, b in folded], [1.0 / self.m] * self.m)


class RepConvBN(RepBlock):
    """RepVGG / Diverse-Branch-Block style conv: kxk conv-BN + 1x1 conv-BN + identity BN (RepVGG),
    optionally + 1x1->kxk and 1x1->avg-pool branches (DBB). Outputs the branches' sum."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, style: str = "repvgg"):
        super().__init__()
        if style not in ("repvgg", "dbb"):
            raise ValueError(f"unknown rep-block style '{style}'; valid: dbb, repvgg")
        if not rep_eligible(conv):
            raise ValueError("conv is not eligible for re-parameterization")
        k, s = conv.kernel_size[0], conv.stride[0]
        cin, cout = conv.in_channels, conv.out_channels
        self.remember(conv, bn)
        self.main, self.main_bn = conv_like(conv), bn_like(bn)
        with torch.no_grad():
            self.main.weight.copy_(conv.weight)
            self.main_bn.load_state_dict(bn.state_dict())
        self.one = self.one_bn = None
        if k > 1:
            self.one, self.one_bn = conv_like(conv, kernel_size=1, padding=0), bn_like(bn)
        self.identity_bn = bn_like(bn) if cin == cout and s == 1 else None
        self.chain = self.avg = None
        if style == "dbb" and k > 1:
            p = k // 2
            # 1x1 (cin -> cout, groups g) -> BN -> pad with BN bias -> kxk (no padding) -> BN
            self.chain = nn.Sequential(conv_like(conv, kernel_size=1, padding=0, out_channels=cout, stride=1),
                                       BiasPad(bn_like(bn), p), conv_like(conv, padding=0, in_channels=cout),
                                       bn_like(bn))
            # 1x1 (cin -> cout) -> BN -> pad with BN bias -> kxk average pool (stride s) -> BN
            self.avg = nn.Sequential(conv_like(conv, kernel_size=1, padding=0, stride=1),
                                     BiasPad(bn_like(bn), p), nn.AvgPool2d(k, stride=s, padding=0), bn_like(bn))
            for module in self.chain.modules():
                if isinstance(module, nn.BatchNorm2d):
                    nn.init.constant_(module.weight, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.main_bn(self.main(x))
        if self.one is not None:
            out = out + self.one_bn(self.one(x))
        if self.identity_bn is not None:
            out = out + self.identity_bn(x)
        if self.chain is not None:
            out = out + self.chain(x) + self.avg(x)
        return out

    def fused_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        conv = self.main
        k, g = conv.kernel_size[0], conv.groups
        kernels, biases = [], []
        for c, b in ((self.main, self.main_bn), (self.one, self.one_bn)):
            if c is not None:
                kk, bb = conv_bn_kernel(c, b)
                kernels.append(kk), biases.append(bb)
        if self.identity_bn is not None:
            ident = identity_kernel(conv.out_channels, g, 1, conv.weight.dtype, conv.weight.device)
            bn = self.identity_bn
            kk, bb = fold_bn(ident, None, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
            kernels.append(kk), biases.append(bb)
        if self.chain is not None:
            c1, pad_bn, c2, bn2 = self.chain
            k1, b1 = conv_bn_kernel(c1, pad_bn.bn)
            k2, b2 = conv_bn_kernel(c2, bn2)
            kernels_biases = merge_1x1_kxk(k1, b1, k2, b2, g)
            kernels.append(kernels_biases[0]), biases.append(kernels_biases[1])
            a1, pad_bn, _, bn3 = self.avg
            k1, b1 = conv_bn_kernel(a1, pad_bn.bn)
            pool = avgpool_kernel(conv.out_channels, g, k, conv.weight.dtype, conv.weight.device)
            kp, bp = merge_1x1_kxk(k1, b1, pool, torch.zeros_like(b1), g)
            kp, bp = fold_bn(kp, bp, bn3.running_mean, bn3.running_var, bn3.weight, bn3.bias, bn3.eps)
            kernels.append(kp), biases.append(bp)
        return sum_branches(kernels, biases)


def rep_eligible(conv: nn.Conv2d) -> bool:
    """Square odd kernel, 'same' padding, no dilation, no bias: what the branch algebra covers."""
    k = conv.kernel_size
    return (isinstance(conv, nn.Conv2d) and k[0] == k[1] and k[0] % 2 == 1 and conv.padding == (k[0] // 2,) * 2
            and conv.dilation == (1, 1) and conv.stride[0] == conv.stride[1] and conv.padding_mode == "zeros")
