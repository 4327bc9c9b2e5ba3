"""Architectures only: the teacher/student zoo, feature taps, re-parameterizable blocks."""
from models.errors import ModelError
from models.registry import ModelSpec, build_model, get_spec, model_names, resolved_options
from models.taps import FeatureTaps, TapSpec

__all__ = ["ModelError", "ModelSpec", "build_model", "get_spec", "model_names", "resolved_options", "FeatureTaps", "TapSpec"]
