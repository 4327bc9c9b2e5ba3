"""Post-training static INT8 quantization of the exported float32 model, and the accuracy gate it must pass.

- ONNX Runtime: ``onnxruntime.quantization.quantize_static`` in the QDQ format
  with per-channel int8 weights and uint8 activations, after ORT's own
  pre-processing (shape inference, graph optimisation): the file runs on any
  ONNX Runtime build, mobile ones included.
- OpenVINO: NNCF's ``nncf.quantize`` on the exact FP32 IR (the file the export
  gates proved equal to the fused student), with the ``mixed`` (symmetric
  weights, asymmetric activations) or ``performance`` (all symmetric) preset.

Both calibrate on images the caller draws from the *training* split (never the
test split) and carry the float model's metadata plus a ``quantization`` entry
that says how they were made. :func:`judge_int8` is the gate: INT8 top-1 against
the float export's on labelled test images, and top-1 agreement between the two,
each judged with its exact 95% interval (:mod:`exporters.gate_stats`).
Needs numpy and the runtimes, never torch.
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from exporters import metadata as md
from exporters.errors import ExportError
from exporters.gate_stats import CONFIDENCE, PairedCounts

log = logging.getLogger(__name__)

PRESETS = ("mixed", "performance")
ACTIVATION_RANGES = ("minmax", "mean_minmax")


@dataclass(frozen=True)
class Int8Settings:
    """How to quantize and what the INT8 artifacts must keep."""

    calibration_images: int = 300  # drawn (stratified, seeded) from the training split
    preset: str = "mixed"  # NNCF's preset; ONNX Runtime: mixed = asymmetric uint8 activations, performance = int8
    max_drop: float = 1.0  # top-1 points the INT8 model may lose against the float export
    min_agreement: float = 97.0  # percent of test images on which INT8 and float give the same class
    # Both limits are judged with this confidence (exporters/gate_stats.py): a model fails where the interval of
    # its drop lies wholly above max_drop, or that of its agreement wholly below min_agreement.
    confidence: float = CONFIDENCE
    # How the quantizers are driven (the defaults are what benchmarks/quantization.py measured best; the other
    # values are there to compare against):
    per_channel: bool = True  # one weight scale per output channel (False: one per tensor)
    activation_ranges: str = "minmax"  # calibration set's min/max, or "mean_minmax": the mean of per-image min/max
    bias_correction: bool = True  # NNCF's fast bias correction (ONNX Runtime has none)
    # 7-bit weights (NNCF's overflow fix on every layer, ONNX Runtime's reduce_range): CPUs without VNNI (plain
    # AVX2 or AVX-512) multiply uint8 activations by int8 weights in pairs summed into saturating int16, which
    # full-range weights overflow. Measured: an OpenVINO INT8 IR at 100% top-1 on a VNNI CPU gave 89.5% under
    # ONEDNN_MAX_CPU_ISA=AVX2 with NNCF's default (first layer only), 100% with the fix on every layer.
    saturation_safe: bool = True

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown INT8 preset '{self.preset}'; valid: {', '.join(PRESETS)}")
        if self.activation_ranges not in ACTIVATION_RANGES:
            raise ValueError(f"unknown activation ranges '{self.activation_ranges}'; valid: "
                             f"{', '.join(ACTIVATION_RANGES)}")
        if not 0.5 <= self.confidence < 1.0:
            raise ValueError(f"INT8 gate confidence {self.confidence} must be in [0.5, 1)")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rule(self) -> str:
        """The gate's decision rule in words (int8.json and the report carry it)."""
        level = f"{100 * self.confidence:g}%"
        return (f"an INT8 model fails where the {level} interval of its top-1 drop lies wholly above "
                f"{self.max_drop:g} points (exact McNemar inversion on the images where exactly one of INT8 and float "
                f"is right), or the {level} interval of its top-1 agreement with float wholly below "
                f"{self.min_agreement:g}% (Clopper-Pearson)")


def quantization_meta(settings: Int8Settings, tool: str, calibration: np.ndarray, seed: int) -> dict[str, Any]:
    """The ``quantization`` entry an INT8 artifact carries beside the float model's metadata."""
    return {"precision": "int8", "tool": tool, "preset": settings.preset, "calibration_images": int(len(calibration)),
            "calibration_split": "train", "calibration_sampling": "stratified", "calibration_seed": seed,
            "per_channel": settings.per_channel, "activation_ranges": settings.activation_ranges,
            "bias_correction": settings.bias_correction and tool.startswith("nncf"),
            "saturation_safe": settings.saturation_safe}


# --------------------------------------------------------------------------- ONNX Runtime

def quantize_onnx(source: Path, target: Path, calibration: np.ndarray, settings: Int8Settings,
                  meta: Mapping[str, Any]) -> Path:
    """QDQ INT8 copy of the ONNX model at ``source``, written to ``target`` (moved into place once complete)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name = str(meta["input_name"])

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._items: Iterator[dict[str, np.ndarray]] = iter(
                {input_name: calibration[i:i + 1]} for i in range(len(calibration)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._items, None)

    activations = QuantType.QUInt8 if settings.preset == "mixed" else QuantType.QInt8
    target = Path(target)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".int8-") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        try:
            quant_pre_process(str(source), str(prepared))
            quantize_static(str(prepared), str(quantized), Batches(), quant_format=QuantFormat.QDQ,
                            per_channel=settings.per_channel, reduce_range=settings.saturation_safe,
                            activation_type=activations, weight_type=QuantType.QInt8,
                            extra_options={"ActivationSymmetric": settings.preset == "performance",
                                           # a moving average of the per-image min/max instead of the global ones
                                           "CalibMovingAverage": settings.activation_ranges == "mean_minmax"})
        except Exception as exc:  # ORT's quantizer raises many types; all mean "could not quantize"
            raise ExportError(f"ONNX Runtime could not quantize {source}: {str(exc).splitlines()[0]}") from exc
        proto = onnx.load(str(quantized))
        md.write_onnx(proto, meta)  # (drops the pre-processing's own notes)
        proto.producer_name = "kdiff-pipeline"
        onnx.save_model(proto, str(quantized))
        os.replace(quantized, target)
    log.info("export: INT8 ONNX (QDQ, per-%s, %d calibration images) -> %s (%.1f MB)",
             "channel" if settings.per_channel else "tensor", len(calibration), target, target.stat().st_size / 1e6)
    return target


# --------------------------------------------------------------------------- OpenVINO

def quantize_openvino(source: Path, target: Path, calibration: np.ndarray, settings: Int8Settings,
                      meta: Mapping[str, Any], validation: tuple[np.ndarray, np.ndarray] | None = None) -> Path:
    """NNCF INT8 copy of the FP32 IR at ``source`` (``.xml``), written to ``target`` (``.xml`` + ``.bin``).

    With ``validation`` (labelled images, never the test split): NNCF's accuracy-aware quantization, which
    returns the layers that cost the most top-1 on those images to floating point until INT8 loses at most
    ``settings.max_drop`` points there."""
    import nncf
    import openvino as ov

    from exporters.openvino import save_ir, set_metadata

    from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters, OverflowFix,
                                                       QuantizationParameters)
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    model = ov.Core().read_model(str(source))
    preset = {"mixed": nncf.QuantizationPreset.MIXED, "performance": nncf.QuantizationPreset.PERFORMANCE}
    # Activation ranges from the calibration set's min and max, as ONNX Runtime's MinMax calibration takes them.
    # NNCF's default averages each image's own min/max, which clips the inputs with the largest activations: on a
    # student whose classes differ in brightness that cost 20-30 top-1 points that min/max keeps.
    ranges = {"minmax": RangeEstimatorParametersSet.MINMAX, "mean_minmax": RangeEstimatorParametersSet.MEAN_MINMAX}
    advanced = AdvancedQuantizationParameters(
        activations_range_estimator_params=ranges[settings.activation_ranges],
        weights_quantization_params=QuantizationParameters(per_channel=settings.per_channel),
        disable_bias_correction=not settings.bias_correction,
        overflow_fix=OverflowFix.ENABLE if settings.saturation_safe else OverflowFix.FIRST_LAYER)
    calibration_set = nncf.Dataset(list(calibration), lambda image: image[None])
    try:
        if validation is None:
            quantized = nncf.quantize(model, calibration_set, preset=preset[settings.preset],
                                      subset_size=len(calibration), advanced_parameters=advanced)
        else:
            def top1(compiled: Any, items: Any) -> float:
                return float(np.mean([compiled(image[None])[0].argmax(1)[0] == label for image, label in items]))

            quantized = nncf.quantize_with_accuracy_control(
                model, calibration_set, nncf.Dataset(list(zip(*validation)), lambda item: item[0][None]),
                validation_fn=top1, max_drop=settings.max_drop / 100.0, drop_type=nncf.DropType.ABSOLUTE,
                preset=preset[settings.preset], subset_size=len(calibration),
                advanced_quantization_parameters=advanced)
    except Exception as exc:  # NNCF raises many types; all mean "could not quantize"
        raise ExportError(f"NNCF could not quantize {source}: {str(exc).splitlines()[0]}") from exc
    set_metadata(quantized, meta)
    return save_ir(quantized, target, compress_to_fp16=False, label=f"INT8, {len(calibration)} calibration images")


# --------------------------------------------------------------------------- the gate

@dataclass(frozen=True)
class Int8Result:
    """One INT8 artifact judged against the float export on the same labelled images.

    It fails only where a 95% interval (:mod:`exporters.gate_stats`) lies wholly beyond its limit: a top-1 drop
    whose interval is above ``max_drop``, or an agreement whose interval is below ``min_agreement``. A point
    estimate past a limit whose interval still reaches back inside it passes as ``within noise``: too few
    images to tell (the report says so)."""

    file: str
    float_file: str
    counts: PairedCounts
    float_top1: float
    int8_top1: float
    max_drop: float
    min_agreement: float
    confidence: float = CONFIDENCE

    @property
    def images(self) -> int:
        return self.counts.images

    @property
    def drop(self) -> float:
        return self.float_top1 - self.int8_top1

    @property
    def agreement(self) -> float:
        """Percent of images with the same top-1 class."""
        return 100.0 * self.counts.agree / max(self.counts.images, 1)

    @cached_property
    def drop_interval(self) -> tuple[float, float]:
        return self.counts.drop_interval(self.confidence)

    @cached_property
    def agreement_interval(self) -> tuple[float, float]:
        return self.counts.agreement_interval(self.confidence)

    @property
    def passed(self) -> bool:
        return self.drop_interval[0] <= self.max_drop and self.agreement_interval[1] >= self.min_agreement

    @property
    def evidence(self) -> str:
        """``clear`` where the point estimates and the intervals give the same verdict, else ``within noise``."""
        points_pass = self.drop <= self.max_drop and self.agreement >= self.min_agreement
        intervals_pass = self.drop_interval[1] <= self.max_drop and self.agreement_interval[0] >= self.min_agreement
        return "clear" if points_pass == self.passed and intervals_pass == self.passed else "within noise"

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "float_file": self.float_file, "images": self.images,
                "float_top1": self.float_top1, "int8_top1": self.int8_top1, "drop": self.drop,
                "agreement": self.agreement, "max_drop": self.max_drop, "min_agreement": self.min_agreement,
                "lost": self.counts.lost, "gained": self.counts.gained, "confidence": self.confidence,
                "drop_interval": list(self.drop_interval), "agreement_interval": list(self.agreement_interval),
                "mcnemar_p": self.counts.mcnemar_p(), "evidence": self.evidence, "passed": self.passed}

    def describe(self) -> str:
        (d_low, d_high), (a_low, a_high) = self.drop_interval, self.agreement_interval
        level = f"{100 * self.confidence:g}%"
        return (f"{self.file}: top-1 {self.int8_top1:.2f}% vs {self.float_top1:.2f}% for {self.float_file} (drop "
                f"{self.drop:+.2f} points, {level} interval [{d_low:+.2f}, {d_high:+.2f}], max {self.max_drop:g}), "
                f"agreement {self.agreement:.2f}% ({level} interval [{a_low:.2f}, {a_high:.2f}], min "
                f"{self.min_agreement:g}%) on {self.images} test images; evidence {self.evidence}")


def predictions(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int = 100) -> np.ndarray:
    return np.concatenate([run(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])


def judge_int8(file: str, float_file: str, int8_classes: np.ndarray, float_classes: np.ndarray,
               labels: np.ndarray, settings: Int8Settings) -> Int8Result:
    float_right, int8_right = float_classes == labels, int8_classes == labels
    counts = PairedCounts(images=int(len(labels)), agree=int(np.sum(int8_classes == float_classes)),
                          lost=int(np.sum(float_right & ~int8_right)), gained=int(np.sum(~float_right & int8_right)))
    return Int8Result(file, float_file, counts, 100.0 * float(np.mean(float_right)), 100.0 * float(np.mean(int8_right)),
                      settings.max_drop, settings.min_agreement, settings.confidence)
