"""What an exported model says about itself: one dict, stored as ONNX metadata_props and OpenVINO rt_info.

Every value is kept as a string (JSON for lists and numbers), the only type both
formats store, under keys prefixed with ``kdiff.``; :func:`decode` turns them back
into the dict that went in, so a deployed file is self-describing: class names,
input size, channel order and the exact preprocessing travel with the weights.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

PREFIX = "kdiff."
# Keys every exported model carries; the runtime helper refuses files without them.
REQUIRED = ("architecture", "classes", "input_size", "channel_order", "layout", "mean", "std", "pixel_scale",
            "fit", "input_name", "output_name")
FIT_RULE = ("pad-or-resize: an image at most 25% smaller than the input side is zero-padded, centred; any "
            "other size is resized with antialiased bilinear interpolation; grey images are repeated to 3 channels")


def build(model_info: Mapping[str, Any], *, input_name: str, output_name: str, source_sha256: str | None,
          made_by: Mapping[str, str] | None = None, preprocessing: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The metadata of an artifact made from a fused student described by ``fused/model.json``.

    ``made_by`` names the settings fingerprints (each stage's ``settings_hash``) of the stages that made the model,
    and nothing else: settings that do not shape the model (the bench's, the report's) leave the file as it is."""
    meta = {
        "architecture": model_info["architecture"],
        "zoo_name": model_info.get("zoo_name", model_info["architecture"]),
        "classes": list(model_info["classes"]),
        "input_size": list(model_info["input_size"]),  # C, H, W
        "channel_order": model_info.get("channel_order", "RGB"),
        "layout": "NCHW",
        "mean": list(model_info["mean"]),
        "std": list(model_info["std"]),
        "pixel_scale": 1 / 255,
        "fit": FIT_RULE,
        "input_name": input_name,
        "output_name": output_name,
        "output": "logits (apply softmax for probabilities)",
        "source_sha256": source_sha256 or "",
        "made_by": dict(made_by or {}),
    }
    if preprocessing is not None:  # exporters.preprocess.spec: what the runtime does to an image file
        meta["preprocessing"] = dict(preprocessing)
    missing = [key for key in REQUIRED if key not in meta]
    assert not missing, missing
    return meta


def encode(meta: Mapping[str, Any]) -> dict[str, str]:
    return {PREFIX + key: value if isinstance(value, str) else json.dumps(value) for key, value in meta.items()}


def write_onnx(proto: Any, meta: Mapping[str, Any]) -> None:
    """Replace the ``metadata_props`` of an ``onnx.ModelProto`` with ``meta`` (encoded); other tools' entries go."""
    del proto.metadata_props[:]
    for key, value in encode(meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def decode(props: Mapping[str, str]) -> dict[str, Any]:
    """Inverse of :func:`encode`; keys without the prefix (other tools' metadata) are ignored."""
    meta: dict[str, Any] = {}
    for key, value in props.items():
        if not key.startswith(PREFIX):
            continue
        try:
            meta[key[len(PREFIX):]] = json.loads(value)
        except json.JSONDecodeError:
            meta[key[len(PREFIX):]] = value
    # JSON can't tell a string that looks like a number from a number; these are always text
    for key in ("architecture", "zoo_name", "channel_order", "layout", "fit", "input_name", "output_name", "output",
                "config_sha256", "source_sha256"):  # config_sha256: files exported before made_by
        if key in meta and not isinstance(meta[key], str):
            meta[key] = json.dumps(meta[key])
    return meta


def missing_keys(meta: Mapping[str, Any]) -> list[str]:
    return [key for key in REQUIRED if key not in meta]
