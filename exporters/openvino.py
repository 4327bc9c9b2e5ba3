"""OpenVINO IR from the exported ONNX file: an exact (FP32) IR and an FP16-compressed one.

The IR carries the same ``kdiff.*`` metadata as the ONNX file, in its runtime
info (``<rt_info><kdiff>...``), so either artifact can be deployed alone.
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import openvino as ov

from exporters import metadata as md
from exporters.errors import ExportError
from exporters.sessions import RT_SECTION

log = logging.getLogger(__name__)


def convert_onnx(onnx_path: Path, meta: Mapping[str, object]) -> ov.Model:
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as exc:  # OpenVINO raises its own generic errors
        raise ExportError(f"OpenVINO could not convert {onnx_path}: {str(exc).splitlines()[0]}") from exc
    set_metadata(model, meta)
    return model


def set_metadata(model: ov.Model, meta: Mapping[str, object]) -> None:
    """The ``kdiff.*`` metadata into the model's runtime info (``<rt_info><kdiff>``)."""
    for key, value in md.encode(meta).items():
        model.set_rt_info(value, [RT_SECTION, key.removeprefix(md.PREFIX)])


def save_ir(model: ov.Model, xml_path: Path, compress_to_fp16: bool, label: str | None = None) -> Path:
    """Write ``.xml`` + ``.bin`` next to each other, each moved into place only once complete."""
    xml_path = Path(xml_path)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=xml_path.parent, prefix=f".{xml_path.stem}.", suffix=".tmp") as tmp:
        tmp_xml = Path(tmp) / xml_path.name
        ov.save_model(model, str(tmp_xml), compress_to_fp16=compress_to_fp16)
        os.replace(tmp_xml.with_suffix(".bin"), xml_path.with_suffix(".bin"))
        os.replace(tmp_xml, xml_path)
    label = label or ("FP16-compressed" if compress_to_fp16 else "exact FP32")
    log.info("export: OpenVINO IR (%s) -> %s", label, xml_path)
    return xml_path
