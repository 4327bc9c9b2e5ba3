"""CRD, contrastive representation distillation (Tian et al., ICLR 2020).

Each training image has a slot in two memory banks: the student's and the
teacher's embedding of it (128-d, L2-normalised, updated by momentum). The
student's embedding of image i must pick the teacher's memory of image i out
of K random others, and the other way round; the objective is the paper's NCE
with a noise distribution uniform over the N training images.

Choice made here (the paper draws K negatives per image): one draw of K
negatives serves the whole batch. The expectation of the loss is the same and
the memory read drops from B x K x D to K x D values per step, which is what
makes the paper's K = 16384 affordable on a CPU. Negatives are drawn from all N
images, as in the paper, so each draw holds an image's own row about K / N
times (0.3 on CIFAR's 50k images, 4 on a 4k-image subset): lower
``negatives`` on small training sets.

Under DDP every rank applies every rank's memory updates (an all-gather of
the batch's embeddings and indices), so the banks stay identical across ranks
without relying on DDP's buffer broadcast.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.methods.base import FeaturePair, check, register_method
from pipeline.methods.feature import PairedFeatureMethod, mean_feature, pooled


def nce_loss(scores: torch.Tensor, num_samples: int, eps: float = 1e-7) -> torch.Tensor:
    """CRD's NCE objective for ``scores`` (B x (1 + K) unnormalised probabilities, the positive first): the
    log-probability that the positive came from the data and each negative from the uniform noise ``1 / N``,
    summed over the K + 1 entries and averaged over the batch."""
    noise = (scores.shape[1] - 1) / num_samples  # K * P_noise
    positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
    negative = torch.log(noise / (scores[:, 1:] + noise + eps))
    return -(positive.sum() + negative.sum()) / scores.shape[0]


def world_size() -> int:
    """The processes of the DDP run (1 outside torchrun)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_from_ranks(values: torch.Tensor) -> torch.Tensor:
    """Every rank's ``values`` concatenated in rank order (the tensor itself outside DDP). Ranks hold equally
    sized batches (the training loader drops the last, uneven one)."""
    if world_size() == 1:
        return values
    parts = [torch.empty_like(values) for _ in range(world_size())]
    dist.all_gather(parts, values.contiguous())
    return torch.cat(parts)


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / world_size()


@register_method("crd")
class CRD(PairedFeatureMethod):
    """CE + beta * (NCE of the student embedding against the teacher memory + the reverse) at each point.

    Embeddings: a linear map of the pooled feature to ``feat_dim``, L2-normalised (one map for the student, one
    for the teacher, both trained). Options are the paper's defaults: ``negatives`` K, ``temperature`` of the
    exponential scores, ``momentum`` of the memory update; the paper's CIFAR-100 runs use ``beta`` 0.8."""

    needs_projector = False

    def __init__(self, beta: float = 0.2, feat_dim: int = 128, negatives: int = 16384, temperature: float = 0.07,
                 momentum: float = 0.5, **options: Any):
        super().__init__(**options)
        check(beta >= 0, f"beta must be >= 0 (got {beta})")
        check(int(feat_dim) >= 1, f"feat_dim must be >= 1 (got {feat_dim})")
        check(int(negatives) >= 1, f"negatives must be >= 1 (got {negatives})")
        check(temperature > 0, f"temperature must be > 0 (got {temperature})")
        check(0 <= momentum < 1, f"momentum must be in [0, 1) (got {momentum})")
        self.beta, self.feat_dim, self.negatives = float(beta), int(feat_dim), int(negatives)
        self.temperature, self.momentum = float(temperature), float(momentum)

    def setup(self, m: int, pairs: list[FeaturePair], next_parts: dict[str, nn.Module | None]) -> None:
        super().setup(m, pairs, next_parts)
        n = self.num_samples
        check(n >= 2, f"crd needs the training set's size (got {n} images)")
        self.student_embeds = nn.ModuleList(nn.Linear(ss[0], self.feat_dim) for _, _, ss, _ in pairs)
        self.teacher_embeds = nn.ModuleList(nn.Linear(ts[0], self.feat_dim) for *_, ts in pairs)
        bound = 1 / math.sqrt(self.feat_dim / 3)  # the paper's initialisation: unit-variance-ish random rows
        for i in range(len(pairs)):  # buffers: saved in checkpoints, so a resumed run keeps its memories
            self.register_buffer(f"student_memory_{i}", torch.rand(n, self.feat_dim).mul_(2 * bound).sub_(bound))
            self.register_buffer(f"teacher_memory_{i}", torch.rand(n, self.feat_dim).mul_(2 * bound).sub_(bound))
        # the scores' normalising constants Z (student side, teacher side), fixed from the first batch; 0 = unset
        self.register_buffer("normalizers", torch.zeros(len(pairs), 2))

    def scores(self, i: int, side: int, embedding: torch.Tensor, memory: torch.Tensor, indices: torch.Tensor,
               negatives: torch.Tensor) -> torch.Tensor:
        """exp(<embedding, memory row> / T) / Z for each image's own row (first) and the K shared negatives."""
        positive = (embedding * memory[indices]).sum(1, keepdim=True)
        logits = torch.cat([positive, embedding @ memory[negatives].T], dim=1)
        scores = torch.exp(logits / self.temperature)
        if self.normalizers[i, side] == 0:  # Z = E[exp(.)] * N, estimated once (the paper's choice)
            self.normalizers[i, side] = mean_over_ranks(scores.detach().mean()) * self.num_samples
        return scores / self.normalizers[i, side].item()

    @torch.no_grad()
    def update_memory(self, memory: torch.Tensor, embedding: torch.Tensor, indices: torch.Tensor) -> None:
        indices, embedding = gather_from_ranks(indices), gather_from_ranks(embedding.detach())
        mixed = memory[indices] * self.momentum + embedding * (1 - self.momentum)
        memory[indices] = F.normalize(mixed, dim=1)

    def feature_losses(self, *, student_logits, labels, branches, teacher_feats, indices=None,
               **_: Any) -> dict[str, torch.Tensor]:
        if indices is None:
            raise ValueError("crd needs each image's index in the training set (the engine passes them)")
        total = student_logits.new_zeros((), dtype=torch.float32)
        for i, (s_tap, t_tap) in enumerate(self.pairs):
            student = self.student_embeds[i](pooled(mean_feature(branches[s_tap])))
            teacher = self.teacher_embeds[i](pooled(teacher_feats[t_tap].detach()))
            total = total + self.contrast(i, F.normalize(student.float(), dim=1), F.normalize(teacher.float(), dim=1),
                                          indices)
        return {"ce": self.cross_entropy(student_logits, labels), "crd": self.beta * total}

    def contrast(self, i: int, student: torch.Tensor, teacher: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Both NCE terms of point ``i`` (in fp32 even under autocast: exp(x / 0.07) needs the precision),
        then the memory update."""
        with torch.autocast(student.device.type, enabled=False):
            student_memory = self.get_buffer(f"student_memory_{i}")
            teacher_memory = self.get_buffer(f"teacher_memory_{i}")
            negatives = torch.randint(self.num_samples, (self.negatives,), device=indices.device)
            loss = (nce_loss(self.scores(i, 0, student, teacher_memory, indices, negatives), self.num_samples)
                    + nce_loss(self.scores(i, 1, teacher, student_memory, indices, negatives), self.num_samples))
        if self.training:
            self.update_memory(student_memory, student, indices)
            self.update_memory(teacher_memory, teacher, indices)
        return loss
