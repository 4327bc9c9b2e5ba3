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

import copy
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.checkpoint import atomic_write_json, atomic_write_text, file_sha256, read_json
from pipeline.config import PipelineConfig, config_to_yaml
from pipeline.distributed import DistContext
from pipeline.errors import BadInputError, PipelineError, unknown_name

log = logging.getLogger(__name__)

STAGES = ("teacher", "distill", "baseline", "fuse", "export", "bench", "report")
# folder of each stage's outputs, relative to the run directory
STAGE_DIRS = {"teacher": "teacher", "distill": "student", "baseline": "baseline/student", "fuse": "fused",
              "export": "export", "bench": "bench", "report": "report"}
TRAINING_STAGES = ("teacher", "distill", "baseline")
# the files a stage reads from the stages before it (relative to the run directory)
STAGE_INPUTS = {"distill": ["teacher/model.pt"], "fuse": ["student/model.pt"], "export": ["fused/model.pt"],
                "bench": ["fused/model.pt", "student/model.pt"],
                "report": ["teacher/metrics.json", "student/metrics.json", "fused/equivalence.json",
                           "export/equivalence.json", "bench/latency.json"]}
MANIFEST = "manifest.json"


def check_run_dir(run_dir: Path, cfg: PipelineConfig) -> None:
    """Refuse a run directory that holds a run on another dataset (its stages would be mixed up)."""
    previous = read_json(run_dir / MANIFEST) or {}
    dataset = previous.get("run", {}).get("dataset")
    if dataset is None and (run_dir / "config.yaml").exists():
        from pipeline.config import read_config_file

        try:
            dataset = read_config_file(run_dir / "config.yaml").get("data", {}).get("dataset")
        except BadInputError:
            dataset = None
    if dataset is not None and dataset != cfg.data.dataset:
        raise BadInputError(f"run directory {run_dir} holds a run on {dataset}, not {cfg.data.dataset}; "
                            "choose another --run-dir (nothing was changed)")


def force_from(run_dir: Path, stage: str) -> None:
    """Forget the results of ``stage`` and every stage after it, so that they run again."""
    if stage not in STAGES:
        raise unknown_name("stage", stage, STAGES)
    for name in STAGES[STAGES.index(stage):]:
        folder = run_dir / STAGE_DIRS[name]
        (folder / "stage.json").unlink(missing_ok=True)
        if name in TRAINING_STAGES and name == stage:  # retrain from scratch, not from the last checkpoint
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    log.info("run: --force %s: rerunning %s", stage, ", ".join(STAGES[STAGES.index(stage):]))


class Manifest:
    """``RUN_DIR/manifest.json``, rewritten atomically after every stage."""

    def __init__(self, run_dir: Path, cfg: PipelineConfig, profile: str | None):
        self.path = run_dir / MANIFEST
        self.run_dir = run_dir
        old = read_json(self.path) or {}
        self.data: dict[str, Any] = {
            "run": {"dataset": cfg.data.dataset, "teacher": cfg.teacher.model, "student": cfg.student.model,
                    "method": cfg.student.method, "profile": profile,
                    "created": old.get("run", {}).get("created", time.strftime("%Y-%m-%dT%H:%M:%S%z")),
                    "updated": None, "status": "running"},
            "exit_codes": {"0": "success", "1": "other pipeline failure", "2": "bad input", "3": "equivalence gate",
                           "4": "training diverged", "5": "export failed", "6": "cannot write (disk full, read-only)"},
            "stages": old.get("stages", {}),
        }

    def _hashes(self, files: list[str]) -> dict[str, str | None]:
        return {f: file_sha256(self.run_dir / f) if (self.run_dir / f).is_file() else None for f in files}

    def stage(self, name: str, status: str, **fields: Any) -> None:
        entry = self.data["stages"].setdefault(name, {})
        entry.update(status=status, **fields)
        if status == "complete":
            folder = self.run_dir / STAGE_DIRS[name]
            record = read_json(folder / "stage.json") or {}
            entry["settings_hash"] = record.get("settings_hash")
            entry["inputs"] = self._hashes(STAGE_INPUTS.get(name, []))
            entry["outputs"] = self._hashes([f"{STAGE_DIRS[name]}/{out}" for out in record.get("outputs", [])])
            entry.pop("error", None)
        self.save()

    def save(self, status: str | None = None) -> None:
        if status:
            self.data["run"]["status"] = status
        self.data["run"]["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(self.path, self.data)


def _marker(run_dir: Path, name: str) -> Any:
    return read_json(run_dir / STAGE_DIRS[name] / "stage.json")


def run_pipeline(cfg: PipelineConfig, run_dir: Path, ctx: DistContext, *, profile: str | None = None,
                 force: str | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Run every stage in order; returns the manifest. Raises the failing stage's PipelineError."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir, cfg)
    if force and ctx.is_main:
        force_from(run_dir, force)
    ctx.barrier()
    manifest = Manifest(run_dir, cfg, profile) if ctx.is_main else None
    if ctx.is_main:
        atomic_write_text(run_dir / "config.yaml", config_to_yaml(cfg))
    steps: list[tuple[str, Callable[[], Any], bool]] = [
        ("teacher", lambda: _teacher(cfg, run_dir, ctx, progress), True),
        ("distill", lambda: _distill(cfg, run_dir, ctx, progress), True),
        ("baseline", lambda: _baseline(cfg, run_dir, ctx, progress), True),
        ("fuse", lambda: _fuse(cfg, run_dir), False),
        ("export", lambda: _export(cfg, run_dir), False),
        ("bench", lambda: _bench(cfg, run_dir), False),
        ("report", lambda: _report(run_dir), False),
    ]
    for name, step, distributed in steps:
        if name == "baseline" and not cfg.baseline:
            continue
        if not distributed and not ctx.is_main:
            continue
        before = _marker(run_dir, name)
        resumed = before is None and (run_dir / STAGE_DIRS[name] / "checkpoints" / "last.pt").exists()
        if manifest:
            manifest.stage(name, "running", started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        start = time.perf_counter()
        try:
            step()
        except (PipelineError, OSError, KeyboardInterrupt) as exc:
            if manifest:
                code = getattr(exc, "exit_code", 6 if isinstance(exc, OSError) else 130)
                try:
                    manifest.stage(name, "failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                                   exit_code=code, wall_s=round(time.perf_counter() - start, 2))
                    manifest.save("failed")
                except OSError:
                    pass  # the run directory itself cannot be written: the error below says so
            raise
        wall = round(time.perf_counter() - start, 2)
        if manifest:
            # the stages fill in resolved settings (image size, Swin windows): keep config.yaml complete
            atomic_write_text(run_dir / "config.yaml", config_to_yaml(cfg))
            after = _marker(run_dir, name)
            action = "skipped" if before is not None and before == after else ("resumed" if resumed else "ran")
            fields = {"action": action, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            if action != "skipped":
                fields["wall_s"] = wall
            manifest.stage(name, "complete", **fields)
            log.info("run: %-8s %s in %.1f s", name, action, wall)
    if manifest:
        manifest.save("complete")
        return manifest.data
    return {}


# --------------------------------------------------------------------------- the steps

def _teacher(cfg: PipelineConfig, run_dir: Path, ctx: DistContext, progress: bool | None) -> Any:
    from pipeline.teacher import run_teacher

    return run_teacher(cfg, run_dir, ctx, progress)


def _distill(cfg: PipelineConfig, run_dir: Path, ctx: DistContext, progress: bool | None) -> Any:
    from pipeline.distill import run_distill

    return run_distill(cfg, run_dir, ctx, progress)


def baseline_config(cfg: PipelineConfig) -> PipelineConfig:
    """The same student, data and budget, trained alone (no teacher)."""
    base = copy.deepcopy(cfg)
    base.student.method = "none"
    base.student.method_options = {}
    return base


def _baseline(cfg: PipelineConfig, run_dir: Path, ctx: DistContext, progress: bool | None) -> Any:
    from pipeline.distill import run_distill

    return run_distill(baseline_config(cfg), run_dir / "baseline", ctx, progress)


def _fuse(cfg: PipelineConfig, run_dir: Path) -> Any:
    from pipeline.equivalence import Tolerances
    from pipeline.fuse import run_fuse

    f = cfg.fuse
    return run_fuse(run_dir, Tolerances(f.fp64_tol, f.fp32_tol, f.min_top1_agreement), cfg.data.data_root, f.images)


def _export(cfg: PipelineConfig, run_dir: Path) -> Any:
    from pipeline.equivalence import Tolerances
    from pipeline.export import ExportSettings, run_export

    e = cfg.export
    settings = ExportSettings(tuple(e.formats), e.opset, e.exporter, e.images,
                              Tolerances(fp32_rel=e.fp32_tol, min_top1_agreement=e.min_top1_agreement))
    return run_export(run_dir, settings, cfg.data.data_root)


def _bench(cfg: PipelineConfig, run_dir: Path) -> Any:
    from pipeline.bench import parse_devices, run_bench
    from pipeline.latency import Budget
    from pipeline.machine import usable_cores

    b = cfg.bench
    budget = Budget(threads=b.threads or usable_cores(), warmup=b.warmup, iterations=b.iterations,
                    duration=b.duration)
    return run_bench(run_dir, tuple(b.backends), parse_devices(b.device), tuple(b.batch_sizes), budget, reuse=True)


def _report(run_dir: Path) -> Any:
    from pipeline.report import write_report

    return write_report(run_dir)
