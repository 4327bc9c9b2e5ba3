"""KDiffusion's loss, projector and teacher side (docs/kdiffusion.md sections 3-5 and 7)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from models import build_model, get_spec
from models.blocks import BranchConvBN
from models.reparam import build_multibranch_student
from pipeline.methods.kdiffusion import KDiffusion
from pipeline.stages.distill import setup_feature_method
from pipeline.training.tasks import DistillTask, FrozenTeacher


def _method(m: int, **options) -> KDiffusion:
    method = KDiffusion(**options)
    method.setup(m, [("final", "stage4", (6, 2, 2), (5, 2, 2))], {"stage4": None})
    return method


def test_m1_uniform_is_scale_normalised_fitnet():
    torch.manual_seed(0)
    method = _method(1, weights="uniform", normalize_teacher=False, guided=False)
    z, t = torch.randn(8, 6, 2, 2), torch.randn(8, 5, 2, 2)
    out = method.losses(student_logits=torch.randn(8, 3), labels=torch.zeros(8, dtype=torch.long),
                        branches={"final": [z]}, teacher_feats={"stage4": t})
    p = method.projectors[0](z)
    expected = ((t - p) ** 2).mean() / (2 * p.detach().var())
    assert out["diff"].item() == pytest.approx(expected.item(), rel=1e-5)


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
    method = KDiffusion(lambda_kd=0.5)
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
