"""The report says what to ship and why, from the run's own evidence: one file, named alike in the headline, the
ship line and the table, with that file's figures; a distilled student worse than the student alone is said
first; untrustworthy latency figures are marked; the INT8 files are in the plots. The suite's tiny run, and
clones of it whose stage files are changed to the situation under test (the report is rebuilt from them)."""
from __future__ import annotations

import json
import platform
import re
from pathlib import Path

import pytest

from pipeline.layout import RunLayout
from exporters.latency import noisy
from pipeline.stages.report import accuracy_bars, collect, latency_bars, write_report
from tests.conftest import clone_run

pytestmark = pytest.mark.slow

SHIP = re.compile(r"\*\*Ship `export/([^`]+)`\*\* \(.*?MB\): ([\d.]+)% test top-1(?:, ([\d.]+) ms per image)?")


def rewrite_json(path: Path, change) -> None:
    """Change a JSON file of a cloned run (its own copy: clones share the original's files through hard links)."""
    data = json.loads(path.read_text())
    change(data)
    path.unlink()
    path.write_text(json.dumps(data))


def rebuilt_report(run: Path) -> str:
    write_report(RunLayout(run))
    return (run / "report.md").read_text()


def first_screen(markdown: str) -> str:
    """What comes before the first section: the headline a user reads first."""
    return markdown.split("\n## ", 1)[0]


def test_headline_ship_line_and_table_name_one_file_with_its_own_figures(tiny_run):
    markdown = (tiny_run / "report.md").read_text()
    deploy = json.loads((tiny_run / "report.json").read_text())["deployables"]
    row = next(r for r in deploy["rows"] if r["file"] == deploy["ship"]["file"])

    headline = SHIP.search(first_screen(markdown))
    section = markdown.split("## Models to ship", 1)[1]
    ship_section = SHIP.search(section)
    assert headline and ship_section and headline.groups() == ship_section.groups()
    assert headline.group(1) == row["file"]
    assert float(headline.group(2)) == pytest.approx(row["top1"], abs=0.005)
    assert float(headline.group(3)) == pytest.approx(row["p50_ms_batch1"], abs=0.0005)
    marked = [line for line in section.splitlines() if "(ship)**" in line]
    assert len(marked) == 1 and f"`{row['file']}` (ship)" in marked[0] and f"{row['top1']:.2f}%" in marked[0]
    assert "The fused student ships at" not in markdown  # the figures of a file that is not the one shipped
    assert f"pipeline predict --model export/{row['file']}" in markdown


def test_a_distilled_student_worse_than_the_student_alone_is_said_first(tiny_run, tmp_path):
    run = clone_run(tiny_run, tmp_path / "run")
    distilled = json.loads((run / "student" / "metrics.json").read_text())["top1"]
    rewrite_json(run / "baseline" / "student" / "metrics.json", lambda m: m.update(top1=distilled + 30.0))
    screen = first_screen(rebuilt_report(run))
    paragraphs = [p for p in screen.split("\n\n")[1:] if p.strip()]
    assert paragraphs[0].startswith("**Distillation made this student worse**"), paragraphs[0]
    assert "-30.00 points" in paragraphs[2] and "beyond the noise" in paragraphs[2]
    # the better model is offered, with the commands that make it shippable
    assert "Ship the student trained alone instead" in paragraphs[0]
    assert f"cp -r {run}/baseline/student {run}-alone/" in paragraphs[0]
    assert f"pipeline export --run-dir {run}-alone" in paragraphs[0]
    assert paragraphs[1].startswith("**Ship `export/")
    verdict = json.loads((run / "report.json").read_text())
    assert collect(RunLayout(run))["deployables"]["ship"]["file"] == verdict["deployables"]["ship"]["file"]


def test_a_gain_within_the_noise_is_called_so(tiny_run):
    """The tiny run's 100 test images cannot tell two near-chance students apart: no verdict either way."""
    screen = first_screen((tiny_run / "report.md").read_text())
    assert "Distillation made this student worse" not in screen
    assert "*Profile `tiny`: a smoke test of the chain" in screen  # why its models stay near chance
    assert re.search(r"Distillation gain over the student alone: [+-][\d.]+ points from one seed, within the noise "
                     r"\(about [\d.]+ points: .* sampling noise of 100 test images", screen)


def test_untrustworthy_latency_figures_are_marked(tiny_run, tmp_path):
    run = clone_run(tiny_run, tmp_path / "run")
    set_p50(run, {("onnxruntime", "int8"): 0.01})  # the fastest file of all: the one the headline ships

    def spread(latency):
        for r in latency["results"]:
            if r["status"] == "ok":
                r.update(p90_ms=r["p50_ms"] * 1.01, std_ms=0.0)  # steady everywhere ...
        ship = next(r for r in latency["results"] if (r["backend"], r["variant"]) == ("onnxruntime", "int8"))
        ship.update(p90_ms=ship["p50_ms"] * 4)  # ... but the shipped file's own figure
        latency["load"] = {"cores": 2, "other_busy": 0.6, "loadavg_1m": 3.1}

    rewrite_json(run / "bench" / "latency.json", spread)
    markdown = rebuilt_report(run)
    latency = json.loads((run / "bench" / "latency.json").read_text())
    assert [r["variant"] for r in latency["results"] if noisy(r)] == ["int8"]
    section = markdown.split("## Latency", 1)[1].split("\n## ", 1)[0]
    assert "**Not every figure below is trustworthy.**" in section and "other processes used 60%" in section
    assert section.count("*noisy*") == 2  # the warning names the mark, and the one noisy row carries it
    assert "Its latency is not a trustworthy figure: p90 4.0x p50" in first_screen(markdown)


def test_int8_models_are_in_the_accuracy_and_latency_plots(tiny_run):
    report = json.loads((tiny_run / "report.json").read_text())
    labels = [label for label, _, _ in accuracy_bars(report)]
    assert "ONNX (QDQ) int8 (model_int8.onnx)" in labels and "OpenVINO IR int8 (openvino/model_int8.xml)" in labels
    groups, series = latency_bars(report)
    int8 = {(r["backend"], r["device"], r["batch"]): r["p50_ms"] for r in report["latency"]["results"]
            if r["status"] == "ok" and r["variant"] == "int8"}
    assert set(int8) == {("onnxruntime", "cpu", 1), ("openvino", "cpu", 1)}
    assert {g: v for g, v in zip(groups, series["int8"]) if v} == int8


def cpu_batch1(latency: dict, backend: str, variant: str) -> dict:
    """The latency row of one file at batch 1 on the CPU (the figure the choice per runtime compares)."""
    return next(r for r in latency["results"] if r["status"] == "ok" and r["device"] == "cpu" and r["batch"] == 1
                and (r["backend"], r["variant"]) == (backend, variant))


def set_p50(run: Path, figures: dict[tuple[str, str], float]) -> None:
    """The run's batch-1 CPU p50 of each (backend, variant), steady (not noisy) so the figure is taken as it is."""
    def change(latency):
        for (backend, variant), p50 in figures.items():
            cpu_batch1(latency, backend, variant).update(p50_ms=p50, p90_ms=p50 * 1.01, mean_ms=p50, std_ms=0.0)

    rewrite_json(run / "bench" / "latency.json", change)


def test_each_runtime_ships_its_fastest_passed_file_and_the_headline_the_fastest_of_them(tiny_run, tmp_path):
    """OpenVINO's fp32 IR faster than ONNX Runtime's INT8 file on the same CPU: the headline names the IR."""
    run = clone_run(tiny_run, tmp_path / "run")
    set_p50(run, {("openvino", "fused"): 0.25, ("openvino", "int8"): 0.40, ("onnxruntime", "int8"): 0.48,
                  ("onnxruntime", "fused"): 0.60})
    markdown = rebuilt_report(run)
    deploy = json.loads((run / "report.json").read_text())["deployables"]
    machine = json.loads((run / "bench" / "latency.json").read_text())["machine"]
    rows = {r["file"]: r for r in deploy["rows"]}
    choices = deploy["ship_per_runtime"]
    assert {rt: c["file"] for rt, c in choices.items()} == {"onnxruntime": "model_int8.onnx",
                                                            "openvino": "openvino/model.xml"}
    ir = choices["openvino"]
    assert ir["p50_ms_batch1"] == 0.25 and ir["bytes"] == rows["openvino/model.xml"]["bytes"]
    assert ir["top1"] == rows["openvino/model.xml"]["top1"] is not None
    assert ir["measured_on"] == {"cpu": machine["cpu"], "arch": machine["arch"]} and machine["arch"] == platform.machine()
    assert deploy["ship"]["file"] == "openvino/model.xml"

    headline = SHIP.search(first_screen(markdown))
    assert headline and headline.group(1) == "openvino/model.xml" and headline.group(3) == "0.250"
    section = markdown.split("## Models to ship", 1)[1].split("\n## ", 1)[0]
    assert f"- openvino: `export/openvino/model.xml` ({ir['bytes'] / 1e6:.2f} MB, {ir['top1']:.2f}% test top-1, " \
           f"0.250 ms batch-1 CPU p50 on {machine['cpu']} ({machine['arch']}))" in section
    assert "- onnxruntime: `export/model_int8.onnx` (" in section and "0.480 ms batch-1 CPU p50" in section
    assert "**`openvino/model.xml` (ship)**" in section and "**`model_int8.onnx` (ship for onnxruntime)**" in section
    # timed on x86: an ARM board gets its own advice (OpenVINO's INT8 IR runs in float there: docs/device.md)
    assert "On an ARM (aarch64) board: time the files there with `kdiff-runtime bench --model FILE`" in section
    assert "so for INT8 on ARM ship `export/model_int8.onnx` (ONNX Runtime)" in section


def test_a_file_whose_int8_gate_failed_is_never_recommended_however_fast(tiny_run, tmp_path):
    run = clone_run(tiny_run, tmp_path / "run")
    set_p50(run, {("onnxruntime", "int8"): 0.01, ("onnxruntime", "fused"): 0.60, ("openvino", "fused"): 0.90,
                  ("openvino", "int8"): 0.80})

    def fail_onnx_int8(gate):
        gate["passed"] = False
        next(r for r in gate["results"] if r["file"] == "model_int8.onnx")["passed"] = False

    rewrite_json(run / "export" / "int8.json", fail_onnx_int8)
    markdown = rebuilt_report(run)
    deploy = json.loads((run / "report.json").read_text())["deployables"]
    choices = deploy["ship_per_runtime"]
    assert choices["onnxruntime"]["file"] == "model.onnx" and choices["onnxruntime"]["p50_ms_batch1"] == 0.60
    assert "INT8 failed its accuracy gate" in choices["onnxruntime"]["why"]
    assert choices["openvino"]["file"] == "openvino/model_int8.xml"  # its own INT8 verdict passed
    assert deploy["ship"]["file"] == "model.onnx"
    assert "`export/model_int8.onnx`" not in markdown and "**`model_int8.onnx`" not in markdown  # not for ARM either
    assert "On an ARM (aarch64) board" in markdown


def test_a_runtime_without_latency_ships_its_smallest_passed_file_and_says_so(tiny_run, tmp_path):
    run = clone_run(tiny_run, tmp_path / "run")
    rewrite_json(run / "bench" / "latency.json", lambda latency: latency.update(
        results=[r for r in latency["results"] if r["backend"] != "openvino"]))
    markdown = rebuilt_report(run)
    deploy = json.loads((run / "report.json").read_text())["deployables"]
    passed_ir = [r for r in deploy["rows"] if r["runtime"] == "openvino" and r["passed"]]
    assert {r["file"] for r in passed_ir} == {"openvino/model.xml", "openvino/model_int8.xml"}  # fp16: not gated
    smallest = min(passed_ir, key=lambda r: r["bytes"])
    choice = deploy["ship_per_runtime"]["openvino"]
    assert choice["file"] == smallest["file"] and choice["p50_ms_batch1"] is None and choice["measured_on"] is None
    assert "latency was not measured" in choice["why"]
    assert deploy["ship"]["file"] == deploy["ship_per_runtime"]["onnxruntime"]["file"]  # the one runtime timed
    assert f"- openvino: `export/{smallest['file']}` ({smallest['bytes'] / 1e6:.2f} MB, " in markdown
    assert "test top-1, latency not measured)" in markdown


@pytest.mark.parametrize("arch", [None, "aarch64"])
def test_the_arm_line_reads_the_benchmarks_architecture_as_found(tiny_run, tmp_path, arch):
    """latency.json from an older run (no architecture) still gives a report with the ARM advice; figures timed on
    an ARM board need none."""
    run = clone_run(tiny_run, tmp_path / "run")
    rewrite_json(run / "bench" / "latency.json", lambda latency: latency["machine"].update(arch=arch))
    markdown = rebuilt_report(run)
    assert ("On an ARM (aarch64) board" in markdown) == (arch is None)
