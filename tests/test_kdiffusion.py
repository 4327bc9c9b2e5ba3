"""KDiffusion's loss, projector and teacher side (docs/kdiffusion.md sections 3-5 and 7)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import build_model, get_spec
from models.blocks import BranchConvBN
from models.reparam import build_multibranch_student
from pipeline.config import TrainConfig
from pipeline.methods import kdiffusion
from pipeline.methods.kdiffusion import KDiffusion, fused_curvature, linear_guidance
from pipeline.stages.distill import pair_by_stride, setup_feature_method
from pipeline.training.engine import make_optimizer
from pipeline.training.tasks import DistillTask, FrozenTeacher


def _method(m: int, **options) -> KDiffusion:
    method = KDiffusion(**options)
    method.setup(m, [("final", "stage4", (6, 2, 2), (5, 2, 2))], {"stage4": None})
    return method


def _losses(method: KDiffusion, z: list[torch.Tensor], t: torch.Tensor) -> dict[str, torch.Tensor]:
    return method.losses(student_logits=torch.zeros(t.shape[0], 3), labels=torch.zeros(t.shape[0], dtype=torch.long),
                         branches={"final": z}, teacher_feats={"stage4": t})


@pytest.mark.parametrize("chain,relative_var", [("poster", 0.1), ("reduced", 1.0)])
def test_m1_is_a_scale_normalised_fitnet_nll(chain, relative_var):
    """One step: the NLL of the clean teacher under N(p, var * sigma_S^2), sigma_S^2 the variance of p (the poster
    chain's only step has w = 0, so its variance is the floor)."""
    torch.manual_seed(0)
    method = _method(1, chain=chain)
    z, t = torch.randn(8, 6, 2, 2), torch.randn(8, 5, 2, 2)
    out = _losses(method, [z], t)
    p = method.projectors[0](z)
    var = relative_var * p.detach().var()
    expected = (0.5 * torch.log(var) + (t - p) ** 2 / (2 * var)).mean()
    assert out["diff"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_poster_chain_is_eqs_5_7_and_10():
    """m = 2, by hand from the poster: the chain starts at the teacher noised to tau_0 = N (eq. 5, nearly pure
    noise); step 1 is the weighted sum u x + v p_1 (eq. 7) scored against the teacher noised to tau = 500 (eq. 5) with
    variance w sigma_S^2; step 2 has u = 0, v = 1 and the clean teacher, with the floor variance."""
    torch.manual_seed(3)
    method = _method(2, shuffle=False)
    z, t = [torch.randn(8, 6, 2, 2) for _ in range(2)], torch.randn(8, 5, 2, 2)
    torch.manual_seed(11)
    out = _losses(method, z, t)
    torch.manual_seed(11)
    eps0, eps1 = torch.randn_like(t), torch.randn_like(t)  # the start's noise, then step 1's target's

    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    a_s2, a_r2 = abar[999].item(), abar[499].item()  # alphabar at tau = 1000 and 500
    a_sr2 = a_s2 / a_r2
    u1 = (1 - a_r2) * a_sr2 ** 0.5 / (1 - a_s2)
    v1 = (1 - a_sr2) * a_r2 ** 0.5 / (1 - a_s2)
    w1 = (1 - a_sr2) * (1 - a_r2) / (1 - a_s2)
    p1, p2 = method.projectors[0](torch.cat(z)).split(8)
    s2 = torch.stack([p1, p2]).detach().var()
    nll = lambda x, mean, var: (0.5 * torch.log(var) + (x - mean) ** 2 / (2 * var)).mean()  # noqa: E731
    start = a_s2 ** 0.5 * t + (1 - a_s2) ** 0.5 * s2.sqrt() * eps0
    state1 = u1 * start + v1 * p1
    goal1 = a_r2 ** 0.5 * t + (1 - a_r2) ** 0.5 * s2.sqrt() * eps1
    expected = 0.5 * (nll(goal1, state1, max(w1, 0.1) * s2) + nll(t, 0 * state1 + 1 * p2, 0.1 * s2))
    assert out["diff"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("m,step1_signal", [(4, 0.0579), (8, 0.0208)])
def test_poster_chain_starts_nearly_pure_noise_and_step_k_sees_the_first_k_branches(m, step1_signal, monkeypatch):
    """Regression: the chain started from the mean of all branches, which is trained towards the teacher, so with
    branches equal to the teacher step 1's mean carried 0.167 t (m = 4; 0.325 t at m = 8) where the posterior's
    target x^T_{tau_1} carries a_{tau_1} t = 0.058 t (0.021 t), and every step saw every branch through that start.
    It now starts at the teacher's state at tau_0 = N (signal a_N = 0.006): with perfect branches each step's mean
    carries exactly its target's signal (eq. 7's posterior mean), and step k depends on the first k branches only."""
    torch.manual_seed(12)
    method = _method(m, shuffle=False)
    t, s2 = torch.randn(8, 5, 2, 2), torch.tensor(0.7)
    order = list(range(m))
    # the noise-free part of the chain and its targets: the signal each carries
    monkeypatch.setattr(kdiffusion, "standard_noise", torch.zeros_like)
    loss = method.chain_loss(0, [t] * m, order, t, s2)
    var = method.variances(0, s2)
    log_terms = sum(w * 0.5 * torch.log(var[k]).mean() for k, w in enumerate(method.omega))
    assert loss.item() == pytest.approx(log_terms.item(), abs=1e-6)  # no squared error left at any step
    ones = torch.ones(())
    means, goals = method.chain_states([ones] * m, order, ones, s2)
    assert means[0].item() == pytest.approx(step1_signal, abs=1e-4)
    assert [x.item() for x in means] == pytest.approx([g.item() for g in goals], abs=1e-6)
    monkeypatch.undo()
    order = list(reversed(range(m)))
    projected = [torch.randn(8, 5, 2, 2, requires_grad=True) for _ in range(m)]
    means, _ = method.chain_states(projected, order, t, s2)
    for k, mean in enumerate(means):
        grads = torch.autograd.grad(mean.sum(), projected, allow_unused=True, retain_graph=True)
        unseen = [grads[j] for j in order[k + 1:]]
        assert all(g is None or not g.any() for g in unseen), f"step {k + 1} depends on a later branch"
        assert grads[order[k]] is not None and grads[order[k]].any()


@pytest.mark.parametrize("m,chain,weights,expected", [(4, "poster", "uniform", 2.821), (1, "poster", "uniform", 10.0),
                                                      (4, "poster", "last", 10.0), (8, "poster", "snr", None),
                                                      (4, "reduced", "uniform", 1.0)])
def test_fused_curvature_is_the_loss_curvature_in_a_shift_shared_by_every_branch(m, chain, weights, expected):
    """What benchmarks/kd_methods.py --matched-scale holds fixed: the second derivative of L_diff (sigma_S^2 = 1) in
    a shift of every branch by the same delta, i.e. how hard the loss holds the fused feature."""
    torch.manual_seed(13)
    method = _method(m, chain=chain, weights=weights).double()
    projected = [torch.randn(8, 5, 2, 2, dtype=torch.float64) for _ in range(m)]
    t = torch.randn(8, 5, 2, 2, dtype=torch.float64)
    delta = torch.zeros((), dtype=torch.float64, requires_grad=True)
    s2 = torch.tensor(1.0, dtype=torch.float64)
    loss = method.chain_loss(0, [p + delta for p in projected], list(range(m)), t, s2)
    (slope,) = torch.autograd.grad(loss, delta, create_graph=True)
    (curvature,) = torch.autograd.grad(slope, delta)
    assert fused_curvature(m, chain, weights) == pytest.approx(curvature.item(), rel=1e-6)  # buffers are fp32
    if expected is not None:
        assert fused_curvature(m, chain, weights) == pytest.approx(expected, abs=1e-3)


def test_the_learned_variance_gets_no_weight_decay():
    """Regression: the learned variance's parameter is 2-D (step x channel), so the optimizer put it among the
    decayed weights (weight decay pulls rho towards 0, a variance of softplus(0) = 0.69 sigma_S^2)."""
    method = _method(4, variance="learned")
    task = nn.ModuleDict({"method": method, "head": nn.Linear(5, 3)})
    optimizer = make_optimizer(task, TrainConfig(weight_decay=0.05))
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert decay_of[id(method.extra_var[0])] == 0.0
    assert decay_of[id(task["head"].weight)] == 0.05 and decay_of[id(method.projectors[0].conv.weight)] == 0.05
    assert len(decay_of) == len(list(task.parameters()))


def test_teacher_noise_does_not_depend_on_the_memory_layout_of_the_teacher_features():
    """Regression: ``randn_like`` follows strides, so a live teacher's permuted (channels-last) features and the
    cache's contiguous copy of the same values drew the noise of eq. (5) in different places."""
    torch.manual_seed(5)
    z, t = [torch.randn(8, 6, 2, 2) for _ in range(4)], torch.randn(8, 5, 2, 2)
    channels_last = t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert torch.equal(channels_last, t) and not channels_last.is_contiguous()
    diffs = []
    for teacher in (t, channels_last):
        torch.manual_seed(9)  # the same projector weights and the same draws (running statistics start afresh)
        diffs.append(_losses(_method(4), z, teacher)["diff"].item())
    assert diffs[0] == diffs[1]


def test_sigma_s_is_the_variance_of_the_branch_outputs():
    """Regression: s2 was the variance of the stack of running means (0.52 instead of 1.00 at initialisation)."""
    torch.manual_seed(4)
    method = _method(4)
    z = [torch.randn(16, 6, 2, 2) for _ in range(4)]
    _losses(method, z, torch.randn(16, 5, 2, 2))
    projected = method.projectors[0](torch.cat(z))
    assert method.s2[0].item() == pytest.approx(projected.detach().var().item(), rel=1e-5)


def test_learned_variance_enters_with_its_log_term_and_is_trained():
    """variance=learned: var = sigma_S^2 (floor + softplus(rho)) per step and channel; the NLL's log sigma term gives
    rho a gradient that pushes the variance up where the error is large and down where it is small."""
    torch.manual_seed(5)
    method = _method(1, chain="reduced", variance="learned")
    z, t = torch.randn(8, 6, 2, 2), torch.randn(8, 5, 2, 2)
    out = _losses(method, [z], t)
    p = method.projectors[0](z)
    s2 = p.detach().var()
    var = s2 * (1 + F.softplus(method.extra_var[0][0])).view(1, -1, 1, 1)
    expected = (0.5 * torch.log(var) + (t - p) ** 2 / (2 * var)).mean()
    assert out["diff"].item() == pytest.approx(expected.item(), rel=1e-5)
    out["diff"].backward()
    grad = method.extra_var[0].grad[0]
    err = ((t - p.detach()) ** 2).mean(dim=(0, 2, 3))
    assert torch.equal(grad < 0, err > var.detach().view(-1))  # more variance where the squared error exceeds it


def test_guidance_is_linear_and_scale_free():
    """Eq. (9) through the next layer's weights, normalised by the teacher's mapped variance: scaling both features
    by c leaves it unchanged, and it is zero when the estimate equals the teacher."""
    torch.manual_seed(6)
    teacher, estimate, weight = torch.randn(8, 5, 2, 2), torch.randn(8, 5, 2, 2), torch.randn(3, 5)
    value = linear_guidance(teacher - estimate, teacher, weight)
    expected = ((teacher - estimate).mean((2, 3)) @ weight.T).pow(2).mean() / (teacher.mean((2, 3)) @ weight.T).var(0).mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    assert linear_guidance(10 * (teacher - estimate), 10 * teacher, weight).item() == pytest.approx(value.item(), rel=1e-5)
    assert linear_guidance(teacher - teacher, teacher, weight).item() == 0


def test_last_estimate_is_the_fused_layer_projected():
    torch.manual_seed(1)
    block = BranchConvBN(nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), m=4).double()
    for bn in block.bns:
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2), bn.weight.data.normal_(1, 0.2)
    block.eval()
    method = _method(4).double().eval()
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    branches = [bn(conv(x)) for conv, bn in zip(block.convs, block.bns)]
    xhats, _ = method.estimates(0, branches)
    conv, bn = block.fused_layers()
    fused_projected = method.projectors[0](bn(conv(x)))
    assert (xhats[-1] - fused_projected).abs().max() < 1e-12


def test_shuffle_draws_each_branch_first_equally_often_and_off_is_fixed():
    torch.manual_seed(2)
    method = _method(4).train()
    branches = [torch.randn(2, 6, 2, 2) for _ in range(4)]
    firsts = Counter(method.estimates(0, branches)[1][0] for _ in range(800))
    assert set(firsts) == {0, 1, 2, 3} and all(150 <= n <= 250 for n in firsts.values()), firsts
    fixed = _method(4, shuffle=False).train()
    assert all(fixed.estimates(0, branches)[1] == [0, 1, 2, 3] for _ in range(20))


def swin_kdiffusion_task(seed: int, m: int) -> DistillTask:
    """A random Swin teacher, a ShuffleNetV2 x0.5 student with m branches at three points, KDiffusion + logit KD."""
    torch.manual_seed(seed)
    teacher_model, _, _ = build_model("swin", 10, 32, drop_path=0.0)
    teacher = FrozenTeacher(teacher_model, "fp32", get_spec("swin").taps)
    student, arch = build_multibranch_student("shufflenetv2_x0_5", 10, 32, m=m, points="multi")
    points = arch["multibranch"]["distill_points"]
    method = KDiffusion(lambda_kd=0.5, guided=True)
    setup_feature_method(method, student, teacher, points, m, torch.randn(4, 3, 32, 32))
    return DistillTask(student, method, teacher, {p["tap"]: p["conv"] for p in points})


@pytest.fixture(scope="module")
def task():
    return swin_kdiffusion_task(3, m=4)


def test_one_step_trains_every_branch_and_never_the_teacher(task):
    task.train()
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    logits, losses = task(images, labels)
    assert set(losses) == {"ce", "diff", "guided", "kd", "loss"}
    losses["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in task.teacher.model.parameters())
    for path in task.point_paths.values():
        block = task.model.get_submodule(path)
        assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in block.convs)
    assert all(p.grad is not None for p in task.method.projectors.parameters())


def test_points_pair_with_the_teacher_stage_of_the_same_stride(task):
    """Regression: with three points the student's (final, stage4, stage3) were zipped with the teacher's (stage4,
    stage3, stage2), one stride off. Each pair now has equal map sizes (both models see the same input)."""
    pairs = [(s, t) for s, t in task.method.pairs]
    assert pairs == [("final", "stage4"), ("stage4", "stage4"), ("stage3", "stage3")]
    assert pair_by_stride({"a": 4, "b": 2, "c": 1}, {"stage4": 1, "stage3": 2, "stage2": 4}) == \
        {"a": "stage2", "b": "stage3", "c": "stage4"}


def test_teacher_and_loss_state_stay_out_of_the_student(task):
    keys = task.model.state_dict().keys()
    assert not any("projector" in k or "teacher" in k or k.startswith(("features.", "head.")) for k in keys)
    assert not any(k.startswith("teacher") for k in task.state_dict())  # nor in resume checkpoints


@pytest.mark.parametrize("options,message", [({"lambda_diff": -1}, "lambda_diff must be >= 0"),
                                             ({"weights": "median"}, "weights must be snr, uniform or last"),
                                             ({"lambda_guided": -0.1}, "lambda_guided must be >= 0")])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        KDiffusion(**options)
