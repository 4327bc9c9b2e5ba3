"""CUDA code paths (autocast dtypes, gradient scaling); they skip, saying why, on machines without a GPU."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.training.data import ArrayImages, BatchPreprocessor
from pipeline.training.distributed import DistContext
from pipeline.training.engine import fit
from pipeline.training.tasks import SupervisedTask
from tests.conftest import make_stripes

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA is not available here; these paths run on GPU machines")


@needs_cuda
@pytest.mark.parametrize("precision", ["auto", "bf16", "fp16"])
def test_training_on_cuda(tmp_path, precision):
    images, labels = make_stripes(256, 0, classes=4)
    split = ArrayImages(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype("int64")))
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(64, 10))
    cfg = TrainConfig(epochs=4, batch_size=32, lr=1e-2, precision=precision, warmup_epochs=0)
    result = fit(SupervisedTask(model), split, split, BatchPreprocessor(32, (0.5,) * 3, (0.5,) * 3), cfg, tmp_path,
                 DistContext(device=torch.device("cuda", 0)), seed=0, settings_hash="h", progress=False)
    expected = {"auto": "bf16" if torch.cuda.is_bf16_supported() else "fp16"}.get(precision, precision)
    assert result.precision == expected and result.top1 > 50


def test_fp16_on_cpu_is_refused():
    from pipeline.errors import BadInputError
    from pipeline.training.engine import choose_precision

    with pytest.raises(BadInputError, match="fp16 is only supported on CUDA"):
        choose_precision("fp16", torch.device("cpu"))


def _tiny_variant(tmp_path):
    from exporters.latency import Variant
    from exporters.onnx import export_onnx
    from models import build_model

    model, _, _ = build_model("shufflenetv2_x0_5", 10, 32, role="student")
    model.eval()
    onnx_path = export_onnx(model, tmp_path / "m.onnx", (3, 32, 32), {"architecture": "shufflenet_v2_x0_5"})
    return Variant("fused", model, onnx_path)


@needs_cuda
def test_bench_torch_on_cuda(tmp_path):
    from exporters.latency import Budget, Target, measure_target

    rows = measure_target(Target("torch", "cuda"), [_tiny_variant(tmp_path)], [1, 8], 32,
                          Budget(threads=1, warmup=2, iterations=5))
    assert [r["status"] for r in rows] == ["ok", "ok"] and all(r["p50_ms"] > 0 for r in rows)


def _has_ort_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(not (torch.cuda.is_available() and _has_ort_cuda()),
                    reason="needs a CUDA device and onnxruntime-gpu (CUDAExecutionProvider)")
def test_bench_onnxruntime_cuda_provider(tmp_path):
    from exporters.latency import Budget, Target, measure_target

    rows = measure_target(Target("onnxruntime", "cuda", "CUDAExecutionProvider"), [_tiny_variant(tmp_path)], [1],
                          32, Budget(threads=1, warmup=2, iterations=5))
    assert rows[0]["status"] == "ok", rows[0]
