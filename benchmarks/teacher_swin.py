"""Swin teacher from scratch on Fashion-MNIST: our recipe vs torchvision's default-window fp32 Swin.

Both runs get the same training-time budget on the same data. For each the
script prints the test top-1 after every epoch against cumulative training
time (the accuracy-vs-time curve) and the measured training throughput, side
by side, plus a throughput probe of both models on identical batches.

    python benchmarks/teacher_swin.py --budget-minutes 20 --out /tmp/swin-bench

Each run gets as many epochs (or, below one epoch, training images) as its
measured throughput allows within the budget; --ours-epochs / --baseline-plan
fix them. Runs are cached in --out keyed by their settings: rerunning with the
same plan prints the table without training again.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch


from models import build_model
from pipeline.training.engine import time_train_steps
from pipeline.training.tasks import SupervisedTask

TRAIN_IMAGES = 60_000
# The recipe is the teacher's default config (pipeline/config.py); spelled out so the benchmark keeps
# measuring the same thing if the defaults move. The baseline differs only in window and precision.
RECIPE = ["--teacher", "swin", "--lr", "5e-4", "--batch-size", "128", "--warmup-epochs", "0.3", "--grad-clip", "1.0",
          "--drop-path", "0.0", "--label-smoothing", "0.0", "--augment", "flip"]
OURS = RECIPE + ["--precision", "auto"]
BASELINE = RECIPE + ["--precision", "fp32"]


def throughput(window_per_stage: list[int] | None, precision: str, batch: int = 128) -> float:
    options = {"drop_path": 0.0} if window_per_stage is None else {"drop_path": 0.0,
                                                                    "window_per_stage": window_per_stage}
    model, _, _ = build_model("swin", 10, 32, **options)
    images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    return time_train_steps(SupervisedTask(model), images, labels, torch.device("cpu"), precision, steps=4)


def run(name: str, flags: list[str], out: Path) -> list[dict]:
    run_dir = out / name
    cmd = [sys.executable, "-m", "pipeline", "teacher", "--run-dir", str(run_dir), "--no-progress", *flags]
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True)
    print(f"  {name}: {time.time() - start:.0f} s wall", flush=True)
    return [json.loads(line) for line in (run_dir / "teacher" / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-minutes", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=Path.home() / ".cache" / "kdiff-pipeline" / "swin-bench")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--ours-epochs", type=int, help="fix our run's epochs (default: planned from the probe)")
    parser.add_argument("--baseline-plan", nargs=2, type=int, metavar=("EPOCHS", "SUBSET"),
                        help="fix the baseline's epochs and training-subset size (default: planned from the probe)")
    args = parser.parse_args()
    budget_s = args.budget_minutes * 60

    probe = {
        "ours fp32 (adaptive window)": throughput(None, "fp32"),
        "ours bf16 (adaptive window)": throughput(None, "bf16"),
        "torchvision window 7 fp32": throughput([7, 7, 7, 7], "fp32"),
    }
    print("\ntraining throughput probe (batch 128, 32x32, img/s):")
    for key, value in probe.items():
        print(f"  {key:32s} {value:8.1f}")
    ours_rate = max(probe["ours fp32 (adaptive window)"], probe["ours bf16 (adaptive window)"])
    base_rate = probe["torchvision window 7 fp32"]

    def plan(rate: float) -> list[str]:
        images = rate * budget_s
        epochs = max(1, math.floor(images / TRAIN_IMAGES))
        subset = [] if images >= TRAIN_IMAGES else ["--subset", str(int(images) // 128 * 128)]
        return ["--epochs", str(epochs), *subset]

    # A plan fixed on the command line keeps a rerun's settings (and so its cached result) stable.
    ours_plan = ["--epochs", str(args.ours_epochs)] if args.ours_epochs else plan(ours_rate)
    base_plan = (["--epochs", str(args.baseline_plan[0]), "--subset", str(args.baseline_plan[1])]
                 if args.baseline_plan else plan(base_rate))
    results = {"ours": run("ours", OURS + ours_plan, args.out)}
    if not args.skip_baseline:
        results["torchvision-default"] = run("torchvision-default", BASELINE + base_plan +
                                             ["--config", str(write_baseline_config(args.out))], args.out)
    print(f"\naccuracy vs training time (budget {args.budget_minutes:.0f} min, full 10k test set):")
    print(f"{'run':22s} {'epoch':>5s} {'train min':>9s} {'test top-1':>10s} {'train img/s':>11s}")
    for name, history in results.items():
        for r in history:
            print(f"{name:22s} {r['epoch']:5d} {r['train_time_s'] / 60:9.1f} {r['test_top1']:9.2f}% "
                  f"{r['train_images_per_s']:11.1f}")
    if "torchvision-default" in results:
        print(f"\nthroughput ratio ours / torchvision-default: {ours_rate / base_rate:.2f}x (probe), "
              f"{results['ours'][-1]['train_images_per_s'] / results['torchvision-default'][-1]['train_images_per_s']:.2f}x"
              " (training runs)")


def write_baseline_config(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "baseline.yaml"
    path.write_text("teacher:\n  window_per_stage: [7, 7, 7, 7]\n")
    return path


if __name__ == "__main__":
    main()
