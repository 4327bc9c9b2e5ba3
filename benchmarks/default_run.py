"""Does distillation pay in the default run? ``pipeline run`` (the default profile) over several seeds.

Each seed is a whole run (teacher, distilled student, the student alone, fusion, export, bench, report) with
``--seed S``: the seed fixes the teacher's and the students' initial weights, the labelled subset and the batch
order. The table gives, per seed and as mean with a 95% t-interval, the teacher, the student alone, the distilled
student and the fused (shipped) student; the gains are paired by seed (the same teacher, subset and order).

    python benchmarks/default_run.py --seeds 3 --out runs/default-seeds --results benchmarks/results/DATE-default-run.md

Runs are cached in ``--out/seed-S`` (a rerun resumes or skips them: ``pipeline run`` skips finished stages);
``--`` passes the rest to ``pipeline run`` (e.g. ``-- --profile tiny``: the test suite does).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import kd_methods as km

ROLES = {"teacher": "teacher", "baseline": "student alone", "student": "distilled student", "fused": "fused student"}


def run_seed(out: Path, seed: int, extra: list[str]) -> dict:
    """One ``pipeline run`` (resumed or skipped where already done); its report.json."""
    run_dir = out / f"seed-{seed}"
    log = out / f"seed-{seed}.log"
    out.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as handle:
        done = subprocess.run([sys.executable, "-m", "pipeline", "run", "--seed", str(seed), "--run-dir",
                               str(run_dir), "--no-progress", *extra], stdout=handle, stderr=subprocess.STDOUT,
                              cwd=km.ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode not in (0, 3):  # 3: a gate failed (e.g. INT8); the accuracies are still there
        raise SystemExit(f"pipeline run --seed {seed} failed ({done.returncode}); see {log}")
    return json.loads((run_dir / "report.json").read_text())


def accuracies(report: dict) -> dict[str, float]:
    return {a["role"]: a["top1"] for a in report["accuracy"] if a["role"] in ROLES}


def stage_minutes(report: dict) -> float:
    """The run's own stage timings (wall seconds of the stages that ran), in minutes."""
    return sum(stage.get("wall_s") or 0 for stage in (report.get("stages") or {}).values()) / 60


def shown(values: list[float], signed: bool = False) -> str:
    """Mean and 95% interval: a gain as kd_methods shows it (signed, ``*`` when the interval excludes 0), an
    accuracy plain."""
    if signed:
        return km.shown(values)
    mean, half = km.interval(values)
    return f"{mean:.2f}" if math.isnan(half) else f"{mean:.2f} [{mean - half:.2f}, {mean + half:.2f}]"


def tables(per_seed: dict[int, dict[str, float]]) -> list[str]:
    seeds = sorted(per_seed)
    lines = ["| seed | " + " | ".join(f"{ROLES[r]} top-1 (%)" for r in ROLES) + " | teacher - alone | "
             "distilled - alone | fused - alone |", "|---|" + "---|" * (len(ROLES) + 3)]
    for seed in seeds:
        acc = per_seed[seed]
        lines.append(f"| {seed} | " + " | ".join(f"{acc[r]:.2f}" for r in ROLES) + " | "
                     + " | ".join(f"{acc[a] - acc['baseline']:+.2f}" for a in ("teacher", "student", "fused")) + " |")
    column = {r: [per_seed[s][r] for s in seeds] for r in ROLES}
    gains = {a: [per_seed[s][a] - per_seed[s]["baseline"] for s in seeds] for a in ("teacher", "student", "fused")}
    lines.append("| mean [95% CI] | " + " | ".join(shown(column[r]) for r in ROLES) + " | "
                 + " | ".join(shown(gains[a], signed=True) for a in ("teacher", "student", "fused")) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=km.ROOT / "runs" / "default-seeds")
    parser.add_argument("--results", type=Path, help="also write the table as markdown here")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    per_seed, minutes = {}, {}
    for seed in range(args.seeds):
        report = run_seed(args.out, seed, extra)
        per_seed[seed], minutes[seed] = accuracies(report), stage_minutes(report)
    first = report  # the settings every seed shares
    notes = [f"teacher: {first['run'].get('teacher', '?')}, students: {first['run'].get('student', '?')} "
             f"with {first['student'].get('method')} {json.dumps(first['student'].get('method_options') or {})}",
             f"data: {first.get('dataset')}, teacher on {first.get('teacher_train_images')} images, students on "
             f"{first.get('train_images')}, {first.get('image_size')}x{first.get('image_size')} px, top-1 on "
             f"{first.get('test_images')} {first.get('eval_split', 'test')} images",
             "paired by seed; `*`: the 95% interval of the paired difference excludes 0",
             "stage time per seed (the runs' own stage timings, min): "
             + ", ".join(f"seed {s} {minutes[s]:.1f}" for s in sorted(minutes)),
             f"machine: {km.machine_note()}"]
    text = "\n".join([*tables(per_seed), "", *[f"- {n}" for n in notes]])
    km.publish(f"The default run over {args.seeds} seeds", text, args.results)


if __name__ == "__main__":
    main()
