"""Helpers of scripts/arm64-check.sh: the test images, one model's logits (torch-free: runs inside the arm64 root
with the installed runtime), and the x86-vs-arm64 comparison.

    python scripts/arm64_compare.py images DATA_DIR OUT_DIR COUNT     (x86, needs the pipeline: its IDX reader)
    python scripts/arm64_compare.py logits MODEL IMAGE_DIR OUT.npy    (either side: exporters only)
    python scripts/arm64_compare.py compare CHECK_DIR MODEL...        (x86: CHECK_DIR/{x86,arm64}/ and labels.json)
    python scripts/arm64_compare.py record EXPORT_DIR ARCH MODEL...   (after a passed check: the manifest's checked_on)

compare prints one Markdown table row per model and exits 1 when a model misses its goal (fp32 files: every top-1
equal; INT8 files: >= 99.5% equal), 0 otherwise; CHECK_DIR/met.txt lists the models that met theirs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

GOALS = {"fp32": 1.0, "int8": 0.995}  # top-1 agreement x86 vs arm64


def write_images(data_dir: Path, out: Path, count: int) -> None:
    """The first ``count`` Fashion-MNIST test images as PNG files (sorted names = order) and their labels."""
    from PIL import Image

    from pipeline.training.data import read_idx

    images = read_idx(data_dir / "t10k-images-idx3-ubyte.gz")[:count]
    labels = read_idx(data_dir / "t10k-labels-idx1-ubyte.gz")[:count]
    out.mkdir(parents=True, exist_ok=True)
    for i, pixels in enumerate(images):
        Image.fromarray(pixels).save(out / f"test_{i:05d}.png")
    (out.parent / "labels.json").write_text(json.dumps([int(v) for v in labels]))


def write_logits(model: Path, image_dir: Path, out: Path, batch: int = 50) -> None:
    """The model's raw outputs for every image of the folder (name order), through the runtime's own loading."""
    from exporters.runtime import Classifier

    clf = Classifier(model)
    files = sorted(image_dir.glob("*.png"))
    rows = [clf.logits(clf.normalize(np.stack([clf.load_image(f) for f in files[i:i + batch]])))
            for i in range(0, len(files), batch)]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, np.concatenate(rows))


def top1_of_predict(path: Path) -> list[int]:
    """The class indices `predict --json` printed, one line per image."""
    return [json.loads(line)["index"] for line in path.read_text().splitlines() if line.strip()]


def compare(check: Path, models: list[str]) -> int:
    labels = np.asarray(json.loads((check / "labels.json").read_text()))
    print("| model | images | top-1 agreement x86 vs arm64 | goal | max abs logit diff | accuracy x86 | "
          "accuracy arm64 | `predict` top-1 equal |")
    print("|---|---|---|---|---|---|---|---|")
    failed, met = False, []
    for model in models:
        stem = model.replace("/", "_")
        x86, arm = np.load(check / "x86" / f"{stem}.npy"), np.load(check / "arm64" / f"{stem}.npy")
        assert x86.shape == arm.shape == (len(labels), x86.shape[1]), (x86.shape, arm.shape)
        agree = float((x86.argmax(1) == arm.argmax(1)).mean())
        goal = GOALS["int8" if "int8" in model else "fp32"]
        cli_x86, cli_arm = top1_of_predict(check / "x86" / f"{stem}.jsonl"), top1_of_predict(check / "arm64" / f"{stem}.jsonl")
        cli_equal = sum(a == b for a, b in zip(cli_x86, cli_arm))
        cli_ok = len(cli_x86) == len(cli_arm) == len(labels) and cli_x86 == x86.argmax(1).tolist()
        missed = agree < goal or not cli_ok or (goal == 1.0 and cli_equal < len(labels))
        failed |= missed
        met += [] if missed else [model]
        print(f"| `{model}` | {len(labels)} | {agree:.2%} ({int(round(agree * len(labels)))}/{len(labels)}) | "
              f">= {goal:.1%} | {float(np.abs(x86 - arm).max()):.2e} | {float((x86.argmax(1) == labels).mean()):.2%} | "
              f"{float((arm.argmax(1) == labels).mean()):.2%} | {cli_equal}/{len(labels)}{'' if cli_ok else ' (MISMATCH)'} |")
    (check / "met.txt").write_text("".join(f"{model}\n" for model in met))  # what the manifest may record
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "images":
        write_images(Path(args[0]), Path(args[1]), int(args[2]))
    elif command == "logits":
        write_logits(Path(args[0]), Path(args[1]), Path(args[2]))
    elif command == "compare":
        return compare(Path(args[0]), args[1:])
    elif command == "record":
        from exporters.verify import record_check

        recorded = record_check(Path(args[0]), args[1], args[2:])
        print(f"[arm64-check] {Path(args[0]) / 'manifest.json'}: checked on {args[1]} recorded for "
              f"{', '.join(recorded)}", file=sys.stderr)
    else:
        print(f"unknown command '{command}'; valid: images, logits, compare, record", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
