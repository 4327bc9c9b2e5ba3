"""The teacher-output cache (pipeline/methods/teacher_cache.py) with a real Swin teacher and a real student."""
from __future__ import annotations

import copy

import pytest
import torch

from pipeline.config import StudentConfig
from pipeline.stages.distill import make_teacher_cache
from pipeline.training.data import BatchPreprocessor
from pipeline.training.tasks import DistillTask
from pipeline.training.teacher_cache import TeacherOutputCache, input_digests
from tests.test_kdiffusion import swin_kdiffusion_task


@pytest.fixture(scope="module")
def task() -> DistillTask:
    """KDiffusion at three points (three taps + logits through the cache) with a logit-KD term."""
    return swin_kdiffusion_task(0, m=2)


def _step(task: DistillTask, images: torch.Tensor, labels: torch.Tensor):
    """One training forward/backward from a fixed RNG state: the losses and every parameter gradient."""
    torch.manual_seed(1)  # the branch shuffle draws from the global generator
    task.train()
    _, losses = task(images, labels)
    losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}
    return {k: v.item() for k, v in losses.items()}, grads


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-4), (torch.float16, 2e-3)])
def test_cached_teacher_gives_the_live_losses_and_gradients(task, dtype, rel):
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    live_losses, live_grads = _step(copy.deepcopy(task), images, labels)
    cached = copy.deepcopy(task)
    cache = TeacherOutputCache(2**30, dtype)
    names = cached.method.teacher_taps
    order = torch.randperm(8)  # fill it in another order and other batches than the step will ask for
    cache.fetch(cached.teacher.with_features, images[order[:5]], names)
    cache.fetch(cached.teacher.with_features, images[order[5:]], names)
    cache.reset_counts()
    cached.teacher_cache = cache
    cached_losses, cached_grads = _step(cached, images, labels)
    assert cache.hits == 8 and cache.misses == 0  # the teacher did not run
    assert set(cached_losses) == {"ce", "diff", "guided", "kd", "loss"}
    for name, value in live_losses.items():
        assert cached_losses[name] == pytest.approx(value, rel=rel, abs=1e-6), name
    assert cached_grads.keys() == live_grads.keys()
    floor = 1e-3 * max(g.abs().max() for g in live_grads.values())  # tensors with ~no gradient: rounding noise
    for name, grad in live_grads.items():
        scale = torch.maximum(grad.abs().max(), floor)
        assert (cached_grads[name] - grad).abs().max() / scale < 10 * rel, name


def test_misses_run_the_teacher_on_new_images_only_and_the_bound_holds(task):
    teacher = task.teacher
    calls: list[int] = []

    def counted(images: torch.Tensor, names: list[str]):
        calls.append(len(images))
        return teacher.with_features(images, names)

    names = task.method.teacher_taps
    images = torch.randn(6, 3, 32, 32)
    entry = TeacherOutputCache(2**30, torch.float32)
    entry.fetch(counted, images[:1], names)
    room = 3 * (entry.bytes_used)  # room for three images
    cache = TeacherOutputCache(room, torch.float32)
    logits, feats = cache.fetch(counted, images[:4], names)
    assert len(cache) == 3 and cache.bytes_used <= room  # the fourth image did not fit
    live_logits, live_feats = teacher.with_features(images[:4], names)
    assert torch.allclose(logits, live_logits, atol=1e-5)
    assert all(torch.allclose(feats[n], live_feats[n], atol=1e-5) for n in names)
    calls.clear()
    cache.fetch(counted, images[2:6], names)  # images 2 cached; 3 (not stored), 4, 5 new
    assert calls == [3] and cache.hits == 1


def test_keys_follow_the_input_itself():
    images = torch.randn(3, 3, 32, 32)
    keys = input_digests(images)
    assert len(set(keys)) == 3 and input_digests(images.clone()) == keys
    assert input_digests(images.flip(-1)) != keys  # the flipped version of an image is another entry
    assert input_digests(images.reshape(3, 3, 16, 64))[0] != keys[0]  # same bytes, other shape
    nudged = images.clone()
    nudged[0, 0, 0, 0] += 1e-6
    assert input_digests(nudged)[0] != keys[0]


def test_float16_overflow_widens_the_cache():
    def teacher(images: torch.Tensor, names: list[str]):
        return images.flatten(1)[:, :4] * 1e6, {}

    cache = TeacherOutputCache(2**20, torch.float16)
    first = torch.randn(2, 1, 2, 2)
    cache.fetch(teacher, first, [])
    logits, _ = cache.fetch(teacher, first, [])
    assert cache.dtype == torch.float32 and torch.isfinite(logits).all()
    assert torch.allclose(logits, first.flatten(1)[:, :4] * 1e6)


def test_the_cache_is_on_only_where_augmentation_repeats_inputs():
    student = StudentConfig()
    assert isinstance(make_teacher_cache(student, "flip"), TeacherOutputCache)
    assert isinstance(make_teacher_cache(student, "none"), TeacherOutputCache)
    assert make_teacher_cache(student, "crop-flip") is None  # random crops: nearly every input is new
    assert make_teacher_cache(StudentConfig(teacher_cache="off"), "flip") is None
    assert make_teacher_cache(StudentConfig(teacher_cache_mb=0), "none") is None
    assert make_teacher_cache(StudentConfig(teacher_cache_dtype="float32"), "flip").dtype == torch.float32


def test_flip_augmentation_yields_two_keys_per_image_across_epochs():
    """With 'flip' the preprocessed inputs repeat across epochs (so the cache pays); with crop-flip they do not."""
    images = torch.randint(0, 255, (64, 1, 28, 28), dtype=torch.uint8)
    indices = torch.arange(64)

    def distinct(augment: str, epochs: int = 6) -> int:
        prep = BatchPreprocessor(32, (0.5,) * 3, (0.25,) * 3, seed=0, augment=augment)
        return len({k for e in range(epochs) for k in input_digests(prep(images, indices, e, 64))})

    assert distinct("none") == 64
    assert 64 < distinct("flip") <= 128
    assert distinct("crop-flip") > 3 * 64


@pytest.mark.slow
def test_torchrun_with_the_cache_trains_what_the_live_teacher_trains(tmp_path, stripes_root, stripes_teacher):
    """KDiffusion (teacher, projectors, branch blocks) under a real 2-process torchrun, with sharded samplers:
    each rank caches its own images; the result equals the live teacher's."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import ROOT, TINY

    run_dir = stripes_teacher  # read only: the teacher checkpoint
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    states = {}
    for cache in ("auto", "off"):
        config = tmp_path / f"{cache}.yaml"
        config.write_text(f"student:\n  teacher_cache: {cache}\n  teacher_cache_dtype: float32\n")
        out = tmp_path / cache
        result = subprocess.run(
            [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "pipeline", "distill", "--student",
             "shufflenetv2_x0_5", "--method", "kdiffusion", "--branches", "2", "--epochs", "2", "--augment", "none",
             "--optimizer", "sgd", "--lr", "0.05", "--config", str(config), "--data-root", str(stripes_root),
             "--teacher-ckpt", str(run_dir / "teacher" / "model.pt"), "--run-dir", str(out), *TINY],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        if cache == "auto":
            last = [line for line in result.stderr.splitlines() if "teacher cache in the last epoch" in line]
            assert last and ", 0 hits and" not in last[0], result.stderr[-3000:]  # rank 0 reused its epoch-1 images
        metrics = json.loads((out / "student" / "metrics.json").read_text())
        assert metrics["world_size"] == 2 and metrics["replica_max_abs_diff"] == 0.0
        states[cache] = torch.load(out / "student" / "model.pt", weights_only=True)
        # the saved student holds no projector, teacher or DDP wrapper state
        assert not any(k.startswith(("method.", "teacher", "module.")) for k in states[cache])
    diff = max((states["auto"][k].double() - states["off"][k].double()).abs().max().item()
               for k in states["off"] if states["off"][k].is_floating_point())
    assert diff < 1e-4, f"cached and live teacher runs differ by {diff:.2e}"


def test_yaml_off_turns_the_cache_off(tmp_path):
    from pipeline.config import resolve_config

    config = tmp_path / "c.yaml"
    config.write_text("student:\n  teacher_cache: off\n")  # YAML 1.1 reads a bare off as False
    assert resolve_config(config).student.teacher_cache == "off"


def test_cache_works_inside_bf16_autocast(task):
    """`--precision bf16` (or auto's probe on a CPU with native bf16) steps in bf16 autocast with the cache on:
    float16 rows must not meet CPU bf16 autocast."""
    cache = TeacherOutputCache(2**30, torch.float16)
    images = torch.randn(4, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = cache.fetch(task.teacher.with_features, images, task.method.teacher_taps)
        again = cache.fetch(task.teacher.with_features, images, task.method.teacher_taps)
    assert cache.hits == 4 and first[0].dtype == torch.float32 and torch.equal(first[0], again[0])
    assert first[1].keys() == again[1].keys() and all(torch.equal(first[1][k], again[1][k]) for k in first[1])
