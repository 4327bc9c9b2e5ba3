"""The distill stage: train the multi-branch student (``pipeline distill``).

Writes ``RUN_DIR/student/{model.pt, metrics.json, metrics.jsonl, stage.json}``;
``model.pt`` holds the multi-branch student only (no teacher, projector or
loss state) and ``metrics.json`` records how to rebuild it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from models import ModelError
from models.reparam import build_multibranch_student
from pipeline.config import PipelineConfig
from pipeline.distributed import DistContext
from pipeline.errors import BadInputError
from pipeline.methods import DistillTask, get_method
from pipeline.stage import Stage, data_settings, prepare_data, train_stage


def run_distill(cfg: PipelineConfig, run_dir: Path, ctx: DistContext, progress: bool | None = None) -> dict[str, Any]:
    s = cfg.student
    method_cls = get_method(s.method)
    if method_cls.needs_teacher:
        raise BadInputError(f"method '{s.method}' needs a teacher, which this version cannot load yet")
    bundle, train, test, image_size = prepare_data(cfg)
    try:
        model, arch = build_multibranch_student(s.model, bundle.num_classes, image_size, s.m, s.points,
                                                s.rep_blocks)
    except ModelError as exc:
        raise BadInputError(str(exc)) from None
    settings = PipelineConfig.model_validate({"seed": cfg.seed, "deterministic": cfg.deterministic,
                                              "data": data_settings(cfg), "student": s.model_dump()})
    settings_hash = settings.section_hash("seed", "deterministic", "data", "student")
    task = DistillTask(model, method_cls(label_smoothing=s.train.label_smoothing))
    arch["method"] = s.method
    return train_stage(Stage(run_dir, "student"), cfg, run_dir, ctx, bundle=bundle, train=train, test=test,
                       image_size=image_size, task=task, train_cfg=s.train, settings_hash=settings_hash, arch=arch,
                       progress=progress)
