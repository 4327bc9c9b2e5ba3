"""The one training loop shared by every training stage.

A stage hands :func:`fit` a *task*: an ``nn.Module`` whose ``forward(images,
labels)`` returns ``(logits, {name: loss})`` with the total under ``"loss"``,
and whose ``model`` attribute is the network that is evaluated and saved
(the task may own extra training-only modules, e.g. projectors). The engine
does the rest: DDP, mixed precision, schedules, clipping, evaluation, metrics,
atomic checkpoints every epoch, and bit-exact resume.

Written into the stage's folder (:class:`pipeline.layout.StageFolder`)::

    checkpoints/last.pt   everything needed to resume (atomic, every epoch)
    checkpoints/best.pt   model weights of the best test top-1 so far
    metrics.jsonl         one JSON line per finished epoch
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from pipeline.training.checkpoint import atomic_save, atomic_write_text, capture_rng, load_checkpoint, restore_rng, seed_everything
from pipeline.config import TrainConfig
from pipeline.training.data import BatchPreprocessor, collate, default_num_workers
from pipeline.training.distributed import DistContext
from pipeline.training.progress import ProgressLines
from pipeline.errors import BadInputError, TrainingDivergedError
from pipeline.layout import StageFolder

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 1
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class FitResult:
    top1: float
    top5: float
    test_loss: float
    best_top1: float
    best_epoch: int
    epochs: int
    precision: str
    train_time_s: float
    train_images_per_s: float
    resumed_from_epoch: int
    replica_max_abs_diff: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- schedule


def lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (linear warm-up, then the schedule)."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if cfg.schedule == "step":
        epoch = step // steps_per_epoch
        return cfg.step_gamma ** sum(epoch >= m for m in cfg.step_milestones)
    return 1.0


def no_decay_names(task: nn.Module) -> set[str]:
    """The parameters that a submodule's ``no_weight_decay()`` (names relative to it) keeps out of weight decay,
    by their names in ``task``."""
    return {f"{prefix}.{name}" if prefix else name for prefix, module in task.named_modules()
            if callable(getattr(module, "no_weight_decay", None)) for name in module.no_weight_decay()}


def make_optimizer(task: nn.Module, cfg: TrainConfig):
    """AdamW or SGD over ``task``'s trainable parameters; biases and norm weights (1-d tensors) get no weight
    decay, nor the parameters a module names in its ``no_weight_decay()`` (a learned variance, say: decay would
    pull it towards a fixed value).

    The fused (single-kernel) implementations are used: on a CPU, fused AdamW
    takes a quarter of the time of the default one per step (25 vs 105 ms
    for Swin-T's 28M parameters here), about 13% of a training step.
    """
    named, exempt = [(n, p) for n, p in task.named_parameters() if p.requires_grad], no_decay_names(task)
    decay = [p for n, p in named if p.ndim > 1 and n not in exempt]
    no_decay = [p for n, p in named if p.ndim <= 1 or n in exempt]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, fused=True)


def autocast(device: torch.device, precision: str):
    dtype = DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ----------------------------------------------------------------------------- data


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation sharding without padding: rank r takes samples r, r+W, ... (nothing counted twice)."""

    def __init__(self, size: int, rank: int, world: int):
        self.indices = list(range(rank, size, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_loader(dataset: Dataset, batch_size: int, ctx: DistContext, seed: int, num_workers: int | None):
    """Per-rank loader of a global batch: rank r's share of global batch k is a fixed slice of it."""
    if batch_size % ctx.world_size:
        raise BadInputError(f"invalid config: batch_size {batch_size} is not divisible by {ctx.world_size} processes")
    per_rank = batch_size // ctx.world_size
    if len(dataset) < batch_size:
        raise BadInputError(f"invalid config: batch_size {batch_size} is larger than the training set "
                            f"({len(dataset)} images)")
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed,
                                 drop_last=False)
    workers = default_num_workers(dataset) if num_workers is None else num_workers
    loader = DataLoader(dataset, batch_size=per_rank, sampler=sampler, drop_last=True, collate_fn=collate,
                        num_workers=workers, persistent_workers=workers > 0)
    return loader, sampler


def eval_loader(dataset: Dataset, batch_size: int, ctx: DistContext, num_workers: int | None) -> DataLoader:
    workers = default_num_workers(dataset) if num_workers is None else num_workers
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), ctx.rank, ctx.world_size),
                      collate_fn=collate, num_workers=workers)


# ----------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, prep: BatchPreprocessor, ctx: DistContext,
             precision: str = "fp32") -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy on a (sharded) split, summed over ranks."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss, top1, top5, count
    for images, labels, _ in loader:
        images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
        with autocast(ctx.device, precision):
            logits = model(prep(images))
        logits = logits.float()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hits = topk.eq(labels.unsqueeze(1))
        sums += torch.tensor([F.cross_entropy(logits, labels, reduction="sum").item(),
                              hits[:, 0].sum().item(), hits.any(dim=1).sum().item(), len(labels)],
                             dtype=torch.float64)
    model.train(was_training)
    loss, top1, top5, count = ctx.all_reduce_sum(sums).tolist()
    count = max(count, 1)
    return {"test_loss": loss / count, "test_top1": 100 * top1 / count, "test_top5": 100 * top5 / count,
            "test_images": int(count)}


# ----------------------------------------------------------------------------- precision


def time_train_steps(task: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device, precision: str,
                steps: int = 3) -> float:
    probe = copy.deepcopy(task).to(device).train()
    params = [p for p in probe.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-9, fused=True)  # the real optimizer step is part of the cost
    timings = []
    for i in range(steps + 1):
        start = time.perf_counter()
        with autocast(device, precision):
            _, losses = probe(images, labels)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step pays one-off costs
            timings.append(time.perf_counter() - start)
    return len(images) / min(timings)


def choose_precision(requested: str, device: torch.device) -> str:
    """Resolve ``auto`` by a rule, never a timing probe: fp32 on a CPU, bf16 on CUDA (fp16 without bf16).

    The same command therefore trains every model of a run (teacher, distilled student, baselines) in the same,
    recorded arithmetic on every machine of a kind; bf16 on a CPU with native support is ``--precision bf16``.
    """
    if requested == "fp16" and device.type == "cpu":
        raise BadInputError("invalid config: precision fp16 is only supported on CUDA (use bf16 or fp32)")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


# ----------------------------------------------------------------------------- the loop


def _folder(where: StageFolder | Path) -> StageFolder:
    return where if isinstance(where, StageFolder) else StageFolder(Path(where))


def read_resume_state(folder: StageFolder | Path, settings_hash: str) -> dict[str, Any] | None:
    """The last checkpoint if it belongs to these settings; raises on a corrupt file."""
    last = _folder(folder).last_checkpoint
    if not last.exists():
        return None
    state = load_checkpoint(last)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise BadInputError(f"corrupt checkpoint {last}: not a checkpoint of this pipeline "
                            "(delete it to start this stage over)")
    if state.get("settings_hash") != settings_hash:
        log.warning("checkpoint %s was made with other settings; starting this stage over", last)
        return None
    return state


def fit(task: nn.Module, train_set: Dataset, test_set: Dataset, prep: BatchPreprocessor, cfg: TrainConfig,
        folder: StageFolder | Path, ctx: DistContext, *, seed: int, settings_hash: str,
        num_workers: int | None = None, progress: bool | None = None, resume_state: dict[str, Any] | None = None,
        label: str = "train") -> FitResult:
    """Train ``task`` for ``cfg.epochs`` epochs, resuming from ``resume_state`` when given.

    Nothing is written before the first epoch ends (so bad input found while
    reading the data leaves a run directory as it was).
    """
    folder = _folder(folder)
    last_path, best_path = folder.last_checkpoint, folder.best_checkpoint
    seed_everything(seed + ctx.rank)
    task.to(ctx.device)
    loader, sampler = train_loader(train_set, cfg.batch_size, ctx, seed, num_workers)
    test_loader = eval_loader(test_set, max(256, cfg.batch_size), ctx, num_workers)
    steps_per_epoch = len(loader)
    named = [(n, p) for n, p in task.named_parameters() if p.requires_grad]
    optimizer = make_optimizer(task, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, cfg))
    history: list[dict[str, Any]] = []
    start_epoch, best_top1, best_epoch, train_time = 0, -1.0, -1, 0.0

    if resume_state is not None:
        task.load_state_dict(resume_state["task"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        start_epoch, history = resume_state["epoch"], resume_state["history"]
        best_top1, best_epoch = resume_state["best_top1"], resume_state["best_epoch"]
        train_time, precision = resume_state["train_time_s"], resume_state["precision"]
        saved_rng = resume_state["rng"]
        if len(saved_rng) == ctx.world_size:
            restore_rng(saved_rng[ctx.rank])
        else:  # torchrun's elastic membership changed the number of ranks: no random stream of this rank was saved
            log.warning("%s: checkpoint written by %d processes, resumed by %d: random streams start afresh (data "
                        "order and augmentation are unchanged)", label, len(saved_rng), ctx.world_size)
        log.info("resuming %s from epoch %d of %d (%s)", label, start_epoch, cfg.epochs, last_path)
    else:
        precision = choose_precision(cfg.precision, ctx.device)
        log.info("%s trains in %s", label, precision)

    scaler = torch.amp.GradScaler(ctx.device.type, enabled=precision == "fp16")
    if resume_state is not None and resume_state.get("scaler"):
        scaler.load_state_dict(resume_state["scaler"])
    trained = DistributedDataParallel(task) if ctx.distributed else task
    # a bar on a terminal (or with --progress); log lines when the output is piped; nothing with --no-progress
    show = ctx.is_main and (sys.stderr.isatty() if progress is None else progress)
    lines = ctx.is_main and progress is None and not show

    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        trained.train()
        epoch_start = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count (this rank)
        bar = tqdm(loader, desc=f"{label} epoch {epoch + 1}/{cfg.epochs}", disable=not show, leave=False,
                   dynamic_ncols=True, mininterval=1.0)
        progress_lines = ProgressLines(label, epoch + 1, cfg.epochs, steps_per_epoch) if lines else None
        for step, (images, labels, idx) in enumerate(bar):
            task.set_progress(epoch + step / steps_per_epoch)
            images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
            x = prep(images, idx, epoch, len(train_set))
            with autocast(ctx.device, precision):
                logits, losses = trained(x, labels, idx.to(ctx.device, non_blocking=True))
            loss = losses["loss"]
            bad = torch.tensor([0.0 if torch.isfinite(loss.detach()) else 1.0])
            if ctx.distributed:
                bad = ctx.all_reduce_sum(bad)
            if bad.item() > 0:
                raise TrainingDivergedError(
                    f"{label}: loss became {loss.item()} at epoch {epoch + 1} step {step + 1}; "
                    f"last good checkpoint kept at {last_path if last_path.exists() else '(none yet)'}; "
                    "lower --lr or enable gradient clipping")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            sums += torch.tensor([loss.item() * len(labels), (logits.argmax(1) == labels).sum().item(), len(labels)],
                                 dtype=torch.float64)
            if progress_lines is not None:
                line = progress_lines.update(step + 1, int(sums[2]) * ctx.world_size, float(sums[0] / sums[2]))
                if line:
                    log.info("%s", line)
            if show and step % 10 == 0:
                bar.set_postfix(loss=f"{sums[0] / sums[2]:.3f}", acc=f"{100 * sums[1] / sums[2]:.1f}%",
                                lr=f"{scheduler.get_last_lr()[0]:.2e}")
        bar.close()
        epoch_time = time.perf_counter() - epoch_start
        train_time += epoch_time
        loss_sum, correct, count = ctx.all_reduce_sum(sums).tolist()
        metrics = evaluate(task.model, test_loader, prep, ctx, precision)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / count, "train_top1": 100 * correct / count,
                  **metrics, "lr": scheduler.get_last_lr()[0], "epoch_time_s": round(epoch_time, 2),
                  "train_time_s": round(train_time, 2), "train_images_per_s": round(count / epoch_time, 1)}
        history.append(record)
        if metrics["test_top1"] > best_top1:
            best_top1, best_epoch = metrics["test_top1"], epoch + 1
            if ctx.is_main:
                atomic_save({"model": task.model.state_dict(), "epoch": epoch + 1, "top1": best_top1}, best_path)
        rng_states = ctx.gather(capture_rng())
        if ctx.is_main:
            atomic_save({"format": CHECKPOINT_FORMAT, "settings_hash": settings_hash, "epoch": epoch + 1,
                         "task": task.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled()
                         else None, "best_top1": best_top1, "best_epoch": best_epoch, "history": history,
                         "train_time_s": train_time, "precision": precision, "rng": rng_states},
                        last_path)
            atomic_write_text(folder.metrics_log, "".join(json.dumps(r) + "\n" for r in history))
        ctx.barrier()
        log.info("%s epoch %d/%d: loss %.4f, train top-1 %.2f%%, test top-1 %.2f%% (top-5 %.2f%%), %.0f img/s",
                 label, epoch + 1, cfg.epochs, record["train_loss"], record["train_top1"], metrics["test_top1"],
                 metrics["test_top5"], record["train_images_per_s"])

    final = history[-1]
    sync_diff = replica_divergence(task, ctx)
    total_images = sum(r["train_images_per_s"] * r["epoch_time_s"] for r in history)
    return FitResult(top1=final["test_top1"], top5=final["test_top5"], test_loss=final["test_loss"],
                     best_top1=best_top1, best_epoch=best_epoch, epochs=cfg.epochs, precision=precision,
                     train_time_s=round(train_time, 2),
                     train_images_per_s=round(total_images / max(train_time, 1e-9), 1),
                     resumed_from_epoch=start_epoch, replica_max_abs_diff=sync_diff)


def replica_divergence(task: nn.Module, ctx: DistContext) -> float | None:
    """Max |parameter difference| between any rank and rank 0 (None in a single process).

    DDP keeps replicas identical by construction; this proves it for every run.
    """
    if not ctx.distributed:
        return None
    flat = torch.cat([p.detach().reshape(-1).double() for p in task.parameters()]).to(ctx.device)
    reference = flat.clone()
    torch.distributed.broadcast(reference, src=0)
    diff = (flat - reference).abs().max().reshape(1)
    torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
    return float(diff.item())

