"""The shipped runtime's command line, with no torch and nothing of ``pipeline``: what a device runs.

    python -m exporters predict --model model.onnx IMAGE...     # the same answers as `pipeline predict`
    python -m exporters verify EXPORT_DIR                       # the same checks as `pipeline verify`

Exit codes as the pipeline's: 2 bad input (missing or unreadable files), 3 a file that differs from its manifest.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from exporters.errors import ExporterError


def _predict(args: argparse.Namespace) -> int:
    from exporters.runtime import Classifier, format_prediction

    failures: list[tuple[str, str]] = []
    predictions = Classifier(args.model, threads=args.threads).classify(args.images, top_k=args.top_k,
                                                                      failures=failures)
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
    from exporters.verify import format_report, verify_export

    report = verify_export(args.folder)
    print(json.dumps(report) if args.json else format_report(report, args.folder))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exporters", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict", help="classify image files with an exported model")
    predict.add_argument("--model", required=True, help="model.onnx, model_int8.onnx or an OpenVINO .xml")
    predict.add_argument("--top-k", type=int, default=1, help="classes shown per image (default 1)")
    predict.add_argument("--json", action="store_true", help="one JSON object per image")
    predict.add_argument("--threads", type=int, help="inference threads")
    predict.add_argument("images", nargs="+")
    predict.set_defaults(run=_predict)
    verify = commands.add_parser("verify", help="check a copied export folder: hashes, metadata, one inference")
    verify.add_argument("folder")
    verify.add_argument("--json", action="store_true", help="the checks as one JSON object")
    verify.set_defaults(run=_verify)
    args = parser.parse_args(argv)
    if getattr(args, "top_k", 1) < 1:
        parser.error("--top-k must be >= 1")
    try:
        return args.run(args)
    except ExporterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
