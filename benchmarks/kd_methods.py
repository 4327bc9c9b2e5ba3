"""Distillation methods side by side: one cached teacher, every method at an identical student budget.

Drives the real CLI (`python -m pipeline distill ... --teacher-ckpt T`) for every method (none, kd, dkd,
fitnet, at, kdiffusion) with several seeds, plus the KDiffusion ablation rows, and prints a table of
mean +- std last-epoch test top-1, its difference to the student alone paired by seed (same initial
weights and batch order), and the epoch time relative to the student-alone epoch time (each run's own
metrics.jsonl), next to the teacher's top-1.

    OMP_NUM_THREADS=1 python benchmarks/kd_methods.py --teacher-ckpt /tmp/bench/swin/ours/teacher/model.pt

Without --teacher-ckpt the teacher is trained once (`pipeline teacher`, Swin-T on Fashion-MNIST at 32x32)
and cached under --out keyed by its settings. Every student run is cached under --out keyed by its full
command line: a rerun with the same settings trains nothing and just prints (the epoch times then are
those of the invocation that trained each run). --results FILE also writes the table as markdown.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The teacher benchmarks/teacher_swin.py settled on (its "ours" run), spelled out so the key stays stable.
TEACHER_FLAGS = ["--teacher", "swin", "--image-size", "32", "--epochs", "4", "--lr", "5e-4", "--batch-size", "128",
                 "--warmup-epochs", "0.3", "--grad-clip", "1.0", "--drop-path", "0.0", "--label-smoothing", "0.0",
                 "--augment", "flip", "--precision", "auto"]


@dataclass
class Row:
    """One table row: a method with its options, trained with each of ``seeds``."""

    label: str
    method: str
    flags: list[str] = field(default_factory=list)
    group: str = "main"


def rows() -> list[Row]:
    kdiff = "kdiffusion"
    opt = lambda *pairs: [a for p in pairs for a in ("--method-option", p)]  # noqa: E731
    main = [Row("student alone", "none"), Row("KD", "kd"), Row("DKD", "dkd"), Row("FitNet", "fitnet"),
            # at the single point both maps are 1x1 at 32x32, where attention transfer is identically zero
            Row("AT (points=multi)", "at", ["--points", "multi"]), Row("KDiffusion (m=4)", kdiff)]
    ablation = [Row(f"KDiffusion m={m}", kdiff, ["--branches", str(m)], "ablation") for m in (1, 2, 8)] + [
        Row("KDiffusion shuffle off", kdiff, opt("shuffle=false"), "ablation"),
        Row("KDiffusion weights=uniform", kdiff, opt("weights=uniform"), "ablation"),
        Row("KDiffusion weights=last", kdiff, opt("weights=last"), "ablation"),
        Row("KDiffusion guided off", kdiff, opt("guided=false"), "ablation"),
        Row("KDiffusion teacher normalisation off", kdiff, opt("normalize_teacher=false"), "ablation"),
        Row("KDiffusion points=multi", kdiff, ["--points", "multi"], "ablation"),
    ]
    return main + ablation


def key(parts: list[str]) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]


def cli(args: list[str], log_path: Path) -> None:
    """One pipeline command in a subprocess (1 thread unless OMP_NUM_THREADS says otherwise), logged to a file."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "pipeline", *args]
    print("$", " ".join(cmd), flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if done.returncode:
        sys.exit(f"command failed ({done.returncode}), see {log_path}")


def finished(stage_dir: Path) -> bool:
    marker = stage_dir / "stage.json"
    return marker.is_file() and json.loads(marker.read_text()).get("status") == "complete"


def teacher_checkpoint(args: argparse.Namespace) -> Path:
    if args.teacher_ckpt:
        return Path(args.teacher_ckpt)
    run_dir = args.out / f"teacher-{key(TEACHER_FLAGS)}"
    if not finished(run_dir / "teacher"):
        cli(["teacher", "--run-dir", str(run_dir), "--no-progress", *TEACHER_FLAGS], run_dir / "log.txt")
    return run_dir / "teacher" / "model.pt"


def student_flags(args: argparse.Namespace) -> list[str]:
    """The identical budget every method gets (everything but the method, its options and the seed)."""
    return ["--student", args.student, "--image-size", "32", "--subset", str(args.subset), "--epochs",
            str(args.epochs), "--batch-size", str(args.batch_size), "--augment", args.augment, "--precision",
            "fp32", "--no-progress"]


def run_flags(row: Row, seed: int, teacher: Path, args: argparse.Namespace) -> list[str]:
    flags = [*student_flags(args), "--method", row.method, *row.flags, "--seed", str(seed)]
    return flags + (["--teacher-ckpt", str(teacher)] if row.method != "none" else [])


def run_dir_of(row: Row, seed: int, teacher: Path, args: argparse.Namespace) -> Path:
    """Each run's folder, keyed by its full command line and the teacher file."""
    return args.out / "runs" / f"{row.method}-{key(run_flags(row, seed, teacher, args) + [teacher_digest(teacher)])}"


def run_student(row: Row, seed: int, teacher: Path, args: argparse.Namespace) -> dict:
    """Train (or find cached) one student; returns its metrics.json plus the per-epoch history."""
    flags = run_flags(row, seed, teacher, args)
    run_dir = run_dir_of(row, seed, teacher, args)
    stage = run_dir / "student"
    if not finished(stage):
        cli(["distill", "--run-dir", str(run_dir), *flags], run_dir / "log.txt")
    metrics = json.loads((stage / "metrics.json").read_text())
    metrics["history"] = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    metrics["seed"] = seed
    return metrics


def teacher_digest(path: Path) -> str:
    """Size and mtime: enough to key runs by the teacher file without hashing 110 MB each time."""
    stat = path.stat()
    return f"{stat.st_size}-{int(stat.st_mtime)}"


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def epoch_time(metrics: dict) -> float:
    return statistics.mean(r["epoch_time_s"] for r in metrics["history"])


def machine_note() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    import torch

    return (f"{cpu}, {os.cpu_count()} cores (shared), torch {torch.__version__}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average at the end "
            f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-ckpt", help="a finished teacher's model.pt (default: train and cache one)")
    parser.add_argument("--out", type=Path, default=Path.home() / ".cache" / "kdiff-pipeline" / "kd-methods")
    parser.add_argument("--student", default="shufflenetv2_x0_5")
    parser.add_argument("--subset", type=int, default=8000, help="training images (stratified)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--augment", default="flip")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the main rows")
    parser.add_argument("--ablation-seeds", type=int, default=1, help="seeds of the ablation rows")
    parser.add_argument("--groups", default="main,ablation",
                        help="row groups to train, e.g. 'ablation' for a second process beside one doing 'main'")
    parser.add_argument("--rows", help="only these row labels (comma-separated), e.g. to add seeds to a few rows")
    parser.add_argument("--budget-minutes", type=float, default=0,
                        help="start no new run after this many minutes (0 = no limit); skipped runs are listed")
    parser.add_argument("--results", type=Path, help="also write the table as markdown here")
    args = parser.parse_args()
    started = time.time()
    teacher = teacher_checkpoint(args)
    teacher_meta = json.loads((teacher.parent / "metrics.json").read_text())

    table = []
    groups = args.groups.split(",")
    plan = [r for r in rows() if r.group in groups and (not args.rows or r.label in args.rows.split(","))]
    alone_row = rows()[0]
    if alone_row not in plan:  # the ratios need the student-alone runs (those finished are read below)
        plan.insert(0, alone_row)
    results: dict[str, list[dict]] = {r.label: [] for r in plan}
    skipped = []
    for group, seeds in (("main", args.seeds), ("ablation", args.ablation_seeds)):  # every main seed first
        if group not in groups:
            continue
        for seed in range(seeds):
            for row in (r for r in plan if r.group == group):
                if args.budget_minutes and time.time() - started > 60 * args.budget_minutes and \
                        not finished(run_dir_of(row, seed, teacher, args) / "student"):
                    skipped.append(f"{row.label} seed {seed}")
                    continue
                results[row.label].append(run_student(row, seed, teacher, args))
    for row in plan:  # also any further seeds already finished (e.g. added to a few rows with --rows)
        done = {m["seed"] for m in results[row.label]}
        results[row.label] += [run_student(row, seed, teacher, args) for seed in range(args.seeds) if seed not in done
                               and finished(run_dir_of(row, seed, teacher, args) / "student")]
    plan = [r for r in plan if results[r.label]]

    alone = statistics.mean(epoch_time(m) for m in results["student alone"])
    for row in plan:
        runs = results[row.label]
        top1 = [m["top1"] for m in runs]
        ratio = statistics.mean(epoch_time(m) for m in runs) / alone
        first_last = (statistics.mean(m["history"][0]["epoch_time_s"] for m in runs) / alone,
                      statistics.mean(m["history"][-1]["epoch_time_s"] for m in runs) / alone)
        alone_by_seed = {m["seed"]: m["top1"] for m in results["student alone"]}
        deltas = [m["top1"] - alone_by_seed[m["seed"]] for m in runs if m["seed"] in alone_by_seed]
        table.append((row, len(runs), mean_std(top1), mean_std(deltas) if deltas else "-", ratio, first_last))

    lines = ["| row | method | flags | seeds | last-epoch test top-1 (%) | vs student alone, paired by seed "
             "(points) | epoch time vs student alone (mean; first / last epoch) |", "|---|---|---|---|---|---|---|"]
    lines.append(f"| teacher ({teacher_meta['arch']['name']}, {teacher_meta['epochs']} epochs, full data) | - | - "
                 f"| 1 | {teacher_meta['top1']:.2f} | - | - |")
    for row, n, shown, delta, ratio, (first, last) in table:
        flags = " ".join(row.flags).replace("--method-option ", "") or "-"
        lines.append(f"| {row.label} | {row.method} | {flags} | {n} | {shown} | {delta} | {ratio:.2f}x "
                     f"({first:.2f}x / {last:.2f}x) |")
    gap = teacher_meta["top1"] - statistics.mean(m["top1"] for m in results["student alone"])
    summary = [f"teacher top-1 {teacher_meta['top1']:.2f}%, student alone "
               f"{statistics.mean(m['top1'] for m in results['student alone']):.2f}%: gap {gap:.2f} points "
               f"({'>=' if gap >= 2 else 'BELOW'} the 2 points a comparison needs)",
               f"student-alone epoch: {alone:.1f} s; wall time of this invocation {time.time() - started:.0f} s",
               f"runs not trained (time budget): {', '.join(skipped) if skipped else 'none'}",
               f"machine: {machine_note()}"]
    print("\n" + "\n".join(lines) + "\n\n" + "\n".join(summary))
    if args.results:
        command = "OMP_NUM_THREADS=1 python benchmarks/kd_methods.py " + " ".join(sys.argv[1:])
        settings = " ".join(student_flags(args))
        args.results.write_text(
            f"# Distillation methods: {args.student} from a Swin-T teacher on Fashion-MNIST\n\n"
            f"```bash\n{command}\n```\n\nStudent budget (identical for every row): `{settings}` (default "
            f"student training recipe otherwise: AdamW lr 3e-3, weight decay 0.01, cosine with 0.3 warm-up epochs); "
            f"seeds 0..{args.seeds - 1} for the main rows, 0..{args.ablation_seeds - 1} for the ablations "
            f"(more where the seeds column says so). "
            f"Top-1 is the last epoch's (not the best) on the full 10,000-image test set.\n\n"
            + "\n".join(lines) + "\n\n" + "\n".join(f"- {s}" for s in summary) + "\n")
        print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
