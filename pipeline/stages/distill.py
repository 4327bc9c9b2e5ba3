"""The distill stage: train the multi-branch student (``pipeline distill``), and the baseline stage.

Writes ``RUN_DIR/student/{model.pt, metrics.json, metrics.jsonl, stage.json}``;
``model.pt`` holds the multi-branch student only (no teacher, projector or
loss state) and ``metrics.json`` records how to rebuild it. Methods that
need a teacher read ``RUN_DIR/teacher/model.pt`` (or ``--teacher-ckpt``).
The baseline stage trains the same student with the same budget and no
teacher into ``RUN_DIR/baseline/student/``, for the report's comparison.
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from models import FeatureTaps, ModelError, TapSpec, get_spec
from models.heads import next_linear
from models.reparam import build_multibranch_student
from pipeline.config import PipelineConfig, StudentConfig, with_derived_settings
from pipeline import names
from pipeline.errors import BadInputError
from pipeline.methods import KDMethod, create_method, get_method, method_settings
from pipeline.stages.base import (TRAINING_OUTPUTS, Stage, StageRun, StageSpec, data_fingerprint_excludes,
                                  data_settings, prepare_data, train_stage)
from pipeline.stages.loaders import load_teacher
from pipeline.training.checkpoint import seed_everything
from pipeline.training.data import BatchPreprocessor, DataBundle
from pipeline.training.distributed import DistContext
from pipeline.training.tasks import DistillTask, FrozenTeacher
from pipeline.training.teacher_cache import CACHEABLE_AUGMENTATIONS, TeacherOutputCache

log = logging.getLogger(__name__)


def teacher_precision(requested: str, device: torch.device) -> str:
    """The frozen teacher's arithmetic: as asked, or for ``auto`` fp32 on a CPU and bf16 on CUDA. Never a timing
    probe, so the same command always trains the same student."""
    if requested != "auto":
        return requested
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


@torch.no_grad()
def describe_teacher_precision(model: torch.nn.Module, images: torch.Tensor, device: torch.device,
                               precision: str) -> dict[str, Any]:
    """The chosen precision with what it costs in accuracy on a sample batch (logit difference and top-1
    agreement against fp32), for the record."""
    report: dict[str, Any] = {"precision": precision}
    if precision != "fp32":
        model = model.to(device).eval()
        reference, low = FrozenTeacher(model, "fp32")(images), FrozenTeacher(model, precision)(images)
        report[f"{precision}_max_abs_logit_diff"] = (low - reference).abs().max().item()
        report[f"{precision}_top1_agreement"] = 100.0 * (low.argmax(1) == reference.argmax(1)).float().mean().item()
    log.info("teacher forward: %s%s", precision, "".join(f", {k} {v:.4g}" for k, v in report.items()
                                                         if k != "precision"))
    return report


def sample_input(train: Any, bundle: DataBundle, image_size: int, ctx: DistContext, n: int = 64) -> torch.Tensor:
    """A preprocessed batch of training images (for measurements and shape discovery)."""
    images = torch.stack([train[i][0] for i in range(min(len(train), n))]).to(ctx.device)
    return BatchPreprocessor(image_size, bundle.mean, bundle.std)(images)


TEACHER_STAGES = ("stage4", "stage3", "stage2", "stage1")  # deepest first: a tie in stride goes to the deeper


def pair_by_stride(student_sizes: dict[str, int], teacher_sizes: dict[str, int]) -> dict[str, str]:
    """Each student point's teacher stage: the one whose map has the same height (the same stride, both models
    seeing the same input), else the nearest in log-scale; ties go to the deeper stage."""
    def distance(s_size: int, t_size: int) -> float:
        return abs(math.log(t_size / s_size))

    order = [t for t in TEACHER_STAGES if t in teacher_sizes]
    return {tap: min(order, key=lambda t: distance(size, teacher_sizes[t])) for tap, size in student_sizes.items()}


def setup_feature_method(method: KDMethod, student: torch.nn.Module, teacher: FrozenTeacher,
                         points: list[dict[str, str]], m: int, images: torch.Tensor) -> list[dict[str, Any]]:
    """Pair each distillation point with the teacher stage of the same stride, find both shapes, and build the
    method's modules; returns the pairs with their C x H x W shapes (for the record)."""
    stages = [t for t in TEACHER_STAGES if t in teacher.taps]
    if not stages:
        raise BadInputError(f"teacher has none of the feature taps {', '.join(TEACHER_STAGES)}")
    _, teacher_feats = teacher.with_features(images[:2], stages)
    student_taps = {p["tap"]: TapSpec(p["conv"]) for p in points}
    was_training = student.training
    student.eval()
    with torch.no_grad(), FeatureTaps(student, student_taps) as taps:
        student(images[:2])
    student.train(was_training)
    pairing = pair_by_stride({p["tap"]: taps.features[p["tap"]].shape[-2] for p in points},
                             {t: teacher_feats[t].shape[-2] for t in stages})
    pairs = [(p["tap"], pairing[p["tap"]], tuple(taps.features[p["tap"]].shape[1:]),
              tuple(teacher_feats[pairing[p["tap"]]].shape[1:])) for p in points]
    teacher_taps = sorted({t for _, t, _, _ in pairs})
    heads = {}
    for t in teacher_taps:
        try:
            heads[t] = next_linear(teacher.model, t)
        except ModelError:
            heads[t] = None  # no guidance at this point
    method.setup(m, pairs, heads)
    log.info("distillation points: %s", ", ".join(f"student {s} {ss} <- teacher {t} {ts}" for s, t, ss, ts in pairs))
    return [{"student": s, "teacher": t, "student_shape": list(ss), "teacher_shape": list(ts)}
            for s, t, ss, ts in pairs]


def make_method(name: str, options: dict[str, Any], label_smoothing: float) -> KDMethod:
    try:
        return create_method(name, options, label_smoothing)
    except ValueError as exc:
        raise BadInputError(str(exc)) from None


def make_teacher_cache(s: StudentConfig, augment: str) -> TeacherOutputCache | None:
    """The teacher-output cache the settings ask for; None when off or when the augmentation rules it out."""
    if s.teacher_cache == "off" or s.teacher_cache_mb == 0:
        return None
    if augment not in CACHEABLE_AUGMENTATIONS:
        log.info("teacher cache off: augmentation '%s' makes nearly every input new", augment)
        return None
    return TeacherOutputCache(s.teacher_cache_mb * 2**20, getattr(torch, s.teacher_cache_dtype))


def distill_settings_hash(cfg: PipelineConfig, teacher_sha256: str | None, precision: str = "fp32") -> str:
    """The stage's fingerprint: seed, data and student settings, the teacher's weights (another teacher means
    another distillation) and the teacher's precision. The precision enters only when it is not fp32, so runs made
    before it was a setting (fp32 on CPUs) keep their fingerprint."""
    student = cfg.student.model_dump()
    student["method_options"] = method_settings(cfg.student.method, cfg.student.method_options)
    settings = PipelineConfig.model_validate({"seed": cfg.seed, "deterministic": cfg.deterministic,
                                              "data": data_settings(cfg), "student": student})
    # teacher_ckpt is a path: the teacher is identified by its sha256 below, wherever the file lies
    unset = {"subset"} if cfg.student.subset is None else set()  # runs from before the setting keep their hash
    settings_hash = settings.section_hash("seed", "deterministic", "data", "student",
                                          exclude={"student": {"teacher_precision", "teacher_ckpt", *unset},
                                                   "data": data_fingerprint_excludes(cfg)})
    if teacher_sha256 is None:
        return settings_hash
    settings_hash += "-" + teacher_sha256[:16]
    return settings_hash if precision == "fp32" else f"{settings_hash}-teacher-{precision}"


def read_teacher(ckpt: Path | None) -> bytes | None:
    """The teacher checkpoint's bytes (None: no teacher needed, or none there yet, which is reported later)."""
    if ckpt is None or not ckpt.is_file():
        return None
    try:
        return ckpt.read_bytes()
    except OSError as exc:
        raise BadInputError(f"cannot read the teacher checkpoint {ckpt}: {exc.strerror or exc}") from None


def run_distill(run: StageRun, name: str | None = None) -> dict[str, Any]:
    """Run (or skip, or resume) the distillation; returns the student's metrics. ``name``: the model's name in the
    log (a baseline's when the stage trains one; by default the distilled student's)."""
    cfg, ctx = with_derived_settings(run.cfg), run.ctx
    s = cfg.student
    name = name or names.student(s.method)
    method_cls = get_method(s.method)
    ckpt = (Path(s.teacher_ckpt) if s.teacher_ckpt else run.layout.teacher.model) if method_cls.needs_teacher else None
    stage = Stage(run.layout.student, name)
    precision = teacher_precision(s.teacher_precision, ctx.device)
    teacher_bytes = read_teacher(ckpt)  # read once: the bytes hashed here are the bytes loaded below
    teacher_sha = hashlib.sha256(teacher_bytes).hexdigest() if teacher_bytes is not None else None
    settings_hash = distill_settings_hash(cfg, teacher_sha, precision)
    if ckpt is None or teacher_sha is not None:  # a missing teacher is reported below, with what to run
        done = stage.skip_if_finished(settings_hash)
        if done is not None:
            return done
    seed_everything(cfg.seed)  # the initial weights (student and projectors) are part of what a seed fixes
    bundle, train, test, image_size = prepare_data(cfg, s.subset)
    method = make_method(s.method, dict(s.method_options), s.train.label_smoothing)
    method.num_samples = len(train)
    try:
        model, arch = build_multibranch_student(s.model, bundle.num_classes, image_size, s.m, s.points,
                                                s.rep_blocks)
    except ModelError as exc:
        raise BadInputError(str(exc)) from None
    teacher, teacher_info, sample = None, None, None
    if ckpt is not None:
        sample = sample_input(train, bundle, image_size, ctx)
        teacher_model, teacher_meta = load_teacher(ckpt, bundle, image_size, teacher_bytes)
        teacher_bytes = None  # the weights live in the model now
        teacher_info = {"checkpoint": str(ckpt), "top1": teacher_meta.get("top1"), "model": teacher_meta["arch"]["name"],
                        **describe_teacher_precision(teacher_model, sample, ctx.device, precision)}
        teacher = FrozenTeacher(teacher_model, teacher_info["precision"], get_spec(teacher_info["model"]).taps)
        teacher_info["sha256"] = teacher_sha
    points = arch["multibranch"]["distill_points"]
    if method.uses_features:  # feature methods (all of which need a teacher)
        arch["feature_pairs"] = setup_feature_method(method, model, teacher, points, s.m, sample)
    cache = make_teacher_cache(s, cfg.data.augment) if teacher is not None else None
    if teacher_info:
        teacher_info["cache"] = None if cache is None else {"dtype": s.teacher_cache_dtype,
                                                            "max_mb": s.teacher_cache_mb}
    task = DistillTask(model, method, teacher, {p["tap"]: p["conv"] for p in points}, cache)
    arch["method"] = s.method
    arch["method_options"] = method_settings(s.method, s.method_options)
    arch["teacher"] = teacher_info
    summary = train_stage(stage, cfg, ctx, bundle=bundle, train=train, test=test, image_size=image_size, task=task,
                          train_cfg=s.train, settings_hash=settings_hash, arch=arch, progress=run.progress)
    if cache is not None and cache.hits + cache.misses:
        log.info("%s: teacher cache in the last epoch: %s", name, cache.describe())
    return summary


def baseline_config(cfg: PipelineConfig, method: str = "none", teacher: Path | None = None) -> PipelineConfig:
    """The same student, data and budget, trained alone (``none``) or with another method at its defaults."""
    update: dict[str, Any] = {"method": method, "method_options": {}}
    if teacher is not None and cfg.student.teacher_ckpt is None:
        update["teacher_ckpt"] = str(teacher)
    return cfg.model_copy(update={"student": cfg.student.model_copy(update=update, deep=True)}, deep=True)


def baseline_spec(method: str) -> StageSpec:
    """The stage training one baseline: ``baseline`` (the student alone) or ``baseline-METHOD``."""

    def run_baseline(run: StageRun) -> dict[str, Any]:
        layout = run.layout.baseline_run(method)
        cfg = baseline_config(run.cfg, method, run.layout.teacher.model if get_method(method).needs_teacher else None)
        return run_distill(StageRun(cfg, layout, run.ctx, run.progress), names.baseline(method))

    needs_teacher = get_method(method).needs_teacher
    return StageSpec(name="baseline" if method == "none" else f"baseline-{method}",
                     folder=lambda layout: layout.baseline_run(method).student, run=run_baseline,
                     inputs=lambda layout: [layout.teacher.model] if needs_teacher else [],
                     outputs=TRAINING_OUTPUTS, per_rank=True,
                     enabled=lambda cfg: cfg.baseline and method in cfg.baselines)


STAGE = StageSpec(name="distill", folder=lambda layout: layout.student, run=run_distill,
                  inputs=lambda layout: [layout.teacher.model], outputs=TRAINING_OUTPUTS, per_rank=True)
# one stage in the order, run once per method of `baselines` (its --force name: baseline)
BASELINE = replace(baseline_spec("none"), enabled=lambda cfg: cfg.baseline,
                   expand=lambda cfg: [baseline_spec(method) for method in cfg.baselines])
