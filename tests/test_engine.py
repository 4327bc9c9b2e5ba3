from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.errors import BadInputError, TrainingDivergedError
from pipeline.machine import native_bf16
from pipeline.training import engine
from pipeline.training.checkpoint import (
    atomic_save,
    capture_rng,
    load_checkpoint,
    restore_rng,
)
from pipeline.training.data import ArrayImages, BatchPreprocessor
from pipeline.training.distributed import DistContext
from pipeline.training.engine import (
    choose_precision,
    fit,
    lr_factor,
    read_resume_state,
)
from pipeline.training.tasks import SupervisedTask
from tests.conftest import make_stripes


def test_warmup_then_cosine_to_min():
    cfg = TrainConfig(epochs=4, warmup_epochs=1, schedule="cosine", min_lr_ratio=0.1)
    factors = [lr_factor(s, 10, cfg) for s in range(40)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert factors[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 29 / 30)))


def test_step_schedule():
    cfg = TrainConfig(epochs=6, warmup_epochs=0, schedule="step", step_milestones=[2, 4], step_gamma=0.5)
    assert [lr_factor(e * 10, 10, cfg) for e in range(6)] == [1, 1, 0.5, 0.5, 0.25, 0.25]


def test_atomic_save_keeps_old_file_when_write_dies(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"epoch": 1}, path)

    def dying_save(obj, target):
        target.write(b"half a checkpoint")  # atomic_save hands torch.save an open file
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_corrupt_checkpoint_is_named(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    path.parent.mkdir()
    path.write_bytes(b"garbage")
    with pytest.raises(BadInputError, match=f"corrupt checkpoint {path}"):
        read_resume_state(tmp_path, "abc")


def test_rng_roundtrip_is_exact():
    state = capture_rng()
    first = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    restore_rng(state)
    again = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_native_bf16_is_read_from_the_isa_flags():
    assert not native_bf16({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"})  # this project's CI machine
    assert native_bf16({"avx512f", "avx512_bf16"}) and native_bf16({"amx_tile", "amx_bf16"})
    assert native_bf16({"asimd", "sve", "bf16"})  # ARM
    assert not native_bf16(set())  # no /proc/cpuinfo


def test_auto_precision_is_a_rule_not_a_probe():
    """auto is fp32 on every CPU (this one may have native bf16): no timing decides, so a run's teacher, student
    and baselines train in the same arithmetic, and a rerun picks the same. Explicit requests are kept."""
    cpu = torch.device("cpu")
    assert choose_precision("auto", cpu) == "fp32"
    assert choose_precision("bf16", cpu) == "bf16" and choose_precision("fp32", cpu) == "fp32"
    with pytest.raises(BadInputError, match="fp16 is only supported on CUDA"):
        choose_precision("fp16", cpu)


class PoisonedTask(SupervisedTask):
    """Real training, except the loss turns NaN once `poison_after` optimizer steps have run."""

    def __init__(self, model: nn.Module, poison_after: int):
        super().__init__(model)
        self.poison_after, self.calls = poison_after, 0

    def forward(self, images, labels, indices=None):
        logits, losses = super().forward(images, labels, indices)
        self.calls += 1
        if self.calls > self.poison_after:
            losses["loss"] = losses["loss"] * float("nan")
        return logits, losses


def _tiny_data(n: int = 64, classes: int = 10):
    images, labels = make_stripes(n, 0, classes)
    split = ArrayImages(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype("int64")))
    return split, BatchPreprocessor(32, (0.5,) * 3, (0.5,) * 3)


def test_nan_loss_aborts_and_keeps_last_good_checkpoint(tmp_path):
    split, prep = _tiny_data()
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10))
    cfg = TrainConfig(epochs=3, batch_size=16, precision="fp32", warmup_epochs=0)
    task = PoisonedTask(model, poison_after=4 + 1)  # 4 steps per epoch: NaN at epoch 2, step 2
    with pytest.raises(TrainingDivergedError, match="loss became nan at epoch 2 step 2"):
        fit(task, split, split, prep, cfg, tmp_path, DistContext(), seed=0, settings_hash="h", progress=False)
    state = read_resume_state(tmp_path, "h")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["task"].values() if v.is_floating_point())


def test_fit_learns_and_resume_state_roundtrips(tmp_path):
    split, prep = _tiny_data(320, classes=4)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(64, 10))
    cfg = TrainConfig(epochs=6, batch_size=16, lr=1e-2, precision="fp32", warmup_epochs=0, label_smoothing=0)
    result = fit(SupervisedTask(model), split, split, prep, cfg, tmp_path, DistContext(), seed=0,
                 settings_hash="h", progress=False)
    assert result.top1 > 60  # four brightness levels; chance is 25%
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6
    assert read_resume_state(tmp_path, "other-settings") is None
