"""The shipped runtime's command line, with no torch and nothing of ``pipeline``: what a device runs.

    python -m exporters predict --model model.onnx IMAGE...     # the same answers as `pipeline predict`
    python -m exporters verify EXPORT_DIR                       # the same checks as `pipeline verify`
    python -m exporters bench --model model_int8.onnx           # latency here: the timing of `pipeline bench`

Exit codes as the pipeline's: 2 bad input (missing, unreadable or malformed files, metadata or images; a usage
error), 3 a file that differs from its manifest or lies in the folder unlisted, or a float model whose answers
differ from its reference answers (reference.npz), 130 SIGINT, 143 SIGTERM.
"""
# No `from __future__` import and nothing but os and sys (both loaded before any of this runs) until the working
# directory has left sys.path: any other import could be a module planted there.
import os
import sys


def _drop_working_directory() -> None:
    """``python -m exporters`` puts the working directory first on ``sys.path``: a ``numpy.py`` planted among the
    images there would run as numpy. The package itself is imported by now, so the entry goes (as with
    ``PYTHONSAFEPATH=1``, which the runtime image also sets; only that one also keeps a planted ``exporters/``
    folder out)."""
    if sys.flags.safe_path or not sys.path:
        return
    first = sys.path[0]
    if first in ("", ".") or os.path.realpath(first) == os.path.realpath(os.getcwd()):
        del sys.path[0]


if __name__ == "__main__":
    _drop_working_directory()

import argparse  # noqa: E402
import json  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from exporters.errors import ExporterError, handle_sigterm, interruption  # noqa: E402


def _predict(args: argparse.Namespace) -> int:
    from exporters.runtime import Classifier, format_prediction

    failures: list[tuple[str, str]] = []
    classifier = Classifier(args.model, threads=args.threads, max_pixels=args.max_pixels)
    predictions = classifier.classify(args.images, top_k=args.top_k, failures=failures)
    for p in predictions:
        print(format_prediction(p, args.json))
    for _, reason in failures:
        print(f"error: {reason}", file=sys.stderr)
    if failures:
        print(f"error: {len(failures)} of {len(args.images)} images could not be classified (listed above)",
              file=sys.stderr)
        return 2
    return 0


def _verify(args: argparse.Namespace) -> int:
    import platform

    from exporters.errors import InputError
    from exporters.reference import REFERENCE
    from exporters.verify import format_report, met_reference, record_check, verify_export

    report = verify_export(args.folder)
    text = format_report(report, args.folder)
    if args.record:  # only the model files whose answers here met their reference answers are vouched for
        if not report["reference"]:
            raise InputError(f"{args.folder} has no reference answers ({REFERENCE}) to check its models against, so "
                             "nothing can be recorded as checked here: re-export the folder with this version")
        met, missed = met_reference(report)
        arch = platform.machine()
        report["recorded"] = {"arch": arch, "paths": record_check(args.folder, arch, met) if met else [],
                              "not_recorded": missed}
        text += f"\nrecorded in manifest.json: checked on {arch} ({len(report['recorded']['paths'])} files)"
        if missed:
            text += f"\nnot recorded (did not match their reference answers here): {', '.join(missed)}"
    print(json.dumps(report) if args.json else text)
    return 0


def _bench(args: argparse.Namespace) -> int:
    import logging

    from exporters.bench import bench_files
    from exporters.latency import Budget, format_table, parse_batch_sizes
    from exporters.machine import usable_cores

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    budget = Budget(threads=args.threads or usable_cores(), warmup=args.warmup, iterations=args.iterations,
                    duration=args.duration)
    result = bench_files(args.model, budget, parse_batch_sizes(args.batch_sizes))
    print(format_table(result))
    if args.json:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as handle:
                handle.write(text + "\n")
    return 0


def _positive(kind: type) -> object:
    def parse(text: str) -> object:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got '{text}'")
        return value
    return parse


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exporters", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict", help="classify image files with an exported model")
    predict.add_argument("--model", required=True, help="model.onnx, model_int8.onnx or an OpenVINO .xml")
    predict.add_argument("--top-k", type=int, default=1, help="classes shown per image (default 1)")
    predict.add_argument("--json", action="store_true", help="one JSON object per image")
    predict.add_argument("--threads", type=int, help="inference threads (capped at the usable cores)")
    predict.add_argument("--max-pixels", type=int, help="refuse images whose header declares more pixels "
                         "(default: max(16777216, 64 x the model's input pixels))")
    predict.add_argument("images", nargs="+")
    predict.set_defaults(run=_predict)
    verify = commands.add_parser("verify", help="check a copied export folder: hashes, metadata, each model's "
                                 "answers against reference.npz")
    verify.add_argument("folder")
    verify.add_argument("--json", action="store_true", help="the checks as one JSON object")
    verify.add_argument("--record", action="store_true", help="once verify passed, add this machine's CPU "
                        "architecture to `checked_on` of the model files that met their reference answers here (and "
                        "their weights) in manifest.json")
    verify.set_defaults(run=_verify)
    bench = commands.add_parser("bench", help="latency of model files on this machine (p50/p90/p99 per batch size)",
                                description="Latency on this machine, timed as `pipeline bench` times it: warm-up "
                                "calls excluded, several files interleaved. Numbers from an emulated CPU (qemu) "
                                "are not latencies.")
    bench.add_argument("--model", required=True, action="append",
                       help="an .onnx (ONNX Runtime) or .xml (OpenVINO) file; repeat to compare files")
    bench.add_argument("--threads", type=_positive(int), help="inference threads (default: every usable core)")
    bench.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes (default 1,32)")
    bench.add_argument("--warmup", type=_positive(int), default=10, help="untimed calls first (default 10)")
    bench.add_argument("--duration", type=_positive(float), default=3.0,
                       help="seconds of timed calls per batch size, all files together (default 3)")
    bench.add_argument("--iterations", type=_positive(int), help="timed calls per file instead of --duration")
    bench.add_argument("--json", metavar="FILE", help="also write the result as JSON to FILE ('-': stdout)")
    bench.set_defaults(run=_bench)
    args = parser.parse_args(argv)
    if getattr(args, "top_k", 1) < 1:
        parser.error("--top-k must be >= 1")
    handle_sigterm()
    try:
        return args.run(args)
    except ExporterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM (exporters.errors.Terminated)
        word, code = interruption(exc)
        print(word, file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
