"""The report says what to ship and why, from the run's own evidence: one file, named alike in the headline, the
ship line and the table, with that file's figures; a distilled student worse than the student alone is said
first; untrustworthy latency figures are marked; the INT8 files are in the plots. The suite's tiny run, and
clones of it whose stage files are changed to the situation under test (the report is rebuilt from them)."""
from __future__ import annotations

import json
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
