"""Logit-based methods: Hinton KD and decoupled KD (DKD)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pipeline.methods.base import KDMethod, check, register_method


def kd_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean (Hinton et al., 2015)."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(1).mean() * temperature**2


@register_method("kd")
class HintonKD(KDMethod):
    """(1 - alpha) * CE + alpha * T^2 * KL on softened logits."""

    def __init__(self, temperature: float = 2.0, alpha: float = 0.9, **options: Any):
        super().__init__(**options)
        check(temperature > 0, f"temperature must be > 0 (got {temperature})")
        check(0 <= alpha <= 1, f"alpha must be in [0, 1] (got {alpha})")
        self.temperature, self.alpha = float(temperature), float(alpha)

    def losses(self, *, student_logits, labels, teacher_logits, **_: Any) -> dict[str, torch.Tensor]:
        return {"ce": (1 - self.alpha) * self.cross_entropy(student_logits, labels),
                "kd": self.alpha * kd_divergence(student_logits, teacher_logits, self.temperature)}


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Target-class (TCKD) and non-target-class (NCKD) KD terms of Zhao et al., 2022, each times T^2."""
    s, t = student_logits.float() / temperature, teacher_logits.float() / temperature
    gt = F.one_hot(labels, s.shape[1]).bool()
    p_s, p_t = F.softmax(s, 1), F.softmax(t, 1)
    b_s = torch.stack([p_s[gt], p_s.masked_fill(gt, 0).sum(1)], 1)
    b_t = torch.stack([p_t[gt], p_t.masked_fill(gt, 0).sum(1)], 1)
    tckd = (b_t * (b_t.clamp_min(1e-12).log() - b_s.clamp_min(1e-12).log())).sum(1).mean()
    log_ns = F.log_softmax(s.masked_fill(gt, -1e4), 1)
    log_nt = F.log_softmax(t.masked_fill(gt, -1e4), 1)
    nckd = (log_nt.exp() * (log_nt - log_ns)).masked_fill(gt, 0).sum(1).mean()
    return tckd * temperature**2, nckd * temperature**2


@register_method("dkd")
class DecoupledKD(KDMethod):
    """CE + warm-up * (alpha * TCKD + beta * NCKD); the KD weight ramps up linearly over ``warmup`` epochs."""

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, temperature: float = 4.0, warmup: float = 1.0,
                 **options: Any):
        super().__init__(**options)
        check(temperature > 0, f"temperature must be > 0 (got {temperature})")
        for name, value in (("alpha", alpha), ("beta", beta), ("warmup", warmup)):
            check(value >= 0, f"{name} must be >= 0 (got {value})")
        self.alpha, self.beta, self.temperature, self.warmup = float(alpha), float(beta), float(temperature), warmup

    def losses(self, *, student_logits, labels, teacher_logits, **_: Any) -> dict[str, torch.Tensor]:
        tckd, nckd = dkd_terms(student_logits, teacher_logits, labels, self.temperature)
        ramp = min(1.0, self.epoch_progress / self.warmup) if self.warmup > 0 else 1.0
        return {"ce": self.cross_entropy(student_logits, labels), "tckd": ramp * self.alpha * tckd,
                "nckd": ramp * self.beta * nckd}
