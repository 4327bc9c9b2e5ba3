"""Checks of the KDiffusion maths (docs/kdiffusion.md section 7) and logit-KD fixtures."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.methods.diffusion import alphabar, gaussian_kl, gaussian_kl_full, gaussian_nll, reverse_steps
from pipeline.methods.logit import dkd_terms, kd_divergence


def test_m4_coefficients_match_the_spec_table():
    steps = reverse_steps(4)
    assert steps.tau.tolist() == [1000, 750, 500, 250, 0]
    assert steps.u.tolist() == pytest.approx([0.1094, 0.1909, 0.2000, 0.0], abs=1e-4)
    assert steps.v.tolist() == pytest.approx([0.0572, 0.2693, 0.6679, 1.0], abs=1e-4)
    assert steps.w.tolist() == pytest.approx([0.9847, 0.8851, 0.4391, 0.0], abs=1e-4)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_coefficients_are_the_closed_form_ddpm_posterior(m, kind):
    """u, v, w equal DDPM's mu_tilde / beta_tilde coefficients for the jump s -> r."""
    abar = alphabar(1000, kind)
    steps = reverse_steps(m, kind=kind)
    for k in range(m):
        s, r = int(steps.tau[k]), int(steps.tau[k + 1])
        alpha = abar[s] / abar[r]  # the jump's "alpha_t"
        beta = 1 - alpha
        coef_x0 = abar[r].sqrt() * beta / (1 - abar[s])
        coef_xt = alpha.sqrt() * (1 - abar[r]) / (1 - abar[s])
        beta_tilde = (1 - abar[r]) / (1 - abar[s]) * beta
        assert steps.v[k].item() == pytest.approx(coef_x0.item(), rel=1e-12, abs=1e-15)
        assert steps.u[k].item() == pytest.approx(coef_xt.item(), rel=1e-12, abs=1e-15)
        assert steps.w[k].item() == pytest.approx(beta_tilde.item(), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("m", [2, 4, 8])
def test_gaussian_kl_equals_the_snr_form(m):
    steps = reverse_steps(m)
    gen = torch.Generator().manual_seed(m)
    x, t, xhat = (torch.randn(50, generator=gen, dtype=torch.float64) for _ in range(3))
    s2 = 0.7
    for k in range(m - 1):  # the last step has w = 0 (its SNR is capped instead)
        u, v, w = steps.u[k], steps.v[k], steps.w[k]
        kl = gaussian_kl(u * x + v * t, u * x + v * xhat, w * s2)
        snr_form = 0.5 * (steps.snr[k + 1] - steps.snr[k]) * ((t - xhat) ** 2).sum() / s2
        assert kl.item() == pytest.approx(snr_form.item(), rel=1e-9)


def test_gaussian_nll_gradients_are_the_closed_form():
    """Eq. (1): d/dmu = -(x - mu) / sigma^2 and d/dlog sigma = 1 - (x - mu)^2 / sigma^2; the log sigma term is what
    stops a learned variance from growing without bound (its optimum is sigma^2 = (x - mu)^2)."""
    gen = torch.Generator().manual_seed(0)
    x, mu = torch.randn(20, generator=gen, dtype=torch.float64), torch.randn(20, generator=gen, dtype=torch.float64)
    mu.requires_grad_(True)
    log_sigma = (0.3 * torch.randn(20, generator=gen, dtype=torch.float64)).requires_grad_(True)
    var = torch.exp(2 * log_sigma)
    gaussian_nll(x, mu, var).sum().backward()
    sigma2 = var.detach()
    assert torch.allclose(mu.grad, -(x - mu.detach()) / sigma2, rtol=1e-12, atol=1e-12)
    assert torch.allclose(log_sigma.grad, 1 - (x - mu.detach()) ** 2 / sigma2, rtol=1e-12, atol=1e-12)
    at_optimum = (x - mu.detach()) ** 2
    assert (gaussian_nll(x, mu.detach(), at_optimum) <= gaussian_nll(x, mu.detach(), at_optimum * 1.1)).all()
    assert (gaussian_nll(x, mu.detach(), at_optimum) <= gaussian_nll(x, mu.detach(), at_optimum * 0.9)).all()


def test_gaussian_kl_closed_form_matches_monte_carlo():
    """KL(p || q) = E_p[NLL_q(x)] - E_p[NLL_p(x)], estimated with 400k samples of p, for unequal variances; with
    equal variances it is the equal-variance form used by the SNR weighting."""
    gen = torch.Generator().manual_seed(1)
    mean_p, mean_q = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64), torch.tensor([0.0, 0.5, 1.0],
                                                                                         dtype=torch.float64)
    var_p, var_q = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 0.3, 2.5],
                                                                                   dtype=torch.float64)
    samples = mean_p + var_p.sqrt() * torch.randn(400_000, 3, generator=gen, dtype=torch.float64)
    monte_carlo = (gaussian_nll(samples, mean_q, var_q) - gaussian_nll(samples, mean_p, var_p)).mean(0)
    closed = gaussian_kl_full(mean_p, var_p, mean_q, var_q)
    assert torch.allclose(monte_carlo, closed, atol=0.01), (monte_carlo, closed)
    same = torch.full((3,), 0.7, dtype=torch.float64)
    assert gaussian_kl_full(mean_p, same, mean_q, same).sum().item() == pytest.approx(
        gaussian_kl(mean_p, mean_q, 0.7).item(), rel=1e-12)


def test_weights_variants():
    assert reverse_steps(4, weights="uniform").omega.tolist() == [0.25] * 4
    assert reverse_steps(4, weights="last").omega.tolist() == [0, 0, 0, 1]
    snr = reverse_steps(4)
    assert snr.omega.sum().item() == pytest.approx(1.0) and (snr.omega > 0).all()
    assert snr.snr[-1] == pytest.approx(2 * snr.snr[-2].item())  # SNR(0) capped at 2 SNR(tau_{m-1})


def test_kd_divergence_fixture():
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[0.5, 3.0, 0.0]])
    T = 2.0
    ps = [math.exp(v / T) for v in (1.0, 2.0, 0.5)]
    pt = [math.exp(v / T) for v in (0.5, 3.0, 0.0)]
    ps = [p / sum(ps) for p in ps]
    pt = [p / sum(pt) for p in pt]
    expected = T**2 * sum(q * math.log(q / p) for p, q in zip(ps, pt))
    assert kd_divergence(s, t, T).item() == pytest.approx(expected, rel=1e-6)


def test_dkd_fixture():
    s = torch.tensor([[1.0, 2.0, 0.5, -1.0]])
    t = torch.tensor([[0.5, 3.0, 0.0, 0.2]])
    label = torch.tensor([1])
    T = 1.0
    soft = lambda z: [math.exp(v) / sum(math.exp(x) for x in z) for v in z]  # noqa: E731
    ps, pt = soft(s[0].tolist()), soft(t[0].tolist())
    bs, bt = [ps[1], 1 - ps[1]], [pt[1], 1 - pt[1]]
    tckd = sum(q * math.log(q / p) for p, q in zip(bs, bt))
    ns = soft([v for i, v in enumerate(s[0].tolist()) if i != 1])
    nt = soft([v for i, v in enumerate(t[0].tolist()) if i != 1])
    nckd = sum(q * math.log(q / p) for p, q in zip(ns, nt))
    got_t, got_n = dkd_terms(s, t, label, T)
    assert got_t.item() == pytest.approx(tckd, rel=1e-5) and got_n.item() == pytest.approx(nckd, rel=1e-5)
