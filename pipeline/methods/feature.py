"""Feature-based methods: FitNet, attention transfer, the relational baselines (PKT, SP, RKD) and VID, plus the
pairing base they share with KDiffusion."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods.base import FeaturePair, KDMethod, check, register_method
from pipeline.methods.logit import kd_divergence


class Projector(nn.Module):
    """Spatial alignment, then 1x1 conv + BN with no nonlinearity (affine: P(mean z) = mean P(z))."""

    def __init__(self, student_shape: tuple[int, int, int], teacher_shape: tuple[int, int, int], align: str = "pool"):
        super().__init__()
        check(align in ("pool", "resize"), f"align must be pool or resize (got {align})")
        self.size = tuple(teacher_shape[1:]) if align == "resize" else tuple(
            min(s, t) for s, t in zip(student_shape[1:], teacher_shape[1:]))
        self.align = align
        self.conv = nn.Conv2d(student_shape[0], teacher_shape[0], 1, bias=False)
        self.bn = nn.BatchNorm2d(teacher_shape[0])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if tuple(z.shape[-2:]) != self.size:
            if self.align == "resize":
                z = F.interpolate(z, size=self.size, mode="bilinear", align_corners=False)
            else:
                z = F.adaptive_avg_pool2d(z, self.size)
        # The 1x1 conv as a matrix product over channels: the same function, but on a CPU oneDNN's 1x1
        # convolution is ~5x slower than the GEMM for these shapes (forward+backward of a 512x1024x1x1
        # batch through 1024->768: 216 ms vs 42 ms on one core here).
        projected = F.linear(z.movedim(1, -1), self.conv.weight.flatten(1)).movedim(-1, 1)
        return self.bn(projected)


def match_size(teacher: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The teacher feature pooled to the (smaller) spatial size of the student's estimate."""
    return teacher if teacher.shape[-2:] == like.shape[-2:] else F.adaptive_avg_pool2d(teacher, like.shape[-2:])


class PairedFeatureMethod(KDMethod):
    """A method that pairs each student distillation point with a teacher stage (set up by the stage).

    Every feature method can train beside Hinton's logit term ("+kd", as CRD+KD and DiffKD do): the options
    ``lambda_kd`` (its weight; 0, the default, leaves it out) and ``kd_temperature``. A subclass computes its own
    terms in :meth:`feature_losses`; :meth:`losses` adds ``kd``."""

    align = "pool"
    uses_features = True
    needs_projector = True  # one Projector per point (student channels -> teacher channels)
    pairs: list[tuple[str, str]] = []  # (student tap, teacher tap), filled in by setup

    def __init__(self, lambda_kd: float = 0.0, kd_temperature: float = 4.0, **options: Any):
        super().__init__(**options)
        check(lambda_kd >= 0, f"lambda_kd must be >= 0 (got {lambda_kd})")
        check(kd_temperature > 0, f"kd_temperature must be > 0 (got {kd_temperature})")
        self.lambda_kd, self.kd_temperature = float(lambda_kd), float(kd_temperature)

    def setup(self, m: int, pairs: list[FeaturePair], next_parts: dict[str, nn.Module | None]) -> None:
        """``pairs``: (student point tap, teacher tap, student CHW, teacher CHW); ``next_parts`` by teacher tap."""
        self.m = m
        self.pairs = [(s, t) for s, t, _, _ in pairs]
        if self.needs_projector:
            self.projectors = nn.ModuleList(Projector(ss, ts, self.align) for _, _, ss, ts in pairs)
        # the teacher's next parts are frozen teacher modules: kept out of this module's state
        object.__setattr__(self, "next_parts", next_parts)

    @property
    def teacher_taps(self) -> list[str]:
        return list(dict.fromkeys(t for _, t in self.pairs))

    def losses(self, *, student_logits: torch.Tensor, labels: torch.Tensor,
               teacher_logits: torch.Tensor | None = None, **inputs: Any) -> dict[str, torch.Tensor]:
        out = self.feature_losses(student_logits=student_logits, labels=labels, teacher_logits=teacher_logits,
                                  **inputs)
        if self.lambda_kd > 0 and teacher_logits is not None:
            out["kd"] = self.lambda_kd * kd_divergence(student_logits, teacher_logits, self.kd_temperature)
        return out

    def feature_losses(self, **inputs: Any) -> dict[str, torch.Tensor]:
        """The method's own named terms (cross-entropy included), with :meth:`losses`' arguments."""
        raise NotImplementedError


def mean_feature(branches: list[torch.Tensor]) -> torch.Tensor:
    """The point's output (uniform mean of its branches = what the fused layer computes)."""
    return torch.stack(branches).mean(0)


@register_method("fitnet")
class FitNet(PairedFeatureMethod):
    """CE + beta * MSE(P(student feature), teacher feature) at each point (Romero et al., 2015)."""

    def __init__(self, beta: float = 1.0, **options: Any):
        super().__init__(**options)
        check(beta >= 0, f"beta must be >= 0 (got {beta})")
        self.beta = float(beta)

    def feature_losses(self, *, student_logits, labels, branches, teacher_feats, **_: Any) -> dict[str, torch.Tensor]:
        total = student_logits.new_zeros(())
        for i, (s_tap, t_tap) in enumerate(self.pairs):
            estimate = self.projectors[i](mean_feature(branches[s_tap])).float()
            total = total + F.mse_loss(estimate, match_size(teacher_feats[t_tap].detach(), estimate))
        return {"ce": self.cross_entropy(student_logits, labels), "fitnet": self.beta * total}


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention of Zagoruyko & Komodakis (2017): normalised channel-mean of |f|^p, flattened."""
    return F.normalize(feature.float().abs().pow(p).mean(1).flatten(1), dim=1)


@register_method("at")
class AttentionTransfer(PairedFeatureMethod):
    """CE + beta / 2 * sum over points of mean((a_s - a_t)^2), attention maps at the smaller spatial size."""

    def __init__(self, beta: float = 100.0, p: float = 2.0, **options: Any):
        super().__init__(**options)
        check(beta >= 0, f"beta must be >= 0 (got {beta})")
        check(p > 0, f"p must be > 0 (got {p})")
        self.beta, self.p = float(beta), float(p)

    def feature_losses(self, *, student_logits, labels, branches, teacher_feats, **_: Any) -> dict[str, torch.Tensor]:
        total = student_logits.new_zeros(())
        for s_tap, t_tap in self.pairs:
            student = mean_feature(branches[s_tap])
            teacher = teacher_feats[t_tap].detach()
            size = tuple(min(a, b) for a, b in zip(student.shape[-2:], teacher.shape[-2:]))
            a_s = attention_map(F.adaptive_avg_pool2d(student, size), self.p)
            a_t = attention_map(F.adaptive_avg_pool2d(teacher, size), self.p)
            total = total + (a_s - a_t).pow(2).mean()
        return {"ce": self.cross_entropy(student_logits, labels), "at": self.beta / 2 * total}


# ------------------------------------------------------------------------------------------ relational baselines


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Loss arithmetic in fp32 under low-precision autocast (fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def pooled(feature: torch.Tensor) -> torch.Tensor:
    """The feature averaged over space, one vector per image (the embedding relational methods compare)."""
    return at_least_fp32(feature).mean(dim=(2, 3))


class RelationalMethod(PairedFeatureMethod):
    """A method comparing relations between the images of a batch (no projector: channel counts may differ)."""

    needs_projector = False

    def __init__(self, beta: float = 1.0, **options: Any):
        super().__init__(**options)
        check(beta >= 0, f"beta must be >= 0 (got {beta})")
        self.beta = float(beta)

    def relation_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def feature_losses(self, *, student_logits, labels, branches, teacher_feats, **_: Any) -> dict[str, torch.Tensor]:
        total = student_logits.new_zeros(())
        for s_tap, t_tap in self.pairs:
            total = total + self.relation_loss(mean_feature(branches[s_tap]), teacher_feats[t_tap].detach())
        return {"ce": self.cross_entropy(student_logits, labels), self.name: self.beta * total}


def pkt_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas, 2018): the cosine-similarity kernel of the batch's
    embeddings, ``(cos + 1) / 2`` made row-stochastic, matched by KL(teacher || student) averaged over entries."""
    def conditional(x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(pooled(x), dim=1, eps=eps)
        kernel = (x @ x.T + 1) / 2
        return kernel / kernel.sum(dim=1, keepdim=True)

    p_s, p_t = conditional(student), conditional(teacher)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def sp_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori, 2019): the batch's Gram matrices of the flattened maps, each row
    L2-normalised; the squared Frobenius distance divided by batch^2."""
    def gram(x: torch.Tensor) -> torch.Tensor:
        flat = at_least_fp32(x).flatten(1)
        return F.normalize(flat @ flat.T, dim=1)

    batch = student.shape[0]
    return (gram(student) - gram(teacher)).pow(2).sum() / batch**2


def rkd_loss(student: torch.Tensor, teacher: torch.Tensor, distance_weight: float = 25.0,
             angle_weight: float = 50.0) -> torch.Tensor:
    """Relational KD (Park et al., 2019) on the embeddings: Huber loss between the pairwise distances (each set
    divided by its mean non-zero distance) plus Huber loss between the cosines of the angles of all triplets.

    The distances are taken from the differences themselves: above 25 rows ``cdist``'s default matrix-product form
    leaves rounding noise on the self-distances (24 of 64 positive at batch 64), which entered the mean and the
    loss; this way they are exactly 0, as in the published implementation."""
    def distances(x: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
        return d / d[d > 0].mean()

    def angles(x: torch.Tensor) -> torch.Tensor:
        diff = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), dim=2)  # diff[i, j] = unit(x_j - x_i)
        return torch.bmm(diff, diff.transpose(1, 2)).flatten()  # cos of angle j-i-k, all i, j, k

    s, t = pooled(student), pooled(teacher)
    with torch.no_grad():
        t_dist, t_angle = distances(t), angles(t)
    return (distance_weight * F.smooth_l1_loss(distances(s), t_dist)
            + angle_weight * F.smooth_l1_loss(angles(s), t_angle))


@register_method("pkt")
class PKT(RelationalMethod):
    def __init__(self, beta: float = 1000.0, **options: Any):  # its loss is ~1e-3 of the cross-entropy
        super().__init__(beta=beta, **options)

    def relation_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return pkt_loss(student, teacher)


@register_method("sp")
class SimilarityPreserving(RelationalMethod):
    def __init__(self, beta: float = 30.0, **options: Any):
        super().__init__(beta=beta, **options)

    def relation_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return sp_loss(student, teacher)  # batch x batch Gram matrices: the map sizes need not agree


@register_method("rkd")
class RelationalKD(RelationalMethod):
    def __init__(self, beta: float = 0.1, distance_weight: float = 25.0, angle_weight: float = 50.0,
                 **options: Any):
        super().__init__(beta=beta, **options)
        check(distance_weight >= 0 and angle_weight >= 0, "distance_weight and angle_weight must be >= 0")
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)

    def relation_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return rkd_loss(student, teacher, self.distance_weight, self.angle_weight)


class VIDRegressor(nn.Module):
    """VID's mean estimator: three 1x1 convs with ReLUs between, student channels -> teacher channels."""

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        hidden = 2 * teacher_channels
        self.net = nn.Sequential(nn.Conv2d(student_channels, hidden, 1), nn.ReLU(),
                                 nn.Conv2d(hidden, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, teacher_channels, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def vid_nll(mean: torch.Tensor, teacher: torch.Tensor, raw_variance: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Variational information distillation (Ahn et al., 2019): the Gaussian NLL of the teacher feature under
    ``N(mean, softplus(raw_variance) + eps)`` with one learned variance per channel, averaged over elements."""
    var = (F.softplus(raw_variance) + eps).view(1, -1, 1, 1)
    return (0.5 * (torch.log(var) + (mean - teacher) ** 2 / var)).mean()


@register_method("vid")
class VID(PairedFeatureMethod):
    """CE + beta * VID's NLL at each point (the variance-aware feature baseline of the poster's tables)."""

    needs_projector = False

    def __init__(self, beta: float = 3.0, init_variance: float = 5.0, **options: Any):
        super().__init__(**options)
        check(beta >= 0, f"beta must be >= 0 (got {beta})")
        check(init_variance > 0, f"init_variance must be > 0 (got {init_variance})")
        self.beta, self.init_variance = float(beta), float(init_variance)

    def setup(self, m: int, pairs: list[FeaturePair], next_parts: dict[str, nn.Module | None]) -> None:
        super().setup(m, pairs, next_parts)
        self.regressors = nn.ModuleList(VIDRegressor(ss[0], ts[0]) for _, _, ss, ts in pairs)
        raw = torch.log(torch.expm1(torch.tensor(self.init_variance)))  # softplus(raw) = init_variance
        self.raw_variances = nn.ParameterList(nn.Parameter(torch.full((ts[0],), raw.item())) for *_, ts in pairs)

    def feature_losses(self, *, student_logits, labels, branches, teacher_feats, **_: Any) -> dict[str, torch.Tensor]:
        total = student_logits.new_zeros(())
        for i, (s_tap, t_tap) in enumerate(self.pairs):
            student = mean_feature(branches[s_tap])
            teacher = teacher_feats[t_tap].detach().float()
            size = tuple(min(a, b) for a, b in zip(student.shape[-2:], teacher.shape[-2:]))
            mean = self.regressors[i](F.adaptive_avg_pool2d(student, size)).float()
            total = total + vid_nll(mean, F.adaptive_avg_pool2d(teacher, size), self.raw_variances[i])
        return {"ce": self.cross_entropy(student_logits, labels), "vid": self.beta * total}


# ------------------------------------------------------------------------------------------ OFD


def negative_mean(teacher: torch.Tensor) -> torch.Tensor:
    """Per channel, the mean of the teacher's negative responses (0 where a channel has none), shape (1, C, 1, 1):
    the margin of OFD's margin ReLU, ``E[t | t < 0]``, estimated from the batch."""
    negative = (teacher < 0).to(teacher.dtype)
    total = (teacher * negative).sum(dim=(0, 2, 3))
    count = negative.sum(dim=(0, 2, 3))
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total)).view(1, -1, 1, 1)


def ofd_partial_l2(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """OFD's partial L2 (Heo et al., 2019), averaged over elements: ``(s - t)^2`` except where the target is not
    positive and the student is already below it (the teacher's negative responses are not copied, only kept
    negative)."""
    skip = (student <= target) & (target <= 0)
    return ((student - target) ** 2 * (~skip).to(student.dtype)).mean()


@register_method("ofd")
class OFD(PairedFeatureMethod):
    """CE + beta * OFD at each point: the projected student feature (a 1x1 conv + BN on the point's pre-activation
    output) against the teacher feature through a margin ReLU ``max(t, m_c)``, with the partial L2.

    The paper takes the margin from the teacher's BatchNorm statistics before its ReLU; our taps are stage outputs
    of any teacher (a Swin has no BN, a ResNet's are after the ReLU), so ``m_c`` is a running (EMA 0.9) estimate
    of ``E[t | t < 0]`` per channel from the teacher's own features; it is 0 when they are never negative."""

    def __init__(self, beta: float = 1.0, **options: Any):
        super().__init__(**options)
        check(beta >= 0, f"beta must be >= 0 (got {beta})")
        self.beta = float(beta)

    def setup(self, m: int, pairs: list[FeaturePair], next_parts: dict[str, nn.Module | None]) -> None:
        super().setup(m, pairs, next_parts)
        for i, (*_, ts) in enumerate(pairs):  # buffers: saved for resume, broadcast from rank 0 under DDP
            self.register_buffer(f"margin_{i}", torch.zeros(1, ts[0], 1, 1))
        self.register_buffer("margins_initialised", torch.zeros(len(pairs), dtype=torch.bool))

    @torch.no_grad()
    def margin(self, i: int, teacher: torch.Tensor) -> torch.Tensor:
        margin = self.get_buffer(f"margin_{i}")
        if not bool(self.margins_initialised[i]):
            margin.copy_(negative_mean(teacher))
            self.margins_initialised[i] = True
        elif self.training:
            margin.mul_(0.9).add_(0.1 * negative_mean(teacher))
        return margin

    def feature_losses(self, *, student_logits, labels, branches, teacher_feats, **_: Any) -> dict[str, torch.Tensor]:
        total = student_logits.new_zeros(())
        for i, (s_tap, t_tap) in enumerate(self.pairs):
            estimate = self.projectors[i](mean_feature(branches[s_tap])).float()
            teacher = match_size(teacher_feats[t_tap].detach().float(), estimate)
            target = torch.maximum(teacher, self.margin(i, teacher))
            total = total + ofd_partial_l2(estimate, target)
        return {"ce": self.cross_entropy(student_logits, labels), "ofd": self.beta * total}


# ------------------------------------------------------------------------------------------ ReviewKD


def hcl_loss(student: torch.Tensor, teacher: torch.Tensor, levels: tuple[int, ...] = (4, 2, 1)) -> torch.Tensor:
    """ReviewKD's hierarchical context loss (Chen et al., 2021): the MSE at full size plus the MSE of both maps
    average-pooled to each ``l x l`` smaller than the map, weighted 1, 1/2, 1/4, ..., divided by the weights' sum."""
    loss, weight, total = F.mse_loss(student, teacher), 1.0, 1.0
    for level in levels:
        if level >= student.shape[-2]:
            continue
        weight /= 2
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(student, level), F.adaptive_avg_pool2d(teacher, level))
        total += weight
    return loss / total


class AttentionBasedFusion(nn.Module):
    """ReviewKD's ABF: the student feature through 1x1 conv + BN, fused with the deeper level's (upsampled) by two
    spatial attention maps, then a 3x3 conv + BN to the teacher's channels. Returns (output, fused feature)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.attention = nn.Conv2d(2 * mid_channels, 2, 1) if fuse else None
        self.out = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor, deeper: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.reduce(x)
        if self.attention is not None and deeper is not None:
            deeper = F.interpolate(deeper, size=x.shape[-2:], mode="nearest")
            weights = torch.sigmoid(self.attention(torch.cat([x, deeper], dim=1)))
            x = x * weights[:, :1] + deeper * weights[:, 1:]
        return self.out(x), x


@register_method("reviewkd")
class ReviewKD(PairedFeatureMethod):
    """CE + beta * sum over points of HCL(ABF output, teacher feature): each point's student feature is fused with
    the deeper points' before it is compared (knowledge review). The stage lists the points deepest first; with a
    single point ReviewKD is HCL through a conv connector."""

    needs_projector = False

    def __init__(self, beta: float = 0.3, mid_channels: int = 128, **options: Any):
        super().__init__(**options)
        check(beta >= 0, f"beta must be >= 0 (got {beta})")
        check(int(mid_channels) >= 1, f"mid_channels must be >= 1 (got {mid_channels})")
        self.beta, self.mid_channels = float(beta), int(mid_channels)

    def setup(self, m: int, pairs: list[FeaturePair], next_parts: dict[str, nn.Module | None]) -> None:
        super().setup(m, pairs, next_parts)
        self.fusions = nn.ModuleList(AttentionBasedFusion(ss[0], self.mid_channels, ts[0], fuse=i > 0)
                                     for i, (_, _, ss, ts) in enumerate(pairs))

    def feature_losses(self, *, student_logits, labels, branches, teacher_feats, **_: Any) -> dict[str, torch.Tensor]:
        total, deeper = student_logits.new_zeros(()), None
        for i, (s_tap, t_tap) in enumerate(self.pairs):  # deepest first
            output, deeper = self.fusions[i](mean_feature(branches[s_tap]), deeper)
            teacher = teacher_feats[t_tap].detach().float()
            size = tuple(min(a, b) for a, b in zip(output.shape[-2:], teacher.shape[-2:]))
            total = total + hcl_loss(F.adaptive_avg_pool2d(output.float(), size), F.adaptive_avg_pool2d(teacher, size))
        return {"ce": self.cross_entropy(student_logits, labels), "reviewkd": self.beta * total}
