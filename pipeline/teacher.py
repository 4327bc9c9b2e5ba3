"""The teacher stage: train or fine-tune a teacher on the dataset (``pipeline teacher``).

Writes ``RUN_DIR/teacher/{model.pt, metrics.json, metrics.jsonl, stage.json}``
and ``RUN_DIR/config.yaml``. A finished stage with the same settings is
skipped; an interrupted one resumes from ``teacher/checkpoints/last.pt``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import build_model, get_spec
from models.errors import ModelError
from models.weights import load_matching, read_state_dict
from pipeline.checkpoint import atomic_save, atomic_write_json, atomic_write_text
from pipeline.config import PipelineConfig, config_to_yaml
from pipeline.data import BatchPreprocessor, DataBundle, load_dataset, stratified_subset
from pipeline.distributed import DistContext
from pipeline.engine import fit, read_resume_state
from pipeline.errors import BadInputError
from pipeline.stage import Stage
from pipeline.tasks import SupervisedTask

log = logging.getLogger(__name__)


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


def prepare_data(cfg: PipelineConfig) -> tuple[DataBundle, Any, Any, int]:
    """Load the dataset and its subsets; returns (bundle, train split, test split, image size)."""
    data = cfg.data
    bundle = load_dataset(data.dataset, data.data_root, data.download, data.image_size)
    image_size = data.image_size or bundle.default_image_size
    train = stratified_subset(bundle.train, data.subset, cfg.seed, "subset")
    test = stratified_subset(bundle.test, data.eval_subset, cfg.seed, "eval_subset")
    return bundle, train, test, image_size


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


def teacher_settings_hash(cfg: PipelineConfig) -> str:
    d = cfg.data
    payload = PipelineConfig.model_validate({"seed": cfg.seed, "deterministic": cfg.deterministic,
                                             "data": {"dataset": d.dataset, "subset": d.subset,
                                                      "eval_subset": d.eval_subset, "image_size": d.image_size,
                                                      "augment": d.augment},
                                             "teacher": cfg.teacher.model_dump()})
    return payload.section_hash("seed", "deterministic", "data", "teacher")


def set_deterministic(enabled: bool) -> None:
    import os

    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


def run_teacher(cfg: PipelineConfig, run_dir: Path, ctx: DistContext, progress: bool | None = None) -> dict[str, Any]:
    """Run (or skip, or resume) the teacher stage; returns its metrics."""
    run_dir = Path(run_dir)
    bundle, train, test, image_size = prepare_data(cfg)
    if cfg.data.image_size is None:
        cfg.data.image_size = image_size
    model, arch = build_teacher(cfg, bundle.num_classes, image_size)
    if "window_per_stage" in arch:
        cfg.teacher.window_per_stage = arch["window_per_stage"]
    stage = Stage(run_dir, "teacher")
    settings_hash = teacher_settings_hash(cfg)
    done = stage.finished(settings_hash)
    if done is not None:
        log.info("teacher: finished with these settings (test top-1 %.2f%%); skipping", done["top1"])
        return done
    resume = read_resume_state(stage.dir, settings_hash)
    set_deterministic(cfg.deterministic)

    log.info("teacher: %s on %s (%d train / %d test images, %dx%d, %s)", arch["name"], bundle.name, len(train),
             len(test), image_size, image_size, bundle.source)
    train_cfg = cfg.teacher.train
    prep = BatchPreprocessor(image_size, bundle.mean, bundle.std, seed=cfg.seed, augment=cfg.data.augment)
    task = SupervisedTask(model, train_cfg.label_smoothing)
    result = fit(task, train, test, prep, train_cfg, stage.dir, ctx, seed=cfg.seed, settings_hash=settings_hash,
                 num_workers=cfg.data.num_workers, progress=progress, resume_state=resume, label="teacher",
                 on_checkpoint=lambda: atomic_write_text(run_dir / "config.yaml", config_to_yaml(cfg)))
    summary = {**result.as_dict(), "dataset": bundle.name, "classes": bundle.classes, "mean": list(bundle.mean),
               "std": list(bundle.std), "image_size": image_size, "arch": arch, "train_images": len(train),
               "test_images": len(test), "world_size": ctx.world_size}
    if ctx.is_main:
        atomic_save(model.state_dict(), stage.dir / "model.pt")
        atomic_write_json(stage.dir / "metrics.json", summary)
        summary = stage.mark_complete(settings_hash, ["model.pt", "metrics.json", "metrics.jsonl"], summary)
    ctx.barrier()
    log.info("teacher: test top-1 %.2f%% (best %.2f%% at epoch %d) in %.0f s of training", result.top1,
             result.best_top1, result.best_epoch, result.train_time_s)
    return summary
