"""Cost of a distillation epoch relative to a student-alone epoch, measured side by side in one process.

Three tasks train on the same batches at the distill stage's default settings (ShuffleNetV2 x1.0 student,
KDiffusion m=4 at the single default point, batch 128, flip augmentation, 32x32 Fashion-MNIST, fp32,
the engine's fused AdamW): the student alone (method ``none``), KDiffusion with the live teacher, and
KDiffusion with the teacher-output cache (pipeline/methods/teacher_cache.py). Their training steps are
interleaved batch by batch, in a rotating order, so a machine shared with other jobs slows all three
alike; each task's epoch time is the sum of its step times (forward, backward, optimizer step).

    OMP_NUM_THREADS=1 python benchmarks/distill_overhead.py --teacher-ckpt RUN/teacher/model.pt

The cache's misses follow the augmentation, not the data size: with random flips epoch k runs the
teacher on about 2^-(k-1) of the images, so a training subset (--subset) gives the same ratios as the
full set, in less time.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch


from models import get_spec
from models.reparam import build_multibranch_student
from pipeline.config import PipelineConfig
from pipeline.training.data import BatchPreprocessor, load_dataset, stratified_subset
from pipeline.stages.loaders import load_teacher
from pipeline.stages.distill import (make_teacher_cache, teacher_precision,
                              setup_feature_method)
from pipeline.training.engine import make_optimizer
from pipeline.methods import get_method
from pipeline.training.tasks import DistillTask, FrozenTeacher


def build_task(method_name: str, cfg: PipelineConfig, teacher: FrozenTeacher | None, sample: torch.Tensor,
               num_classes: int, image_size: int, cached: bool) -> DistillTask:
    """The distill stage's task for one method, as ``run_distill`` builds it (same seed for every task)."""
    s = cfg.student
    torch.manual_seed(cfg.seed)
    student, arch = build_multibranch_student(s.model, num_classes, image_size, s.m, s.points, s.rep_blocks)
    points = arch["multibranch"]["distill_points"]
    method = get_method(method_name)(label_smoothing=s.train.label_smoothing)
    if hasattr(method, "setup"):
        setup_feature_method(method, student, teacher, points, s.m, sample)
    cache = make_teacher_cache(s, cfg.data.augment) if cached else None
    if cached and cache is None:
        sys.exit(f"the teacher cache is off for augmentation '{cfg.data.augment}'")
    return DistillTask(student, method, teacher if method.needs_teacher else None,
                       {p["tap"]: p["conv"] for p in points}, cache).train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-ckpt", required=True, help="a finished 32x32 Fashion-MNIST teacher's model.pt")
    parser.add_argument("--subset", type=int, default=6400, help="training images (stratified)")
    parser.add_argument("--epochs", type=int, help="default: the student's default epochs")
    parser.add_argument("--augment", choices=["flip", "none"], help="default: the default augmentation (flip)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = PipelineConfig()  # the default settings
    if args.augment:
        cfg.data.augment = args.augment
    s, train_cfg = cfg.student, cfg.student.train
    epochs = args.epochs or train_cfg.epochs
    bundle = load_dataset(cfg.data.dataset, None, False, None)
    image_size = bundle.default_image_size
    train = stratified_subset(bundle.train, args.subset, cfg.seed, "subset")
    prep = BatchPreprocessor(image_size, bundle.mean, bundle.std, seed=cfg.seed, augment=cfg.data.augment)
    device = torch.device("cpu")

    teacher_model, meta = load_teacher(Path(args.teacher_ckpt), bundle, image_size)
    sample_images, _, _ = train.__getitems__(list(range(64)))
    sample = prep(sample_images)
    precision = teacher_precision(cfg.student.teacher_precision, device)
    teacher = FrozenTeacher(teacher_model, precision, get_spec(meta["arch"]["name"]).taps)

    tasks = {"student alone": build_task("none", cfg, None, sample, bundle.num_classes, image_size, False),
             "kdiffusion, live teacher": build_task(s.method, cfg, teacher, sample, bundle.num_classes, image_size,
                                                    False),
             "kdiffusion, cached teacher": build_task(s.method, cfg, teacher, sample, bundle.num_classes, image_size,
                                                      True)}
    optimizers = {name: make_optimizer(task, train_cfg) for name, task in tasks.items()}
    names = list(tasks)
    times = {name: [0.0] * epochs for name in names}
    hit_rates = []
    print(f"default settings: student {s.model} m={s.m} points={s.points}, method {s.method}, batch "
          f"{train_cfg.batch_size}, augment {cfg.data.augment}, {image_size}x{image_size}, {epochs} epochs of "
          f"{len(train)} images; teacher {meta['arch']['name']} ({meta['top1']}% top-1) in {precision}; "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    steps_per_epoch = len(train) // train_cfg.batch_size
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        for b in range(steps_per_epoch):
            idx = order[b * train_cfg.batch_size:(b + 1) * train_cfg.batch_size]
            images, labels, idx = train.__getitems__(idx.tolist())
            x = prep(images, idx, epoch, len(train))
            for name in names[step % 3:] + names[:step % 3]:  # rotate who goes first
                task, optimizer = tasks[name], optimizers[name]
                task.set_progress(epoch + b / steps_per_epoch)
                start = time.perf_counter()
                _, losses = task(x, labels)
                optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                optimizer.step()
                times[name][epoch] += time.perf_counter() - start
            step += 1
        cache = tasks["kdiffusion, cached teacher"].teacher_cache
        hit_rates.append(cache.stats()["hit_rate"])
        print(f"epoch {epoch + 1}: " + ", ".join(f"{n} {times[n][epoch]:.1f} s" for n in names) +
              f"; cache hit rate {hit_rates[-1]:.1%}", flush=True)
        cache.reset_counts()

    alone = times["student alone"]
    print("\n| task | " + " | ".join(f"epoch {e + 1}" for e in range(epochs)) + " | all epochs |")
    print("|---|" + "---|" * (epochs + 1))
    for name in names:
        cells = [f"{t:.1f} s ({t / a:.2f}x)" for t, a in zip(times[name], alone)]
        total = sum(times[name])
        print(f"| {name} | " + " | ".join(cells) + f" | {total:.1f} s ({total / sum(alone):.2f}x) |")
    print("| cache hit rate | " + " | ".join(f"{h:.1%}" for h in hit_rates) + " | |")

    # What float16 storage costs: cached vs live teacher outputs on one training batch.
    cache = tasks["kdiffusion, cached teacher"].teacher_cache
    taps = tasks["kdiffusion, cached teacher"].method.teacher_taps
    images, labels, idx = train.__getitems__(order[:train_cfg.batch_size].tolist())
    x = prep(images, idx, epochs - 1, len(train))
    cached_logits, cached_feats = cache.fetch(teacher.with_features, x, taps)
    live_logits, live_feats = teacher.with_features(x, taps)
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    print(f"\ncache: {cache.stats()}; stored vs live teacher outputs (max abs diff / max abs): logits "
          f"{rel(cached_logits, live_logits):.2e}, " + ", ".join(f"{t} {rel(cached_feats[t], live_feats[t]):.2e}"
                                                               for t in taps))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs), "
          f"torch {torch.__version__}, load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
