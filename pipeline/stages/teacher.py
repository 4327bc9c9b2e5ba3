"""The teacher stage: train or fine-tune a teacher on the dataset (``pipeline teacher``).

Writes ``RUN_DIR/teacher/{model.pt, metrics.json, metrics.jsonl, stage.json}``.
A finished stage with the same settings is skipped; an interrupted one resumes
from ``teacher/checkpoints/last.pt``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models import build_model, get_spec
from models.errors import ModelError
from models.weights import load_matching, read_state_dict
from pipeline.config import PipelineConfig, with_derived_settings
from pipeline.errors import BadInputError
from pipeline.stages.base import (TRAINING_OUTPUTS, Stage, StageRun, StageSpec, data_fingerprint_excludes,
                                  data_settings, prepare_data, train_stage)
from pipeline.training.checkpoint import seed_everything
from pipeline.training.tasks import SupervisedTask


def pretrained_state(torchvision_name: str) -> dict[str, torch.Tensor]:
    """torchvision's default ImageNet weights through its weights API (needs the internet or a warm cache)."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(torchvision_name).DEFAULT
        return weights.get_state_dict(progress=False)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BadInputError(f"cannot fetch torchvision's pretrained {torchvision_name} weights ({reason}); "
                            "offline, download them elsewhere and pass --teacher-weights PATH") from None


def build_teacher(cfg: PipelineConfig, num_classes: int, image_size: int) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher network, with any requested weights loaded; raises before any file is written."""
    t = cfg.teacher
    spec = get_spec(t.model, "teacher")
    options = {k: v for k, v in (("drop_path", t.drop_path), ("window", t.window),
                                 ("window_per_stage", t.window_per_stage)) if k in spec.options}
    try:
        model, spec, arch = build_model(spec.name, num_classes, image_size, **options)
        report = None
        if t.weights or t.pretrained:
            state = read_state_dict(t.weights) if t.weights else pretrained_state(spec.torchvision_name)
            report = load_matching(model, state, spec.classifier, spec.adaptable_keys).as_dict()
            report["source"] = t.weights or f"torchvision:{spec.torchvision_name}"
    except ModelError as exc:
        raise BadInputError(f"teacher weights: {exc}" if "weights" in str(exc) else str(exc)) from None
    arch["weights"] = report
    return model, arch


def run_teacher(run: StageRun) -> dict[str, Any]:
    """Run (or skip, or resume) the teacher stage; returns its metrics."""
    cfg = with_derived_settings(run.cfg)  # the settings hash covers the resolved Swin windows
    settings = PipelineConfig.model_validate({"seed": cfg.seed, "deterministic": cfg.deterministic,
                                              "data": data_settings(cfg), "teacher": cfg.teacher.model_dump()})
    settings_hash = settings.section_hash("seed", "deterministic", "data", "teacher",
                                          exclude={"data": data_fingerprint_excludes(cfg)})
    stage = Stage(run.layout.teacher, "teacher")
    done = stage.skip_if_finished(settings_hash)
    if done is not None:
        return done
    seed_everything(cfg.seed)  # the initial weights are part of what a seed fixes
    bundle, train, test, image_size = prepare_data(cfg)
    model, arch = build_teacher(cfg, bundle.num_classes, image_size)
    task = SupervisedTask(model, cfg.teacher.train.label_smoothing)
    return train_stage(stage, cfg, run.ctx, bundle=bundle, train=train, test=test, image_size=image_size, task=task,
                       train_cfg=cfg.teacher.train, settings_hash=settings_hash, arch=arch, progress=run.progress)


STAGE = StageSpec(name="teacher", folder=lambda layout: layout.teacher, run=run_teacher, outputs=TRAINING_OUTPUTS,
                  per_rank=True)
