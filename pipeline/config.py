"""One typed config for the whole pipeline: defaults, YAML files, CLI overrides, validation.

Precedence: built-in defaults < ``--profile`` (``pipeline run``; YAML files in
``pipeline/profiles/``) < ``--config FILE`` < command-line flags. The
resolved config is validated as a whole before any work starts (so an
invalid value never touches a run directory), completed with the settings the
defaults leave to the data and the models (:func:`with_derived_settings`: the
input side, the Swin windows) and saved once to ``RUN_DIR/config.yaml``. The
stages never write into the config: what they choose while running (precision,
teacher cache) goes into their own records.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import BadInputError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    dataset: str = "fashion-mnist"
    data_root: Optional[str] = None
    download: bool = False
    subset: Optional[int] = Field(None, gt=0, description="train on N images (stratified, seeded)")
    eval_subset: Optional[int] = Field(None, gt=0, description="evaluate on N test images")
    validation: Optional[int] = Field(
        None, gt=0, description="hold out N training images (stratified, the same for every seed) and evaluate on "
        "them instead of the test split: for tuning, so that the test split judges only the chosen settings")
    image_size: Optional[int] = Field(None, ge=16, le=1024, description="model input side; default per dataset")
    augment: Literal["crop-flip", "flip", "none"] = Field(
        "flip", description="training augmentation: random crop (padding size/8) and/or horizontal flip")
    num_workers: Optional[int] = Field(None, ge=0, description="loader processes for image folders")

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        from pipeline.training.data import check_dataset_name

        return check_dataset_name(value)


class TrainConfig(_Strict):
    """Settings of one training run (shared by every training stage).

    The defaults are the Swin teacher's from-scratch recipe for Fashion-MNIST on a
    2-core CPU (benchmarks/teacher_swin.py): short, so no crop augmentation, no label
    smoothing and no stochastic depth (the model underfits in 4 epochs), AdamW at
    5e-4 with a short warm-up and gradient clipping (1e-3 without clipping diverges).
    """

    epochs: int = Field(4, gt=0)
    batch_size: int = Field(128, gt=0, description="global batch (split across torchrun ranks)")
    lr: float = Field(5e-4, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(0.05, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.3, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    step_milestones: list[int] = Field(default_factory=lambda: [30, 60, 90])
    step_gamma: float = Field(0.1, gt=0, le=1)
    grad_clip: Optional[float] = Field(1.0, ge=0, description="max gradient norm; 0 or null = off")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class TeacherConfig(_Strict):
    model: str = "swin"
    weights: Optional[str] = Field(None, description="torchvision-format state dict to start from")
    pretrained: bool = False
    drop_path: Optional[float] = Field(0.0, ge=0, lt=1, description="stochastic depth (Swin)")
    window: int = Field(7, ge=1, description="largest Swin attention window")
    window_per_stage: Optional[list[int]] = Field(
        None, description="Swin window of each stage; empty = the largest window <= `window` that divides the "
        "stage's token grid (no padding), filled in when the config is resolved")
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        return _check_model(value, "teacher")


# The student's own training recipe where it differs from TrainConfig's defaults (the teacher's): a small CNN
# trains well at a higher rate with lighter weight decay and needs no clipping.
STUDENT_RECIPE: dict[str, Any] = {"epochs": 3, "lr": 3e-3, "weight_decay": 0.01, "grad_clip": None}


# The measurement that chose the default method and its options: a results file of benchmarks/kd_methods.py and
# its row. Every run's report names it; tests/test_report_evidence.py holds the defaults to that row.
DEFAULT_METHOD_EVIDENCE = {"file": "benchmarks/results/2026-12-07-kd-methods-swin.md", "row": "DKD",
                           "pair": "Swin-T teacher -> ShuffleNetV2 x0.5, 32x32, 4k labelled images"}


class StudentConfig(_Strict):
    model: str = "shufflenetv2"
    method: str = "dkd"  # what DEFAULT_METHOD_EVIDENCE chose; `--method kdiffusion` is one flag away
    method_options: dict[str, Any] = Field(default_factory=dict, description="options of the method, by name")
    teacher_ckpt: Optional[str] = Field(None, description="teacher model.pt (default RUN_DIR/teacher/model.pt)")
    subset: Optional[int] = Field(
        None, gt=0, description="labelled images the student trains on, drawn (stratified, seeded) from the "
        "teacher's training images; default: all of them. The few-labels setting: a teacher trained on every "
        "labelled image, a student (and the student alone it is compared with) on fewer")
    m: int = Field(4, ge=1, le=8, description="parallel branches at each distillation point")
    points: Literal["single", "multi"] = "single"
    rep_blocks: Literal["none", "repvgg", "dbb"] = "none"
    teacher_cache: Literal["auto", "off"] = Field(
        "auto", description="reuse the teacher's outputs per distinct input image across epochs; auto = on when "
        "data.augment is flip or none (random crops make every input new)")
    teacher_cache_mb: int = Field(2048, ge=0, description="memory bound of the teacher cache per process (MiB)")
    teacher_cache_dtype: Literal["float16", "float32"] = Field("float16", description="storage of cached outputs")
    teacher_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="the frozen teacher's arithmetic; auto = fp32 on a CPU, bf16 on CUDA (a setting, never "
        "a timing probe: the same command always trains the same student)")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(**STUDENT_RECIPE))

    @field_validator("train", mode="before")
    @classmethod
    def _over_student_recipe(cls, value: Any) -> Any:
        """A partial ``student.train`` overrides only the fields it names: the rest stay the student's recipe
        (not the teacher's, which is TrainConfig's own defaults)."""
        return {**STUDENT_RECIPE, **value} if isinstance(value, dict) else value

    @field_validator("teacher_cache", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML reads a bare ``off`` as False (and ``on`` as True, which here means auto)."""
        return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from pipeline.methods import get_method

        try:
            return get_method(value).name
        except Exception as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _valid_method_options(self) -> "StudentConfig":
        """Every method option is checked with the settings, before any stage runs (not after the teacher)."""
        from pipeline.methods import create_method

        create_method(self.method, self.method_options, self.train.label_smoothing)
        return self

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        return _check_model(value, "student")


def _check_model(value: str, role: str) -> str:
    from models import ModelError, get_spec

    try:
        return get_spec(value, role).name
    except ModelError as exc:
        raise ValueError(str(exc)) from None


class FuseConfig(_Strict):
    images: int = Field(256, ge=1, description="held-out images compared")
    fp64_tol: float = Field(1e-9, ge=0)
    fp32_tol: float = Field(1e-4, ge=0, description="times max(1, max |logit|)")
    min_top1_agreement: float = Field(100.0, ge=0, le=100)


def _all_formats() -> list[str]:
    from exporters.formats import format_names

    return list(format_names())


class ExportConfig(_Strict):
    formats: list[str] = Field(default_factory=_all_formats, min_length=1,
                               description="export formats (exporters.formats); default: every registered one")
    opset: Optional[int] = Field(None, ge=7, description="default: 18 (dynamo exporter), 17 (torchscript)")
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    images: int = Field(64, ge=1, description="held-out images compared")
    fp32_tol: float = Field(1e-4, ge=0, description="times max(1, max |logit|)")
    min_top1_agreement: float = Field(100.0, ge=0, le=100)
    int8: bool = Field(True, description="also write post-training INT8 artifacts behind an accuracy gate")
    calibration_images: int = Field(300, ge=1, description="INT8 calibration images from the training split")
    int8_preset: Literal["mixed", "performance"] = Field("mixed", description="NNCF quantization preset")
    int8_max_drop: float = Field(1.0, ge=0, description="top-1 points INT8 may lose against the float export")
    int8_min_agreement: float = Field(97.0, ge=0, le=100, description="percent top-1 agreement with float")
    int8_saturation_safe: bool = Field(True, description="7-bit INT8 weights, so that CPUs without VNNI (whose "
                                       "int16 sums saturate) give the answers the gate checked")
    int8_confidence: float = Field(0.95, ge=0.5, lt=1, description="the INT8 gate fails a model only where this "
                                   "interval of its drop (or agreement) lies wholly beyond the limit")
    int8_eval_images: Optional[int] = Field(None, ge=1, description="test images of the INT8 gate (default: "
                                            "those the student was evaluated on)")
    reference_images: int = Field(32, ge=1, le=10_000, description="held-out images whose answers reference.npz "
                                  "records for every model file (what `verify` compares on a device)")


    @field_validator("formats")
    @classmethod
    def _known_formats(cls, value: list[str]) -> list[str]:
        from exporters.formats import format_names

        unknown = [name for name in value if name not in format_names()]
        if unknown:
            raise ValueError(f"unknown export format(s) {', '.join(unknown)}; valid: {', '.join(format_names())}")
        return list(dict.fromkeys(value))


class BenchConfig(_Strict):
    backends: list[Literal["torch", "onnxruntime", "openvino"]] = Field(
        default_factory=lambda: ["torch", "onnxruntime", "openvino"], min_length=1)
    device: Literal["cpu", "cuda", "all"] = "all"
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32], min_length=1)
    threads: Optional[int] = Field(None, ge=1, description="default: every usable core")
    warmup: int = Field(10, ge=0)
    iterations: Optional[int] = Field(None, ge=1, description="per variant; default: run for `duration` s")
    duration: float = Field(3.0, gt=0)


class PipelineConfig(_Strict):
    seed: int = Field(0, ge=0)
    deterministic: bool = False
    keep_checkpoints: bool = Field(
        False, description="keep a training stage's checkpoints/ (resume state, best epoch) after it finishes; "
        "by default they are removed then, since a finished stage never resumes (a Swin teacher's are 0.44 GB)")
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    baseline: bool = Field(True, description="`pipeline run` also trains the student alone with the same budget, "
                           "for the report's comparison")
    baselines: list[str] = Field(
        default_factory=lambda: ["none"], min_length=1,
        description="with `baseline` on: the methods trained beside the distilled student, same student and budget, "
        "each with its default options; `none` is the student alone (e.g. none,kd,fitnet)")

    @field_validator("baselines")
    @classmethod
    def _known_baselines(cls, value: list[str]) -> list[str]:
        from pipeline.methods import get_method

        try:
            return list(dict.fromkeys(get_method(name).name for name in value))
        except Exception as exc:
            raise ValueError(str(exc)) from None
    fuse: FuseConfig = Field(default_factory=FuseConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)

    def section_hash(self, *sections: str, exclude: dict[str, set[str]] | None = None) -> str:
        """Stable hash of the named top-level sections: a stage's settings fingerprint. ``exclude`` leaves fields
        out (settings added later that must not change the fingerprints of runs made before them)."""
        exclude = exclude or {}
        payload = {name: getattr(self, name) for name in sections}
        text = json.dumps({k: (v.model_dump(exclude=exclude.get(k)) if isinstance(v, BaseModel) else v)
                           for k, v in payload.items()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def describe_error(error: ValidationError) -> str:
    first = error.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "config"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"invalid config: unknown field '{field}'"
    got = first.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return f"invalid config: {field}: {message}{shown}"


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise BadInputError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise BadInputError(f"config file {path} must hold a mapping at the top level")
    return data


PROFILES_DIR = Path(__file__).parent / "profiles"


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def read_profile(name: str) -> dict[str, Any]:
    """A named set of settings shipped with the package (``pipeline/profiles/NAME.yaml``), or a YAML file given
    by its path (ending in .yaml or .yml). A name never reaches outside the profiles folder."""
    if name in profile_names():
        return read_config_file(PROFILES_DIR / f"{name}.yaml")
    if Path(name).suffix in (".yaml", ".yml"):
        return read_config_file(name)
    raise BadInputError(f"unknown profile '{name}'; valid: {', '.join(profile_names())} (or a PATH.yaml file)")


def _section(settings: dict[str, Any], key: str) -> dict[str, Any]:
    """``settings[key]`` when it is a mapping, else empty (validation names a malformed one later)."""
    value = settings.get(key)
    return value if isinstance(value, dict) else {}


def profile_for(profile: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """A profile's settings for the dataset the run uses: its general ones, then those under
    ``for_dataset: {DATASET: ...}`` for that dataset only (the default profile sizes its run for the built-in
    data there: subsets and epochs that would be wrong on a user's images). ``given``: the config file's and the
    flags' settings, which decide the dataset."""
    per_dataset = profile.get("for_dataset") or {}
    if not isinstance(per_dataset, dict) or not all(isinstance(v, dict) for v in per_dataset.values()):
        raise BadInputError("invalid profile: for_dataset must map dataset names to settings")
    data = {**_section(profile, "data"), **_section(given, "data")}
    dataset = data.get("dataset") or DataConfig.model_fields["dataset"].default
    chosen = _merge({key: value for key, value in profile.items() if key != "for_dataset"},
                    per_dataset.get(dataset, {}) if isinstance(dataset, str) else {})
    labelled = _section(chosen, "student").get("subset")
    subset = {**_section(chosen, "data"), **_section(given, "data")}.get("subset")
    if isinstance(labelled, int) and isinstance(subset, int) and labelled >= subset:
        # the profile's few-labels subset, on a run given fewer training images: the students take them all
        chosen["student"] = {key: value for key, value in chosen["student"].items() if key != "subset"}
    return chosen


def resolve_config(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None,
                   profile: str | None = None) -> PipelineConfig:
    """Defaults < profile < config file < overrides (nested dicts; ``None`` values are ignored)."""
    given = _merge(read_config_file(config_file) if config_file else {}, _drop_none(overrides or {}))
    data = _merge(profile_for(read_profile(profile), given) if profile else {}, given)
    try:
        return with_derived_settings(PipelineConfig.model_validate(data))
    except ValidationError as exc:
        raise BadInputError(describe_error(exc)) from None


def with_derived_settings(cfg: PipelineConfig) -> PipelineConfig:
    """A copy with the settings that defaults leave open filled in: the input side (the dataset's default) and
    the teacher's architecture choices for it (Swin: the window of each stage)."""
    from models import resolved_options
    from pipeline.training.data import default_image_size

    data = cfg.model_dump()
    image_size = cfg.data.image_size or default_image_size(cfg.data.dataset)
    data["data"]["image_size"] = image_size
    teacher = data["teacher"]
    options = {key: teacher[key] for key in ("window", "window_per_stage") if key in teacher}
    teacher.update({k: v for k, v in resolved_options(cfg.teacher.model, image_size, options).items()
                    if k in teacher})
    return PipelineConfig.model_validate(data)


def _drop_none(tree: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            value = _drop_none(value)
            if value:
                out[key] = value
        elif value is not None:
            out[key] = value
    return out


def config_to_yaml(config: PipelineConfig, extra: dict[str, Any] | None = None) -> str:
    data = config.model_dump()
    if extra:
        data = _merge(data, extra)
    return yaml.safe_dump(data, sort_keys=False)
