"""Does re-parameterization hurt INT8? Fused students of the same budget, quantized the way the export stage does.

For each student architecture, the same training budget (``kd_methods.py``'s regime and cache: the teacher, the
labelled subset, the epochs) trains

- **plain**: the student alone with one conv+BN per point (``--branches 1``): nothing to fold but BN;
- **multi-branch alone**: the student alone with ``m = 4`` branches at the point (the pipeline's student network);
- **KDiffusion single / multi**: distilled with KDiffusion at one point or at several;
- **RepVGG / DBB**: the student alone with re-parameterizable blocks (``--rep-blocks``);

then each is fused and exported by the real CLI (``pipeline fuse``, ``pipeline export``), whose INT8 step writes
the ONNX Runtime (QDQ) and OpenVINO (NNCF) INT8 twins and judges them on the whole test split (the gate is
opened wide here, so every number is recorded). Then the quantizers' other settings (per-tensor weights, NNCF's
default mean-of-per-image activation ranges, no bias correction, and NNCF's accuracy-aware quantization, which
returns the costliest layers to float until INT8 loses at most 1 point on 2000 *training* images) are applied to
the same float files of the first ``--alternative-seeds`` seeds' runs and judged on the same test images. The fused convolutions' weight statistics, read from the exported ONNX
file (the tensors that are quantized), say whether folding spreads the weights: the per-tensor range over the
standard deviation, and the largest output channel's range over the median channel's.

    python benchmarks/quantization.py --out ~/.cache/kdm --jobs 2 --results benchmarks/results/DATE-quantization.md

Runs are cached under ``--out`` (shared with ``kd_methods.py``: the same command line trains once); a rerun only
does what is missing. ``--scale tiny`` runs everything on a few hundred images (the test suite does).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from copy import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import kd_methods as km
from exporters.formats import get_format, read_metadata
from exporters.quantize import Int8Settings, judge_int8, predictions, quantize_openvino

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "plain": ("none", ["--branches", "1"]),
    "multi-branch alone": ("none", []),
    "KDiffusion single": ("kdiffusion", km.option_flags(lambda_diff=1)),
    "KDiffusion multi": ("kdiffusion", ["--points", "multi", *km.option_flags(lambda_diff=1)]),
    "RepVGG": ("none", ["--branches", "1", "--rep-blocks", "repvgg"]),
    "DBB": ("none", ["--branches", "1", "--rep-blocks", "dbb"]),
}

# The export stage's settings (Int8Settings()) and one change at a time.
ALTERNATIVES: dict[str, Int8Settings] = {
    "per-tensor weights": Int8Settings(per_channel=False),
    "mean min/max ranges": Int8Settings(activation_ranges="mean_minmax"),
    "no bias correction": Int8Settings(bias_correction=False),
    # NNCF's accuracy-aware quantization (OpenVINO only), max drop 1 point on VALIDATION_IMAGES training images
    "accuracy-aware (NNCF)": Int8Settings(),
}
ACCURACY_AWARE = "accuracy-aware (NNCF)"
VALIDATION_IMAGES = 2000  # from the training split, drawn with another seed than the calibration images
RUNTIMES = {"onnx": "ORT", "openvino": "OpenVINO"}


@dataclass
class Result:
    arch: str
    variant: str
    seed: int
    run_dir: Path
    float_top1: float = 0.0
    int8: dict[str, dict[str, float]] = field(default_factory=dict)  # setting -> runtime -> drop / agreement
    weights: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ one run


def fuse_and_export(run_dir: Path, threads: int) -> None:
    """The real CLI's fuse and export stages (each skips itself when already complete)."""
    km.cli(["fuse", "--run-dir", str(run_dir)], run_dir / "log.txt", threads)
    km.cli(["export", "--run-dir", str(run_dir), "--int8", "--int8-max-drop", "100", "--int8-min-agreement", "0"],
           run_dir / "log.txt", threads)


def conv_weight_stats(onnx_file: Path) -> dict[str, float]:
    """Statistics of the float model's convolution weights (the tensors INT8 quantizes): per layer, the range
    max|w| over the std, and the widest output channel's max|w| over the median channel's; the table gives the
    median layer's first and the worst layer's second."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_file))
    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    range_over_std, channel_spread = [], []
    for node in model.graph.node:
        weight = tensors.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if weight is None or weight.size < 16:
            continue
        per_channel = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1)
        range_over_std.append(float(np.abs(weight).max() / (weight.std() + 1e-12)))
        channel_spread.append(float(per_channel.max() / (np.median(per_channel) + 1e-12)))
    return {"convs": len(range_over_std), "range_over_std": statistics.median(range_over_std),
            "channel_spread_max": max(channel_spread)}


def judge_alternatives(result: Result, calibration: np.ndarray, images: np.ndarray, labels: np.ndarray,
                       validation: tuple[np.ndarray, np.ndarray]) -> None:
    """Each alternative setting on the run's float files, judged on the export stage's test images (cached in
    the run's ``export/int8-alternatives.json``)."""
    folder = result.run_dir / "export"
    cache_file = folder / "int8-alternatives.json"
    cached = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    for name, settings in ALTERNATIVES.items():
        if name not in cached:
            cached[name] = {}
            for fmt_name, runtime in RUNTIMES.items():
                fmt = get_format(fmt_name)
                variant = fmt.int8
                if name in ("no bias correction", ACCURACY_AWARE) and not variant.tool.startswith("nncf"):
                    continue  # ONNX Runtime has neither
                if name == ACCURACY_AWARE and result.int8["default"][runtime]["drop"] <= settings.max_drop:
                    continue  # only where plain quantization loses more than the gate allows
                source = folder / variant.source
                with tempfile.TemporaryDirectory(dir=folder) as tmp:
                    target = Path(tmp) / Path(variant.model_file).name
                    if name == ACCURACY_AWARE:
                        quantize_openvino(source, target, calibration, settings, read_metadata(source), validation)
                    else:
                        variant.quantize(source, target, calibration, settings, read_metadata(source))
                    verdict = judge_int8(target.name, variant.source, predictions(fmt.open(target).run, images),
                                         predictions(fmt.open(source).run, images), labels, settings)
                cached[name][runtime] = {"drop": verdict.drop, "agreement": verdict.agreement}
            cache_file.write_text(json.dumps(cached, indent=1))
        result.int8[name] = cached[name]


def collect(result: Result) -> Result:
    """The export stage's own INT8 verdicts and the float model's weight statistics."""
    report = json.loads((result.run_dir / "export" / "int8.json").read_text())
    by_file = {r["file"]: r for r in report["results"]}
    result.int8["default"] = {}
    for fmt_name, runtime in RUNTIMES.items():
        verdict = by_file[get_format(fmt_name).int8.model_file]
        result.float_top1 = verdict["float_top1"]
        result.int8["default"][runtime] = {"drop": verdict["drop"], "agreement": verdict["agreement"]}
    result.weights = conv_weight_stats(result.run_dir / "export" / get_format("onnx").model_file)
    return result


# ------------------------------------------------------------------------------------------------ the table


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def tables(results: list[Result]) -> list[str]:
    settings = ["default", *ALTERNATIVES]
    lines = ["## fp32 vs INT8 (the export stage's settings)", "",
             "| student | variant | seeds | fp32 top-1 (%) | ORT INT8 drop (pt) | ORT agreement (%) | OpenVINO INT8 drop "
             "(pt) | OpenVINO agreement (%) | conv range / std (median layer) | widest / median channel (worst "
             "layer) |", "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.arch, r.variant), []).append(r)
    for (arch, variant), group in groups.items():
        cells = [mean_std([r.float_top1 for r in group])]
        for runtime in RUNTIMES.values():
            cells += [mean_std([r.int8["default"][runtime]["drop"] for r in group]),
                      mean_std([r.int8["default"][runtime]["agreement"] for r in group])]
        cells += [mean_std([r.weights["range_over_std"] for r in group]),
                  mean_std([r.weights["channel_spread_max"] for r in group])]
        lines.append(f"| {arch} | {variant} | {len(group)} | " + " | ".join(cells) + " |")
    lines += ["", "## Top-1 drop (points) per quantizer setting (the other settings on the first seeds' runs only: "
              "see the seeds column)", "",
              "| student | variant | runtime | seeds | " + " | ".join(settings) + " |",
              "|---|---|---|---|" + "---|" * len(settings)]
    for (arch, variant), group in groups.items():
        judged = [r for r in group if len(r.int8) > 1]  # the runs the other settings were tried on
        for runtime in RUNTIMES.values():
            values = {s: [r.int8[s][runtime]["drop"] for r in judged if runtime in r.int8.get(s, {})]
                      for s in settings}
            cells = [mean_std(values[s]) if values[s] else "-" for s in settings]
            lines.append(f"| {arch} | {variant} | {runtime} | {len(judged)} | " + " | ".join(cells) + " |")
    return lines


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    km.add_protocol_arguments(parser)
    parser.add_argument("--students", default="shufflenetv2_x0_5,mobilenetv2")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {','.join(VARIANTS)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--alternative-seeds", type=int, default=1,
                        help="judge the quantizers' other settings on the runs of this many seeds (0: none)")
    args = parser.parse_args()
    variants = km.parse_names(parser, args.variants, VARIANTS, "variant")
    started = time.time()
    args.device = "cpu"
    base = km.Protocol(args)
    teacher = base.teacher()

    def protocol_for(arch: str) -> km.Protocol:
        arch_args = copy(args)
        arch_args.student = arch
        return km.Protocol(arch_args)

    plan = [(arch, variant, seed) for seed in range(args.seeds) for arch in args.students.split(",")
            for variant in variants]  # seed-major: an interrupted run has every row at the same seed count

    def one(item: tuple[str, str, int]) -> Result:
        arch, variant, seed = item
        method, flags = VARIANTS[variant]
        run = protocol_for(arch).train(km.Run(method, flags, seed, tuning=False), teacher)
        assert run.run_dir is not None
        fuse_and_export(run.run_dir, args.threads)
        return collect(Result(arch, variant, seed, run.run_dir))

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(one, plan))

    if args.alternative_seeds:
        from pipeline.stages.loaders import held_out

        scale = km.SCALES[args.scale]
        where = {"dataset": "fashion-mnist", "image_size": scale.image_size}
        for seed in range(min(args.seeds, args.alternative_seeds)):  # the images the export stage used for the run of this seed
            images, labels = (t.numpy() for t in held_out(where, args.data_root, scale.eval_subset or 10**9, seed))
            calibration = held_out(where, args.data_root, Int8Settings().calibration_images, seed, split="train")[0]
            validation = tuple(t.numpy() for t in held_out(where, args.data_root, VALIDATION_IMAGES, seed + 1000,
                                                           split="train"))
            for r in results:
                if r.seed == seed:
                    print(f"alternatives: {r.arch} {r.variant} seed {seed}", flush=True)
                    judge_alternatives(r, calibration.numpy(), images, labels, validation)

    s = km.SCALES[args.scale]
    notes = [f"students trained as in kd_methods.py's `{args.scale}` scale: {s.subset} labelled images, {s.epochs} "
             f"epochs, {s.image_size}x{s.image_size}, fp32, seeds 0-{args.seeds - 1}; KDiffusion with its defaults "
             "(lambda_diff=1, the setting kd_methods.py's tuning chose)",
             "INT8 as the export stage makes it: ONNX Runtime quantize_static QDQ (uint8 activations, int8 weights), "
             "NNCF on the FP32 IR (mixed preset), 300 calibration images from the training split; drop = fp32 top-1 "
             f"- INT8 top-1 on {'the whole test split' if not s.eval_subset else f'{s.eval_subset} test images'}",
             "weight statistics from the exported float ONNX (fused convs with >= 16 weights)",
             f"accuracy-aware: only where the default loses more than 1 point; validation on {VALIDATION_IMAGES} "
             "training images (seeded apart from the calibration images; they may include the student's own "
             "training images, which makes NNCF's validation top-1 optimistic, not its drop)",
             f"wall time of this invocation {time.time() - started:.0f} s; machine: {km.machine_note()}"]
    text = "\n".join([*tables(results), "", *[f"- {n}" for n in notes]])
    km.publish("Does re-parameterization hurt INT8?", text, args.results)


if __name__ == "__main__":
    main()
