"""CRD (contrastive representation distillation): the NCE objective and the memory update against values computed
by hand, a toy problem it must solve, and its memory banks under a real 2-process torchrun."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.methods import create_method
from pipeline.methods.contrastive import CRD, nce_loss
from tests.conftest import ROOT

PAIRS = [("final", "stage4", (6, 2, 2), (5, 2, 2))]


def make_crd(num_samples: int, **options) -> CRD:
    method = create_method("crd", options)
    method.num_samples = num_samples
    method.setup(1, PAIRS, {"stage4": None})
    return method


def test_nce_by_hand():
    scores = torch.rand(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.01
    n, k, eps = 100, 4, 1e-7
    expected = 0.0
    for row in scores.tolist():
        expected -= math.log(row[0] / (row[0] + k / n + eps))
        expected -= sum(math.log((k / n) / (x + k / n + eps)) for x in row[1:])
    assert nce_loss(scores, n).item() == pytest.approx(expected / 3, rel=1e-12)


def test_scores_are_normalised_once_and_the_memory_moves_by_momentum():
    torch.manual_seed(1)
    method = make_crd(10, negatives=6, feat_dim=4, momentum=0.25)
    memory = method.teacher_memory_0.clone()
    student = F.normalize(torch.randn(2, 4), dim=1)
    indices, negatives = torch.tensor([3, 7]), torch.tensor([0, 1, 2, 3, 8, 9])
    first = method.scores(0, 0, student, method.teacher_memory_0, indices, negatives)
    raw = [[math.exp(sum(a * b for a, b in zip(s, memory[j].tolist())) / 0.07) for j in [i, *negatives.tolist()]]
           for s, i in zip(student.tolist(), indices.tolist())]
    z = sum(map(sum, raw)) / 14 * 10  # mean over the batch's 2 x 7 scores, times N
    assert method.normalizers[0, 0].item() == pytest.approx(z, rel=1e-5)
    assert first.flatten().tolist() == pytest.approx([r / z for row in raw for r in row], rel=1e-5)
    method.scores(0, 0, 2 * student, method.teacher_memory_0, indices, negatives)
    assert method.normalizers[0, 0].item() == pytest.approx(z, rel=1e-5)  # fixed after the first batch

    method.update_memory(method.teacher_memory_0, student, indices)
    for row, i in zip(student, indices.tolist()):
        mixed = 0.25 * memory[i] + 0.75 * row
        assert torch.allclose(method.teacher_memory_0[i], mixed / mixed.norm(), atol=1e-6)
    untouched = [i for i in range(10) if i not in indices.tolist()]
    assert torch.equal(method.teacher_memory_0[untouched], memory[untouched])


def test_the_loss_trains_every_part_and_leaves_the_memory_alone_in_eval_mode():
    torch.manual_seed(2)
    method = make_crd(32, negatives=64)
    branches = [torch.randn(8, 6, 2, 2, requires_grad=True) for _ in range(2)]
    inputs = dict(student_logits=torch.randn(8, 3), labels=torch.zeros(8, dtype=torch.long),
                  branches={"final": branches}, teacher_feats={"stage4": torch.randn(8, 5, 2, 2)})
    with pytest.raises(ValueError, match="index"):
        method.losses(**inputs)
    out = method.losses(**inputs, indices=torch.arange(8))
    assert set(out) == {"ce", "crd"} and out["crd"].item() > 0
    out["crd"].backward()
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for b in branches)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())  # DDP needs all used
    memory = method.student_memory_0.clone()
    method.eval()
    method.losses(**inputs, indices=torch.arange(8))
    assert torch.equal(method.student_memory_0, memory)


def test_crd_learns_which_teacher_memory_is_each_images():
    """A toy problem: the student's feature of image i is a fixed random mix of the teacher's. After training, the
    student's embedding must retrieve image i's row of the teacher memory among 64 far more often than chance
    (1 in 64; 0.45-0.63 measured over seeds 3-5)."""
    torch.manual_seed(3)
    n = 64
    teacher_feats = torch.randn(n, 5, 2, 2)
    mix = torch.randn(6, 5)
    student_feats = torch.einsum("sc,nchw->nshw", mix, teacher_feats) + 0.1 * torch.randn(n, 6, 2, 2)
    method = make_crd(n, negatives=256, temperature=0.1)

    def retrieval_accuracy() -> float:
        with torch.no_grad():
            embedded = F.normalize(method.student_embeds[0](student_feats.mean(dim=(2, 3))), dim=1)
        return ((embedded @ method.teacher_memory_0.T).argmax(1) == torch.arange(n)).float().mean().item()

    before = retrieval_accuracy()
    optimizer = torch.optim.Adam(method.parameters(), lr=0.01)
    for _ in range(150):
        indices = torch.randperm(n)[:16]
        out = method.losses(student_logits=torch.zeros(16, 3), labels=torch.zeros(16, dtype=torch.long),
                            branches={"final": [student_feats[indices]]},
                            teacher_feats={"stage4": teacher_feats[indices]}, indices=indices)
        optimizer.zero_grad()
        out["crd"].backward()
        optimizer.step()
    after = retrieval_accuracy()
    assert before < 0.1 and after > 0.3, (before, after)


WORKER = ROOT / "tests" / "crd_memory_worker.py"


def test_memory_banks_agree_across_torchrun_ranks_and_with_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    ddp = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(WORKER), str(tmp_path / "ddp")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "single")], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"ddp-{r}.pt", weights_only=True) for r in (0, 1))
    alone = torch.load(tmp_path / "single-0.pt", weights_only=True)
    for name in ("student_memory_0", "teacher_memory_0"):
        assert torch.equal(rank0[name], rank1[name]), name  # every rank applied every rank's update
        assert torch.allclose(rank0[name], alone[name], atol=1e-6), name  # = the whole batch in one process
        assert not torch.equal(rank0[name], rank0["initial_" + name])  # and the batch did move it
    assert torch.equal(rank0["normalizers"], rank1["normalizers"]) and (rank0["normalizers"] > 0).all()
