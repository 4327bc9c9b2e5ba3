"""Numerical equivalence checks between two models that must compute the same function.

A check returns its numbers; :func:`gate` raises :class:`GateFailedError`
naming the failed check and by how much. Models are always compared in eval
mode (copies are put in eval mode, whatever mode the caller left them in).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from exporters.errors import GateFailedError


@dataclass
class Comparison:
    name: str
    dtype: str
    max_abs_diff: float
    max_rel_diff: float
    max_abs_logit: float
    top1_agreement: float  # percent
    samples: int
    tolerance: float = 0.0
    passed: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Tolerances:
    fp64_abs: float = 1e-9
    fp32_rel: float = 1e-4  # max abs diff <= fp32_rel * max(1, max |logit|)
    min_top1_agreement: float = 100.0


def compare_outputs(name: str, reference: torch.Tensor, candidate: torch.Tensor, dtype: str) -> Comparison:
    ref, cand = reference.double(), candidate.double()
    diff = (ref - cand).abs()
    max_abs_logit = ref.abs().max().item()
    # relative to the largest reference logit: element-wise ratios blow up on logits near zero
    return Comparison(name=name, dtype=dtype, max_abs_diff=diff.max().item(),
                      max_rel_diff=diff.max().item() / max(max_abs_logit, 1e-30), max_abs_logit=max_abs_logit,
                      top1_agreement=100.0 * (ref.argmax(1) == cand.argmax(1)).double().mean().item(),
                      samples=len(ref))


def compare_runner(name: str, reference: nn.Module, runner: Callable[[np.ndarray], np.ndarray],
                   images: torch.Tensor, batch_sizes: Sequence[int]) -> list[Comparison]:
    """An exported model's runner (numpy batch -> logits) vs the PyTorch model, at each batch size, over all
    ``images``."""
    with torch.no_grad():
        expected = reference(images)
    results = []
    for batch in batch_sizes:
        outputs = [runner(np.ascontiguousarray(chunk.numpy())) for chunk in images.split(batch)]
        got = torch.from_numpy(np.concatenate(outputs)).double()
        results.append(compare_outputs(f"{name}, batch {batch}", expected, got, "float32"))
    return results


@torch.no_grad()
def run_both(reference: nn.Module, candidate: nn.Module, inputs: torch.Tensor, dtype: torch.dtype,
             batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of eval-mode copies of both models in ``dtype``."""
    ref, cand = copy.deepcopy(reference).to(dtype).eval(), copy.deepcopy(candidate).to(dtype).eval()
    outs_ref, outs_cand = [], []
    for chunk in inputs.split(batch_size):
        chunk = chunk.to(dtype)
        outs_ref.append(ref(chunk))
        outs_cand.append(cand(chunk))
    return torch.cat(outs_ref), torch.cat(outs_cand)


def tolerance_for(comparison: Comparison, tol: Tolerances) -> float:
    if comparison.dtype == "float64":
        return tol.fp64_abs
    return tol.fp32_rel * max(1.0, comparison.max_abs_logit)


def judge(comparison: Comparison, tol: Tolerances) -> Comparison:
    comparison.tolerance = tolerance_for(comparison, tol)
    comparison.passed = (comparison.max_abs_diff <= comparison.tolerance
                         and comparison.top1_agreement >= tol.min_top1_agreement)
    return comparison


def gate(comparisons: list[Comparison], what: str) -> None:
    """Raise on the first failed comparison, saying which check failed and by how much."""
    for c in comparisons:
        if not c.passed:
            detail = (f"max abs diff {c.max_abs_diff:.3e} > {c.tolerance:.3e}"
                      if c.max_abs_diff > c.tolerance else f"top-1 agreement {c.top1_agreement:.2f}%")
            raise GateFailedError(f"{what} equivalence gate failed: {c.name} ({c.dtype}): {detail}")


def randomize_bn_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy whose BatchNorm statistics and affine parameters are random (untrained BN hides bugs)."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            with torch.no_grad():
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                module.weight.copy_(1 + torch.randn(n, generator=gen) * 0.3)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.3)
    return model


def fusion_checks(model: nn.Module, fuse: Callable[[nn.Module], nn.Module], real_images: torch.Tensor,
                  image_size: int, tol: Tolerances, random_samples: int = 16, seed: int = 0) -> list[Comparison]:
    """Multi-branch vs fused on (a) random inputs with randomized BN and (b) real images, fp64 and fp32.

    Fusion is done in the dtype being checked, as deployment would.
    """
    results = []
    gen = torch.Generator().manual_seed(seed)
    random_inputs = torch.randn(random_samples, 3, image_size, image_size, generator=gen)
    randomized = randomize_bn_statistics(model, seed)
    for name, source, inputs in (("random inputs, randomized BN", randomized, random_inputs),
                                 ("real held-out images", model, real_images)):
        for dtype in (torch.float64, torch.float32):
            typed = copy.deepcopy(source).to(dtype).eval()
            fused = fuse(typed)
            ref, cand = run_both(typed, fused, inputs, dtype)
            results.append(judge(compare_outputs(name, ref, cand, str(dtype).removeprefix("torch.")), tol))
    return results
