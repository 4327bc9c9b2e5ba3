"""KDiffusion (Yao et al., AAAI 2024), as described in docs/kdiffusion.md.

Per distillation point the student layer has ``m`` parallel linear branches
(``models.blocks.BranchConvBN``); their projected outputs ``p_j = P(z_j)``
estimate the teacher feature ``t`` in ``m`` reverse-diffusion steps:
``xhat_k`` is the running mean of the first ``k`` branches in a fresh random
order, and step ``k`` costs the Gaussian KL between the teacher's and the
student's DDPM posteriors, ``0.5 (SNR(tau_k) - SNR(tau_{k-1})) |t - xhat_k|^2 / s2``
(normalised weights ``omega_k``). Target guidance runs the frozen next part
of the teacher on ``xhat_m``. Choices marked [ours] in the spec are options:
``weights``, ``shuffle``, ``guided``, ``normalize_teacher``, ``snr_cap``,
``align``, the lambdas and the optional logit KD term.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods.base import FeaturePair, check, register_method
from pipeline.methods.feature import PairedFeatureMethod, match_size
from pipeline.methods.diffusion import reverse_steps
from pipeline.methods.logit import kd_divergence


@register_method("kdiffusion")
class KDiffusion(PairedFeatureMethod):
    def __init__(self, weights: str = "snr", shuffle: bool = True, guided: bool = True,
                 normalize_teacher: bool = True, lambda_diff: float = 1.0, lambda_guided: float = 1.0,
                 lambda_kd: float = 0.0, kd_temperature: float = 4.0, schedule: str = "linear", N: int = 1000,
                 snr_cap: float | None = None, align: str = "pool", diff_warmup: float = 0.0, **options: Any):
        super().__init__(**options)
        check(weights in ("snr", "uniform", "last"), f"weights must be snr, uniform or last (got {weights})")
        check(schedule in ("linear", "cosine"), f"schedule must be linear or cosine (got {schedule})")
        check(align in ("pool", "resize"), f"align must be pool or resize (got {align})")
        for name, value in (("lambda_diff", lambda_diff), ("lambda_guided", lambda_guided),
                            ("lambda_kd", lambda_kd), ("diff_warmup", diff_warmup)):
            check(value >= 0, f"{name} must be >= 0 (got {value})")
        check(int(N) >= 2, f"N must be >= 2 (got {N})")
        check(snr_cap is None or snr_cap > 0, f"snr_cap must be > 0 (got {snr_cap})")
        check(kd_temperature > 0, f"kd_temperature must be > 0 (got {kd_temperature})")
        self.weights, self.shuffle, self.guided = weights, bool(shuffle), bool(guided)
        self.normalize_teacher, self.align = bool(normalize_teacher), align
        self.lambda_diff, self.lambda_guided, self.lambda_kd = float(lambda_diff), float(lambda_guided), float(lambda_kd)
        self.kd_temperature, self.schedule, self.N, self.snr_cap = float(kd_temperature), schedule, int(N), snr_cap
        self.diff_warmup = float(diff_warmup)
        self.last_orders: list[list[int]] = []

    # --------------------------------------------------------------------------------- set-up

    def setup(self, m: int, pairs: list[FeaturePair], next_parts: dict[str, nn.Module | None]) -> None:
        super().setup(m, pairs, next_parts)
        steps = reverse_steps(m, self.N, self.schedule, self.weights, self.snr_cap)
        self.register_buffer("omega", steps.omega.float())
        n = len(pairs)
        self.register_buffer("s2", torch.ones(n))
        self.register_buffer("initialised", torch.zeros(n, dtype=torch.bool))
        # Detached running statistics are buffers: saved for resume, and under DDP broadcast from rank 0
        # each step, so every replica normalises with the same numbers.
        for i, (*_, ts) in enumerate(pairs):
            self.register_buffer(f"teacher_mean_{i}", torch.zeros(1, ts[0], 1, 1))
            self.register_buffer(f"teacher_std_{i}", torch.ones(1, ts[0], 1, 1))

    # --------------------------------------------------------------------------------- statistics

    @torch.no_grad()
    def _update_stats(self, i: int, teacher: torch.Tensor, projected: torch.Tensor) -> None:
        """Detached running estimates (EMA, momentum 0.1): teacher per-channel mean/std, and s2."""
        var = projected.float().var()
        mean_t = teacher.mean(dim=(0, 2, 3), keepdim=True)
        std_t = teacher.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6) if teacher.numel() > teacher.shape[1] \
            else torch.ones_like(mean_t)
        if not bool(self.initialised[i]):
            self.s2[i] = var
            self.get_buffer(f"teacher_mean_{i}").copy_(mean_t)
            self.get_buffer(f"teacher_std_{i}").copy_(std_t)
            self.initialised[i] = True
        elif self.training:
            self.s2[i] = 0.9 * self.s2[i] + 0.1 * var
            self.get_buffer(f"teacher_mean_{i}").mul_(0.9).add_(0.1 * mean_t)
            self.get_buffer(f"teacher_std_{i}").mul_(0.9).add_(0.1 * std_t)

    # --------------------------------------------------------------------------------- the loss

    def estimates(self, i: int, branches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
        """``[xhat_1 .. xhat_m]`` of point ``i``: running means of the projected branches in shuffled order."""
        m = len(branches)
        batch = branches[0].shape[0]
        projected = self.projectors[i](torch.cat(branches))  # one P (one set of BN statistics) for all branches
        projected = projected.to(torch.promote_types(projected.dtype, torch.float32)).split(batch)
        order = torch.randperm(m).tolist() if (self.shuffle and self.training) else list(range(m))
        xhat, out = None, []
        for k, j in enumerate(order, start=1):
            xhat = projected[j] if xhat is None else xhat + (projected[j] - xhat) / k
            out.append(xhat)
        return out, order

    def losses(self, *, student_logits, labels, teacher_logits=None, branches=None, teacher_feats=None,
               **_: Any) -> dict[str, torch.Tensor]:
        out = {"ce": self.cross_entropy(student_logits, labels)}
        diff_total, guided_total = student_logits.new_zeros(()), student_logits.new_zeros(())
        self.last_orders = []
        ramp = min(1.0, self.epoch_progress / self.diff_warmup) if self.diff_warmup > 0 else 1.0
        for i, (s_tap, t_tap) in enumerate(self.pairs):
            teacher = teacher_feats[t_tap].float().detach()
            xhats, order = self.estimates(i, branches[s_tap])
            self.last_orders.append(order)
            teacher = match_size(teacher, xhats[-1])
            self._update_stats(i, teacher, torch.stack(xhats))
            mu, sd = self.get_buffer(f"teacher_mean_{i}"), self.get_buffer(f"teacher_std_{i}")
            target = (teacher - mu) / sd if self.normalize_teacher else teacher
            s2 = self.s2[i].clamp_min(1e-8)
            diff = sum(w * ((target - x) ** 2).mean() for w, x in zip(self.omega, xhats)) / (2 * s2)
            diff_total = diff_total + diff
            head = self.next_parts.get(t_tap) if self.guided else None
            if head is not None:
                raw = mu + sd * xhats[-1] if self.normalize_teacher else xhats[-1]
                with torch.no_grad():
                    goal = head(teacher)
                guided_total = guided_total + F.mse_loss(head(raw), goal)
        out["diff"] = ramp * self.lambda_diff * diff_total
        if self.guided and any(self.next_parts.get(t) is not None for t in self.teacher_taps):
            out["guided"] = self.lambda_guided * guided_total
        if self.lambda_kd > 0 and teacher_logits is not None:
            out["kd"] = self.lambda_kd * kd_divergence(student_logits, teacher_logits, self.kd_temperature)
        return out
