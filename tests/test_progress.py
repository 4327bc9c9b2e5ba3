"""What a user sees while a run works with its output piped (`| tee`, a CI log, a file): a progress line at a
steady interval with rate and ETA, each model named as the report names it, and no library noise."""
from __future__ import annotations

import re

import pytest

from pipeline.training.progress import ProgressLines, duration


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lines_of(steps: int, seconds_per_step: float, **kwargs) -> list[str]:
    clock = Clock()
    progress = ProgressLines("teacher", 1, 4, steps, clock=clock, **kwargs)
    out = []
    for step in range(1, steps + 1):
        clock.now += seconds_per_step
        line = progress.update(step, step * 64, loss=1.5)
        if line:
            out.append(line)
    return out


def test_a_long_epoch_gets_a_line_at_once_then_every_30_s():
    # 1000 steps of 2 s: 10% of the epoch is 200 s, so the 30 s interval decides
    lines = lines_of(1000, 2.0)
    assert lines[0] == "teacher epoch 1/4: step 1/1000 (0%), 32 img/s, loss 1.5000, epoch ETA 33m18s"
    steps = [int(re.search(r"step (\d+)/", line).group(1)) for line in lines]
    assert steps[:3] == [1, 16, 31]  # then every 30 s (15 steps) ...
    assert {100, 200, 500, 900} <= set(steps)  # ... and at each tenth of the epoch
    assert max(b - a for a, b in zip(steps, steps[1:])) == 15 and steps[-1] < 1000  # none at the end


def test_a_short_epoch_gets_a_line_every_tenth_but_never_two_within_5_s():
    lines = lines_of(100, 1.0)  # 100 s: a line at each 10% (10 s apart)
    assert [int(re.search(r"step (\d+)/", line).group(1)) for line in lines] == [1, 10, 20, 30, 40, 50, 60, 70, 80,
                                                                                 90]
    assert len(lines_of(100, 0.01)) == 1  # one second in all: the first line only


def test_durations_read_as_a_person_writes_them():
    assert [duration(s) for s in (4.4, 65, 3599, 3720)] == ["4s", "1m05s", "59m59s", "1h02m"]


@pytest.mark.slow
def test_a_piped_run_shows_progress_and_names_each_model_as_the_report_does(tiny_run):
    log = (tiny_run.parent / "run.log").read_text()
    for name in ("teacher", "distilled student", "student alone (baseline)"):
        assert re.search(rf"INFO {re.escape(name)} epoch 1/1: step 1/5 \(20%\), \d+ img/s, loss [\d.]+, epoch ETA \d+s",
                         log), name
        assert f"INFO {name} epoch 1/1: loss" in log and f"INFO {name}: test top-1" in log
    assert "INFO student:" not in log and "INFO student epoch" not in log
    curves = __import__("json").loads((tiny_run / "report.json").read_text())["curves"]
    assert set(curves) == {"teacher", "distilled student", "student alone (baseline)"}


@pytest.mark.slow
def test_a_piped_run_prints_no_library_noise(tiny_run):
    log = (tiny_run.parent / "run.log").read_text()
    for noise in ("No CUDA runtime is found", "Performing symbolic shape inference", "{'entries'",
                  "generated new fontManager"):
        assert noise not in log, noise
    table = re.split(r"\n\d\d:\d\d:\d\d ", log.split("INFO bench:\nlatency of", 1)[1])[0].splitlines()[1:]
    assert table[0].startswith("target ") and len(table) > 5
    for line in table:  # the target column is wide enough for every target: two spaces at least after it
        if not line.startswith(("p50 ratios", "warning")):
            assert re.match(r"^\S+\s{2,}\S", line), line
