"""The diffusion quantities of KDiffusion (docs/kdiffusion.md section 2), as pure functions.

A DDPM noise schedule over ``N`` steps, the ``m`` reverse steps
``tau_k = N - k N / m`` and, for each step, the posterior coefficients
``u_k, v_k, w_k`` of ``q(x_r | x_s, x_0) = N(u x_s + v x_0, w s2)``, the
signal-to-noise ratios and the per-step loss weights ``omega_k``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def alphabar(n_steps: int = 1000, kind: str = "linear", beta_start: float = 1e-4,
             beta_end: float = 0.02) -> torch.Tensor:
    """``alphabar_t`` for t = 0..N (float64; ``alphabar_0 = 1``)."""
    if kind == "linear":
        betas = torch.linspace(beta_start, beta_end, n_steps, dtype=torch.float64)
        return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])
    if kind == "cosine":  # Nichol & Dhariwal (2021), betas clipped at 0.999
        s = 0.008
        t = torch.arange(n_steps + 1, dtype=torch.float64) / n_steps
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])
    raise ValueError(f"unknown schedule '{kind}'; valid: cosine, linear")


@dataclass(frozen=True)
class ReverseSteps:
    tau: torch.Tensor  # m + 1 time steps, tau_0 = N ... tau_m = 0
    a2: torch.Tensor  # alphabar at each tau_k (m + 1 values; a_t^2 in the poster's notation)
    u: torch.Tensor  # m posterior coefficients each
    v: torch.Tensor
    w: torch.Tensor
    snr: torch.Tensor  # SNR(tau_k), k = 0..m, with SNR(0) capped
    omega: torch.Tensor  # m loss weights summing to 1


def reverse_steps(m: int, n_steps: int = 1000, kind: str = "linear", weights: str = "snr",
                  snr_cap: float | None = None) -> ReverseSteps:
    if m < 1:
        raise ValueError(f"m must be >= 1 (got {m})")
    abar = alphabar(n_steps, kind)
    tau = torch.tensor([round(n_steps - k * n_steps / m) for k in range(m + 1)])
    a2 = abar[tau]  # a_t^2
    b2 = 1 - a2  # b_t^2
    s, r = slice(0, m), slice(1, m + 1)
    a_sr2 = a2[s] / a2[r]
    b_sr2 = 1 - a_sr2
    u = b2[r] * a_sr2.sqrt() / b2[s]
    v = b_sr2 * a2[r].sqrt() / b2[s]
    w = b_sr2 * b2[r] / b2[s]
    snr = a2 / b2.clamp_min(0)  # SNR(0) = inf
    cap = 2 * snr[m - 1] if snr_cap is None else torch.tensor(snr_cap, dtype=torch.float64)
    snr = torch.where(torch.isfinite(snr), snr, cap)
    if weights == "snr":
        omega = snr[r] - snr[s]
    elif weights == "uniform":
        omega = torch.ones(m, dtype=torch.float64)
    elif weights == "last":
        omega = torch.zeros(m, dtype=torch.float64)
        omega[-1] = 1
    else:
        raise ValueError(f"unknown weights '{weights}'; valid: last, snr, uniform")
    return ReverseSteps(tau, a2, u, v, w, snr, omega / omega.sum())


def gaussian_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, var: torch.Tensor | float) -> torch.Tensor:
    """KL(N(mean_p, var) || N(mean_q, var)) summed over elements (equal variances)."""
    return ((mean_p - mean_q) ** 2 / (2 * var)).sum()


def gaussian_kl_full(mean_p: torch.Tensor, var_p: torch.Tensor, mean_q: torch.Tensor,
                     var_q: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_p, var_p) || N(mean_q, var_q)) per element, for any two diagonal Gaussians."""
    return 0.5 * (torch.log(var_q / var_p) + (var_p + (mean_p - mean_q) ** 2) / var_q - 1)


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``-log N(x; mean, var)`` per element without the constant ``log sqrt(2 pi)``: the poster's eq. (1),
    ``log sigma + (x - mu)^2 / (2 sigma^2)``. With a learned ``var`` its ``log sigma`` term is what keeps the
    variance from growing without bound; with a fixed one the NLL is a weighted L2 plus a constant."""
    return 0.5 * torch.log(var) + (x - mean) ** 2 / (2 * var)
