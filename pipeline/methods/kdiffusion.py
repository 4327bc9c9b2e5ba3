"""KDiffusion (Yao et al., AAAI 2024), as described in docs/kdiffusion.md.

Per distillation point the student layer has ``m`` parallel linear branches
(``models.blocks.BranchConvBN``); their projected outputs ``p_j = P(z_j)``
are the student features of a ``m``-step diffusion reverse process that ends
at the teacher feature ``t``. Two forms of the chain (option ``chain``):

- ``poster`` (the paper's, eqs. 3-7 and 10): the chain starts where the
  reverse process does, at the teacher's forward-noised state at ``tau_0 = N``
  (eq. 5: ``a_N t + b_N sigma_S eps``, nearly pure noise, ``a_N = 0.006``);
  step ``k`` is the weighted sum ``mu_k = u_k x_{k-1} + v_k p_{pi(k)}`` of the
  previous state and the next shuffled branch (eq. 7), so it depends on the
  first ``k`` branches of the order only, and its loss is the
  Gaussian negative log-likelihood (eq. 1) of the teacher's forward-noised
  state ``x^T_{tau_k} = a_{tau_k} t + b_{tau_k} sigma_S eps`` (eq. 5) under
  ``N(mu_k, sigma_k^2)``, ``sigma_k^2 = max(w_k, var_floor) sigma_S^2``.
- ``reduced`` (the first spec's): running means of the shuffled branches
  compared with the clean teacher, ``NLL(t; xhat_k, sigma_S^2)``.

``variance=learned`` makes the likelihood variance-aware: a learned
per-step, per-channel variance on top of the DDPM posterior variance (its
floor), entering with its ``log sigma`` term. Target guidance (eq. 9) is an
L2 after the teacher's next linear layer, scale-free. Every choice the poster
leaves open is an option; docs/kdiffusion.md lists them.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods.base import FeaturePair, check, register_method
from pipeline.methods.diffusion import ReverseSteps, gaussian_nll, reverse_steps
from pipeline.methods.feature import PairedFeatureMethod, match_size

LEARNED_VARIANCE_INIT = -4.0  # softplus(-4) = 0.018: the learned part starts small against the floor


@register_method("kdiffusion")
class KDiffusion(PairedFeatureMethod):
    def __init__(self, chain: str = "poster", variance: str = "fixed", var_floor: float = 0.1,
                 weights: str = "uniform", shuffle: bool = True, guided: bool = False,
                 normalize_teacher: bool = False, lambda_diff: float = 1.0, lambda_guided: float = 1.0,
                 schedule: str = "linear", N: int = 1000,
                 snr_cap: float | None = None, align: str = "pool", diff_warmup: float = 0.0, **options: Any):
        super().__init__(**options)
        check(chain in ("poster", "reduced"), f"chain must be poster or reduced (got {chain})")
        check(variance in ("fixed", "learned"), f"variance must be fixed or learned (got {variance})")
        check(weights in ("snr", "uniform", "last"), f"weights must be snr, uniform or last (got {weights})")
        check(schedule in ("linear", "cosine"), f"schedule must be linear or cosine (got {schedule})")
        check(align in ("pool", "resize"), f"align must be pool or resize (got {align})")
        for name, value in (("lambda_diff", lambda_diff), ("lambda_guided", lambda_guided),
                            ("diff_warmup", diff_warmup)):
            check(value >= 0, f"{name} must be >= 0 (got {value})")
        check(var_floor > 0, f"var_floor must be > 0 (got {var_floor})")
        check(int(N) >= 2, f"N must be >= 2 (got {N})")
        check(snr_cap is None or snr_cap > 0, f"snr_cap must be > 0 (got {snr_cap})")
        self.chain, self.variance, self.var_floor = chain, variance, float(var_floor)
        self.weights, self.shuffle, self.guided = weights, bool(shuffle), bool(guided)
        self.normalize_teacher, self.align = bool(normalize_teacher), align
        self.lambda_diff, self.lambda_guided = float(lambda_diff), float(lambda_guided)
        self.schedule, self.N, self.snr_cap = schedule, int(N), snr_cap
        self.diff_warmup = float(diff_warmup)
        self.last_orders: list[list[int]] = []

    # --------------------------------------------------------------------------------- set-up

    def setup(self, m: int, pairs: list[FeaturePair], next_parts: dict[str, nn.Module | None]) -> None:
        super().setup(m, pairs, next_parts)
        steps = reverse_steps(m, self.N, self.schedule, self.weights, self.snr_cap)
        abar = steps.a2
        self.register_buffer("omega", steps.omega.float())
        self.register_buffer("u", steps.u.float())
        self.register_buffer("v", steps.v.float())
        self.register_buffer("step_var", step_variances(steps, self.chain, self.var_floor).float())
        self.register_buffer("signal", abar[1:].sqrt().float())  # a_{tau_k}, k = 1..m
        self.register_buffer("noise", (1 - abar[1:]).clamp_min(0).sqrt().float())  # b_{tau_k}
        # the chain's start, the state at tau_0 = N (constants, kept out of the state dict)
        self.start_signal, self.start_noise = float(abar[0].sqrt()), float((1 - abar[0]).sqrt())
        n = len(pairs)
        self.register_buffer("s2", torch.ones(n))
        self.register_buffer("initialised", torch.zeros(n, dtype=torch.bool))
        # Detached running statistics are buffers: saved for resume, and under DDP broadcast from rank 0
        # each step, so every replica normalises with the same numbers.
        for i, (*_, ts) in enumerate(pairs):
            self.register_buffer(f"teacher_mean_{i}", torch.zeros(1, ts[0], 1, 1))
            self.register_buffer(f"teacher_std_{i}", torch.ones(1, ts[0], 1, 1))
        if self.variance == "learned":  # per point: (step, channel), the learned excess over the floor
            self.extra_var = nn.ParameterList(nn.Parameter(torch.full((m, ts[0]), LEARNED_VARIANCE_INIT))
                                              for *_, ts in pairs)

    def no_weight_decay(self) -> set[str]:
        """The learned variance is a likelihood parameter, not a weight: no weight decay (the engine reads this)."""
        return {name for name, _ in self.named_parameters() if name.startswith("extra_var.")}

    # --------------------------------------------------------------------------------- statistics

    @torch.no_grad()
    def _update_stats(self, i: int, teacher: torch.Tensor, projected: torch.Tensor) -> None:
        """Detached running estimates (EMA, momentum 0.1): teacher per-channel mean/std, and ``s2`` (sigma_S^2,
        the variance of the projected branch features ``p_j``)."""
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

    # --------------------------------------------------------------------------------- the chain

    def project(self, i: int, branches: list[torch.Tensor]) -> list[torch.Tensor]:
        """``[p_1 .. p_m]``: the branches through point ``i``'s projector (one P, one set of BN statistics)."""
        batch = branches[0].shape[0]
        projected = self.projectors[i](torch.cat(branches))
        return list(projected.to(torch.promote_types(projected.dtype, torch.float32)).split(batch))

    def branch_order(self, m: int) -> list[int]:
        """Shuffle sampling (eq. 10): a fresh random order per point and step while training."""
        return torch.randperm(m).tolist() if (self.shuffle and self.training) else list(range(m))

    def estimates(self, i: int, branches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
        """``[xhat_1 .. xhat_m]`` of point ``i`` in the reduced chain: running means of the shuffled branches."""
        projected = self.project(i, branches)
        order = self.branch_order(len(projected))
        return running_means([projected[j] for j in order]), order

    def variances(self, i: int, s2: torch.Tensor) -> torch.Tensor:
        """Each step's likelihood variance, shape (m, 1, C, 1, 1) or (m, 1, 1, 1, 1): the floor ``step_var_k *
        sigma_S^2``, plus the learned per-channel excess with ``variance=learned``."""
        var = self.step_var.view(-1, 1, 1, 1, 1) * s2
        if self.variance == "learned":
            var = var + s2 * F.softplus(self.extra_var[i]).view(self.m, 1, -1, 1, 1)
        return var

    def chain_states(self, projected: list[torch.Tensor], order: list[int], target: torch.Tensor,
                     s2: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each step's student mean and the target it is scored against. ``poster``: the chain from the teacher's
        state at ``tau_0`` through the shuffled branches (eq. 7), against the teacher's state at each ``tau_k``
        (eq. 5), every state freshly noised; ``reduced``: running means against the clean teacher."""
        features = [projected[j] for j in order]
        if self.chain == "reduced":
            return running_means(features), [target] * len(features)
        # (contiguous: a live teacher's channels-last features and the cache's copy then reduce in one order)
        target, scale = target.contiguous(), s2.sqrt()
        start = forward_noised(target, self.start_signal, self.start_noise * scale)
        goals = [forward_noised(target, self.signal[k], self.noise[k] * scale) for k in range(len(features))]
        return poster_chain(start, features, self.u, self.v), goals

    def chain_loss(self, i: int, projected: list[torch.Tensor], order: list[int], target: torch.Tensor,
                   s2: torch.Tensor) -> torch.Tensor:
        """The weighted sum over steps of each step's Gaussian NLL (means over elements)."""
        var = self.variances(i, s2)
        means, goals = self.chain_states(projected, order, target, s2)
        return sum(w * gaussian_nll(goal, mean, var[k]).mean()
                   for k, (w, goal, mean) in enumerate(zip(self.omega, goals, means)))

    # --------------------------------------------------------------------------------- the loss

    def feature_losses(self, *, student_logits, labels, branches=None, teacher_feats=None,
                       **_: Any) -> dict[str, torch.Tensor]:
        out = {"ce": self.cross_entropy(student_logits, labels)}
        diff_total, guided_total = student_logits.new_zeros(()), student_logits.new_zeros(())
        self.last_orders = []
        ramp = min(1.0, self.epoch_progress / self.diff_warmup) if self.diff_warmup > 0 else 1.0
        guided_points = 0
        for i, (s_tap, t_tap) in enumerate(self.pairs):
            projected = self.project(i, branches[s_tap])
            order = self.branch_order(len(projected))
            self.last_orders.append(order)
            teacher = match_size(teacher_feats[t_tap].float().detach(), projected[0])
            self._update_stats(i, teacher, torch.stack(projected))
            mu, sd = self.get_buffer(f"teacher_mean_{i}"), self.get_buffer(f"teacher_std_{i}")
            target = (teacher - mu) / sd if self.normalize_teacher else teacher
            diff_total = diff_total + self.chain_loss(i, projected, order, target, self.s2[i].clamp_min(1e-8))
            head = self.next_parts.get(t_tap) if self.guided else None
            if head is not None:
                estimate = torch.stack(projected).mean(0)  # the deployed (fused) feature, projected
                gap = sd * (target - estimate) if self.normalize_teacher else target - estimate
                guided_total = guided_total + linear_guidance(gap, teacher, head.weight)
                guided_points += 1
        out["diff"] = ramp * self.lambda_diff * diff_total
        if guided_points:
            out["guided"] = self.lambda_guided * guided_total
        return out


def standard_noise(like: torch.Tensor) -> torch.Tensor:
    """``eps ~ N(0, I)`` shaped like ``like``, drawn in the logical (contiguous) order: the same generator state
    gives the same noise whatever the memory layout of ``like`` (a live teacher's features are permuted views,
    cached ones are contiguous; ``randn_like`` would follow their strides)."""
    return torch.randn(like.shape, dtype=like.dtype, device=like.device)


def running_means(features: list[torch.Tensor]) -> list[torch.Tensor]:
    """``xhat_k``: the mean of the first ``k`` features, for k = 1..m."""
    xhat, out = None, []
    for k, feature in enumerate(features, start=1):
        xhat = feature if xhat is None else xhat + (feature - xhat) / k
        out.append(xhat)
    return out


def forward_noised(target: torch.Tensor, signal: torch.Tensor | float, noise: torch.Tensor | float) -> torch.Tensor:
    """Eq. (5): a draw of the teacher's state ``a t + b sigma_S eps`` (``noise`` is ``b sigma_S``)."""
    return signal * target + noise * standard_noise(target)


def poster_chain(start: torch.Tensor, features: list[torch.Tensor], u: torch.Tensor,
                 v: torch.Tensor) -> list[torch.Tensor]:
    """The student's reverse chain (eq. 7): ``x_0 = start``, ``x_k = u_k x_{k-1} + v_k f_k`` for the features in
    chain order, so ``x_k`` depends on the first ``k`` of them only."""
    state, states = start, []
    for k, feature in enumerate(features):
        state = u[k] * state + v[k] * feature
        states.append(state)
    return states


def step_variances(steps: ReverseSteps, chain: str, var_floor: float) -> torch.Tensor:
    """Each step's likelihood variance relative to sigma_S^2 (the floor of ``variance=learned``): the poster
    chain's posterior ``w_k``, floored (``w_m = 0``); the reduced chain's 1."""
    variance = steps.w if chain == "poster" else torch.ones_like(steps.w)
    return variance.clamp_min(var_floor)


def fused_curvature(m: int, chain: str = "poster", weights: str = "uniform", var_floor: float = 0.1,
                    schedule: str = "linear", N: int = 1000, snr_cap: float | None = None) -> float:
    """How hard one point's ``L_diff`` holds the fused (deployed) feature, in units of ``1 / sigma_S^2``: moving every
    branch by the same ``delta`` moves step ``k``'s mean by ``c_k delta`` (``c_k = u_k c_{k-1} + v_k`` from
    ``c_0 = 0`` on the poster chain, 1 on the reduced), so the loss's second derivative in ``delta`` (per element,
    at the variance floor) is ``sum_k omega_k c_k^2 / var_k``. m = 4 by default: 2.83; m = 1 or
    ``weights=last``: 10."""
    steps = reverse_steps(m, N, schedule, weights, snr_cap)
    one = torch.ones((), dtype=torch.float64)
    if chain == "poster":
        coefficients = torch.stack(poster_chain(0 * one, [one] * m, steps.u, steps.v))
    else:
        coefficients = torch.stack(running_means([one] * m))
    return float((steps.omega * coefficients**2 / step_variances(steps, chain, var_floor)).sum())


def linear_guidance(gap: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Eq. (9), scale-free: ``||(x^T - xhat^T) w_t||^2`` on the spatially averaged features, divided by the
    (detached) variance of ``x^T w_t`` over the batch, so its size does not depend on the teacher's scale."""
    mapped_gap = F.linear(gap.mean(dim=(2, 3)), weight.float())
    with torch.no_grad():
        scale = F.linear(teacher.mean(dim=(2, 3)), weight.float()).var(dim=0).mean().clamp_min(1e-8)
    return mapped_gap.pow(2).mean() / scale
