"""``pipeline run``: teacher -> distill -> baseline -> fuse -> export -> bench -> report in one run directory.

``RUN_DIR/manifest.json`` records, for every stage, its status, what happened
in the last invocation (ran, resumed, skipped), its settings hash, the sha256
of its inputs and outputs and its wall time. Each stage decides for itself
whether its finished outputs still match its settings and inputs (its
``stage.json``), so an unchanged stage is skipped, an interrupted one resumes
from its last checkpoint, and a changed setting reruns that stage and, through
the input hashes, the ones after it. ``--force STAGE`` reruns from STAGE on.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig, config_to_yaml
from pipeline.errors import FAILURES, BadInputError, unknown_name
from pipeline.layout import RunLayout, StageFolder
from pipeline.stages import STAGES, StageRun, StageSpec, stage_names
from pipeline.training.checkpoint import atomic_write_json, atomic_write_text, file_sha256, read_json
from pipeline.training.distributed import DistContext

log = logging.getLogger(__name__)

EXIT_CODES = {"0": "success", "1": "other pipeline failure", "2": "bad input", "3": "equivalence gate",
              "4": "training diverged", "5": "export failed", "6": "cannot write (disk full, read-only)",
              "7": "another torchrun rank stalled, died or failed"}


def check_run_dir(layout: RunLayout, cfg: PipelineConfig) -> None:
    """Refuse a run directory that holds a run on another dataset (its stages would be mixed up)."""
    previous = read_json(layout.manifest) or {}
    dataset = previous.get("run", {}).get("dataset")
    if dataset is None and layout.config.exists():
        from pipeline.config import read_config_file

        try:
            dataset = read_config_file(layout.config).get("data", {}).get("dataset")
        except BadInputError:
            dataset = None
    if dataset is not None and dataset != cfg.data.dataset:
        raise BadInputError(f"run directory {layout.root} holds a run on {dataset}, not {cfg.data.dataset}; "
                            "choose another --run-dir (nothing was changed)")


def write_config(layout: RunLayout, cfg: PipelineConfig) -> None:
    """``RUN_DIR/config.yaml``: the resolved settings of this invocation, written once before any stage runs."""
    atomic_write_text(layout.config, config_to_yaml(cfg))


def force_from(layout: RunLayout, stage: str, cfg: PipelineConfig) -> None:
    """Forget the results of ``stage`` and every stage after it, so that they run again."""
    names = stage_names()
    if stage not in names:
        raise unknown_name("stage", stage, names)
    for spec in STAGES[names.index(stage):]:
        for instance in spec.instances(cfg):
            folder = instance.folder(layout)
            folder.marker.unlink(missing_ok=True)
            if spec.name == stage:  # retrain from scratch, not from the last checkpoint
                shutil.rmtree(folder.checkpoints, ignore_errors=True)
    log.info("run: --force %s: rerunning %s", stage, ", ".join(names[names.index(stage):]))


def remove_leftovers(folder: StageFolder) -> None:
    """Temporary files of a killed command (``.NAME.*.tmp`` and ``.onnx-*`` export folders) in a stage's folder;
    safe because this command holds the run directory."""
    if not folder.path.is_dir():
        return
    for path in folder.path.rglob(".*"):
        if path.name.endswith(".tmp") or path.name.startswith(".onnx-"):
            log.info("run: removing %s, left by an interrupted command", path)
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


class Manifest:
    """``RUN_DIR/manifest.json``, rewritten atomically after every stage."""

    def __init__(self, layout: RunLayout, cfg: PipelineConfig, profile: str | None):
        self.layout = layout
        old = read_json(layout.manifest) or {}
        self.data: dict[str, Any] = {
            "run": {"dataset": cfg.data.dataset, "teacher": cfg.teacher.model, "student": cfg.student.model,
                    "method": cfg.student.method, "profile": profile,
                    "created": old.get("run", {}).get("created", time.strftime("%Y-%m-%dT%H:%M:%S%z")),
                    "updated": None, "status": "running"},
            "exit_codes": EXIT_CODES,
            "stages": old.get("stages", {}),
        }
        for entry in self.data["stages"].values():
            if entry.get("status") == "running":  # its command died (this one holds the run directory's lock)
                entry["status"] = "interrupted"

    def _hashes(self, files: list[Path]) -> dict[str, str | None]:
        return {self.layout.relative(f): file_sha256(f) if f.is_file() else None for f in files}

    def stage(self, spec: StageSpec, status: str, **fields: Any) -> None:
        entry = self.data["stages"].setdefault(spec.name, {})
        entry.update(status=status, **fields)
        if status == "complete":
            folder = spec.folder(self.layout)
            record = read_json(folder.marker) or {}
            entry["settings_hash"] = record.get("settings_hash")
            entry["inputs"] = self._hashes(spec.inputs(self.layout))
            recorded = record.get("output_sha256", {})  # hashed when the stage finished (older records: none)
            entry["outputs"] = {self.layout.relative(folder / out): (recorded.get(out) or file_sha256(folder / out))
                                if (folder / out).is_file() else None for out in record.get("outputs", [])}
            entry.pop("error", None)
        self.save()

    def save(self, status: str | None = None) -> None:
        if status:
            self.data["run"]["status"] = status
        self.data["run"]["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(self.layout.manifest, self.data)


def run_pipeline(cfg: PipelineConfig, run_dir: Path, ctx: DistContext, *, profile: str | None = None,
                 force: str | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Run every stage in order; returns the manifest. Raises the failing stage's error."""
    layout = RunLayout(run_dir)
    check_run_dir(layout, cfg)
    if force and ctx.is_main:
        force_from(layout, force, cfg)
    ctx.barrier()
    manifest = Manifest(layout, cfg, profile) if ctx.is_main else None
    if ctx.is_main:
        write_config(layout, cfg)
    run = StageRun(cfg, layout, ctx, progress)
    for spec in (instance for stage in STAGES for instance in stage.instances(cfg)):
        if not spec.enabled(cfg):
            continue
        if not spec.per_rank and not ctx.is_main:  # rank 0 runs it alone and says how it ended
            ctx.wait_for_main(spec.name)
            continue
        folder = spec.folder(layout)
        if ctx.is_main:
            remove_leftovers(folder)
        before = read_json(folder.marker)
        resumed = before is None and folder.last_checkpoint.exists()
        if manifest:
            manifest.stage(spec, "running", started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        start = time.perf_counter()
        try:
            spec.run(run)
        except BaseException as exc:
            known = isinstance(exc, (*FAILURES, OSError, KeyboardInterrupt))
            code = getattr(exc, "exit_code", 6 if isinstance(exc, OSError) else 130 if known else 1)
            error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if not spec.per_rank:
                with contextlib.suppress(RuntimeError):  # the error below matters more than a lost rank
                    ctx.announce((code, error))
            if manifest and known:
                try:
                    manifest.stage(spec, "failed", error=error, exit_code=code,
                                   wall_s=round(time.perf_counter() - start, 2))
                    manifest.save("failed")
                except OSError:
                    pass  # the run directory itself cannot be written: the error below says so
            raise
        if not spec.per_rank:
            ctx.announce(None)
        wall = round(time.perf_counter() - start, 2)
        if manifest:
            after = read_json(folder.marker)
            action = "skipped" if before is not None and before == after else ("resumed" if resumed else "ran")
            fields = {"action": action, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            if action != "skipped":
                fields["wall_s"] = wall
            manifest.stage(spec, "complete", **fields)
            log.info("run: %-8s %s in %.1f s", spec.name, action, wall)
    if manifest:
        manifest.save("complete")
        return manifest.data
    return {}
