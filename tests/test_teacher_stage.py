"""The teacher stage through the real CLI: outputs, skip, SIGKILL + resume, and bad input."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from models import build_model
from tests.conftest import (
    ROOT,
    TINY,
    clone_run,
    kill_when_written,
    run_cli,
    shared_dir,
    tree_digest,
)


PIPELINE = [sys.executable, "-m", "pipeline"]


def _teacher_args(run_dir: Path, data_root: Path) -> list[str]:
    """The module's Swin teacher command (after ``python -m pipeline``)."""
    return ["teacher", "--teacher", "swin", "--data-root", str(data_root),
            "--subset", "192", "--eval-subset", "64", "--batch-size", "64", "--epochs", "2", "--precision", "fp32",
            "--drop-path", "0.2", "--deterministic", "--seed", "3", "--no-progress", "--run-dir", str(run_dir)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, stripes_root) -> Iterator[Path]:
    """One uninterrupted Swin teacher run (stochastic depth on, deterministic): the module's tests read it, and it
    is the reference the SIGKILLed run must match bit for bit (one Swin run fewer: ~0.5 GB and 30 s)."""
    with shared_dir(tmp_path_factory, "run") as folder:
        subprocess.run([*PIPELINE, *_teacher_args(folder / "run", stripes_root)], check=True, capture_output=True,
                       cwd=ROOT, timeout=600)
        yield folder / "run"


def test_teacher_writes_its_outputs(finished_run):
    stage = finished_run / "teacher"
    for name in ("model.pt", "metrics.json", "metrics.jsonl", "stage.json"):
        assert (stage / name).is_file(), name
    assert not (stage / "checkpoints").exists(), "a finished stage never resumes: its resume state is removed"
    state = torch.load(stage / "model.pt", weights_only=True)
    model, _, _ = build_model("swin", 10, 32)
    model.load_state_dict(state, strict=True)
    metrics = yaml.safe_load((stage / "metrics.json").read_text())
    assert 0 <= metrics["top1"] <= 100 and metrics["epochs"] == 2 and metrics["precision"] == "fp32"
    assert len((stage / "metrics.jsonl").read_text().splitlines()) == 2
    config = yaml.safe_load((finished_run / "config.yaml").read_text())
    assert config["teacher"]["model"] == "swin_t"
    assert config["teacher"]["window_per_stage"] == [4, 4, 2, 1]  # the window choice is recorded
    assert config["data"]["image_size"] == 32


def test_second_identical_command_skips(finished_run, stripes_root):
    before = tree_digest(finished_run)
    result = run_cli(*_teacher_args(finished_run, stripes_root))
    assert result.returncode == 0, result.stderr
    assert "skipping" in result.stderr
    assert tree_digest(finished_run) == before


def test_saved_config_reproduces_the_settings(finished_run, stripes_root):
    """--config RUN_DIR/config.yaml resolves to the same settings, so the stage is skipped."""
    result = run_cli("teacher", "--config", str(finished_run / "config.yaml"), "--data-root", str(stripes_root),
                     "--run-dir", str(finished_run), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "skipping" in result.stderr


def test_sigkill_then_rerun_is_bit_identical(finished_run, tmp_path, stripes_root):
    reference = finished_run
    killed = tmp_path / "killed"
    kill_when_written(_teacher_args(killed, stripes_root), killed / "teacher" / "checkpoints" / "last.pt")
    assert not (killed / "teacher" / "model.pt").exists()

    resumed = subprocess.run([*PIPELINE, *_teacher_args(killed, stripes_root)], capture_output=True, text=True,
                             cwd=ROOT, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming teacher from epoch" in resumed.stderr
    a = torch.load(reference / "teacher" / "model.pt", weights_only=True)
    b = torch.load(killed / "teacher" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert not (killed / "teacher" / "checkpoints").exists()  # removed once the resumed stage finished


# ----------------------------------------------------------------------------- bad input


def _bad_weights(tmp_path: Path) -> str:
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return str(path)


def _corrupt_images(tmp_path: Path) -> str:
    from tests.test_data import _write_imagefolder

    _write_imagefolder(tmp_path / "images")
    (tmp_path / "images" / "val" / "cat" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return str(tmp_path / "images")


def _bad_yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return str(path)


BAD_INPUTS = {
    "unknown teacher": (lambda t: ["--teacher", "vit_h"], "unknown teacher 'vit_h'; valid: "),
    "unknown dataset": (lambda t: ["--dataset", "mnist2"], "unknown dataset 'mnist2'; valid: fashion-mnist"),
    "missing data root": (lambda t: ["--data-root", str(t / "nowhere")], "data root not found: "),
    "corrupt image": (lambda t: ["--dataset", f"imagefolder:{_corrupt_images(t)}", "--image-size", "32",
                                 "--workers", "1", "--subset", "4", "--eval-subset", "6", "--batch-size", "2"],
                      "corrupt or unreadable image file "),
    "wrong-shape weights": (lambda t: ["--teacher", "resnet50", "--teacher-weights", _bad_weights(t)],
                            "wrong shapes"),
    "negative lr": (lambda t: ["--lr", "-1"], "teacher.train.lr"),
    "zero epochs": (lambda t: ["--epochs", "0"], "teacher.train.epochs"),
    "zero batch": (lambda t: ["--batch-size", "0"], "teacher.train.batch_size"),
    "subset too large": (lambda t: ["--subset", "100000"], "data.subset: 100000 is larger than the split"),
    "bad yaml value": (lambda t: ["--config", _bad_yaml(t, "teacher:\n  train:\n    lr: -0.5\n")],
                       "teacher.train.lr"),
    "unknown yaml field": (lambda t: ["--config", _bad_yaml(t, "teacher:\n  lr: 0.1\n")],
                           "unknown field 'teacher.lr'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_touches_nothing(case, finished_run, stripes_root, tmp_path):
    run_dir = tmp_path / "run"
    clone_run(finished_run, run_dir)
    before = tree_digest(run_dir)
    extra, expected = BAD_INPUTS[case]
    args = ["--data-root", str(stripes_root), "--epochs", "1", *TINY, *extra(tmp_path)]
    result = run_cli("teacher", "--run-dir", str(run_dir), *args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert tree_digest(run_dir) == before


def test_corrupt_checkpoint_is_named_and_kept(finished_run, stripes_root, tmp_path):
    run_dir = tmp_path / "run"
    clone_run(finished_run, run_dir)
    (run_dir / "teacher" / "stage.json").unlink()  # an unfinished stage, so the checkpoint is read
    (run_dir / "teacher" / "checkpoints").mkdir()  # a killed command's: resume state torn by a failing disk
    (run_dir / "teacher" / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 torn")
    before = tree_digest(run_dir)
    result = run_cli(*_teacher_args(run_dir, stripes_root))
    assert result.returncode == 2
    assert f"error: corrupt checkpoint {run_dir / 'teacher' / 'checkpoints' / 'last.pt'}" in result.stderr
    assert "Traceback" not in result.stderr and tree_digest(run_dir) == before


def test_debug_shows_traceback(stripes_root, tmp_path):
    result = run_cli("--debug", "teacher", "--teacher", "vit_h", "--run-dir", str(tmp_path / "r"))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_pretrained_offline_points_to_teacher_weights(stripes_root, tmp_path):
    env = {"TORCH_HOME": str(tmp_path / "hub"), "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY":
           "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    result = run_cli("teacher", "--teacher", "resnet34", "--pretrained", "--data-root", str(stripes_root),
                     "--run-dir", str(tmp_path / "r"), *TINY, env=env, timeout=120)
    assert result.returncode == 2
    assert "--teacher-weights" in result.stderr and "Traceback" not in result.stderr


def test_pretrained_uses_torchvision_weights_api(stripes_root, tmp_path):
    """With torchvision's weight file in the hub cache (as after an online run), --pretrained loads it."""
    weights = torchvision.models.ResNet34_Weights.DEFAULT
    cache = tmp_path / "hub" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    source = torchvision.models.resnet34()
    torch.save(source.state_dict(), cache / Path(weights.url).name)
    result = run_cli("teacher", "--teacher", "resnet34", "--pretrained", "--data-root", str(stripes_root),
                     "--run-dir", str(tmp_path / "r"), "--epochs", "1", "--lr", "1e-12", "--warmup-epochs", "0",
                     *TINY, env={"TORCH_HOME": str(tmp_path / "hub")})
    assert result.returncode == 0, result.stderr
    assert "classifier head replaced" in result.stderr
    trained = torch.load(tmp_path / "r" / "teacher" / "model.pt", weights_only=True)
    assert torch.allclose(trained["conv1.weight"], source.conv1.weight, atol=1e-6)
