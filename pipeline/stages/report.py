"""The report stage: ``RUN_DIR/report.md`` for a person, ``RUN_DIR/report.json`` for a machine, PNG plots.

Everything is read from the stages' own files; the report is rebuilt only when
one of them changed (``report/stage.json`` holds their hashes).
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import names
from pipeline.layout import RunLayout
from pipeline.stages.base import Stage, StageSpec
from exporters.latency import SPREAD_LIMIT, load_warning, noisy
from exporters.sessions import ARM_MACHINES
from pipeline.training.checkpoint import (atomic_write, atomic_write_json, atomic_write_text, file_sha256, read_json,
                                         settings_digest)

log = logging.getLogger(__name__)



def sources(layout: RunLayout) -> list[Path]:
    """Every file the report is made from (the manifest aside, it decides whether the report is rebuilt)."""
    baselines = [run.student for run in layout.baseline_runs().values()] or [layout.baseline.student]
    return [layout.manifest, layout.config, layout.teacher.metrics, layout.teacher.metrics_log,
            layout.student.metrics, layout.student.metrics_log,
            *[path for b in baselines for path in (b.metrics, b.metrics_log)],
            layout.fused.metrics, layout.fused.equivalence, layout.export.equivalence, layout.export.manifest,
            layout.export.int8_report, layout.bench.latency]


def _yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return rows


def collect(layout: RunLayout) -> dict[str, Any]:
    """The report's content as one JSON-able dict."""
    manifest = read_json(layout.manifest) or {}
    teacher = read_json(layout.teacher.metrics) or {}
    student = read_json(layout.student.metrics) or {}
    baseline = read_json(layout.baseline.student.metrics) or {}
    fused = read_json(layout.fused.metrics) or {}
    export_manifest = read_json(layout.export.manifest) or {}
    latency = read_json(layout.bench.latency) or {}
    arch = student.get("arch", {})
    accuracy = [
        {"model": f"{names.TEACHER} ({teacher.get('arch', {}).get('name', '?')})", "role": "teacher",
         "top1": teacher.get("top1"), "params": teacher.get("arch", {}).get("params")},
        {"model": f"{names.baseline()}: {arch.get('name', '?')}, same budget", "role": "baseline",
         "top1": baseline.get("top1")},
        *[{"model": f"{names.baseline(method)}: {arch.get('name', '?')}, same budget, default options",
           "role": f"baseline-{method}", "top1": (read_json(run.student.metrics) or {}).get("top1")}
          for method, run in layout.baseline_runs().items() if method != "none"],
        {"model": f"{names.student(arch.get('method'))} (multi-branch {arch.get('name', '?')}, "
                  f"{arch.get('method', '?')})",
         "role": "student", "top1": student.get("top1")},
        {"model": f"{names.FUSED} ({(read_json(layout.fused.model_info) or {}).get('architecture', '?')})",
         "role": "fused", "top1": fused.get("top1")},
    ]
    config = _yaml(layout.config)
    return {
        "run": manifest.get("run", {}),
        "dataset": student.get("dataset") or teacher.get("dataset"),
        "image_size": student.get("image_size"),
        "test_images": student.get("test_images"),
        "eval_split": student.get("eval_split") or "test",  # "validation" under --validation (tuning runs)
        "train_images": student.get("train_images"),
        "teacher_train_images": teacher.get("train_images"),
        "accuracy": [a for a in accuracy if a["top1"] is not None],
        "precision": {role: metrics.get("precision") for role, metrics in
                      (("teacher", teacher), ("student", student), ("baseline", baseline)) if metrics},
        "student": {"arch": arch.get("name"), "method": arch.get("method"),
                    "method_options": arch.get("method_options"), "multibranch": arch.get("multibranch"),
                    "teacher": arch.get("teacher")},
        "curves": {name: _jsonl(folder.metrics_log) for name, folder in
                   ((names.TEACHER, layout.teacher), (names.student(arch.get("method")), layout.student),
                    (names.baseline(), layout.baseline.student))},
        "equivalence": {"fuse": read_json(layout.fused.equivalence),
                        "export": read_json(layout.export.equivalence)},
        "latency": latency,
        "artifacts": {"input": export_manifest.get("input"), "output": export_manifest.get("output"),
                      "files": export_manifest.get("artifacts", []), "onnx": export_manifest.get("onnx")},
        "stages": manifest.get("stages", {}),
        "deployables": deployables(export_manifest, read_json(layout.export.int8_report), fused.get("top1"), latency),
        "data_root": ((config.get("data") or {}).get("data_root")),
        "run_dir": str(layout.root),
    }


# The model files of the export folder, as a user picks one: (file, format, precision, runtime, bench variant).
MODEL_FILES = (("model.onnx", "ONNX", "fp32", "onnxruntime", "fused"),
               ("model_int8.onnx", "ONNX (QDQ)", "int8", "onnxruntime", "int8"),
               ("openvino/model.xml", "OpenVINO IR", "fp32", "openvino", "fused"),
               ("openvino/model_fp16.xml", "OpenVINO IR", "fp16 weights", "openvino", None),
               ("openvino/model_int8.xml", "OpenVINO IR", "int8", "openvino", "int8"))


def deployables(manifest: dict[str, Any], int8: dict[str, Any] | None, fused_top1: float | None,
                latency: dict[str, Any]) -> dict[str, Any]:
    """One row per model file in the export folder (format, precision, bytes with its weights, test top-1,
    top-1 agreement with fp32, batch-1 CPU p50, whether it passed its gate), the file to ship per runtime
    (``ship_per_runtime``) and the headline's one file (``ship``: the choice of the fastest runtime)."""
    sizes = {a["path"]: a["bytes"] for a in manifest.get("artifacts", [])}
    judged = {r["file"]: r for r in (int8 or {}).get("results", [])}
    float_top1 = {r["float_file"]: r["float_top1"] for r in judged.values()}
    p50 = {(r["backend"], r["variant"]): r["p50_ms"] for r in latency.get("results", [])
           if r.get("status") == "ok" and r["device"] == "cpu" and r["batch"] == 1}
    rows = []
    for file, fmt, precision, runtime, variant in MODEL_FILES:
        if file not in sizes:
            continue
        weights = file.replace(".xml", ".bin") if file.endswith(".xml") else f"{file}.data"
        row = {"file": file, "format": fmt, "precision": precision, "runtime": runtime,
               "bytes": sizes[file] + sizes.get(weights, 0), "top1": None, "agreement": None,
               "p50_ms_batch1": p50.get((runtime, variant)) if variant else None,
               # fp32 files exist only once the export gates passed; the fp16 IR is reported, never gated
               "passed": judged[file].get("passed") is True if file in judged else precision == "fp32"}
        if file in judged:
            row.update(top1=judged[file]["int8_top1"], agreement=judged[file]["agreement"])
        elif precision == "fp32":  # the fused student's function, proven by the export gates
            row.update(top1=float_top1.get(file, fused_top1), agreement=100.0)
        rows.append(row)
    per_runtime = ship_per_runtime(rows, int8, latency.get("machine"))
    return {"rows": rows, "ship": headline_choice(per_runtime, int8), "ship_per_runtime": per_runtime,
            "int8_gate": int8}


def int8_state(int8: dict[str, Any] | None) -> str:
    """What became of the INT8 step, said beside each choice."""
    if int8 is None:
        return "no INT8 artifacts were made (--no-int8)"
    return "the INT8 artifacts passed their accuracy gate" if int8.get("passed", True) else \
        "INT8 failed its accuracy gate; the float artifacts passed theirs"


def ship_per_runtime(rows: list[dict[str, Any]], int8: dict[str, Any] | None,
                     machine: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Per runtime, the file to ship among those that passed their gates: the fastest at batch 1 on the CPU the
    benchmark ran on; where none of them was timed, the smallest."""
    measured_on = {"cpu": machine.get("cpu"), "arch": machine.get("arch")} if machine else None
    choices: dict[str, dict[str, Any]] = {}
    for runtime in dict.fromkeys(r["runtime"] for r in rows):
        passed = [r for r in rows if r["runtime"] == runtime and r["passed"]]
        if not passed:
            continue
        timed = [r for r in passed if r["p50_ms_batch1"] is not None]
        if timed and measured_on:
            row = min(timed, key=lambda r: r["p50_ms_batch1"])
            why = (f"the fastest {runtime} file that passed its gates (batch-1 CPU p50 on {measured_on['cpu']}, "
                   f"{measured_on['arch']})")
        else:
            row = min(passed, key=lambda r: r["bytes"])
            why = f"the smallest {runtime} file that passed its gates; its latency was not measured"
        choices[runtime] = {"file": row["file"], "why": f"{why}; {int8_state(int8)}", "bytes": row["bytes"],
                            "p50_ms_batch1": row["p50_ms_batch1"] if timed and measured_on else None,
                            "top1": row["top1"], "measured_on": measured_on if timed else None}
    return choices


def headline_choice(per_runtime: dict[str, dict[str, Any]], int8: dict[str, Any] | None) -> dict[str, Any] | None:
    """The one file the first screen names: the per-runtime choice of the fastest runtime, or, with no runtime
    timed, the smallest of the per-runtime choices (the rule each runtime's own choice followed then)."""
    if not per_runtime:
        return None
    timed = [c for c in per_runtime.values() if c["p50_ms_batch1"] is not None]
    if not timed:
        best = min(per_runtime.values(), key=lambda c: c["bytes"])
        return {"file": best["file"], "why": best["why"]}
    best = min(timed, key=lambda c: c["p50_ms_batch1"])
    where = best["measured_on"]
    return {"file": best["file"], "why": f"the fastest file that passed its gates in any runtime (batch-1 CPU p50 on "
                                         f"{where['cpu']}, {where['arch']}); {int8_state(int8)}"}


def per_runtime_lines(deploy: dict[str, Any], split: str) -> list[str]:
    """One line per runtime: the file to ship there with its size, top-1 and batch-1 CPU p50 and where that was
    measured (or that it was not)."""
    lines = []
    for runtime, choice in (deploy.get("ship_per_runtime") or {}).items():
        where = choice.get("measured_on")
        timing = (f"{choice['p50_ms_batch1']:.3f} ms batch-1 CPU p50 on {where['cpu']} ({where['arch']})" if where
                  else "latency not measured")
        lines.append(f"- {runtime}: `export/{choice['file']}` ({choice['bytes'] / 1e6:.2f} MB, "
                     f"{_fmt(choice['top1'], '.2f', '%')} {split} top-1, {timing})")
    return ["Per runtime, the file to ship (the fastest that passed its gates):", "", *lines, ""] if lines else []


def arm_lines(deploy: dict[str, Any]) -> list[str]:
    """For an ARM (aarch64) board, when the figures above come from another architecture: they do not carry over,
    and OpenVINO's INT8 IR runs its quantizers in float there (``exporters.sessions.int8_kernels_trusted``), so
    INT8 speed on ARM comes from ONNX Runtime's file (both checked by outcome under emulation: docs/device.md)."""
    choices = deploy.get("ship_per_runtime") or {}
    measured = {str(c["measured_on"].get("arch") or "").lower() for c in choices.values()
                if isinstance(c.get("measured_on"), dict)}  # latency.json may predate or lack the machine's arch
    if not choices or measured & set(ARM_MACHINES):
        return []
    passed = {r["file"] for r in deploy.get("rows") or [] if r.get("passed")}
    int8 = ("; OpenVINO's INT8 IR runs its quantizers in float there (no int8 kernels), so for INT8 on ARM ship "
            "`export/model_int8.onnx` (ONNX Runtime)") if "model_int8.onnx" in passed else ""
    return [f"On an ARM (aarch64) board: time the files there with `kdiff-runtime bench --model FILE`, these "
            f"figures do not carry over{int8} (docs/device.md).", ""]


# --------------------------------------------------------------------------- plots

ROLE_COLORS = {"teacher": "#4c72b0", "student": "#dd8452", "fused": "#55a868", "int8": "#8172b3"}


def accuracy_bars(report: dict[str, Any]) -> list[tuple[str, float, str]]:
    """The accuracy plot's bars (label, top-1, colour): every model of the run, then the INT8 files with their own
    top-1 (the fp32 files compute the fused student's function, so they need no bar of their own)."""
    bars = [(a["model"], a["top1"], ROLE_COLORS.get(a["role"], "#999999")) for a in report["accuracy"]]
    return bars + [(f"{row['format']} int8 ({row['file']})", row["top1"], ROLE_COLORS["int8"])
                   for row in (report.get("deployables") or {}).get("rows", [])
                   if row["precision"] == "int8" and row["top1"] is not None]


LATENCY_VARIANTS = ("fused", "int8", "unfused", "stock")  # the latency plot's bars per target, in this order


def latency_bars(report: dict[str, Any]) -> tuple[list[tuple[str, str, int]], dict[str, list[float]]]:
    """The latency plot: its groups (backend, device, batch) and, per variant measured, the p50 of each group."""
    rows = [r for r in report["latency"].get("results", []) if r.get("status") == "ok"]
    groups = sorted({(r["backend"], r["device"], r["batch"]) for r in rows}, key=lambda g: (g[1], g[0], g[2]))
    return groups, {variant: [next((r["p50_ms"] for r in rows if (r["backend"], r["device"], r["batch"]) == g
                                    and r["variant"] == variant), 0.0) for g in groups]
                    for variant in LATENCY_VARIANTS if any(r["variant"] == variant for r in rows)}


def _plots(report: dict[str, Any], folder: Path) -> dict[str, str]:
    split = report.get("eval_split", "test")  # the split every top-1 below is measured on
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}

    curves = {k: v for k, v in report["curves"].items() if v}
    if curves:
        fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.6))
        for name, rows in curves.items():
            epochs = [r["epoch"] for r in rows]
            (line,) = ax_acc.plot(epochs, [r["test_top1"] for r in rows], marker="o", label=f"{name} {split}")
            ax_acc.plot(epochs, [r["train_top1"] for r in rows], linestyle="--", marker=".", alpha=0.6,
                        color=line.get_color(), label=f"{name} train")
            ax_loss.plot(epochs, [r["train_loss"] for r in rows], marker="o", color=line.get_color(), label=name)
        ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="accuracy per epoch (dashed: training batches)")
        for ax in (ax_acc, ax_loss):
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss (students: task + distillation)")
        for ax in (ax_acc, ax_loss):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        made["training_curves"] = _save(fig, folder / "training_curves.png")

    bars_data = accuracy_bars(report)
    if bars_data:
        fig, ax = plt.subplots(figsize=(7, 2 + 0.3 * len(bars_data)))
        labels, values, colors = zip(*bars_data)
        bars = ax.barh(labels, values, color=colors)
        ax.bar_label(bars, labels=[f"{v:.2f}%" for v in values], padding=3, fontsize=8)
        low = max(0.0, min(values) - 10)
        ax.set(xlim=(low, min(100.0, max(values) + 5)), xlabel=f"{split} top-1 (%)", title="accuracy")
        ax.invert_yaxis()
        made["accuracy"] = _save(fig, folder / "accuracy.png")

    groups, series = latency_bars(report)
    if groups:
        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups)), 3.6))
        width = 0.8 / len(series)
        for i, (variant, values) in enumerate(series.items()):
            ax.bar([x + i * width for x in range(len(groups))], values, width, label=variant)
        variants = list(series)
        ax.set_xticks([x + width * (len(variants) - 1) / 2 for x in range(len(groups))],
                      [f"{b}\n{d} b{n}" for b, d, n in groups], fontsize=8)
        ax.set(ylabel="p50 latency (ms, log)", yscale="log", title="latency per backend, device and batch")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        made["latency"] = _save(fig, folder / "latency.png")
    return made


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path.name


# --------------------------------------------------------------------------- markdown

def _fmt(value: Any, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


# What one seed's gain is worth: the seed-to-seed spread of the paired (same seed) difference between a distilled
# student and the student alone, measured in benchmarks/results/2026-12-06-kd-methods.md (0.2-0.5 points of paired
# std over 5 seeds): a difference under about 1 point is within seed noise.
SEED_NOISE_POINTS = 1.0


def distillation_verdict(report: dict[str, Any]) -> dict[str, Any] | None:
    """The distilled student against the student trained alone: the gain, the noise it is judged against and
    whether it is ``better``, ``worse`` or ``within noise``.

    The noise is the larger of the seed-to-seed spread our benchmark measured and the sampling noise of the test
    images (the standard error of a difference of two accuracies on n images: a 100-image test set cannot tell
    models 1 point apart).
    """
    acc = {a["role"]: a["top1"] for a in report["accuracy"]}
    if "student" not in acc or "baseline" not in acc:
        return None
    gain, n = acc["student"] - acc["baseline"], report.get("test_images") or 0
    p = min(max((acc["student"] + acc["baseline"]) / 200, 0.0), 1.0)
    sampling = 100 * math.sqrt(2 * p * (1 - p) / n) if n else float("inf")
    noise = max(SEED_NOISE_POINTS, sampling)
    verdict = "within noise" if abs(gain) < noise else "better" if gain > 0 else "worse"
    return {"gain": round(gain, 2), "noise": round(noise, 2), "seed_noise": SEED_NOISE_POINTS,
            "sampling_noise": round(sampling, 2), "images": n, "verdict": verdict, "distilled": acc["student"],
            "alone": acc["baseline"]}


def _noise_text(v: dict[str, Any]) -> str:
    return (f"about {v['noise']:.1f} points: the larger of the seed-to-seed noise our benchmark measured "
            f"({v['seed_noise']:.0f} point) and the sampling noise of {v['images']} test images "
            f"({v['sampling_noise']:.1f})")


def alone_commands(report: dict[str, Any]) -> str:
    """The commands that make the student trained alone shippable (fused, exported, gated) in a run of its own."""
    run_dir = report.get("run_dir") or "RUN_DIR"
    data = f" --data-root {report['data_root']}" if report.get("data_root") else ""
    return (f"`mkdir -p {run_dir}-alone && cp -r {run_dir}/baseline/student {run_dir}-alone/ && "
            f"pipeline fuse --run-dir {run_dir}-alone{data} && pipeline export --run-dir {run_dir}-alone{data}`")


def recommendation(report: dict[str, Any]) -> dict[str, Any] | None:
    """The file to ship with its own figures (the same in the headline, the ship line and the table), and the
    evidence of the run that qualifies it."""
    deploy = report.get("deployables") or {}
    ship = deploy.get("ship")
    if not ship:
        return None
    row = next(r for r in deploy["rows"] if r["file"] == ship["file"])
    torch_b1 = next((r["p50_ms"] for r in report["latency"].get("results", []) if r.get("status") == "ok"
                     and (r["backend"], r["variant"], r["device"], r["batch"]) == ("torch", "fused", "cpu", 1)), None)
    variant = "int8" if row["precision"] == "int8" else "fused"
    timed = next((r for r in report["latency"].get("results", []) if r.get("status") == "ok" and r["device"] == "cpu"
                  and r["batch"] == 1 and (r["backend"], r["variant"]) == (row["runtime"], variant)), None)
    return {**ship, "model": f"the {names.DISTILLED}, fused", "row": row, "torch_p50_ms": torch_b1,
            "noisy": noisy(timed) if timed else None, "load": load_warning(report["latency"]),
            "distillation": distillation_verdict(report)}


def ship_line(rec: dict[str, Any], split: str) -> str:
    """``**Ship `export/FILE`**`` with that file's own figures: one sentence for the headline and the ship section."""
    row = rec["row"]
    text = (f"**Ship `export/{rec['file']}`** ({rec['model']}, {row['format']} {row['precision']}, "
            f"{row['bytes'] / 1e6:.2f} MB): {_fmt(row['top1'], '.2f', '%')} {split} top-1")
    if row["p50_ms_batch1"] is not None:
        text += f", {row['p50_ms_batch1']:.3f} ms per image in {row['runtime']} (batch-1 CPU p50"
        if rec.get("torch_p50_ms"):
            text += f"; torch eager {rec['torch_p50_ms']:.2f} ms"
        text += ")"
    text += f"; {rec['why']}."
    if rec.get("noisy") or rec.get("load"):
        text += " Its latency is not a trustworthy figure: " + "; ".join(x for x in (rec.get("noisy"), rec.get("load"))
                                                                          if x) + "."
    return text


def _training_images(report: dict[str, Any]) -> str:
    """The student's training images, and the teacher's where it trained on more (the few-labels setting)."""
    mine, teachers = report.get("train_images"), report.get("teacher_train_images")
    if mine and teachers and teachers != mine:
        return f"the students on {mine} labelled images, the teacher on {teachers}"
    return f"{mine or '?'} training images"


def method_evidence(student: dict[str, Any]) -> str:
    """Where the run's distillation method came from: the default, with the measurement that chose it (file and
    row), or the run's own choice, with the default's evidence for comparison."""
    from pipeline.config import DEFAULT_METHOD_EVIDENCE as evidence, StudentConfig
    from pipeline.methods import method_settings

    default = StudentConfig.model_fields["method"].default
    source = f"`{evidence['file']}`, row \"{evidence['row']}\", measured on the pair {evidence['pair']}"
    if student.get("method") == default and student.get("method_options") == method_settings(default, {}):
        return f"The method and its options are the default, chosen by measurement ({source})."
    return (f"The method or its options were this run's choice; the default is {default} with its default options, "
            f"chosen by measurement ({source}).")


def _summary(report: dict[str, Any]) -> list[str]:
    """The report's first screen: what distillation did, what to ship with its figures, then the run."""
    split = report.get("eval_split", "test")  # the split every top-1 below is measured on
    run, rec = report["run"], recommendation(report)
    verdict = (rec or {}).get("distillation") or distillation_verdict(report)
    md: list[str] = []
    if verdict and verdict["verdict"] == "worse":
        md += [f"**Distillation made this student worse**: the {names.DISTILLED} scores {verdict['distilled']:.2f}% "
               f"{split} top-1, {-verdict['gain']:.2f} points below the same student trained alone "
               f"({verdict['alone']:.2f}%), beyond the noise ({_noise_text(verdict)}). Ship the student trained "
               f"alone instead: this run trained it (`baseline/student/`) but did not export it; "
               f"{alone_commands(report)} fuses, exports and gates it like this run's files. The file named below is "
               f"the best of those this run exported, all of them the {names.DISTILLED}'s. To make distillation pay, "
               "give the teacher more epochs or use a stronger teacher.", ""]
    if rec:
        md += [ship_line(rec, split), ""]
    text = [f"**{run.get('student', '?')}** distilled from **{run.get('teacher', '?')}** with "
            f"**{report['student'].get('method', '?')}** on **{report.get('dataset', '?')}** "
            f"({_training_images(report)}, {report.get('test_images', '?')} {split} images, "
            f"{report.get('image_size', '?')}x{report.get('image_size', '?')} px).", method_evidence(report["student"])]
    if verdict:
        judged = {"better": "beyond the noise", "worse": "beyond the noise",
                  "within noise": "within the noise"}[verdict["verdict"]]
        text.append(f"Distillation gain over the student alone: {verdict['gain']:+.2f} points from one seed, "
                    f"{judged} ({_noise_text(verdict)}).")
    precision = report.get("precision") or {}
    if precision:
        text.append("Training arithmetic: " + ", ".join(f"{role} {value}" for role, value in precision.items()) + ".")
    eq = report["equivalence"]
    gates = [("fusion", eq.get("fuse")), ("export", eq.get("export"))]
    text.append("Equivalence gates: " + ", ".join(
        f"{name} {'passed' if data and data.get('passed') else 'FAILED' if data else 'not run'}"
        for name, data in gates) + ".")
    md += [" ".join(text), ""]
    if run.get("profile") == "tiny":
        md += ["*Profile `tiny`: a smoke test of the chain on a few hundred images; its models stay near chance, so "
               "its figures say that every step works, not how well. `make run` (the `default` profile) trains "
               "for real.*", ""]
    return md


def _int8_gate_lines(gate: dict[str, Any]) -> list[str]:
    """Each INT8 file's drop and agreement with their intervals, the rule they were judged by and the CPU that ran
    the check (INT8 kernels differ between CPUs: VNNI, AMX, AVX2, NEON)."""
    if not gate.get("results"):
        return []
    lines = []
    for r in gate["results"]:
        if "drop_interval" not in r:  # int8.json of a run made before the gate had intervals
            continue
        (d_low, d_high), (a_low, a_high) = r["drop_interval"], r["agreement_interval"]
        level = f"{100 * r['confidence']:g}%"
        noise = (f"; within the noise: {r['images']} images cannot settle it, judge on more with "
                 "`--int8-eval-images`" if r["evidence"] != "clear" else "")
        lines.append(f"- `{r['file']}`: drop {r['drop']:+.2f} points ({level} interval [{d_low:+.2f}, {d_high:+.2f}]), "
                     f"agreement {r['agreement']:.2f}% ({level} interval [{a_low:.2f}, {a_high:.2f}]) on "
                     f"{r['images']} images: {'pass' if r['passed'] else 'FAIL'}{noise}")
    cpu = gate.get("checked_on")
    if lines and gate.get("rule"):
        lines.append(f"- Rule: {gate['rule']}.")
    if lines and cpu:
        lines.append(f"- Checked on {cpu['cpu']} ({cpu['arch']}; ISA {', '.join(cpu['isa']) or '-'}): INT8 kernels "
                     "differ between CPUs (VNNI, AMX, AVX2, NEON), so another CPU may answer a few images otherwise.")
    return lines + [""] if lines else []


def ship_mark(file: str, deploy: dict[str, Any]) -> str:
    """The table's file cell: the headline's file marked ``(ship)``, another runtime's choice ``(ship for it)``."""
    if file == deploy["ship"]["file"]:
        return f"**`{file}` (ship)**"
    runtime = next((rt for rt, c in (deploy.get("ship_per_runtime") or {}).items() if c["file"] == file), None)
    return f"**`{file}` (ship for {runtime})**" if runtime else f"`{file}`"


def to_markdown(report: dict[str, Any], plots: dict[str, str]) -> str:
    split = report.get("eval_split", "test")  # the split every top-1 below is measured on
    run = report["run"]
    md = [f"# Run report: {run.get('teacher', '?')} -> {run.get('student', '?')} on {report.get('dataset', '?')}", ""]
    md += _summary(report)

    md += ["## Accuracy", ""]
    md += _table(["model", f"{split} top-1"], [(a["model"], _fmt(a["top1"], ".2f", "%")) for a in report["accuracy"]])
    if "accuracy" in plots:
        md += [f"![accuracy]({plots['accuracy']})", ""]
    if "training_curves" in plots:
        md += ["### Training curves", "", f"![training curves]({plots['training_curves']})", ""]
    s = report["student"]
    if s.get("multibranch"):
        mb = s["multibranch"]
        md += [f"Student: {s['arch']} with m={mb.get('m')} parallel branches at {mb.get('points')} distillation "
               f"point(s), method {s.get('method')} {json.dumps(s.get('method_options') or {})}; teacher forward "
               f"precision {(s.get('teacher') or {}).get('precision', 'n/a')}.", ""]

    md += ["## Equivalence", ""]
    fuse = report["equivalence"].get("fuse")
    if fuse:
        md += ["Branch fusion (multi-branch student vs fused network):", ""]
        md += _table(["check", "dtype", "max abs diff", "tolerance", "top-1 agreement", "result"],
                     [(c["name"], c["dtype"], f"{c['max_abs_diff']:.2e}", f"{c['tolerance']:.1e}",
                       f"{c['top1_agreement']:.1f}%", "pass" if c["passed"] else "FAIL") for c in fuse["checks"]])
    export = report["equivalence"].get("export")
    if export:
        md += [f"Exported artifacts vs the fused PyTorch model ({export['images']} held-out test images):", ""]
        md += _table(["runtime", "max abs diff", "tolerance", "top-1 agreement", "result"],
                     [(c["name"], f"{c['max_abs_diff']:.2e}", f"{c['tolerance']:.1e}", f"{c['top1_agreement']:.1f}%",
                       "pass" if c["passed"] else "FAIL") for c in export["gated"]]
                     + [(c["name"], f"{c['max_abs_diff']:.2e}", "-", f"{c['top1_agreement']:.1f}%",
                         "reported, not gated") for c in export["reported"]])

    latency = report["latency"]
    if latency:
        m = latency["machine"]
        md += ["## Latency", "",
               f"{m['cpu']}, {m['usable_cores']} usable cores, ISA: {', '.join(m['isa']) or '-'}; GPU: "
               f"{(m.get('gpu') or {}).get('name', 'none')}. {latency['budget']['threads']} threads for every "
               f"backend, {latency['budget']['warmup']} warm-up calls excluded, variants timed in interleaved rounds.",
               ""]
        ok = [r for r in latency["results"] if r["status"] == "ok"]
        shaky = [r for r in ok if noisy(r)]
        load = load_warning(latency)
        if load or shaky:
            md += [f"**Not every figure below is trustworthy.** "
                   + (f"While the benchmark ran, {load}. " if load else "")
                   + (f"{len(shaky)} of {len(ok)} rows spread widely (marked *noisy*: p90 above "
                      f"{SPREAD_LIMIT}x p50 or std above half the mean), so their p50 says more about the machine than "
                      "about the model. " if shaky else "")
                   + "Rerun `pipeline bench --run-dir RUN_DIR` on an idle machine (`--duration` longer) for figures "
                     "to compare.", ""]
        md += _table(["backend", "device", "variant", "batch", "p50 ms", "p90 ms", "p99 ms", "mean +- std ms",
                      "images/s"],
                     [(r["backend"] + (f" ({r['provider']})" if r["provider"] else ""), r["device"], r["variant"],
                       r["batch"], f"{r['p50_ms']:.3f}" + (" *noisy*" if noisy(r) else ""), f"{r['p90_ms']:.3f}",
                       f"{r['p99_ms']:.3f}", f"{r['mean_ms']:.3f} +- {r['std_ms']:.3f}", f"{r['throughput_ips']:.1f}")
                      for r in ok])
        skipped = sorted({(r["backend"] + (f" ({r['provider']})" if r["provider"] else ""), r["device"], r["reason"])
                          for r in latency["results"] if r["status"] != "ok"})
        if skipped:
            md += ["Skipped targets:", ""] + [f"- {b} on {d}: {reason}" for b, d, reason in skipped] + [""]
        if latency.get("ratios"):
            md += _table(["backend", "device", "batch", "ratio", "p50 ratio"],
                         [(q["backend"], q["device"], q["batch"], q["ratio"], f"{q['p50_ratio']:.3f}")
                          for q in latency["ratios"]])
        if "latency" in plots:
            md += [f"![latency]({plots['latency']})", ""]

    deploy = report.get("deployables") or {}
    if deploy.get("rows") and deploy.get("ship"):
        gate = deploy.get("int8_gate") or {}
        settings = gate.get("settings") or {}
        md += ["## Models to ship", "",
               ship_line(recommendation(report), split)
               + (f" INT8 gate: top-1 drop <= {settings['max_drop']:g} points and top-1 agreement with fp32 >= "
                  f"{settings['min_agreement']:g}% on {gate.get('test_images')} {split} images; calibrated on "
                  f"{gate['calibration']['images']} training images (preset {settings['preset']})." if gate else ""),
               ""] + per_runtime_lines(deploy, split) + arm_lines(deploy) + _int8_gate_lines(gate)
        md += _table(["file", "format", "precision", "size (MB)", f"{split} top-1", "agreement with fp32",
                      "batch-1 CPU p50 (ms)"],
                     [(ship_mark(r["file"], deploy),
                       r["format"], r["precision"], f"{r['bytes'] / 1e6:.2f}", _fmt(r["top1"], ".2f", "%"),
                       _fmt(r["agreement"], ".2f", "%"), _fmt(r["p50_ms_batch1"], ".3f")) for r in deploy["rows"]])

    art = report["artifacts"]
    if art.get("files"):
        md += ["## Artifacts", "", "In `export/` (what to ship):", ""]
        md += _table(["file", "bytes", "sha256"], [(f"`{a['path']}`", a["bytes"], f"`{a['sha256']}`")
                                                  for a in art["files"]])
        i = art["input"]
        md += [f"Input `{i['name']}`: float32 {i['layout']} {i['shape']}, {i['channel_order']}, pixels x "
               f"{i['pixel_scale']:.6f}, then (x - mean) / std with mean {i['mean']} and std {i['std']}; "
               f"fitting: {i['fit']}. Output `{art['output']['name']}`: {art['output']['meaning']}. "
               f"ONNX opset {art['onnx']['opset']} ({art['onnx']['exporter']} exporter). "
               f"Classify files with `pipeline predict --model "
               f"export/{(deploy.get('ship') or {}).get('file', 'model.onnx')} IMAGE...`.", ""]

    if report["stages"]:
        md += ["## Stages", ""]
        md += _table(["stage", "status", "last action", "wall time (s)", "settings hash"],
                     [(name, st.get("status"), st.get("action", "-"), _fmt(st.get("wall_s"), ".1f"),
                       f"`{st.get('settings_hash') or '-'}`") for name, st in report["stages"].items()
                      if name != "report"])
    md += ["Machine-readable: `report.json`. Settings: `config.yaml`. Stage records: `manifest.json`.", ""]
    return "\n".join(md)


def write_report(layout: RunLayout) -> dict[str, Any]:
    stage = Stage(layout.report, "report")
    # the manifest changes with every invocation (timings, actions); the report follows the stages' results
    inputs = {layout.relative(path): file_sha256(path) for path in sources(layout)
              if path != layout.manifest and path.is_file()}
    settings_hash = settings_digest(inputs)
    done = stage.finished(settings_hash)
    if done is not None and layout.report_md.exists() and layout.report_json.exists():
        log.info("report: up to date; skipping")
        return done
    report = collect(layout)
    plots = {name: layout.relative(stage.folder / file) for name, file in _plots(report, stage.dir).items()}
    report["plots"] = plots
    atomic_write_json(layout.report_json, report)
    atomic_write_text(layout.report_md, to_markdown(report, plots))
    log.info("report: %s, %s", layout.report_md, layout.report_json)
    files = [Path(path).name for path in plots.values()]
    return stage.mark_complete(settings_hash, files, {"plots": files})


STAGE = StageSpec(name="report", folder=lambda layout: layout.report, run=lambda run: write_report(run.layout),
                  inputs=lambda layout: [layout.teacher.metrics, layout.student.metrics, layout.fused.equivalence,
                                         layout.export.equivalence, layout.bench.latency])
