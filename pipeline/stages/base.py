"""What every stage shares: its declaration, its folder's bookkeeping, data preparation, the training flow.

A stage module declares itself with a :class:`StageSpec` (name, folder,
inputs, outputs, run function); :mod:`pipeline.stages` lists them in order and
the orchestrator derives everything else from that list.

``STAGE/stage.json`` is written last, atomically, when the stage's outputs
are complete; its ``settings_hash`` tells a rerun whether the finished
outputs still match what was asked for.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import PipelineConfig, TrainConfig
from pipeline.layout import RunLayout, StageFolder
from pipeline.training.checkpoint import atomic_save, atomic_write_json, file_sha256, read_json
from pipeline.training.data import BatchPreprocessor, DataBundle, load_dataset, stratified_subset, validation_split
from pipeline.training.distributed import DistContext
from pipeline.training.engine import fit, read_resume_state

log = logging.getLogger(__name__)


@dataclass
class StageRun:
    """What a stage's run function gets from the orchestrator (or from its own CLI command)."""

    cfg: PipelineConfig
    layout: RunLayout
    ctx: DistContext
    progress: bool | None = None


def _always(cfg: PipelineConfig) -> bool:
    return True


@dataclass(frozen=True)
class StageSpec:
    """One stage of ``pipeline run``.

    ``folder`` and ``inputs`` name paths through the run's :class:`RunLayout`;
    ``inputs`` are the files the stage reads from the stages before it (their
    sha256 go into the manifest); ``outputs`` are the files it always writes
    into its folder (a stage may list more in its ``stage.json``).
    ``per_rank``: runs on every torchrun process (the training stages), else
    on the main process only.
    """

    name: str
    folder: Callable[[RunLayout], StageFolder]
    run: Callable[[StageRun], Any]
    inputs: Callable[[RunLayout], list[Path]] = lambda layout: []
    outputs: tuple[str, ...] = ()
    per_rank: bool = False
    enabled: Callable[[PipelineConfig], bool] = field(default=_always)
    # a stage that runs once per configured item (the baselines): the specs it stands for in a run with ``cfg``
    expand: Callable[[PipelineConfig], list["StageSpec"]] | None = None

    def instances(self, cfg: PipelineConfig) -> list["StageSpec"]:
        return self.expand(cfg) if self.expand else [self]


TRAINING_OUTPUTS = ("model.pt", "metrics.json", "metrics.jsonl")


class Stage:
    """The bookkeeping of one stage's folder: is it finished with these settings, mark it finished."""

    def __init__(self, folder: StageFolder, name: str):
        self.name = name
        self.folder = folder
        self.dir = folder.path

    @property
    def marker(self) -> Path:
        return self.folder.marker

    def finished(self, settings_hash: str) -> dict[str, Any] | None:
        """The completion record when the stage finished with these settings and every output is still the file
        it wrote (same sha256); None, with a log line saying why, when the stage must run again."""
        record = read_json(self.marker)
        if not isinstance(record, dict) or record.get("status") != "complete":
            return None
        if record.get("settings_hash") != settings_hash:
            log.info("%s: finished outputs were made with other settings; rerunning", self.name)
            return None
        missing = [out for out in record.get("outputs", []) if not (self.dir / out).is_file()]
        if missing:
            log.info("%s: output %s is missing; rerunning", self.name, self.dir / missing[0])
            return None
        # records written before outputs were hashed (older run directories) are checked for existence only
        for out, digest in record.get("output_sha256", {}).items():
            if file_sha256(self.dir / out) != digest:
                log.info("%s: %s is not the file this stage wrote (sha256 differs: truncated, corrupted or "
                         "replaced); rerunning", self.name, self.dir / out)
                return None
        return record

    def skip_if_finished(self, settings_hash: str) -> dict[str, Any] | None:
        """The completion record, logged as a skip, when the stage finished with these settings; else None."""
        done = self.finished(settings_hash)
        if done is not None:
            top1 = f" (test top-1 {done['top1']:.2f}%)" if isinstance(done.get("top1"), (int, float)) else ""
            log.info("%s: finished with these settings%s; skipping", self.name, top1)
        return done

    def mark_complete(self, settings_hash: str, outputs: list[str], summary: dict[str, Any]) -> dict[str, Any]:
        """Write ``stage.json`` (last, atomically) with the settings hash and the sha256 of every output."""
        record = {"status": "complete", "settings_hash": settings_hash, "outputs": outputs,
                  "output_sha256": {out: file_sha256(self.dir / out) for out in outputs},
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **summary}
        atomic_write_json(self.marker, record)
        return record


def prepare_data(cfg: PipelineConfig, labelled: int | None = None) -> tuple[DataBundle, Any, Any, int]:
    """Load the dataset and its subsets; returns (bundle, train split, test split, image size). ``labelled``: the
    student's own subset of the training images (``student.subset``), drawn from the teacher's."""
    data = cfg.data
    bundle = load_dataset(data.dataset, data.data_root, data.download, data.image_size)
    image_size = data.image_size or bundle.default_image_size
    train, test = bundle.train, bundle.test
    if data.validation:
        test, train = validation_split(bundle.train, data.validation)
    train = stratified_subset(train, data.subset, cfg.seed, "subset")
    if labelled is not None:
        train = stratified_subset(train, labelled, cfg.seed, "student.subset")
    test = stratified_subset(test, data.eval_subset, cfg.seed, "eval_subset")
    return bundle, train, test, image_size


def evaluated_on(validation: int | None) -> dict[str, Any]:
    """Which split a stage's top-1 is measured on: the test split, or (``--validation N``, for tuning) N images
    held out of the training split. Written into metrics.json so that later stages measure on the same images
    and the report names the split."""
    return {"eval_split": "validation" if validation else "test", "validation": validation}


def data_settings(cfg: PipelineConfig) -> dict[str, Any]:
    """The data settings that change what a model learns (not where the files are)."""
    d = cfg.data
    settings = {"dataset": d.dataset, "subset": d.subset, "eval_subset": d.eval_subset, "image_size": d.image_size,
                "augment": d.augment}
    return settings if d.validation is None else {**settings, "validation": d.validation}


def data_fingerprint_excludes(cfg: PipelineConfig) -> set[str]:
    """Data settings added after runs were made, left out of fingerprints while unset (so those runs keep
    theirs)."""
    return {"validation"} if cfg.data.validation is None else set()


def set_deterministic(enabled: bool) -> None:
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


def train_stage(stage: Stage, cfg: PipelineConfig, ctx: DistContext, *, bundle: DataBundle,
                train: Any, test: Any, image_size: int, task: nn.Module, train_cfg: TrainConfig, settings_hash: str,
                arch: dict[str, Any], progress: bool | None) -> dict[str, Any]:
    """Resume or run one training stage (its caller has checked that it is not finished); writes model.pt,
    metrics.json(l) and stage.json."""
    resume = read_resume_state(stage.dir, settings_hash)
    set_deterministic(cfg.deterministic)
    split = evaluated_on(cfg.data.validation)
    log.info("%s: %s on %s (%d train / %d %s images, %dx%d, %s)", stage.name, arch["name"], bundle.name,
             len(train), len(test), split["eval_split"], image_size, image_size, bundle.source)
    prep = BatchPreprocessor(image_size, bundle.mean, bundle.std, seed=cfg.seed, augment=cfg.data.augment)
    result = fit(task, train, test, prep, train_cfg, stage.dir, ctx, seed=cfg.seed, settings_hash=settings_hash,
                 num_workers=cfg.data.num_workers, progress=progress, resume_state=resume, label=stage.name)
    summary = {**result.as_dict(), "dataset": bundle.name, "classes": bundle.classes, "mean": list(bundle.mean),
               "std": list(bundle.std), "image_size": image_size, "arch": arch, "train_images": len(train),
               "test_images": len(test), "world_size": ctx.world_size, **split}
    if ctx.is_main:
        atomic_save(task.model.state_dict(), stage.folder.model)
        atomic_write_json(stage.folder.metrics, summary)
        summary = stage.mark_complete(settings_hash, list(TRAINING_OUTPUTS), summary)
        if not cfg.keep_checkpoints:  # a finished stage never resumes: its resume state is dead weight
            shutil.rmtree(stage.folder.checkpoints, ignore_errors=True)
    ctx.barrier()
    log.info("%s: %s top-1 %.2f%% (best %.2f%% at epoch %d) in %.0f s of training", stage.name,
             summary["eval_split"], result.top1, result.best_top1, result.best_epoch, result.train_time_s)
    return summary
