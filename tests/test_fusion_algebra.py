"""Property tests of the pure fusion algebra: fused conv == unfused branches, in float64."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from models.fusion import (
    avgpool_kernel,
    fold_bn,
    identity_kernel,
    merge_1x1_kxk,
    pad_kernel,
    sum_branches,
)

FP64_BOUND = 1e-9
DT = torch.float64


@st.composite
def conv_setups(draw):
    k = draw(st.sampled_from([1, 3, 5]))
    stride = draw(st.sampled_from([1, 2]))
    depthwise = draw(st.booleans())
    cin = draw(st.integers(1, 6))
    cout = cin if depthwise else draw(st.integers(1, 6))
    groups = cin if depthwise else 1
    seed = draw(st.integers(0, 2**31 - 1))
    return k, stride, cin, cout, groups, seed


def random_bn(n: int, gen: torch.Generator):
    return (torch.randn(n, generator=gen, dtype=DT), torch.rand(n, generator=gen, dtype=DT) * 2 + 0.1,
            torch.randn(n, generator=gen, dtype=DT) * 0.5 + 1, torch.randn(n, generator=gen, dtype=DT))


def bn_eval(x, mean, var, gamma, beta, eps):
    return F.batch_norm(x, mean, var, gamma, beta, training=False, eps=eps)


@settings(max_examples=40, deadline=None)
@given(conv_setups(), st.integers(1, 8), st.floats(1e-6, 1e-2))
def test_branch_mean_of_conv_bn_equals_one_conv(setup, m, eps):
    k, stride, cin, cout, groups, seed = setup
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cin, 9, 9, generator=gen, dtype=DT)
    outs, kernels, biases = [], [], []
    for _ in range(m):
        kernel = torch.randn(cout, cin // groups, k, k, generator=gen, dtype=DT)
        bn = random_bn(cout, gen)
        outs.append(bn_eval(F.conv2d(x, kernel, None, stride, k // 2, 1, groups), *bn, eps))
        fk, fb = fold_bn(kernel, None, *bn, eps)
        kernels.append(fk), biases.append(fb)
    fused_k, fused_b = sum_branches(kernels, biases, [1 / m] * m)
    fused = F.conv2d(x, fused_k, fused_b, stride, k // 2, 1, groups)
    assert (torch.stack(outs).mean(0) - fused).abs().max() <= FP64_BOUND


@settings(max_examples=40, deadline=None)
@given(conv_setups())
def test_repvgg_sum_of_kxk_1x1_identity(setup):
    k, stride, cin, cout, groups, seed = setup
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cin, 8, 8, generator=gen, dtype=DT)
    big = torch.randn(cout, cin // groups, k, k, generator=gen, dtype=DT)
    small = torch.randn(cout, cin // groups, 1, 1, generator=gen, dtype=DT)
    bn1, bn2, bn3 = random_bn(cout, gen), random_bn(cout, gen), random_bn(cout, gen)
    out = bn_eval(F.conv2d(x, big, None, stride, k // 2, 1, groups), *bn1, 1e-5)
    out = out + bn_eval(F.conv2d(x, small, None, stride, 0, 1, groups), *bn2, 1e-5)
    parts = [fold_bn(big, None, *bn1, 1e-5), fold_bn(small, None, *bn2, 1e-5)]
    if cin == cout and stride == 1:
        out = out + bn_eval(x, *bn3, 1e-5)
        parts.append(fold_bn(identity_kernel(cout, groups, 1, DT), None, *bn3, 1e-5))
    kernel, bias = sum_branches([p[0] for p in parts], [p[1] for p in parts])
    assert kernel.shape[-1] == k
    assert (out - F.conv2d(x, kernel, bias, stride, k // 2, 1, groups)).abs().max() <= FP64_BOUND


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([3, 5]), st.sampled_from([1, 2]), st.integers(1, 5), st.booleans(), st.integers(0, 10**6))
def test_avgpool_as_conv_kernel(k, stride, channels, depthwise, seed):
    groups = channels if depthwise else 1
    x = torch.randn(2, channels, 9, 9, generator=torch.Generator().manual_seed(seed), dtype=DT)
    pooled = F.avg_pool2d(x, k, stride, k // 2, count_include_pad=True)
    conv = F.conv2d(x, avgpool_kernel(channels, groups, k, DT), None, stride, k // 2, 1, groups)
    assert (pooled - conv).abs().max() <= FP64_BOUND


@settings(max_examples=30, deadline=None)
@given(conv_setups())
def test_1x1_then_kxk_merge(setup):
    k, stride, cin, cout, groups, seed = setup
    gen = torch.Generator().manual_seed(seed)
    mid = cout  # grouped chains keep the group count
    x = torch.randn(2, cin, 8, 8, generator=gen, dtype=DT)
    k1 = torch.randn(mid, cin // groups, 1, 1, generator=gen, dtype=DT)
    b1 = torch.randn(mid, generator=gen, dtype=DT)
    k2 = torch.randn(cout, mid // groups, k, k, generator=gen, dtype=DT)
    b2 = torch.randn(cout, generator=gen, dtype=DT)
    y = F.conv2d(x, k1, b1, 1, 0, 1, groups)
    p = k // 2
    y = F.pad(y - b1.reshape(1, -1, 1, 1), [p] * 4) + b1.reshape(1, -1, 1, 1)  # pad with the 1x1's bias
    chained = F.conv2d(y, k2, b2, stride, 0, 1, groups)
    kernel, bias = merge_1x1_kxk(k1, b1, k2, b2, groups)
    assert (chained - F.conv2d(x, kernel, bias, stride, p, 1, groups)).abs().max() <= FP64_BOUND


def test_pad_kernel_is_centred_and_identity_is_identity():
    kernel = torch.arange(9, dtype=DT).reshape(1, 1, 3, 3)
    padded = pad_kernel(kernel, 5)
    assert padded.shape == (1, 1, 5, 5) and torch.equal(padded[0, 0, 1:4, 1:4], kernel[0, 0])
    assert padded.sum() == kernel.sum()
    x = torch.randn(1, 4, 5, 5, dtype=DT)
    assert torch.equal(F.conv2d(x, identity_kernel(4, 2, 3, DT), None, 1, 1, 1, 2), x)
