"""Distillation methods compared under one tuning protocol, with paired seeds and 95% intervals.

The protocol, the same for every method (none of them gets more tuning than another):

1. **Teacher.** Trained once on the whole training split and cached (or ``--teacher-ckpt``).
2. **Tune.** Each method's grid (at most ``--max-settings`` settings, listed in ``GRIDS``) is trained with one
   seed and scored on a validation split carved from the training data (``--validation`` images, the same for
   every run; never the test split). The best last-epoch validation top-1 wins; ties go to the earlier setting.
3. **Test.** Each method's chosen setting is trained with ``--seeds`` seeds and scored on the test split.
4. **Ablations.** KDiffusion's chosen setting with one thing changed at a time, on the same seeds; the rows with
   another branch count ``m`` are paired with the student alone of that same ``m`` (the multi-branch network
   trains differently with each ``m``). With ``--matched-scale`` each ablation's ``lambda_diff`` is rescaled so
   that it puts the chosen setting's weight on the fused feature (``weights=last`` and ``m=1`` put 3.5x the
   default's there, ``--points multi`` 3x): the row then measures the change, not the loss scale.

The table gives mean +- std of the last-epoch test top-1, the difference to the student alone and to KD paired
by seed (a seed fixes the initial weights, the training subset and the batch order) with a 95% t-interval, and
the epoch time relative to the student alone. Each run is the real CLI (``python -m pipeline distill``) in a
subprocess, cached under ``--out`` by its full command line, so a rerun trains only what is missing.

    python benchmarks/kd_methods.py --out ~/.cache/kdm --jobs 2 --results benchmarks/results/DATE-kd-methods.md

``--scale tiny`` runs the whole protocol in about a minute (the test suite does); ``--device cuda`` with
``--scale paper`` is the GPU version (full data, more epochs, larger inputs).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # in-process imports of pipeline come from this checkout, as the runs do
    sys.path.insert(0, str(ROOT))  # (they are `python -m pipeline` with ROOT as the working directory)


@dataclass(frozen=True)
class Scale:
    """The regime: teacher recipe, student budget and split sizes."""

    teacher: tuple[str, ...]
    image_size: int
    subset: int
    validation: int
    epochs: int
    batch_size: int
    eval_subset: int | None = None


SCALES = {
    # 2 CPU cores: a ResNet-34 teacher on all 60k images at 48x48 (every distillation point keeps a 2x2 map, where
    # 32x32 leaves 1x1), students on 4k labelled images to convergence, a few minutes per run.
    "cpu": Scale(teacher=("--teacher", "resnet34", "--epochs", "2", "--batch-size", "128", "--lr", "2e-3",
                          "--weight-decay", "0.05", "--warmup-epochs", "0.2", "--augment", "flip"),
                 image_size=48, subset=4000, validation=5000, epochs=10, batch_size=64),
    # one GPU, <= 10 minutes: a Swin-T teacher at 64x64 on all data, students on 10k images at 64x64.
    "paper": Scale(teacher=("--teacher", "swin", "--epochs", "8", "--batch-size", "256", "--lr", "1e-3",
                            "--augment", "flip"),
                   image_size=64, subset=10000, validation=5000, epochs=30, batch_size=128),
    # 2 CPU cores, the pair `pipeline run` trains: the default profile's Swin-T teacher (2 epochs on all 60k images
    # at 32x32, about 8 minutes) and students on 4k labelled images. At 32x32 the student's last map is 1x1.
    "swin": Scale(teacher=("--teacher", "swin", "--epochs", "2"), image_size=32, subset=4000, validation=5000,
                  epochs=10, batch_size=64),
    # the map-size probe: the `swin` regime at 72x72, the smallest common size where the student's last map keeps
    # 3x3 (ShuffleNetV2: 72 -> 36 -> 18 -> 9 -> 5 -> 3) and so does the Swin teacher's last stage (18 -> 9 -> 5 -> 3).
    # The teacher gets one epoch on all 60k images: at 72x72 a Swin-T epoch costs ~5x one at 32x32 on a CPU.
    "swin-maps": Scale(teacher=("--teacher", "swin", "--epochs", "1"), image_size=72, subset=4000, validation=5000,
                       epochs=10, batch_size=64),
    # the test suite's: the whole protocol on a few hundred images in about a minute.
    "tiny": Scale(teacher=("--teacher", "resnet34", "--epochs", "1", "--batch-size", "64", "--augment", "flip",
                           "--subset", "320", "--eval-subset", "64"),
                  image_size=32, subset=160, validation=96, epochs=1, batch_size=32, eval_subset=64),
}


def option_flags(**options: object) -> list[str]:
    return [a for key, value in options.items() for a in ("--method-option", f"{key}={value}")]


# Each method's tuning grid: the same budget, four settings, around the published defaults (the weights' useful
# range differs per method: it is the scale of each loss that differs).
GRIDS: dict[str, list[list[str]]] = {
    "none": [[]],
    "kd": [option_flags(temperature=t, alpha=a) for t in (2, 4) for a in (0.5, 0.9)],
    "dkd": [option_flags(beta=b) for b in (1, 2, 4, 8)],
    "fitnet": [option_flags(beta=b) for b in (0.3, 1, 3, 10)],
    "at": [["--points", "multi", *option_flags(beta=b)] for b in (100, 300, 1000, 3000)],
    "pkt": [option_flags(beta=b) for b in (300, 1000, 3000, 10000)],
    "sp": [option_flags(beta=b) for b in (30, 100, 300, 1000)],
    "rkd": [option_flags(beta=b) for b in (0.1, 0.3, 1, 3)],
    "vid": [option_flags(beta=b) for b in (0.1, 0.3, 1, 3)],
    "ofd": [option_flags(beta=b) for b in (0.3, 1, 3, 10)],
    "reviewkd": [["--points", "multi", *option_flags(beta=b)] for b in (0.3, 1, 3, 10)],
    "crd": [option_flags(beta=b) for b in (0.2, 0.8, 2, 5)],
    "kdiffusion": [*(option_flags(lambda_diff=lam) for lam in (0.1, 1, 10)),
                   option_flags(lambda_diff=1, variance="learned")],
}
# "+kd": a feature method at its default (tuned) weight beside Hinton's term, whose weight is the grid: does the
# feature term add anything on top of KD? KD's own chosen setting (T 2, alpha 0.9) puts 9x the cross-entropy's
# weight on the KL term; the grid spans 0.5x-9x at that temperature.
PLUS_KD = [option_flags(lambda_kd=weight, kd_temperature=2) for weight in (0.5, 1, 3, 9)]
GRIDS.update({"fitnet+kd": PLUS_KD, "reviewkd+kd": [["--points", "multi", *flags] for flags in PLUS_KD],
              "kdiffusion+kd": PLUS_KD})


def fixed_setting(text: str) -> tuple[str, list[str]]:
    """``METHOD:option=value,option=value`` (``--setting``): a method's setting given, not tuned; the flags of its
    grid that are not options (ReviewKD's ``--points multi``) come with it."""
    method, _, options = text.partition(":")
    if method not in GRIDS:
        raise ValueError(f"unknown method {method!r} in --setting {text!r}; valid: {', '.join(GRIDS)}")
    pairs = [item.partition("=") for item in options.split(",") if item]
    if any(not name or not sep or not value for name, sep, value in pairs):
        raise ValueError(f"--setting {text!r}: write METHOD:option=value[,option=value]")
    structure = GRIDS[method][0]
    kept = [flag for i, flag in enumerate(structure)
            if flag != "--method-option" and (i == 0 or structure[i - 1] != "--method-option")]
    return method, kept + option_flags(**{name: value for name, _, value in pairs})


def cli_method(name: str) -> str:
    """The pipeline's method for a grid's name (``fitnet+kd`` trains ``fitnet`` with its ``lambda_kd`` option)."""
    return name.removesuffix("+kd")


def ablations(chosen: list[str]) -> dict[str, list[str]]:
    """KDiffusion's chosen flags with one thing changed (an option given twice: the CLI keeps the last)."""
    change = {
        "chain=reduced": option_flags(chain="reduced"),  # running means against the clean teacher
        "variance=" + ("fixed" if "variance=learned" in chosen else "learned"):
            option_flags(variance="fixed" if "variance=learned" in chosen else "learned"),
        "shuffle=off": option_flags(shuffle="false"),
        "weights=snr": option_flags(weights="snr"),
        "weights=last": option_flags(weights="last"),
        "guided=on": option_flags(guided="true"),
        "normalize_teacher=on": option_flags(normalize_teacher="true"),
        "points=multi": ["--points", "multi"],
    }
    rows = {label: [*chosen, *flags] for label, flags in change.items()}
    rows.update({f"m={m}": [*chosen, "--branches", str(m)] for m in (1, 2, 8)})
    return rows


@dataclass
class Run:
    method: str
    flags: list[str]
    seed: int
    tuning: bool  # scored on the validation split
    metrics: dict = field(default_factory=dict)
    run_dir: Path | None = None  # where it trained (set by Protocol.train)


def key(parts: list[str]) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]


def cli(args: list[str], log_path: Path, threads: int) -> None:
    """One pipeline command in a subprocess, logged to a file."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        done = subprocess.run([sys.executable, "-m", "pipeline", *args], stdout=log, stderr=subprocess.STDOUT,
                              env=env, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"command failed ({done.returncode}): pipeline {' '.join(args)}; see {log_path}")


def finished(stage_dir: Path) -> bool:
    marker = stage_dir / "stage.json"
    return marker.is_file() and json.loads(marker.read_text()).get("status") == "complete"


class Protocol:
    def __init__(self, args: argparse.Namespace):
        self.args, self.scale = args, SCALES[args.scale]
        self.out: Path = args.out

    # ---------------------------------------------------------------------------------------------- runs

    def common(self) -> list[str]:
        s, a = self.scale, self.args
        flags = ["--image-size", str(s.image_size), "--augment", "flip", "--precision", "fp32", "--no-progress",
                 "--device", a.device]
        return flags + (["--data-root", a.data_root] if a.data_root else [])

    def teacher(self) -> Path:
        if self.args.teacher_ckpt:
            return Path(self.args.teacher_ckpt)
        flags = [*self.scale.teacher, *self.common()]
        run_dir = self.out / f"teacher-{key(flags)}"
        if not finished(run_dir / "teacher"):
            cli(["teacher", "--run-dir", str(run_dir), *flags], run_dir / "log.txt", self.args.threads * self.args.jobs)
        return run_dir / "teacher" / "model.pt"

    def student_flags(self, run: Run, teacher: Path) -> list[str]:
        s = self.scale
        split = ["--validation", str(s.validation)] if run.tuning else (
            ["--eval-subset", str(s.eval_subset)] if s.eval_subset else [])
        flags = [*self.common(), "--student", self.args.student, "--subset", str(s.subset), "--epochs",
                 str(s.epochs), "--batch-size", str(s.batch_size), *split, "--seed", str(run.seed),
                 "--method", cli_method(run.method), *run.flags]
        return flags + (["--teacher-ckpt", str(teacher)] if run.method != "none" else [])

    def train(self, run: Run, teacher: Path) -> Run:
        flags = self.student_flags(run, teacher)
        stat = teacher.stat() if run.method != "none" else None
        run_dir = self.out / "runs" / f"{run.method}-{key(flags + [f'{stat.st_size}-{int(stat.st_mtime)}' if stat else ''])}"
        stage, run.run_dir = run_dir / "student", run_dir
        if not finished(stage):
            print(f"$ pipeline distill {' '.join(flags)}", flush=True)
            cli(["distill", "--run-dir", str(run_dir), *flags], run_dir / "log.txt", self.args.threads)
        run.metrics = json.loads((stage / "metrics.json").read_text())
        run.metrics["history"] = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
        return run

    def train_all(self, runs: list[Run], teacher: Path) -> list[Run]:
        with ThreadPoolExecutor(self.args.jobs) as pool:
            return list(pool.map(lambda r: self.train(r, teacher), runs))

    # ---------------------------------------------------------------------------------------------- phases

    def tune(self, methods: list[str], teacher: Path, fixed: dict[str, list[str]] | None = None
             ) -> dict[str, tuple[list[str], list[tuple[list[str], float]]]]:
        """Each method's grid on the validation split (seed 0): (chosen flags, [(flags, validation top-1)]); a method
        in ``fixed`` keeps the flags given there, untuned (no validation scores)."""
        fixed = fixed or {}
        grid = [Run(m, flags, 0, tuning=True) for m in methods if m not in fixed
                for flags in GRIDS[m][:self.args.max_settings]]
        done = self.train_all(grid, teacher)
        chosen = {m: (flags, []) for m, flags in fixed.items() if m in methods}
        for method in (m for m in methods if m not in fixed):
            scored = [(r.flags, r.metrics["top1"]) for r in done if r.method == method]
            best = max(scored, key=lambda fs: fs[1])  # max keeps the first of equal scores
            chosen[method] = (best[0], scored)
        return chosen

    def test(self, rows: dict[str, tuple[str, list[str]]], teacher: Path) -> dict[str, list[Run]]:
        runs = {label: [Run(method, flags, seed, tuning=False) for seed in range(self.args.seeds)]
                for label, (method, flags) in rows.items()}
        # seed-major: an interrupted protocol has every row at the same seed count (rerun with fewer --seeds to
        # print the table from the finished runs)
        self.train_all([group[seed] for seed in range(self.args.seeds) for group in runs.values()], teacher)
        return runs


# -------------------------------------------------------------------------------------------------- statistics

def t_within(t: float, df: int) -> float:
    """``P(|T| < t)`` for Student's t with a whole number ``df`` of degrees of freedom, in closed form (Abramowitz
    and Stegun 26.7.3-4: with ``theta = atan(t / sqrt(df))``, a finite series in ``cos(theta)``)."""
    theta = math.atan(t / math.sqrt(df))
    cos2, total = math.cos(theta) ** 2, 0.0
    if df % 2:  # odd: 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), df - 2 the last power
        term = math.sin(theta) * math.cos(theta)
        for j in range(1, (df - 1) // 2 + 1):
            total += term
            term *= cos2 * 2 * j / (2 * j + 1)
        return 2 / math.pi * (theta + total)
    term = math.sin(theta)  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), df - 2 the last power
    for j in range(1, df // 2 + 1):
        total += term
        term *= cos2 * (2 * j - 1) / (2 * j)
    return total


def t_quantile(level: float, df: int) -> float:
    """The ``level`` quantile (> 0.5) of Student's t with ``df`` degrees of freedom: bisection on its CDF."""
    if not (0.5 < level < 1 and df >= 1 and df == int(df)):
        raise ValueError(f"t_quantile needs 0.5 < level < 1 and a whole df >= 1 (got {level}, {df})")
    within, low, high = 2 * level - 1, 0.0, 1.0
    while t_within(high, int(df)) < within:
        low, high = high, 2 * high
    for _ in range(200):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        low, high = (middle, high) if t_within(middle, int(df)) < within else (low, middle)
    return (low + high) / 2


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval (0 half-width for one value: no interval)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, t_quantile(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def differences(runs: list[Run], reference: list[Run]) -> dict[int, float]:
    """Top-1 minus the reference's, by seed (the seeds both have)."""
    by_seed = {r.seed: r.metrics["top1"] for r in reference}
    return {r.seed: r.metrics["top1"] - by_seed[r.seed] for r in runs if r.seed in by_seed}


def paired(runs: list[Run], reference: list[Run]) -> list[float]:
    return list(differences(runs, reference).values())


def gain_change(runs: list[Run], alone: list[Run], reference: list[Run], reference_alone: list[Run]) -> list[float]:
    """Per seed, how much more the row gains over its student alone than the reference gains over its own: an
    ablation's effect on the distillation gain, fair also where the change alters the network (m, points)."""
    mine, theirs = differences(runs, alone), differences(reference, reference_alone)
    return [mine[seed] - theirs[seed] for seed in mine if seed in theirs]


def shown(values: list[float]) -> str:
    mean, half = interval(values)
    if math.isnan(half):
        return f"{mean:+.2f}"
    beyond = " *" if abs(mean) > half else ""
    return f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]{beyond}"


def epoch_time(run: Run) -> float:
    return statistics.mean(h["epoch_time_s"] for h in run.metrics["history"])


def machine_note() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), []) if Path("/proc/cpuinfo").exists() else []
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags]
    import torch

    return (f"{cpu}, {os.cpu_count()} cores, ISA {' '.join(isa) or '-'}, torch {torch.__version__}, load average "
            f"at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def last_epochs_change(run: Run) -> float:
    """How much the last two epochs moved test top-1 (a converged run moves little)."""
    history = [h["test_top1"] for h in run.metrics["history"] if "test_top1" in h]
    return abs(history[-1] - history[-2]) if len(history) >= 2 else float("nan")


def map_sizes(run: Run) -> str:
    pairs = run.metrics.get("arch", {}).get("feature_pairs") or []
    return ", ".join(f"{p['student']} {'x'.join(map(str, p['student_shape'][1:]))} <- {p['teacher']} "
                     f"{'x'.join(map(str, p['teacher_shape'][1:]))}" for p in pairs) or "-"


def table(rows: dict[str, tuple[str, list[str]]], runs: dict[str, list[Run]], alone_of: dict[str, str]) -> list[str]:
    ablated = any(label.startswith("KDiffusion ") for label in rows)  # then: each change's effect on the gain
    lines = ["| row | method | setting | seeds | test top-1 (%) | vs student alone (paired, 95% CI) | "
             "vs KD (paired, 95% CI) | " + ("gain vs KDiffusion's (paired, 95% CI) | " if ablated else "")
             + "epoch time vs alone | last-epoch change |",
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if ablated else "")]
    for label, (method, flags) in rows.items():
        group, alone = runs[label], runs[alone_of[label]]
        top1 = [r.metrics["top1"] for r in group]
        spread = f"{statistics.mean(top1):.2f} +- {statistics.stdev(top1):.2f}" if len(top1) > 1 else f"{top1[0]:.2f}"
        vs_kd = shown(paired(group, runs["KD"])) if "KD" in runs and label != "KD" else "-"
        setting = " ".join(flags).replace("--method-option ", "") or "-"
        ratio = statistics.mean(epoch_time(r) for r in group) / statistics.mean(epoch_time(r) for r in alone)
        change = statistics.mean(last_epochs_change(r) for r in group)
        vs_kdiffusion = ""
        if ablated:
            vs_kdiffusion = (shown(gain_change(group, alone, runs["KDiffusion"], runs[alone_of["KDiffusion"]]))
                             if label.startswith("KDiffusion ") else "-") + " | "
        lines.append(f"| {label} | {method} | {setting} | {len(group)} | {spread} | "
                     f"{shown(paired(group, alone)) if label != alone_of[label] else '-'} | {vs_kd} | "
                     f"{vs_kdiffusion}{ratio:.2f}x | {change:.2f} |")
    return lines


NETWORK_FLAGS = {"--branches": "m", "--points": "points"}  # flags that change the training-time network


def network_flags(flags: list[str]) -> dict[str, str]:
    """The flags among ``flags`` that change the training-time network, with their values."""
    return {flag: flags[flags.index(flag) + 1] for flag in NETWORK_FLAGS if flag in flags}


def network_of(flags: list[str]) -> str:
    """The label part naming a row's training-time network when it is not the default one ("" when it is):
    ``m=8`` for ``--branches 8``, ``points=multi`` for ``--points multi``."""
    return " ".join(f"{NETWORK_FLAGS[flag]}={value}" for flag, value in network_flags(flags).items())


def kdiffusion_settings(flags: list[str]) -> dict[str, object]:
    """Every KDiffusion option with the value these flags give it (a repeated option: the last, as in the CLI)."""
    from pipeline.cli import parse_method_options
    from pipeline.methods import method_settings

    return method_settings("kdiffusion", parse_method_options(
        tuple(flags[i + 1] for i, flag in enumerate(flags) if flag == "--method-option")))


def diffusion_weight(flags: list[str]) -> float:
    """The weight KDiffusion's flags put on the fused (deployed) feature: ``lambda_diff`` times the curvature
    ``L_diff`` puts on it at one point (``kdiffusion.fused_curvature``) times the points (their losses are summed)."""
    from pipeline.config import StudentConfig
    from pipeline.methods.kdiffusion import fused_curvature
    from models.reparam import POINT_COUNTS

    o = kdiffusion_settings(flags)
    network = network_flags(flags)
    m = int(network.get("--branches", StudentConfig.model_fields["m"].default))
    points = POINT_COUNTS[network.get("--points", StudentConfig.model_fields["points"].default)]
    curvature = fused_curvature(m, o["chain"], o["weights"], o["var_floor"], o["schedule"], o["N"], o["snr_cap"])
    return o["lambda_diff"] * points * curvature


def at_matched_scale(reference: list[str], flags: list[str]) -> list[str]:
    """``flags`` with ``lambda_diff`` rescaled so that their weight on the fused feature is ``reference``'s: an
    ablation then changes its one thing and not also the loss scale (``weights=last`` and ``m=1`` put 3.5x the
    default's curvature on the fused feature, ``--points multi`` 3x)."""
    ratio = diffusion_weight(reference) / diffusion_weight(flags)
    if math.isclose(ratio, 1.0, rel_tol=1e-9):
        return flags
    lambda_diff = kdiffusion_settings(flags)["lambda_diff"]
    return [*flags, *option_flags(lambda_diff=f"{lambda_diff * ratio:.4g}")]


def plan_rows(chosen: dict[str, list[str]], ablation_labels: list[str], matched_scale: bool = False
              ) -> tuple[dict[str, tuple[str, list[str]]], dict[str, str]]:
    """The test-phase rows (label -> (method, flags)) and, for each, the label of the student-alone row it is
    paired with: the one with the same training-time network (branch count ``m`` and distillation points, e.g.
    ReviewKD's multi-point grid or the m=8 ablation), added where the default student alone is another network
    and itself paired with the default one. ``matched_scale``: each KDiffusion ablation with the chosen setting's
    weight on the fused feature (:func:`at_matched_scale`)."""
    rows = {LABELS[m]: (m, flags) for m, flags in chosen.items()}
    if "kdiffusion" in chosen:
        variants = ablations(chosen["kdiffusion"])
        variance = next(label for label in variants if label.startswith("variance="))
        known = {**variants, "variance": variants[variance]}
        unknown = sorted({part for label in ablation_labels for part in label.split("+")} - set(known) - {"all"})
        if unknown:
            raise SystemExit(f"unknown ablation(s) {', '.join(unknown)}; valid: all, {', '.join(variants)} "
                             "(join several with + for one row with all of them)")
        for label in (list(variants) if "all" in ablation_labels else []) + ablation_labels:
            if label == "all":
                continue
            parts = [variance if part == "variance" else part for part in label.split("+")]
            changes = [flag for part in parts for flag in known[part][len(chosen["kdiffusion"]):]]
            flags = [*chosen["kdiffusion"], *changes]
            rows[f"KDiffusion {'+'.join(parts)}"] = (
                "kdiffusion", at_matched_scale(chosen["kdiffusion"], flags) if matched_scale else flags)
    alone_of = {}
    for label, (method, flags) in list(rows.items()):
        network = network_of(flags)
        alone_of[label] = f"student alone {network}" if network else "student alone"
        if network and method != "none":
            rows[alone_of[label]] = ("none", [part for item in network_flags(flags).items() for part in item])
            alone_of[alone_of[label]] = "student alone"  # shows what the other network alone changes
    return rows, alone_of


LABELS = {"none": "student alone", "kd": "KD", "dkd": "DKD", "fitnet": "FitNet", "at": "AT", "pkt": "PKT",
          "sp": "SP", "rkd": "RKD", "vid": "VID", "ofd": "OFD",
          "reviewkd": "ReviewKD", "crd": "CRD", "kdiffusion": "KDiffusion", "fitnet+kd": "FitNet+KD",
          "reviewkd+kd": "ReviewKD+KD", "kdiffusion+kd": "KDiffusion+KD"}


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of every benchmark built on this protocol (this one, quantization.py): the run cache, the
    regime, the teacher, the data, parallelism and the results file."""
    parser.add_argument("--out", type=Path, default=Path.home() / ".cache" / "kdiff-pipeline" / "kd-methods")
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--teacher-ckpt", help="a finished teacher's model.pt (default: train and cache one)")
    parser.add_argument("--data-root", help="dataset folder (default: the pipeline's)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="threads per run")
    parser.add_argument("--results", type=Path, help="also write the tables as markdown here")


def publish(title: str, text: str, results: Path | None) -> None:
    """Print a benchmark's tables; with ``results``, also write them as markdown under ``title``, headed by the
    command that made them (this benchmark's script and its arguments)."""
    print(text)
    if results:
        command = f"python benchmarks/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:])
        results.write_text(f"# {title}\n\n```bash\n{command}\n```\n\n{text}\n")
        print(f"wrote {results}")


def parse_names(parser: argparse.ArgumentParser, text: str, valid: Iterable[str], what: str) -> list[str]:
    """A comma-separated list of names; an unknown one ends the program with the valid ones listed."""
    names, valid = text.split(","), list(valid)
    unknown = sorted(set(names) - set(valid))
    if unknown:
        parser.error(f"unknown {what}(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_arguments(parser)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--student", default="shufflenetv2_x0_5")
    parser.add_argument("--methods", default="none,kd,dkd,fitnet,kdiffusion",
                        help=f"comma-separated, from {','.join(GRIDS)}")
    parser.add_argument("--max-settings", type=int, default=4, help="tuning budget per method")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--ablations", default="all",
                        help="KDiffusion ablation rows: all, none (empty) or a comma-separated list of labels; "
                             "labels joined by + make one row with all those changes (variance+m=8)")
    parser.add_argument("--setting", action="append", default=[], metavar="METHOD:OPTION=VALUE[,...]",
                        help="use this setting for METHOD instead of tuning it (e.g. the one chosen at another "
                             "scale: kd:temperature=2,alpha=0.9); repeat for several methods")
    parser.add_argument("--matched-scale", action="store_true",
                        help="run each KDiffusion ablation with lambda_diff rescaled to the chosen setting's weight "
                             "on the fused feature (lambda_diff x points x the chain's curvature)")
    args = parser.parse_args()
    methods = parse_names(parser, args.methods, GRIDS, "method")
    if "none" not in methods:
        methods.insert(0, "none")
    try:
        fixed = dict(fixed_setting(text) for text in args.setting)
    except ValueError as exc:
        parser.error(str(exc))
    unlisted = sorted(set(fixed) - set(methods))
    if unlisted:
        parser.error(f"--setting for {', '.join(unlisted)}, which --methods does not list ({','.join(methods)})")
    started = time.time()
    protocol = Protocol(args)
    teacher = protocol.teacher()
    teacher_meta = json.loads((teacher.parent / "metrics.json").read_text())

    chosen = protocol.tune(methods, teacher, fixed)
    rows, alone_of = plan_rows({m: chosen[m][0] for m in methods},
                               [] if args.ablations in ("", "none") else args.ablations.split(","), args.matched_scale)
    runs = protocol.test(rows, teacher)

    tuning = ["| method | setting | validation top-1 (%) | chosen |", "|---|---|---|---|"]
    for m in methods:
        for flags, score in chosen[m][1] or [(chosen[m][0], None)]:
            setting = " ".join(flags).replace("--method-option ", "") or "-"
            shown_score = "given (--setting), not tuned" if score is None else f"{score:.2f}"
            tuning.append(f"| {LABELS[m]} | {setting} | {shown_score} | {'yes' if flags == chosen[m][0] else ''} |")
    main_rows = table(rows, runs, alone_of)
    sample = next((r for group in runs.values() for r in group if r.metrics.get("arch", {}).get("feature_pairs")),
                  None)
    s = protocol.scale
    notes = [f"teacher: {teacher_meta['arch']['name']} {teacher_meta['top1']:.2f}% test top-1 "
             f"({teacher_meta['epochs']} epochs on {teacher_meta.get('train_images', '?')} images)",
             f"student: {args.student}, {s.subset} labelled images, {s.epochs} epochs, batch {s.batch_size}, "
             f"{s.image_size}x{s.image_size}, fp32, the student recipe (AdamW 3e-3, wd 0.01, cosine)",
             f"tuning: <= {args.max_settings} settings per method, seed 0, {s.validation} validation images held out "
             f"of the training split; test: {args.seeds} seeds on the "
             f"{'test split' if not s.eval_subset else f'{s.eval_subset}-image test subset'}"
             + (f"; not tuned here (setting given with --setting): {', '.join(LABELS[m] for m in fixed)}"
                if fixed else ""),
             f"feature map sizes (C x H x W without C): {map_sizes(sample) if sample else '-'}",
             "`*`: the 95% interval of the paired difference excludes 0",
             *(["KDiffusion's ablations at matched scale: lambda_diff rescaled so that lambda_diff x points x the "
                "chain's curvature on the fused feature is the chosen setting's"] if args.matched_scale else []),
             f"wall time of this invocation {time.time() - started:.0f} s; machine: {machine_note()}"]
    text = "\n".join(["## Tuning (validation split)", "", *tuning, "", "## Test (chosen settings)", "", *main_rows,
                      "", *[f"- {n}" for n in notes]])
    publish("Distillation methods under one tuning protocol", text, args.results)


if __name__ == "__main__":
    main()
