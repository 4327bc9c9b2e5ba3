"""benchmarks/default_run.py: the default run's seeds in one table, gains paired by seed."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # it imports kd_methods, its neighbour
    spec = importlib.util.spec_from_file_location("default_run", ROOT / "benchmarks" / "default_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(ROOT / "benchmarks"))
    sys.modules.pop("kd_methods", None)


def test_gains_are_paired_by_seed_with_their_interval(bench):
    per_seed = {0: {"teacher": 88.0, "baseline": 79.0, "student": 81.5, "fused": 81.5},
                1: {"teacher": 87.0, "baseline": 80.0, "student": 82.0, "fused": 82.1},
                2: {"teacher": 88.5, "baseline": 78.5, "student": 81.5, "fused": 81.4}}
    lines = bench.tables(per_seed)
    assert lines[2] == "| 0 | 88.00 | 79.00 | 81.50 | 81.50 | +9.00 | +2.50 | +2.50 |"
    gains = [2.5, 2.0, 3.0]  # distilled - alone per seed: mean 2.5, std 0.5, t(0.975, 2) = 4.3027
    half = 4.302653 * 0.5 / 3 ** 0.5
    assert f"+2.50 [{2.5 - half:+.2f}, {2.5 + half:+.2f}] *" in lines[-1]
    assert lines[-1].count("*") == 3  # every gain's interval excludes 0 here
    per_seed[1]["student"] = 75.0  # one seed far below: the interval takes in 0, no star
    assert bench.tables(per_seed)[-1].split(" | ")[-2].endswith("]")


@pytest.mark.slow
def test_it_reads_the_accuracies_of_a_real_run(bench, tiny_run):
    report = json.loads((tiny_run / "report.json").read_text())
    acc = bench.accuracies(report)
    assert set(acc) == {"teacher", "baseline", "student", "fused"} and all(0 <= v <= 100 for v in acc.values())
    assert bench.stage_minutes(report) > 0
