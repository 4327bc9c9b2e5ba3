"""The ``pipeline`` command line: one subcommand per stage, plus ``run`` to chain them."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import click

from exporters.errors import handle_sigterm, interruption
from exporters.formats import format_names
from pipeline.config import BenchConfig, ExportConfig, FuseConfig
from pipeline.errors import FAILURES, BadInputError, storage_error

log = logging.getLogger("pipeline")


# Libraries' lines that say nothing to a user of the pipeline, shown from this level up: torch's "No CUDA runtime
# is found, using CUDA_HOME=..." on every CPU run (we compile no extension), ONNX Runtime's "Performing symbolic
# shape inference..." from the INT8 step, matplotlib's "generated new fontManager" (its cache is in the run).
QUIET_LOGGERS = {"torch.utils.cpp_extension": logging.ERROR,
                 "onnxruntime.quantization.shape_inference": logging.WARNING,
                 "matplotlib.font_manager": logging.WARNING}


def _setup_logging(level: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=getattr(logging, level.upper()) if rank == 0 else logging.WARNING,
                        format=("" if rank == 0 else f"[rank {rank}] ") + "%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    if level != "debug":
        for name, quiet in QUIET_LOGGERS.items():
            logging.getLogger(name).setLevel(quiet)


# Options shared by the training stages: (flag, config path under the stage's section or top level, click kwargs).
DATA_OPTIONS: list[tuple[str, str, dict[str, Any]]] = [
    ("--dataset", "data.dataset", dict(help="fashion-mnist (default), cifar10, cifar100 or imagefolder:PATH")),
    ("--data-root", "data.data_root", dict(help="folder holding the dataset files")),
    ("--download/--no-download", "data.download", dict(default=None, help="fetch the dataset through torchvision")),
    ("--subset", "data.subset", dict(type=int, help="train on N images (stratified, seeded)")),
    ("--eval-subset", "data.eval_subset", dict(type=int, help="evaluate on N test images (default: all)")),
    ("--validation", "data.validation", dict(type=int, help="hold out N training images and evaluate on them "
                                                           "instead of the test split (for tuning)")),
    ("--image-size", "data.image_size", dict(type=int, help="model input side (default: 32 for 28-32px data)")),
    ("--augment", "data.augment", dict(type=click.Choice(["crop-flip", "flip", "none"]),
                                       help="training augmentation (default flip)")),
    ("--workers", "data.num_workers", dict(type=int, help="data-loader processes (image folders)")),
    ("--seed", "seed", dict(type=int, help="random seed (default 0)")),
    ("--deterministic/--no-deterministic", "deterministic", dict(default=None, help="deterministic algorithms")),
    ("--keep-checkpoints/--no-keep-checkpoints", "keep_checkpoints",
     dict(default=None, help="keep each training stage's checkpoints/ (resume state) after it finishes")),
]
TRAIN_OPTIONS: list[tuple[str, str, dict[str, Any]]] = [
    ("--epochs", "train.epochs", dict(type=int)),
    ("--batch-size", "train.batch_size", dict(type=int, help="global batch size (split across torchrun ranks)")),
    ("--lr", "train.lr", dict(type=float)),
    ("--optimizer", "train.optimizer", dict(type=click.Choice(["adamw", "sgd"]))),
    ("--weight-decay", "train.weight_decay", dict(type=float)),
    ("--schedule", "train.schedule", dict(type=click.Choice(["cosine", "step", "constant"]))),
    ("--warmup-epochs", "train.warmup_epochs", dict(type=float)),
    ("--grad-clip", "train.grad_clip", dict(type=float, help="max gradient norm")),
    ("--label-smoothing", "train.label_smoothing", dict(type=float)),
    ("--precision", "train.precision", dict(type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
                                           help="autocast dtype; auto = fp32 on a CPU, bf16 on CUDA")),
]
TEACHER_OPTIONS: list[tuple[str, str, dict[str, Any]]] = [
    ("--teacher-weights", "weights", dict(help="torchvision-format state dict to start from")),
    ("--pretrained/--no-pretrained", "pretrained", dict(default=None, help="torchvision's ImageNet weights (online)")),
    ("--drop-path", "drop_path", dict(type=float, help="stochastic depth rate (Swin)")),
]

STUDENT_OPTIONS: list[tuple[str, str, dict[str, Any]]] = [
    ("--method", "method", dict(help="dkd (default), kd, kdiffusion, fitnet, at, pkt, sp, rkd, vid, ofd, reviewkd, crd, none "
                                     "(student alone)")),
    ("--teacher-ckpt", "teacher_ckpt", dict(help="teacher model.pt (default RUN_DIR/teacher/model.pt)")),
    ("--student-subset", "subset", dict(type=int, help="labelled images the student trains on, drawn from the "
                                                       "teacher's training images (default: all of them)")),
    # not "--m": under torchrun, argparse would take it for an abbreviation of its own options
    ("--branches", "m", dict(type=int, help="parallel branches m per distillation point (1-8, default 4)")),
    ("--points", "points", dict(type=click.Choice(["single", "multi"]), help="distillation points")),
    ("--rep-blocks", "rep_blocks", dict(type=click.Choice(["none", "repvgg", "dbb"]),
                                        help="re-parameterizable blocks for every other eligible conv+BN")),
    ("--teacher-cache", "teacher_cache", dict(type=click.Choice(["auto", "off"]),
                                              help="reuse the teacher's outputs per input image across epochs "
                                                   "(auto: on with --augment flip or none)")),
    ("--teacher-cache-mb", "teacher_cache_mb", dict(type=int, help="memory bound of the teacher cache (MiB)")),
    ("--teacher-precision", "teacher_precision", dict(type=click.Choice(["auto", "fp32", "bf16"]),
                                                      help="the frozen teacher's arithmetic (auto: fp32 on a CPU, "
                                                           "bf16 on CUDA)")),
    ("--method-option", "method_options", dict(multiple=True, callback=lambda c, p, v: parse_method_options(v) or None,
                                               help="KEY=VALUE option of the method (repeatable), e.g. temperature=4")),
]


def _param_name(flag: str) -> str:
    return flag.split("/")[0].lstrip("-").replace("-", "_")


def with_options(*groups: tuple[str, list[tuple[str, str, dict[str, Any]]]]) -> Callable:
    """Add option groups to a command; ``groups`` pairs a config prefix with its option list."""

    def decorate(func: Callable) -> Callable:
        for _, options in reversed(groups):
            for flag, _path, kwargs in reversed(options):
                func = click.option(flag, _param_name(flag), **kwargs)(func)
        return func

    return decorate


def parse_method_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """KEY=VALUE pairs; values are read as YAML scalars (numbers, booleans, words)."""
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got '{pair}'", param_hint="--method-option")
        options[key.strip()] = yaml.safe_load(value)
    return options


def overrides_from(params: dict[str, Any], *groups: tuple[str, list[tuple[str, str, dict[str, Any]]]]) -> dict:
    """Nested config overrides from the parsed options (None = not given)."""
    tree: dict[str, Any] = {}
    for prefix, options in groups:
        for flag, paths, _ in options:
            value = params.get(_param_name(flag))
            if value is None:
                continue
            for path in paths.split(","):  # a flag may set several fields ("a.x,b.x")
                full = f"{prefix}.{path}" if prefix else path
                node = tree
                *parents, leaf = full.split(".")
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = value
    return tree


def common_options(func: Callable) -> Callable:
    func = click.option("--config", "config_file", type=click.Path(dir_okay=False),
                        help="YAML config file (command-line flags override it)")(func)
    func = click.option("--run-dir", default="runs/default", show_default=True, type=click.Path(file_okay=False),
                        help="run directory")(func)
    func = click.option("--progress/--no-progress", default=None,
                        help="progress bar on a terminal, progress lines in the log otherwise (the default); "
                             "--no-progress: neither")(func)
    func = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)(func)
    return func


def handle_errors(func: Callable) -> Callable:
    """Turn pipeline failures into one line on stderr and the failure class's exit code. A command with a run
    directory keeps the libraries' caches inside it from its start (:mod:`pipeline.caches`: torch's are placed
    when torch's compiler modules are first imported)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        debug = ctx.find_root().params.get("debug", False)
        try:
            if kwargs.get("run_dir"):
                from pipeline.caches import caches_in

                with caches_in(Path(kwargs["run_dir"])):
                    return func(*args, **kwargs)
            return func(*args, **kwargs)
        except FAILURES as exc:
            if debug:
                raise
            click.echo(f"error: {one_line(exc)}", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:
            failure = storage_error(exc) or path_error(exc)
            if failure is None or debug:
                raise
            click.echo(f"error: {one_line(failure)}", err=True)
            sys.exit(failure.exit_code)
        except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM (exporters.errors.Terminated)
            word, code = interruption(exc)
            click.echo(f"{word}; rerun the same command to resume", err=True)
            sys.exit(code)
        finally:
            if "torch.distributed" in sys.modules:  # predict and verify never load torch: keep it that way
                from pipeline.training.distributed import shutdown_distributed

                shutdown_distributed()

    return wrapper


def path_error(exc: OSError) -> BadInputError | None:
    """A path that cannot be a folder (a file stands where a folder of it should be) is bad input."""
    import errno

    if exc.errno not in (errno.ENOTDIR, errno.EEXIST):
        return None
    return BadInputError(f"cannot use {exc.filename or 'the path'} as a folder: a file of that name (or of one of "
                         "its parents) is in the way; choose another path")


@contextlib.contextmanager
def no_trace_on_bad_input(run_dir: str | Path, owner: bool = True):
    """A command that fails on bad input leaves no trace: a run directory it created is removed again, unless a
    stage finished or checkpointed in it (work is never thrown away). Only its ``owner`` (rank 0 under torchrun)
    removes anything."""
    path = Path(run_dir)
    fresh = owner and not path.exists()
    try:
        yield
    except BadInputError:
        kept = ("stage.json", "last.pt")
        if fresh and path.is_dir() and not any(p.name in kept for p in path.rglob("*")):
            import shutil

            shutil.rmtree(path, ignore_errors=True)
        raise


@contextlib.contextmanager
def writing(run_dir: str | Path, ctx: Any = None):
    """The block writes ``run_dir``: one command at a time (the main process holds its lock; under torchrun every
    rank checks that it sees the directory rank 0 holds), no trace of a fresh run directory when it fails on bad
    input, and a collective that fails (a rank stalled or died) is reported in one line that names the rank."""
    from pipeline.layout import RunLayout
    from pipeline.runlock import hold_run_dir

    layout = RunLayout(run_dir)
    with no_trace_on_bad_input(layout.root, owner=ctx is None or ctx.is_main):
        with ctx.collective_failures() if ctx is not None else contextlib.nullcontext():
            with hold_run_dir(layout, ctx):
                yield layout


def one_line(exc: BaseException) -> str:
    """The message itself, even when a DataLoader worker wrapped it in a traceback."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback" in str(exc):
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return lines[0] if lines else type(exc).__name__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="show Python tracebacks")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@click.version_option(package_name="kdiff-pipeline")
def main(debug: bool, log_level: str) -> None:
    """Distill-and-export pipeline: teacher -> distill -> fuse -> export -> bench.

    Each stage is a subcommand reading and writing one run directory; `run` chains them.
    """
    _setup_logging("debug" if debug else log_level)
    handle_sigterm()


def _config(params: dict[str, Any], *groups, models: dict[str, str | None] | None = None,
            profile: str | None = None, extra: dict[str, Any] | None = None):
    from pipeline.config import resolve_config

    overrides = {**overrides_from(params, *groups), **(extra or {})}
    for section, name in (models or {}).items():
        if name:
            overrides.setdefault(section, {})["model"] = name
    return resolve_config(params.get("config_file"), overrides, profile)


TEACHER_GROUPS = (("", DATA_OPTIONS), ("teacher", TRAIN_OPTIONS), ("teacher", TEACHER_OPTIONS))
# `run`: the budget flags apply to both training stages, per-stage flags override them.
RUN_OPTIONS: list[tuple[str, str, dict[str, Any]]] = [
    ("--epochs", "teacher.train.epochs,student.train.epochs", dict(type=int, help="epochs of both training stages")),
    ("--batch-size", "teacher.train.batch_size,student.train.batch_size", dict(type=int, help="global batch size")),
    ("--precision", "teacher.train.precision,student.train.precision",
     dict(type=click.Choice(["auto", "fp32", "bf16", "fp16"]))),
    ("--teacher-epochs", "teacher.train.epochs", dict(type=int)),
    ("--student-epochs", "student.train.epochs", dict(type=int)),
    ("--teacher-lr", "teacher.train.lr", dict(type=float)),
    ("--student-lr", "student.train.lr", dict(type=float)),
    ("--int8/--no-int8", "export.int8", dict(default=None, help="INT8 artifacts behind an accuracy gate (default on)")),
    ("--calibration-images", "export.calibration_images", dict(type=int, help="INT8 calibration images (default 300)")),
    ("--int8-preset", "export.int8_preset", dict(type=click.Choice(["mixed", "performance"]))),
]
INT8_FIELDS = ("int8", "calibration_images", "int8_preset", "int8_max_drop", "int8_min_agreement", "int8_confidence",
               "int8_eval_images")
RUN_GROUPS = (("", DATA_OPTIONS), ("", RUN_OPTIONS), ("teacher", TEACHER_OPTIONS), ("student", STUDENT_OPTIONS))
STUDENT_GROUPS = (("", DATA_OPTIONS), ("student", TRAIN_OPTIONS), ("student", STUDENT_OPTIONS))


def _context(device: str):
    from pipeline.training.distributed import init_distributed

    try:
        return init_distributed(device)
    except RuntimeError as exc:

        raise BadInputError(str(exc)) from None


@main.command()
@click.option("--teacher", help="teacher model (default swin = swin_t); see `pipeline models`")
@with_options(*TEACHER_GROUPS)
@common_options
@handle_errors
def teacher(**params: Any) -> None:
    """Train or fine-tune the teacher; writes RUN_DIR/teacher/."""
    from pipeline.stages.teacher import run_teacher

    cfg = _config(params, *TEACHER_GROUPS, models={"teacher": params.pop("teacher")})
    _run_stage(run_teacher, cfg, params)


def _run_stage(run_function: Callable, cfg: Any, params: dict[str, Any]) -> Any:
    """One training stage on its own; RUN_DIR/config.yaml records its settings once it has finished."""
    from pipeline.orchestrate import write_config
    from pipeline.stages import StageRun

    ctx = _context(params["device"])
    with writing(params["run_dir"], ctx) as layout:
        result = run_function(StageRun(cfg, layout, ctx, params["progress"]))
    if ctx.is_main:
        write_config(layout, cfg)
    return result


@main.command()
@click.option("--teacher", help="teacher model (default swin)")
@click.option("--student", help="student model (default shufflenetv2)")
@click.option("--profile", default="default", show_default=True,
              help="named settings: default (Fashion-MNIST, ~10 min on 2 CPU cores), full (224 px, long "
                   "schedules, for GPUs), tiny (a smoke test); --config and flags override it")
@click.option("--force", "force_stage", metavar="STAGE",
              help="rerun STAGE and every stage after it (the stages are listed above)")
@click.option("--baseline/--no-baseline", "baseline", default=None,
              help="also train the student alone with the same budget, for the report (default: on)")
@click.option("--baselines", "baselines", metavar="METHODS",
              callback=lambda c, p, v: [m.strip() for m in v.split(",") if m.strip()] if v else None,
              help="the methods trained beside the distilled student, each with its defaults and the same budget, "
                   "for the report (default: none, the student alone; e.g. none,kd,fitnet)")
@with_options(*RUN_GROUPS)
@common_options
@handle_errors
def run(**params: Any) -> None:
    """Run every stage into one run directory: teacher -> distill -> baseline -> fuse -> export -> bench -> report.

    Finished stages whose settings and inputs are unchanged are skipped, an interrupted stage resumes,
    and RUN_DIR/manifest.json records what happened. Exit codes: 2 bad input, 3 equivalence gate,
    4 training diverged, 5 export failed, 6 cannot write (disk full or read-only), 7 another torchrun rank
    stalled, died or failed (docs/distributed.md).
    """
    from pipeline.layout import RunLayout
    from pipeline.orchestrate import run_pipeline

    overrides_models = {"teacher": params.pop("teacher"), "student": params.pop("student")}
    cfg = _config(params, *RUN_GROUPS, models=overrides_models, profile=params["profile"],
                  extra={"baseline": params["baseline"], "baselines": params["baselines"]})
    run_dir, ctx = Path(params["run_dir"]), _context(params["device"])
    with writing(run_dir, ctx):
        manifest = run_pipeline(cfg, run_dir, ctx, profile=params["profile"], force=params["force_stage"],
                                progress=params["progress"])
    if ctx.is_main:
        log.info("run: complete; report: %s (stages: %s)", RunLayout(run_dir).report_md,
                 ", ".join(f"{k} {v.get('action')}" for k, v in manifest.get("stages", {}).items()))


@main.command()
@click.option("--student", help="student model (default shufflenetv2); see `pipeline models`")
@with_options(*STUDENT_GROUPS)
@common_options
@handle_errors
def distill(**params: Any) -> None:
    """Train the multi-branch student; writes RUN_DIR/student/."""
    from pipeline.stages.distill import run_distill

    cfg = _config(params, *STUDENT_GROUPS, models={"student": params.pop("student")})
    _run_stage(run_distill, cfg, params)


def _section(model: type, params: dict[str, Any], *names: str) -> Any:
    """A config section from the given options; options left out keep the section's own defaults."""
    from pydantic import ValidationError

    from pipeline.config import describe_error

    try:
        return model.model_validate({n: params[n] for n in names if params.get(n) is not None})
    except ValidationError as exc:
        raise BadInputError(describe_error(exc)) from None


def _default(model: type, name: str) -> str:
    return f"(default {model.model_fields[name].get_default(call_default_factory=True)})"


@main.command()
@click.option("--run-dir", default="runs/default", show_default=True, type=click.Path(file_okay=False))
@click.option("--data-root", help="folder holding the dataset files (for the held-out images)")
@click.option("--images", type=int, help="held-out images compared " + _default(FuseConfig, "images"))
@click.option("--fp64-tol", type=float, help="max abs logit diff in float64 " + _default(FuseConfig, "fp64_tol"))
@click.option("--fp32-tol", type=float, help="max abs logit diff in float32, times max(1, max |logit|) "
              + _default(FuseConfig, "fp32_tol"))
@click.option("--min-top1-agreement", type=float, help="percent " + _default(FuseConfig, "min_top1_agreement"))
@handle_errors
def fuse(run_dir: str, data_root: str | None, **params: Any) -> None:
    """Fold the student's branches into the stock network, gated on numerical equivalence; writes RUN_DIR/fused/."""
    from exporters.equivalence import Tolerances
    from pipeline.stages.fuse import run_fuse

    f = _section(FuseConfig, params, "images", "fp64_tol", "fp32_tol", "min_top1_agreement")
    with writing(run_dir) as layout:
        run_fuse(layout, Tolerances(f.fp64_tol, f.fp32_tol, f.min_top1_agreement), data_root, f.images)


@main.command()
@click.option("--run-dir", default="runs/default", show_default=True, type=click.Path(file_okay=False))
@click.option("--formats", help=f"comma-separated: {', '.join(format_names())} (default: all)")
@click.option("--opset", type=int, help="ONNX opset (default 18 with the dynamo exporter, 17 with torchscript)")
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]),
              help="torch.export-based exporter (default dynamo) or the deprecated TorchScript one")
@click.option("--data-root", help="folder holding the dataset files (for the held-out images)")
@click.option("--images", type=int, help="held-out images compared " + _default(ExportConfig, "images"))
@click.option("--tol", "fp32_tol", type=float, help="max abs logit diff, times max(1, max |logit|) "
              + _default(ExportConfig, "fp32_tol"))
@click.option("--min-top1-agreement", type=float, help="percent " + _default(ExportConfig, "min_top1_agreement"))
@click.option("--int8/--no-int8", default=None, help="also write INT8 artifacts behind an accuracy gate "
              + _default(ExportConfig, "int8"))
@click.option("--calibration-images", type=int, help="INT8 calibration images from the training split "
              + _default(ExportConfig, "calibration_images"))
@click.option("--int8-preset", type=click.Choice(["mixed", "performance"]),
              help="quantization preset " + _default(ExportConfig, "int8_preset"))
@click.option("--int8-max-drop", type=float, help="top-1 points INT8 may lose "
              + _default(ExportConfig, "int8_max_drop"))
@click.option("--int8-min-agreement", type=float, help="percent top-1 agreement with the float model "
              + _default(ExportConfig, "int8_min_agreement"))
@click.option("--int8-confidence", type=float, help="the gate fails a model only where this interval of its drop "
              "or agreement lies wholly beyond the limit " + _default(ExportConfig, "int8_confidence"))
@click.option("--int8-eval-images", type=int, help="test images of the INT8 gate (default: the student's)")
@click.option("--verify", is_flag=True, help="only re-run the gates on the existing artifacts (exit 3 if they fail)")
@handle_errors
def export(run_dir: str, formats: str | None, data_root: str | None, verify: bool, **params: Any) -> None:
    """Export the fused student to ONNX and OpenVINO IR, gated on equivalence, and their INT8 twins, gated on
    accuracy; writes RUN_DIR/export/."""
    from pipeline.stages.export import export_settings, parse_formats, run_export

    if formats is not None:
        params["formats"] = list(parse_formats(formats))
    section = _section(ExportConfig, params, "formats", "opset", "exporter", "images", "fp32_tol",
                       "min_top1_agreement", *INT8_FIELDS)
    with writing(run_dir) as layout:
        run_export(layout, export_settings(section), data_root, verify_only=verify)


@main.command()
@click.option("--run-dir", default="runs/default", show_default=True, type=click.Path(file_okay=False))
@click.option("--backends", help="comma-separated: torch, onnxruntime, openvino (default: all)")
@click.option("--bench-device", "device", help="cpu, cuda or all (default all: GPU targets that are missing are "
              "reported as skipped)")
@click.option("--batch-sizes", help="comma-separated " + _default(BenchConfig, "batch_sizes"))
@click.option("--threads", type=int, help="threads per backend (default: all usable cores)")
@click.option("--warmup", type=int, help="untimed calls per variant " + _default(BenchConfig, "warmup"))
@click.option("--iterations", type=int, help="timed calls per variant (default: run for --duration)")
@click.option("--duration", type=float, help="seconds of timing per target and batch "
              + _default(BenchConfig, "duration"))
@handle_errors
def bench(run_dir: str, **params: Any) -> None:
    """Latency of the fused, unfused and stock student per backend and device; writes RUN_DIR/bench/."""
    from exporters.latency import BACKENDS
    from pipeline.errors import parse_list
    from pipeline.stages.bench import format_table, parse_batch_sizes, parse_devices, run_configured_bench
    from pipeline.training.checkpoint import read_json

    if params["backends"] is not None:
        params["backends"] = list(parse_list(params["backends"], BACKENDS, "backend"))
    if params["device"] is not None:
        devices = parse_devices(params["device"])
        params["device"] = devices[0] if len(devices) == 1 else "all"
    if params["batch_sizes"] is not None:
        params["batch_sizes"] = list(parse_batch_sizes(params["batch_sizes"]))
    b = _section(BenchConfig, params, "backends", "device", "batch_sizes", "threads", "warmup", "iterations",
                 "duration")
    with writing(run_dir) as layout:
        run_configured_bench(layout, b, reuse=False)
    click.echo(format_table(read_json(layout.bench.latency)))


@main.command()
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False),
              help="exported model: RUN_DIR/export/model.onnx or an OpenVINO .xml")
@click.option("--top-k", default=1, show_default=True, type=click.IntRange(min=1), help="classes shown per image")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per image")
@click.option("--threads", type=click.IntRange(min=1), help="inference threads (capped at the usable cores)")
@click.option("--max-pixels", type=click.IntRange(min=1), help="refuse images whose header declares more pixels "
              "(default: max(16777216, 64 x the model's input pixels))")
@click.argument("images", nargs=-1, required=True)
@handle_errors
def predict(model_path: str, top_k: int, as_json: bool, threads: int | None, max_pixels: int | None,
            images: tuple[str, ...]) -> None:
    """Classify image files with an exported model, preprocessed as its metadata says.

    An image that cannot be read is reported on stderr and the others are still classified; the exit code is
    then 2."""
    from exporters.runtime import Classifier, format_prediction

    failures: list[tuple[str, str]] = []
    classifier = Classifier(model_path, threads=threads, max_pixels=max_pixels)
    predictions = classifier.classify(list(images), top_k=top_k, failures=failures)
    for p in predictions:
        click.echo(format_prediction(p, as_json))
    for source, reason in failures:
        click.echo(f"error: {reason}", err=True)
    if failures:
        raise BadInputError(f"{len(failures)} of {len(images)} images could not be classified (listed above)")


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="the checks as one JSON object")
@handle_errors
def verify(path: str, as_json: bool) -> None:
    """Check an export folder on its own (e.g. after copying it to a device): every artifact's sha256 against
    manifest.json, the metadata each model carries, and one inference per model. PATH is the export folder or
    a run directory. Needs no torch. Exit codes: 2 missing or unreadable files, 3 a file that differs."""
    import json

    from exporters.verify import format_report, verify_export

    from pipeline.layout import RunLayout

    folder, run = Path(path), RunLayout(path)
    if run.export.manifest.is_file():  # a run directory: its own manifest.json records stages, not artifacts
        folder = run.export.path
    report = verify_export(folder)
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(format_report(report, folder))


@main.command()
@handle_errors
def models() -> None:
    """List the model zoo: names, aliases and feature taps."""
    from models import get_spec, model_names

    for role in ("teacher", "student"):
        click.echo(f"{role}s:")
        for name in model_names(role):
            spec = get_spec(name)
            aliases = f" (aliases: {', '.join(spec.aliases)})" if spec.aliases else ""
            click.echo(f"  {name}{aliases}  taps: {', '.join(spec.taps)}")


if __name__ == "__main__":
    main()
