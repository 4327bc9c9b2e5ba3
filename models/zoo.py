"""Registration of every zoo architecture (teachers and students)."""
from __future__ import annotations

from functools import partial
from typing import Any

import torchvision
from torch import nn

from models.spec import ModelSpec, register
from models.swin import build_swin, resolve_swin_options
from models.taps import TapSpec


def _torchvision(tv_name: str, num_classes: int, image_size: int, options: dict[str, Any]) -> tuple[nn.Module, dict]:
    return torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes), {}


def _taps(*modules: str, layout: str = "NCHW", final: str | None = None) -> dict[str, TapSpec]:
    """Stage taps named by stride: stage1 (/4), stage2 (/8), stage3 (/16), stage4 (/32), then final."""
    taps = {f"stage{i + 1}": TapSpec(m, layout) for i, m in enumerate(modules)}  # type: ignore[arg-type]
    taps["final"] = TapSpec(final or modules[-1], layout)  # type: ignore[arg-type]
    return taps


_SWIN_TAPS = _taps("features.1", "features.3", "features.5", "features.7", layout="NHWC", final="norm")
for _variant, _aliases in (("swin_t", ("swin", "swin_tiny")), ("swin_s", ("swin_small",)), ("swin_b", ("swin_base",))):
    register(ModelSpec(
        name=_variant, role="teacher", torchvision_name=_variant, builder=partial(build_swin, _variant),
        classifier="head", taps=_SWIN_TAPS, aliases=_aliases, resolve=resolve_swin_options,
        adaptable_keys=("relative_position_bias_table", "relative_position_index"),
        options={"window": 7, "window_per_stage": None, "drop_path": None},
    ))

_RESNET_TAPS = _taps("layer1", "layer2", "layer3", "layer4")
for _name in ("resnet50", "resnet34"):
    register(ModelSpec(name=_name, role="teacher", torchvision_name=_name, builder=partial(_torchvision, _name),
                       classifier="fc", taps=_RESNET_TAPS))
register(ModelSpec(name="resnet18", role="student", torchvision_name="resnet18",
                   builder=partial(_torchvision, "resnet18"), classifier="fc", taps=_RESNET_TAPS))

_SHUFFLE_TAPS = _taps("maxpool", "stage2", "stage3", "stage4", final="conv5")
for _width, _aliases in (("x0_5", ()), ("x1_0", ("shufflenetv2", "shufflenet_v2", "shufflenet")),
                         ("x1_5", ()), ("x2_0", ())):
    _tv = f"shufflenet_v2_{_width}"
    register(ModelSpec(name=f"shufflenetv2_{_width}", role="student", torchvision_name=_tv,
                       builder=partial(_torchvision, _tv), classifier="fc", taps=_SHUFFLE_TAPS,
                       aliases=(_tv, *_aliases)))

register(ModelSpec(name="mobilenetv2", role="student", torchvision_name="mobilenet_v2",
                   builder=partial(_torchvision, "mobilenet_v2"), classifier="classifier.1",
                   taps=_taps("features.3", "features.6", "features.13", "features.17", final="features.18"),
                   aliases=("mobilenet_v2",)))
register(ModelSpec(name="mobilenetv3_small", role="student", torchvision_name="mobilenet_v3_small",
                   builder=partial(_torchvision, "mobilenet_v3_small"), classifier="classifier.3",
                   taps=_taps("features.1", "features.3", "features.8", "features.11", final="features.12"),
                   aliases=("mobilenet_v3_small",)))
register(ModelSpec(name="mobilenetv3_large", role="student", torchvision_name="mobilenet_v3_large",
                   builder=partial(_torchvision, "mobilenet_v3_large"), classifier="classifier.3",
                   taps=_taps("features.3", "features.6", "features.12", "features.15", final="features.16"),
                   aliases=("mobilenetv3", "mobilenet_v3", "mobilenet_v3_large")))
