"""A student without the requested distillation point: a one-line bad-input error before anything is written."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
from torch import nn

from models import ModelError, registry
from models.registry import ModelSpec
from models.reparam import build_multibranch_student, distill_points
from models.taps import TapSpec
from pipeline.config import resolve_config
from pipeline.errors import BadInputError
from pipeline.layout import RunLayout
from pipeline.stages import StageRun
from pipeline.stages.distill import run_distill
from pipeline.training.distributed import DistContext

NAME = "test_one_point_net"


def _build(num_classes: int, image_size: int, options: dict) -> tuple[nn.Module, dict]:
    """A student whose only conv+BN is its final feature layer; its earlier stages are pooling and ReLU."""
    model = nn.Sequential()
    model.add_module("stem", nn.Sequential(nn.MaxPool2d(2), nn.ReLU()))
    model.add_module("body", nn.Sequential(nn.AvgPool2d(2), nn.ReLU()))
    model.add_module("conv5", nn.Sequential(nn.Conv2d(3, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()))
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(16, num_classes))
    return model, {}


@pytest.fixture
def one_point_student() -> Iterator[str]:
    """A test-only zoo student (registered for this test, removed after it)."""
    spec = ModelSpec(name=NAME, role="student", torchvision_name=NAME, builder=_build, classifier="fc",
                     taps={"stage2": TapSpec("stem"), "stage3": TapSpec("body"), "final": TapSpec("conv5")},
                     default_image_size=32)
    registry.register(spec)
    yield NAME
    registry.unregister(NAME)


def test_single_point_exists_but_multi_does_not(one_point_student):
    assert [p.tap for p in distill_points(one_point_student, "single")] == ["final"]
    model, arch = build_multibranch_student(one_point_student, 10, 32, m=2, points="single")
    assert arch["multibranch"]["distill_points"][0]["conv"] == "conv5.0"
    with pytest.raises(ModelError, match=r"lacks the distillation point\(s\) that points 'multi' needs: 3 conv\+BN "
                                         r"layer\(s\) .* found final \(conv5.0\)"):
        distill_points(one_point_student, "multi")


def test_distill_stage_refuses_it_in_one_line_and_touches_nothing(one_point_student, stripes_root, tmp_path):
    cfg = resolve_config(overrides={"data": {"data_root": str(stripes_root), "subset": 320},
                                    "student": {"model": one_point_student, "method": "kdiffusion", "points": "multi",
                                                "teacher_ckpt": str(tmp_path / "no-teacher.pt")}})
    run_dir = tmp_path / "run"
    with pytest.raises(BadInputError) as error:
        run_distill(StageRun(cfg, RunLayout(run_dir), DistContext()))
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"student {one_point_student} lacks the distillation point")
    assert not run_dir.exists()  # refused before the teacher is read or anything is written
