"""Every report names the measurement behind the default method (a results file and its row)."""
from __future__ import annotations

import json

import pytest
import yaml

from pipeline.config import DEFAULT_METHOD_EVIDENCE
from tests.conftest import ROOT, clone_run
from tests.test_report import first_screen, rebuilt_report, rewrite_json

pytestmark = pytest.mark.slow


def test_the_evidence_file_holds_the_row_it_names_and_the_defaults_are_that_rows_setting():
    """The row's test-table line (`| label | method | setting | seeds | ...`) measured the default method with its
    default options: a new results file or a changed default fails here until the two agree."""
    from pipeline.config import StudentConfig
    from pipeline.methods import method_settings

    results = (ROOT / DEFAULT_METHOD_EVIDENCE["file"]).read_text()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in results.splitlines()
            if line.startswith(f"| {DEFAULT_METHOD_EVIDENCE['row']} |")]
    tested = [cells for cells in rows if len(cells) > 3 and cells[3].isdigit()]  # the test table: seeds column
    assert tested, f"no test row {DEFAULT_METHOD_EVIDENCE['row']!r} in {DEFAULT_METHOD_EVIDENCE['file']}"
    method, setting = tested[0][1], dict(part.split("=", 1) for part in tested[0][2].split() if "=" in part)
    default = StudentConfig.model_fields["method"].default
    assert method == default
    defaults = method_settings(default, {})
    assert {key: defaults[key] for key in setting} == {key: yaml.safe_load(value) for key, value in setting.items()}


def test_a_run_with_the_default_method_names_its_evidence(tiny_run):
    screen = first_screen((tiny_run / "report.md").read_text())
    assert "are the default, chosen by measurement" in screen
    assert f"`{DEFAULT_METHOD_EVIDENCE['file']}`, row \"{DEFAULT_METHOD_EVIDENCE['row']}\"" in screen


def test_a_run_with_another_method_says_it_was_its_own_choice(tiny_run, tmp_path):
    run = clone_run(tiny_run, tmp_path / "run")
    rewrite_json(run / "student" / "metrics.json",
                 lambda m: m["arch"].update(method="fitnet", method_options={"beta": 1.0}))
    screen = first_screen(rebuilt_report(run))
    assert "were this run's choice; the default is dkd" in screen and DEFAULT_METHOD_EVIDENCE["file"] in screen
    assert json.loads((run / "report.json").read_text())["student"]["method"] == "fitnet"
