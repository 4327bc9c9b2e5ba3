"""The comparison protocol of benchmarks/kd_methods.py: what is paired with what, and the interval arithmetic."""
from __future__ import annotations

import importlib.util
import json
import statistics
import sys

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def protocol():
    spec = importlib.util.spec_from_file_location("kd_methods", ROOT / "benchmarks" / "kd_methods.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kd_methods"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("kd_methods", None)


def test_every_grid_has_the_same_budget_and_kdiffusion_no_more(protocol):
    sizes = {method: len(grid) for method, grid in protocol.GRIDS.items() if method != "none"}
    assert len(set(sizes.values())) == 1, sizes


def test_each_row_is_compared_with_the_student_alone_of_its_training_time_network(protocol):
    """Regression: the m=1/2/8 rows were compared with a student alone that had m=4 branches, and the multi-point
    rows (ReviewKD's grid, the points=multi ablation) with a student that has branches at one point only."""
    chosen = {"none": [], "kd": ["--method-option", "alpha=0.9"], "kdiffusion": ["--method-option", "lambda_diff=1"],
              "reviewkd": ["--points", "multi", "--method-option", "beta=1"]}
    rows, alone_of = protocol.plan_rows(chosen, ["m=1", "m=8", "chain=reduced", "points=multi"])
    assert alone_of["KDiffusion m=1"] == "student alone m=1" and rows["student alone m=1"] == ("none", ["--branches", "1"])
    assert alone_of["KDiffusion m=8"] == "student alone m=8" and rows["student alone m=8"][1] == ["--branches", "8"]
    assert alone_of["KDiffusion points=multi"] == alone_of["ReviewKD"] == "student alone points=multi"
    assert rows["student alone points=multi"] == ("none", ["--points", "multi"])
    assert alone_of["KDiffusion chain=reduced"] == alone_of["KD"] == alone_of["KDiffusion"] == "student alone"
    assert alone_of["student alone m=8"] == alone_of["student alone points=multi"] == "student alone"
    assert rows["KDiffusion chain=reduced"] == ("kdiffusion", [*chosen["kdiffusion"], "--method-option",
                                                               "chain=reduced"])
    assert {label for label, (method, _) in rows.items() if method == "none"} == {
        "student alone", "student alone m=1", "student alone m=8", "student alone points=multi"}
    assert "KDiffusion shuffle=off" not in rows
    with pytest.raises(SystemExit, match="unknown ablation"):
        protocol.plan_rows(chosen, ["m=3"])


def test_a_combined_ablation_makes_every_change_and_pairs_with_the_student_alone_of_its_network(protocol):
    chosen = {"none": [], "kdiffusion": ["--method-option", "lambda_diff=1"]}
    rows, alone_of = protocol.plan_rows(chosen, ["variance+m=8+points=multi", "m=8"])
    label = "KDiffusion variance=learned+m=8+points=multi"
    method, flags = rows[label]
    assert method == "kdiffusion" and flags[:2] == chosen["kdiffusion"]
    assert flags[2:] == ["--method-option", "variance=learned", "--branches", "8", "--points", "multi"]
    assert alone_of[label] == "student alone m=8 points=multi"
    assert rows["student alone m=8 points=multi"] == ("none", ["--branches", "8", "--points", "multi"])
    assert alone_of["KDiffusion m=8"] == "student alone m=8"
    assert [r for r, (m, _) in rows.items() if m == "kdiffusion"] == ["KDiffusion", label, "KDiffusion m=8"]
    with pytest.raises(SystemExit, match="unknown ablation.*m=3"):
        protocol.plan_rows(chosen, ["variance+m=3"])


def test_matched_scale_ablations_put_the_chosen_weight_on_the_fused_feature(protocol):
    """The confound of the ablation table: weights=last and m=1 put 3.5x the chosen setting's curvature on the fused
    feature and --points multi 3x (losses summed over points). With matched_scale each ablation's lambda_diff is
    rescaled so that lambda_diff x points x curvature is the chosen setting's; the pairing does not change."""
    chosen = {"none": [], "kdiffusion": ["--method-option", "lambda_diff=1"]}
    labels = ["weights=last", "m=1", "points=multi", "shuffle=off", "variance+m=8+points=multi"]
    plain, plain_alone = protocol.plan_rows(chosen, labels)
    rows, alone_of = protocol.plan_rows(chosen, labels, matched_scale=True)
    weight = protocol.diffusion_weight(chosen["kdiffusion"])
    assert weight == pytest.approx(2.821, abs=1e-3)
    assert protocol.diffusion_weight(plain["KDiffusion weights=last"][1]) == pytest.approx(3.544 * weight, rel=1e-3)
    assert protocol.diffusion_weight(plain["KDiffusion points=multi"][1]) == pytest.approx(3 * weight)
    for label in ("weights=last", "m=1", "points=multi", "variance=learned+m=8+points=multi"):
        assert protocol.diffusion_weight(rows[f"KDiffusion {label}"][1]) == pytest.approx(weight, rel=1e-3), label
    assert rows["KDiffusion points=multi"][1] == [*plain["KDiffusion points=multi"][1], "--method-option",
                                                  "lambda_diff=0.3333"]
    assert rows["KDiffusion shuffle=off"] == plain["KDiffusion shuffle=off"]  # nothing to match
    assert alone_of == plain_alone


def test_paired_differences_and_their_interval(protocol):
    runs = [protocol.Run("kd", [], seed, False, {"top1": top1}) for seed, top1 in enumerate([80.0, 81.0, 79.5])]
    alone = [protocol.Run("none", [], seed, False, {"top1": top1}) for seed, top1 in enumerate([78.0, 80.0, 79.0])]
    deltas = protocol.paired(runs, alone)
    assert deltas == [2.0, 1.0, 0.5]
    mean, half = protocol.interval(deltas)
    assert mean == pytest.approx(7 / 6) and half == pytest.approx(4.302653 * statistics.stdev(deltas) / 3 ** 0.5)
    assert protocol.shown(deltas).endswith("]")  # the interval [-0.7, 3.0] includes 0: no star
    assert protocol.shown([2.0, 2.1, 1.9]).endswith("*")


@pytest.mark.parametrize("df,table", [(1, 12.7062), (2, 4.3027), (5, 2.5706), (10, 2.2281), (30, 2.0423),
                                      (100, 1.9840)])
def test_t_quantiles_match_the_tables(protocol, df, table):
    assert protocol.t_quantile(0.975, df) == pytest.approx(table, abs=5e-5)


def test_t_quantiles_agree_with_scipy_for_any_degrees_of_freedom(protocol):
    stats = pytest.importorskip("scipy.stats")
    for df in (*range(1, 60), 75, 120, 250, 1000):
        for level in (0.9, 0.975, 0.995):
            assert protocol.t_quantile(level, df) == pytest.approx(stats.t.ppf(level, df), rel=1e-9), (df, level)


def test_the_interval_of_many_seeds_uses_their_t_quantile(protocol):
    """Regression: the t table stopped at 10 degrees of freedom and fell back to 1.96 beyond (30: 2.042)."""
    values = [float(i % 7) for i in range(31)]
    mean, half = protocol.interval(values)
    assert half == pytest.approx(2.0423 * statistics.stdev(values) / 31 ** 0.5, rel=1e-4)


def test_an_ablation_row_shows_its_effect_on_the_gain_over_the_student_alone_of_its_network(protocol):
    """m=8 trains another network: its effect is its gain over the m=8 student alone minus KDiffusion's gain over
    the default one, seed by seed (not the raw top-1 difference, which mixes in what 8 branches do alone)."""
    def runs(method, top1s):
        return [protocol.Run(method, [], seed, False, {"top1": t, "history": [{"test_top1": t, "epoch_time_s": 1.0}]})
                for seed, t in enumerate(top1s)]

    chosen = {"none": [], "kd": [], "kdiffusion": ["--method-option", "lambda_diff=1"]}
    rows, alone_of = protocol.plan_rows(chosen, ["m=8"])
    results = {"student alone": runs("none", [80.0, 81.0, 80.0]), "KD": runs("kd", [81.0, 82.0, 81.0]),
               "KDiffusion": runs("kdiffusion", [81.0, 81.5, 80.5]),  # gains +1.0, +0.5, +0.5
               "student alone m=8": runs("none", [82.0, 82.0, 83.0]),
               "KDiffusion m=8": runs("kdiffusion", [83.0, 83.0, 84.5])}  # gains +1.0, +1.0, +1.5
    lines = protocol.table(rows, results, alone_of)
    assert "gain vs KDiffusion's" in lines[0] and all(line.count("|") == lines[0].count("|") for line in lines)
    cells = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in lines[2:]}
    column = lines[0].split(" | ").index("gain vs KDiffusion's (paired, 95% CI)")
    assert cells["KDiffusion m=8"][column] == protocol.shown([0.0, 0.5, 1.0])  # not the raw +2.0, +1.5, +4.0
    assert cells["KD"][column] == cells["student alone m=8"][column] == "-"
    assert protocol.gain_change(results["KDiffusion m=8"], results["student alone m=8"], results["KDiffusion"],
                                results["student alone"]) == [0.0, 0.5, 1.0]
    plain = protocol.table({k: v for k, v in rows.items() if not k.endswith("m=8")}, results, alone_of)
    assert "gain vs KDiffusion's" not in plain[0]  # no ablation rows, no column


EVIDENCE = ROOT / "benchmarks" / "results" / "2026-12-06-kd-methods.md"  # every method under the protocol


def chosen_in(results: str) -> dict[str, dict[str, str]]:
    """The method options of each row marked chosen in a results file's tuning table (label -> key -> value)."""
    chosen = {}
    for line in results.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[3] == "yes":
            chosen[cells[0]] = dict(part.split("=", 1) for part in cells[1].split() if "=" in part)
    return chosen


def test_each_methods_defaults_are_the_setting_the_protocol_chose(protocol):
    """The default follows the evidence: `--method X` and `pipeline run --baselines X` (run with default options)
    train with the setting the committed tuning chose, the one whose test rows were measured; rerunning the
    protocol with another outcome fails here until the defaults follow."""
    from pipeline.methods.base import method_settings

    chosen = chosen_in(EVIDENCE.read_text())
    methods = {label: method for method, label in protocol.LABELS.items() if "+" not in method}  # not X+kd
    assert set(chosen) == set(methods)  # every method is in the file
    for label, options in chosen.items():
        defaults = method_settings(methods[label], {})
        for key, value in options.items():
            default = defaults[key]
            same = float(default) == float(value) if isinstance(default, (int, float)) else str(default) == value
            assert same, f"{label}: default {key}={default}, the protocol chose {value}"


@pytest.mark.slow
def test_the_whole_protocol_runs_at_tiny_size(tiny_run, fashion_root, tmp_path):
    """The script end to end on the CPU (its --device cuda --scale paper form runs the same code on a GPU):
    tuning on the validation split, the chosen setting on two seeds, the table with paired intervals."""
    import subprocess

    results = tmp_path / "results.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kd_methods.py"), "--scale", "tiny", "--device", "cpu",
         "--teacher-ckpt", str(tiny_run / "teacher" / "model.pt"), "--data-root", str(fashion_root),
         "--out", str(tmp_path / "out"), "--methods", "none,kd", "--max-settings", "1", "--seeds", "2",
         "--ablations", "none", "--jobs", "2", "--results", str(results)], capture_output=True, text=True, cwd=ROOT,
        timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    text = results.read_text()
    assert "| KD | temperature=2 alpha=0.5 | " in text  # the one tuned setting, scored on the validation split
    row = next(line for line in text.splitlines() if line.startswith("| KD | kd |"))
    assert "| 2 |" in row and "[" in row  # two seeds, a paired interval against the student alone
    runs = list((tmp_path / "out" / "runs").iterdir())
    assert len(runs) == 2 + 2 * 2  # tuning: none + one KD setting; test: 2 methods x 2 seeds
    tuned = [json.loads((r / "student" / "metrics.json").read_text()) for r in runs]
    assert sorted(m["test_images"] for m in tuned) == [64] * 4 + [96] * 2  # test subset (64), validation (96)


def test_a_plus_kd_row_trains_the_feature_method_with_hintons_term_beside_it(protocol, tmp_path):
    """``fitnet+kd``: the pipeline's fitnet with its lambda_kd option (one option of every feature method), paired
    with the student alone of its network; its grid has the same budget as every other."""
    import argparse

    args = argparse.Namespace(scale="swin", out=tmp_path, student="shufflenetv2_x0_5", device="cpu", data_root=None)
    run = protocol.Protocol(args)
    flags = run.student_flags(protocol.Run("reviewkd+kd", protocol.GRIDS["reviewkd+kd"][2], 0, False),
                              tmp_path / "teacher.pt")
    assert flags[flags.index("--method") + 1] == "reviewkd"
    assert "lambda_kd=3" in flags and "kd_temperature=2" in flags and "--teacher-ckpt" in flags
    rows, alone_of = protocol.plan_rows({"none": [], "fitnet+kd": protocol.GRIDS["fitnet+kd"][0],
                                         "reviewkd+kd": protocol.GRIDS["reviewkd+kd"][0]}, [])
    assert rows["FitNet+KD"][0] == "fitnet+kd" and alone_of["FitNet+KD"] == "student alone"
    assert alone_of["ReviewKD+KD"] == "student alone points=multi"


def test_a_given_setting_replaces_the_methods_tuning_and_keeps_its_grids_network_flags(protocol, tmp_path):
    """``--setting``: the map-size probe reuses the settings chosen at 32x32 instead of tuning again at 72x72."""
    import argparse

    assert protocol.fixed_setting("kd:temperature=2,alpha=0.9") == (
        "kd", ["--method-option", "temperature=2", "--method-option", "alpha=0.9"])
    assert protocol.fixed_setting("reviewkd+kd:lambda_kd=1") == (
        "reviewkd+kd", ["--points", "multi", "--method-option", "lambda_kd=1"])
    with pytest.raises(ValueError, match="unknown method 'kdd'.*valid: none, kd, dkd"):
        protocol.fixed_setting("kdd:beta=1")
    with pytest.raises(ValueError, match="METHOD:option=value"):
        protocol.fixed_setting("kd:temperature")

    args = argparse.Namespace(scale="swin-maps", out=tmp_path, student="shufflenetv2_x0_5", device="cpu",
                              data_root=None, max_settings=4, jobs=1, threads=1)
    run = protocol.Protocol(args)
    trained = []

    def train_all(runs, teacher):  # records what tuning would train; scores each run by its position
        trained.extend(runs)
        for i, r in enumerate(runs):
            r.metrics = {"top1": float(i)}
        return runs

    run.train_all = train_all
    fixed = dict([protocol.fixed_setting("kd:temperature=4,alpha=0.5")])
    chosen = run.tune(["none", "kd", "fitnet"], tmp_path / "teacher.pt", fixed)
    assert [r.method for r in trained] == ["none"] + ["fitnet"] * len(protocol.GRIDS["fitnet"])
    assert chosen["kd"] == (fixed["kd"], [])
    assert chosen["fitnet"][0] == protocol.GRIDS["fitnet"][-1]  # the best-scored (here: the last) setting
    assert "--image-size" in run.common() and run.common()[run.common().index("--image-size") + 1] == "72"
