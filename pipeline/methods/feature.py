"""Feature-based methods: FitNet and attention transfer, plus the pairing base they share with KDiffusion."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods.base import FeaturePair, KDMethod, check, register_method


class Projector(nn.Module):
    """Spatial alignment, then 1x1 conv + BN with no nonlinearity (affine: P(mean z) = mean P(z))."""

    def __init__(self, student_shape: tuple[int, int, int], teacher_shape: tuple[int, int, int], align: str = "pool"):
        super().__init__()
        check(align in ("pool", "resize"), f"align must be pool or resize (got {align})")
        self.size = tuple(teacher_shape[1:]) if align == "resize" else tuple(
            min(s, t) for s, t in zip(student_shape[1:], teacher_shape[1:]))
        self.align = align
        self.conv = nn.Conv2d(student_shape[0], teacher_shape[0], 1, bias=False)
        self.bn = nn.BatchNorm2d(teacher_shape[0])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if tuple(z.shape[-2:]) != self.size:
            if self.align == "resize":
                z = F.interpolate(z, size=self.size, mode="bilinear", align_corners=False)
            else:
                z = F.adaptive_avg_pool2d(z, self.size)
        # The 1x1 conv as a matrix product over channels: the same function, but on a CPU oneDNN's 1x1
        # convolution is ~5x slower than the GEMM for these shapes (forward+backward of a 512x1024x1x1
        # batch through 1024->768: 216 ms vs 42 ms on one core here).
        projected = F.linear(z.movedim(1, -1), self.conv.weight.flatten(1)).movedim(-1, 1)
        return self.bn(projected)


def match_size(teacher: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The teacher feature pooled to the (smaller) spatial size of the student's estimate."""
    return teacher if teacher.shape[-2:] == like.shape[-2:] else F.adaptive_avg_pool2d(teacher, like.shape[-2:])


class PairedFeatureMethod(KDMethod):
    """A method that pairs each student distillation point with a teacher stage (set up by the stage)."""

    align = "pool"
    uses_features = True
    pairs: list[tuple[str, str]] = []  # (student tap, teacher tap), filled in by setup

    def setup(self, m: int, pairs: list[FeaturePair], next_parts: dict[str, nn.Module | None]) -> None:
        """``pairs``: (student point tap, teacher tap, student CHW, teacher CHW); ``next_parts`` by teacher tap."""
        self.m = m
        self.pairs = [(s, t) for s, t, _, _ in pairs]
        self.projectors = nn.ModuleList(Projector(ss, ts, self.align) for _, _, ss, ts in pairs)
        # the teacher's next parts are frozen teacher modules: kept out of this module's state
        object.__setattr__(self, "next_parts", next_parts)

    @property
    def teacher_taps(self) -> list[str]:
        return [t for _, t in self.pairs]


def mean_feature(branches: list[torch.Tensor]) -> torch.Tensor:
    """The point's output (uniform mean of its branches = what the fused layer computes)."""
    return torch.stack(branches).mean(0)


@register_method("fitnet")
class FitNet(PairedFeatureMethod):
    """CE + beta * MSE(P(student feature), teacher feature) at each point (Romero et al., 2015)."""

    def __init__(self, beta: float = 1.0, **options: Any):
        super().__init__(**options)
        check(beta >= 0, f"beta must be >= 0 (got {beta})")
        self.beta = float(beta)

    def losses(self, *, student_logits, labels, branches, teacher_feats, **_: Any) -> dict[str, torch.Tensor]:
        total = student_logits.new_zeros(())
        for i, (s_tap, t_tap) in enumerate(self.pairs):
            estimate = self.projectors[i](mean_feature(branches[s_tap])).float()
            total = total + F.mse_loss(estimate, match_size(teacher_feats[t_tap].detach(), estimate))
        return {"ce": self.cross_entropy(student_logits, labels), "fitnet": self.beta * total}


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention of Zagoruyko & Komodakis (2017): normalised channel-mean of |f|^p, flattened."""
    return F.normalize(feature.float().abs().pow(p).mean(1).flatten(1), dim=1)


@register_method("at")
class AttentionTransfer(PairedFeatureMethod):
    """CE + beta / 2 * sum over points of mean((a_s - a_t)^2), attention maps at the smaller spatial size."""

    def __init__(self, beta: float = 1000.0, p: float = 2.0, **options: Any):
        super().__init__(**options)
        check(beta >= 0, f"beta must be >= 0 (got {beta})")
        check(p > 0, f"p must be > 0 (got {p})")
        self.beta, self.p = float(beta), float(p)

    def losses(self, *, student_logits, labels, branches, teacher_feats, **_: Any) -> dict[str, torch.Tensor]:
        total = student_logits.new_zeros(())
        for s_tap, t_tap in self.pairs:
            student = mean_feature(branches[s_tap])
            teacher = teacher_feats[t_tap].detach()
            size = tuple(min(a, b) for a, b in zip(student.shape[-2:], teacher.shape[-2:]))
            a_s = attention_map(F.adaptive_avg_pool2d(student, size), self.p)
            a_t = attention_map(F.adaptive_avg_pool2d(teacher, size), self.p)
            total = total + (a_s - a_t).pow(2).mean()
        return {"ce": self.cross_entropy(student_logits, labels), "at": self.beta / 2 * total}
