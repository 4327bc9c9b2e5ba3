"""What an exported model says about itself: one dict, stored as ONNX metadata_props and OpenVINO rt_info.

Every value is kept as a string (JSON for lists and numbers), the only type both
formats store, under keys prefixed with ``kdiff.``; :func:`decode` turns them back
into the dict that went in, so a deployed file is self-describing: class names,
input size, channel order and the exact preprocessing travel with the weights.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from exporters.errors import InputError, printable

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
        except (json.JSONDecodeError, RecursionError):  # plain text, or nesting no field of ours has
            meta[key[len(PREFIX):]] = value
    # JSON can't tell a string that looks like a number from a number; these are always text
    for key in ("architecture", "zoo_name", "channel_order", "layout", "fit", "input_name", "output_name", "output",
                "config_sha256", "source_sha256"):  # config_sha256: files exported before made_by
        if key in meta and not isinstance(meta[key], str):
            meta[key] = json.dumps(meta[key])
    return meta


def missing_keys(meta: Mapping[str, Any]) -> list[str]:
    return [key for key in REQUIRED if key not in meta]


# ----------------------------------------------------------------------------- what the runtime trusts
# A model file may come from anywhere: every field the runtime reads is checked against these bounds and against
# the graph itself before any image is decoded or any buffer is sized from it (docs/device-inputs.md).
CHANNELS = (1, 3)
MAX_SIDE = 8192  # input height and width
MAX_CLASSES = 100_000
MAX_LABEL_CHARS = 1000
MEAN_RANGE, STD_RANGE = (0.0, 1.0), (1e-3, 10.0)  # fractions of full scale, as pixel_scale 1/255 makes them


def validate(meta: Mapping[str, Any], input_shape: Sequence[int | None], output_shape: Sequence[int | None],
             where: str) -> None:
    """Refuse (one InputError line) metadata the runtime cannot trust: missing or malformed fields, values out of
    range, an ``input_size`` other than the graph's static C, H, W, or labels that do not match its output width."""
    def bad(field: str, why: str) -> InputError:
        return InputError(f"{printable(where)}: metadata field '{field}' {why}; re-export the model with "
                          "`pipeline export`")

    missing = missing_keys(meta)
    if missing:
        raise InputError(f"{printable(where)} carries no pipeline metadata ({', '.join(missing)} missing); export "
                         "it with `pipeline export`")
    size = meta["input_size"]
    if not (_ints(size) and len(size) == 3 and size[0] in CHANNELS and all(1 <= v <= MAX_SIDE for v in size[1:])):
        raise bad("input_size", f"must be [C, H, W] with C in {CHANNELS} and 1 <= H, W <= {MAX_SIDE}")
    graph = list(input_shape)
    if len(graph) != 4 or list(graph[1:]) != list(size):
        raise bad("input_size", f"is {list(size)} but the graph's input is {_shape(graph)} (N x C x H x W with "
                                "static C, H, W expected)")
    if meta["layout"] != "NCHW":
        raise bad("layout", "must be NCHW")
    classes = meta["classes"]
    if not (isinstance(classes, list) and 0 < len(classes) <= MAX_CLASSES
            and all(isinstance(c, str) and len(c) <= MAX_LABEL_CHARS for c in classes)):
        raise bad("classes", f"must be a list of 1 to {MAX_CLASSES} labels (text, at most {MAX_LABEL_CHARS} "
                             "characters each)")
    width = list(output_shape)[-1] if len(output_shape) == 2 else -1
    if width is not None and width != len(classes):
        raise bad("classes", f"has {len(classes)} labels but the graph's output is {_shape(output_shape)}")
    _check_normalization(meta, size[0], bad, "")
    p = meta.get("preprocessing")
    if p is None:
        return
    from exporters.preprocess import COLORS, CROPS

    if not isinstance(p, dict):
        raise bad("preprocessing", "must be an object")
    if p.get("color") not in COLORS or p.get("crop") not in CROPS:
        raise bad("preprocessing", f"needs color in {COLORS} and crop in {CROPS}")
    if p.get("size") != list(size[1:]) or p.get("channels") != size[0]:
        raise bad("preprocessing", f"size and channels must be {list(size[1:])} and {size[0]} (as input_size)")
    _check_normalization(p, size[0], bad, "preprocessing.")


def _check_normalization(fields: Mapping[str, Any], channels: int, bad: Any, prefix: str) -> None:
    for key, (low, high) in (("mean", MEAN_RANGE), ("std", STD_RANGE)):
        values = fields.get(key)
        if not (isinstance(values, list) and len(values) == channels and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and low <= v <= high
                for v in values)):
            raise bad(prefix + key, f"must be {channels} finite numbers in [{low}, {high}]")


def _ints(values: Any) -> bool:
    return isinstance(values, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _shape(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
