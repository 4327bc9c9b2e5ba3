"""The fuse stage (``pipeline fuse``): fold the student's branches into the stock architecture, proven equal.

Reads ``RUN_DIR/student/{model.pt, metrics.json}``, writes ``RUN_DIR/fused/``:
``model.pt`` (plain state dict that loads strictly into the torchvision
class), ``model.json`` (what is needed to rebuild and feed it) and
``equivalence.json``. A failed gate exits non-zero (code 3) and writes no
model; ``RUN_DIR/student/`` is only read.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from models import ModelError, get_spec
from models.reparam import build_multibranch_student, fuse_model
from pipeline.checkpoint import (atomic_save, atomic_write_json, file_sha256, load_weights_into, read_json,
                                 settings_digest)
from pipeline.data import BatchPreprocessor, load_dataset, stratified_subset
from pipeline.equivalence import Tolerances, fusion_checks, gate
from pipeline.errors import BadInputError
from pipeline.stage import Stage

log = logging.getLogger(__name__)


def load_student(run_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the multi-branch student saved by the distill stage."""
    student_dir = Path(run_dir) / "student"
    meta = read_json(student_dir / "metrics.json")
    if not isinstance(meta, dict) or "arch" not in meta:
        raise BadInputError(f"no finished student in {student_dir} (metrics.json missing or unreadable); "
                            "run `pipeline distill` first")
    arch = meta["arch"]
    mb = arch.get("multibranch", {})
    try:
        model, _ = build_multibranch_student(arch["name"], arch["num_classes"], arch["image_size"], mb.get("m", 1),
                                             mb.get("points", "single"), mb.get("rep_blocks", "none"))
    except ModelError as exc:
        raise BadInputError(f"cannot rebuild the student of {student_dir}: {exc}") from None
    load_weights_into(model, student_dir / "model.pt", "student checkpoint", student_dir / "metrics.json")
    return model, meta


def held_out(meta: dict[str, Any], data_root: str | None, count: int, seed: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` preprocessed images of the test split the student was evaluated on, and their labels."""
    bundle = load_dataset(meta["dataset"], data_root, False, meta["image_size"])
    test = stratified_subset(bundle.test, min(count, len(bundle.test)), seed, "eval_subset")
    items = [test[i] for i in range(len(test))]
    images = torch.stack([item[0] for item in items])
    labels = torch.tensor([int(item[1]) for item in items])
    return BatchPreprocessor(meta["image_size"], bundle.mean, bundle.std)(images), labels


def held_out_images(meta: dict[str, Any], data_root: str | None, count: int, seed: int = 0) -> torch.Tensor:
    return held_out(meta, data_root, count, seed)[0]


@torch.no_grad()
def top1_accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    model = model.eval()
    correct = sum((model(chunk).argmax(1) == target).sum().item()
                  for chunk, target in zip(images.split(batch_size), labels.split(batch_size)))
    return 100.0 * correct / max(1, len(labels))


def run_seed(run_dir: Path) -> int:
    """The run's seed (it chose the test subset); 0 when the run has no readable config.yaml."""
    import yaml

    try:
        return int(yaml.safe_load((run_dir / "config.yaml").read_text()).get("seed", 0))
    except (OSError, yaml.YAMLError, AttributeError, ValueError, TypeError):
        return 0


def run_fuse(run_dir: Path, tol: Tolerances, data_root: str | None = None, images: int = 256) -> dict[str, Any]:
    """Fuse and gate; skipped when the fused model of this very student with these settings exists."""
    run_dir = Path(run_dir)
    model, meta = load_student(run_dir)
    stage = Stage(run_dir, "fused")
    settings_hash = settings_digest({"tolerances": vars(tol), "images": images,
                                     "student": file_sha256(run_dir / "student" / "model.pt")})
    done = stage.finished(settings_hash)
    if done is not None:
        log.info("fuse: the fused model of this student is up to date; skipping")
        return done
    real = held_out_images(meta, data_root, images)
    checks = fusion_checks(model, fuse_model, real, meta["image_size"], tol)
    report = {"passed": all(c.passed for c in checks), "tolerances": vars(tol),
              "checks": [c.as_dict() for c in checks]}
    atomic_write_json(stage.dir / "equivalence.json", report)
    for c in checks:
        log.info("fuse: %-30s %-7s max abs diff %.2e (tol %.1e), top-1 agreement %.1f%% -> %s", c.name, c.dtype,
                 c.max_abs_diff, c.tolerance, c.top1_agreement, "ok" if c.passed else "FAILED")
    if not report["passed"]:
        stage.marker.unlink(missing_ok=True)
        (stage.dir / "model.pt").unlink(missing_ok=True)
    gate(checks, "fusion")

    fused = fuse_model(model.float())
    arch = meta["arch"]
    spec = get_spec(arch["name"])
    info = {"architecture": spec.torchvision_name, "zoo_name": spec.name, "num_classes": arch["num_classes"],
            "classes": meta["classes"], "dataset": meta["dataset"], "input_size": [3, meta["image_size"], meta["image_size"]],
            "channel_order": "RGB", "mean": meta["mean"], "std": meta["std"],
            "pixel_scale": "divide uint8 pixels by 255, then subtract mean and divide by std",
            "source": str(run_dir / "student" / "model.pt"), "multibranch": arch.get("multibranch")}
    # the fused network's own accuracy on the student's test split (the same images, the same subset)
    test_images, test_labels = held_out(meta, data_root, meta["test_images"], run_seed(run_dir))
    metrics = {"top1": top1_accuracy(fused, test_images, test_labels), "test_images": len(test_labels),
               "multibranch_top1": meta.get("top1")}
    log.info("fuse: fused student test top-1 %.2f%% (multi-branch %.2f%%) on %d images", metrics["top1"],
             meta.get("top1", float("nan")), len(test_labels))
    atomic_save(fused.state_dict(), stage.dir / "model.pt")
    atomic_write_json(stage.dir / "model.json", info)
    atomic_write_json(stage.dir / "metrics.json", metrics)
    stage.mark_complete(settings_hash, ["model.pt", "model.json", "equivalence.json", "metrics.json"],
                        {"architecture": spec.torchvision_name, "equivalence_passed": True, "top1": metrics["top1"]})
    log.info("fuse: %s fused into stock %s -> %s", arch["name"], spec.torchvision_name, stage.dir / "model.pt")
    return report
