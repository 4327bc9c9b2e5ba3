"""The fuse stage (``pipeline fuse``): fold the student's branches into the stock architecture, proven equal.

Reads ``RUN_DIR/student/{model.pt, metrics.json}``, writes ``RUN_DIR/fused/``:
``model.pt`` (plain state dict that loads strictly into the torchvision
class), ``model.json`` (what is needed to rebuild and feed it) and
``equivalence.json``. A failed gate exits non-zero (code 3) and writes no
model; ``RUN_DIR/student/`` is only read.
"""
from __future__ import annotations

import logging
from typing import Any

from exporters.equivalence import Tolerances, fusion_checks, gate
from models import get_spec
from models.reparam import fuse_model
from pipeline.layout import RunLayout
from pipeline.stages.base import Stage, StageRun, StageSpec, evaluated_on
from pipeline.stages.loaders import held_out, load_student, run_seed, top1_accuracy
from pipeline.training.checkpoint import atomic_save, atomic_write_json, file_sha256, settings_digest

log = logging.getLogger(__name__)


def run_fuse(layout: RunLayout, tol: Tolerances, data_root: str | None = None, images: int = 256) -> dict[str, Any]:
    """Fuse and gate; skipped when the fused model of this very student with these settings exists."""
    stage = Stage(layout.fused, "fused")
    student = layout.student.model
    # without the student file there is nothing to fingerprint: load_student below says what to run first
    settings_hash = settings_digest({"tolerances": vars(tol), "images": images,
                                     "student": file_sha256(student) if student.is_file() else None})
    done = stage.finished(settings_hash)
    if done is not None:
        log.info("fuse: the fused model of this student is up to date; skipping")
        return done
    model, meta = load_student(layout)
    real = held_out(meta, data_root, images)[0]
    checks = fusion_checks(model, fuse_model, real, meta["image_size"], tol)
    report = {"passed": all(c.passed for c in checks), "tolerances": vars(tol),
              "checks": [c.as_dict() for c in checks]}
    atomic_write_json(stage.folder.equivalence, report)
    for c in checks:
        log.info("fuse: %-30s %-7s max abs diff %.2e (tol %.1e), top-1 agreement %.1f%% -> %s", c.name, c.dtype,
                 c.max_abs_diff, c.tolerance, c.top1_agreement, "ok" if c.passed else "FAILED")
    if not report["passed"]:
        stage.marker.unlink(missing_ok=True)
        stage.folder.model.unlink(missing_ok=True)
    gate(checks, "fusion")

    fused = fuse_model(model.float())
    arch = meta["arch"]
    spec = get_spec(arch["name"])
    info = {"architecture": spec.torchvision_name, "zoo_name": spec.name, "num_classes": arch["num_classes"],
            "classes": meta["classes"], "dataset": meta["dataset"], "input_size": [3, meta["image_size"], meta["image_size"]],
            "channel_order": "RGB", "mean": meta["mean"], "std": meta["std"],
            "pixel_scale": "divide uint8 pixels by 255, then subtract mean and divide by std",
            "source": str(layout.student.model), "multibranch": arch.get("multibranch")}
    # the fused network's own accuracy on the images the student was evaluated on (the same split and subset)
    test_images, test_labels = held_out(meta, data_root, meta["test_images"], run_seed(layout))
    split = evaluated_on(meta.get("validation"))
    metrics = {"top1": top1_accuracy(fused, test_images, test_labels), "test_images": len(test_labels),
               "multibranch_top1": meta.get("top1"), **split}
    log.info("fuse: fused student %s top-1 %.2f%% (multi-branch %.2f%%) on %d images", split["eval_split"],
             metrics["top1"], meta.get("top1", float("nan")), len(test_labels))
    atomic_save(fused.state_dict(), stage.folder.model)
    atomic_write_json(stage.folder.model_info, info)
    atomic_write_json(stage.folder.metrics, metrics)
    stage.mark_complete(settings_hash, list(STAGE.outputs),
                        {"architecture": spec.torchvision_name, "equivalence_passed": True, "top1": metrics["top1"]})
    log.info("fuse: %s fused into stock %s -> %s", arch["name"], spec.torchvision_name, stage.folder.model)
    return report


def run_fuse_stage(run: StageRun) -> dict[str, Any]:
    f = run.cfg.fuse
    return run_fuse(run.layout, Tolerances(f.fp64_tol, f.fp32_tol, f.min_top1_agreement), run.cfg.data.data_root,
                    f.images)


STAGE = StageSpec(name="fuse", folder=lambda layout: layout.fused, run=run_fuse_stage,
                  inputs=lambda layout: [layout.student.model],
                  outputs=("model.pt", "model.json", "equivalence.json", "metrics.json"))
