"""Rebuilding what earlier stages saved, and the held-out images the gates compare on.

One loader per saved model (teacher, multi-branch student, fused student), each
rebuilding the network from the metadata beside its weights and loading them
strictly with ``weights_only=True``; a missing or mismatched file is a one-line
BadInputError naming it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models import ModelError, build_model, get_spec
from models.reparam import build_multibranch_student
from pipeline.errors import BadInputError
from pipeline.layout import RunLayout, StageFolder
from pipeline.training.checkpoint import load_checkpoint, load_weights_into, read_json
from pipeline.training.data import BatchPreprocessor, DataBundle, load_dataset, stratified_subset, validation_split


def read_sidecar(path: Path, keys: tuple[str, ...], missing_hint: str) -> dict[str, Any]:
    """A stage's JSON record with the (dotted) keys a loader needs; a missing, unreadable or malformed file is one
    line naming it (``missing_hint`` says what to run), never a KeyError."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise BadInputError(f"{path} is missing or unreadable; {missing_hint}")
    for key in keys:
        node: Any = data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise BadInputError(f"{path} is malformed (no '{key}'); delete its stage folder and run that stage "
                                    "again")
            node = node[part]
    return data


TRAINED_KEYS = ("arch.name", "arch.num_classes", "arch.image_size")
STUDENT_KEYS = (*TRAINED_KEYS, "dataset", "classes", "mean", "std", "image_size", "test_images")
FUSED_KEYS = ("zoo_name", "architecture", "num_classes", "input_size", "classes", "mean", "std")


def load_teacher(path: Path, bundle: DataBundle, image_size: int,
                 data: bytes | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a finished teacher from its ``model.pt`` (any path, e.g. ``--teacher-ckpt``) and the
    ``metrics.json`` of the stage folder beside it; ``data``: the bytes of ``model.pt`` as the caller read and
    hashed them (the file is not read again, so the teacher a record names is the one that was loaded)."""
    meta = read_sidecar(StageFolder(path.parent).metrics, TRAINED_KEYS, "train the teacher with `pipeline "
                        "teacher` or give --teacher-ckpt DIR/teacher/model.pt")
    arch = meta["arch"]
    if arch["num_classes"] != bundle.num_classes:
        raise BadInputError(f"teacher checkpoint {path} has {arch['num_classes']} classes but dataset "
                            f"{bundle.name} has {bundle.num_classes}")
    if arch["image_size"] != image_size:
        raise BadInputError(f"teacher checkpoint {path} was trained at {arch['image_size']}x{arch['image_size']} "
                            f"but the student runs at {image_size}x{image_size} (set --image-size)")
    spec = get_spec(arch["name"])
    options = {k: arch[k] for k in ("window_per_stage", "drop_path") if k in arch and k in spec.options}
    try:
        model, _, _ = build_model(spec.name, arch["num_classes"], image_size, **options)
        model.load_state_dict(load_checkpoint(path, "teacher checkpoint", data), strict=True)
    except (ModelError, RuntimeError) as exc:
        raise BadInputError(f"teacher checkpoint {path} does not match its metadata: "
                            f"{str(exc).splitlines()[0]}") from None
    return model, meta


def load_student(layout: RunLayout) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the multi-branch student saved by the distill stage."""
    folder = layout.student
    meta = read_sidecar(folder.metrics, STUDENT_KEYS, f"no finished student in {folder.path}: run `pipeline "
                        "distill` first")
    arch = meta["arch"]
    mb = arch.get("multibranch", {})
    try:
        model, _ = build_multibranch_student(arch["name"], arch["num_classes"], arch["image_size"], mb.get("m", 1),
                                             mb.get("points", "single"), mb.get("rep_blocks", "none"))
    except ModelError as exc:
        raise BadInputError(f"cannot rebuild the student of {folder.path}: {exc}") from None
    load_weights_into(model, folder.model, "student checkpoint", folder.metrics)
    return model, meta


def fused_info(layout: RunLayout) -> dict[str, Any]:
    """The finished fuse stage's ``model.json`` (how to rebuild and feed the fused student)."""
    folder = layout.fused
    record = read_json(folder.marker)
    if not isinstance(record, dict) or record.get("status") != "complete" or not folder.model.is_file():
        raise BadInputError(f"no fused student in {folder.path} (model.pt, model.json or stage.json missing); "
                            "run `pipeline fuse` first")
    return read_sidecar(folder.model_info, FUSED_KEYS, f"no fused student in {folder.path}: run `pipeline fuse` "
                        "first")


def load_fused(layout: RunLayout) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The fused student as its stock torchvision class (float32, eval mode), and its ``model.json``."""
    folder = layout.fused
    info = fused_info(layout)
    try:
        model, _, _ = build_model(info["zoo_name"], info["num_classes"], info["input_size"][-1], role="student")
    except ModelError as exc:
        raise BadInputError(f"cannot rebuild the fused student of {folder.path}: {exc}") from None
    load_weights_into(model, folder.model, "fused student", folder.model_info)
    return model.float().eval(), info


def dataset_of(layout: RunLayout, info: dict[str, Any]) -> str:
    """The dataset the fused student of ``info`` (its ``model.json``) was trained on."""
    if "dataset" in info:
        return info["dataset"]
    student = read_json(layout.student.metrics) or {}
    if "dataset" not in student:
        raise BadInputError(f"cannot tell which dataset {layout.root} was trained on (no student/metrics.json)")
    return student["dataset"]


def run_seed(layout: RunLayout) -> int:
    """The run's seed (it chose the test subset); 0 when the run has no readable config.yaml."""
    import yaml

    try:
        return int(yaml.safe_load(layout.config.read_text()).get("seed", 0))
    except (OSError, yaml.YAMLError, AttributeError, ValueError, TypeError):
        return 0


def held_out(meta: dict[str, Any], data_root: str | None, count: int, seed: int = 0, split: str = "test"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` preprocessed images of the split the student was evaluated on (``split="train"``: of the images
    it trained on, e.g. for INT8 calibration), stratified and seeded, and their labels.

    ``meta`` needs ``dataset`` and ``image_size``; its ``validation`` (a student's metrics.json has it) says the
    student was evaluated on that many images held out of the training split, not on the test split."""
    bundle = load_dataset(meta["dataset"], data_root, False, meta["image_size"])
    evaluated, trained = (validation_split(bundle.train, meta["validation"]) if meta.get("validation")
                          else (bundle.test, bundle.train))
    source = evaluated if split == "test" else trained
    chosen = stratified_subset(source, min(count, len(source)), seed, "eval_subset" if split == "test" else split)
    items = [chosen[i] for i in range(len(chosen))]
    images = torch.stack([item[0] for item in items])
    labels = torch.tensor([int(item[1]) for item in items])
    return BatchPreprocessor(meta["image_size"], bundle.mean, bundle.std)(images), labels


@torch.no_grad()
def top1_accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    model = model.eval()
    correct = sum((model(chunk).argmax(1) == target).sum().item()
                  for chunk, target in zip(images.split(batch_size), labels.split(batch_size)))
    return 100.0 * correct / max(1, len(labels))
