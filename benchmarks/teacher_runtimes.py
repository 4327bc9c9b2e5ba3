"""What the frozen teacher's forward pass costs next to a student training step, per runtime, in one run.

This is the measurement behind the distillation-overhead verdict
(benchmarks/results/*-distill-overhead.md). For each thread count it times, on one batch
of the default settings (128 Fashion-MNIST images at 32x32, flip augmentation):

- one student-alone training step (multi-branch ShuffleNetV2 x1.0, m = 4; forward, backward and the
  engine's fused AdamW step);
- the teacher's forward pass with its logits and the ``stage4`` tap (what KDiffusion needs), in torch
  fp32 and bf16 autocast, ONNX Runtime and OpenVINO fp32, and two int8 versions made with ONNX
  Runtime's quantizer (dynamic, and static QDQ calibrated on the batch, which OpenVINO also runs). Each
  comes with its largest relative difference from torch fp32 and its top-1 agreement;
- at two threads or more, the "teacher beside the student" arrangement: the student steps on half the
  threads while OpenVINO runs the teacher on the other half in a worker thread (it releases the GIL).

Every variant runs once per round, for --rounds rounds, so machine noise spreads over all of them; the
table gives each variant's median and its ratio to the student-alone step on all threads.

    python benchmarks/teacher_runtimes.py --teacher-ckpt RUN/teacher/model.pt
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static


from exporters.errors import InputError
from exporters.sessions import RuntimeOptions, open_session
from models import FeatureTaps, get_spec
from models.reparam import build_multibranch_student
from pipeline.config import PipelineConfig
from pipeline.training.data import BatchPreprocessor, load_dataset, stratified_subset
from pipeline.stages.loaders import load_teacher
from pipeline.training.engine import make_optimizer
from pipeline.machine import machine_info
from pipeline.methods import get_method
from pipeline.training.tasks import DistillTask


class LogitsAndTap(torch.nn.Module):
    """The teacher with its ``stage4`` tap as a second output (what a KDiffusion step asks of it)."""

    def __init__(self, model: torch.nn.Module, taps: dict):
        super().__init__()
        self.model, self.taps = model, taps

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with FeatureTaps(self.model, self.taps, ["stage4"]) as taps:
            logits = self.model(images)
        return logits, taps.features["stage4"]


def runtime_session(runtime: str, path: Path, threads: int) -> Callable[[np.ndarray], list[np.ndarray]]:
    """Both outputs (logits, stage4) of the exported teacher, with the latency options the bench stage uses."""
    options = RuntimeOptions(threads=threads, latency=True, precision="f32" if runtime == "openvino" else None)
    return open_session(path, runtime, options).run_all


def export_models(wrapper: torch.nn.Module, batch: torch.Tensor, folder: Path) -> dict[str, Path]:
    """fp32 ONNX, and int8 versions from ONNX Runtime's quantizer (dynamic; static QDQ calibrated on ``batch``)."""
    paths = {name: folder / f"teacher-{name}.onnx" for name in ("fp32", "int8-dynamic", "int8-static")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (batch,), paths["fp32"], dynamo=False, opset_version=17, input_names=["images"],
                          output_names=["logits", "stage4"], dynamic_axes={"images": {0: "batch"}})
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer warns about every int64 shape tensor it skips
    quantize_dynamic(paths["fp32"], paths["int8-dynamic"], weight_type=QuantType.QInt8)

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter({"images": batch[i:i + 32].numpy()} for i in range(0, len(batch), 32))

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    quantize_static(paths["fp32"], paths["int8-static"], Calibration(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=["MatMul", "Gemm", "Conv"])
    logging.getLogger().setLevel(quiet)
    return paths


def compare(reference: tuple[torch.Tensor, torch.Tensor], outputs: list) -> str:
    rel = max(float(np.abs(np.asarray(o) - r.numpy()).max() / r.abs().max().item()) for o, r in zip(outputs, reference))
    agree = 100.0 * float((np.asarray(outputs[0]).argmax(1) == reference[0].argmax(1).numpy()).mean())
    return f"{rel:.1e} | {agree:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-ckpt", required=True, help="a finished 32x32 Fashion-MNIST teacher's model.pt")
    parser.add_argument("--threads", default="1,2", help="thread counts to measure (comma-separated)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    cfg = PipelineConfig()
    bundle = load_dataset(cfg.data.dataset, None, False, None)
    train = stratified_subset(bundle.train, cfg.student.train.batch_size, cfg.seed, "subset")
    prep = BatchPreprocessor(bundle.default_image_size, bundle.mean, bundle.std, seed=cfg.seed,
                             augment=cfg.data.augment)
    images, labels, idx = train.__getitems__(list(range(len(train))))
    x = prep(images, idx, 0, len(train))
    xn = x.numpy()

    teacher, meta = load_teacher(Path(args.teacher_ckpt), bundle, bundle.default_image_size)
    wrapper = LogitsAndTap(teacher.eval().requires_grad_(False), get_spec(meta["arch"]["name"]).taps).eval()
    with torch.no_grad():
        reference = wrapper(x)
    torch.manual_seed(cfg.seed)
    student, _ = build_multibranch_student(cfg.student.model, bundle.num_classes, bundle.default_image_size,
                                           cfg.student.m, cfg.student.points, cfg.student.rep_blocks)
    task = DistillTask(student, get_method("none")()).train()
    optimizer = make_optimizer(task, cfg.student.train)

    def student_step() -> None:
        _, losses = task(x, labels)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()

    def torch_teacher(precision: str) -> Callable[[], tuple]:
        def run() -> tuple:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                return tuple(t.float() for t in wrapper(x))
        return run

    folder = Path(tempfile.mkdtemp(prefix="teacher-runtimes-"))
    paths = export_models(wrapper, x, folder)
    pool = ThreadPoolExecutor(1)
    print(f"teacher {meta['arch']['name']} ({meta['top1']}% top-1), student {cfg.student.model} m={cfg.student.m}, "
          f"batch {len(x)} at {bundle.default_image_size}x{bundle.default_image_size}; {args.rounds} rounds; "
          f"{machine_info()['cpu']}, {os.cpu_count()} cores", flush=True)

    for threads in thread_counts:
        torch.set_num_threads(threads)
        variants: dict[str, tuple[Callable[[], object], int]] = {"student-alone step": (student_step, threads)}
        failures: dict[str, str] = {}
        checks = {"torch fp32": "reference |", "torch bf16 autocast": compare(reference, torch_teacher("bf16")())}
        variants["teacher: torch fp32"] = (torch_teacher("fp32"), threads)
        variants["teacher: torch bf16 autocast"] = (torch_teacher("bf16"), threads)
        for name, path in paths.items():
            for runtime in ("onnxruntime", "openvino"):
                if runtime == "openvino" and name == "int8-dynamic":
                    continue  # OpenVINO runs the QDQ form; the dynamic form has ONNX Runtime-only ops
                try:
                    run = runtime_session(runtime, path, threads)
                    checks[f"{runtime} {name}"] = compare(reference, run(xn))
                except (RuntimeError, InputError) as exc:  # a runtime that refuses a model is a result too
                    failures[f"teacher: {runtime} {name}"] = str(exc).strip().splitlines()[-1][:120]
                    continue
                variants[f"teacher: {runtime} {name}"] = ((lambda run=run: run(xn)), threads)
        if threads >= 2:
            beside = runtime_session("openvino", paths["fp32"], threads // 2)

            def student_with_teacher_beside(beside=beside) -> None:
                job = pool.submit(beside, xn)
                student_step()
                job.result()

            variants[f"student step on {threads - threads // 2} + openvino teacher beside on {threads // 2}"] = (
                student_with_teacher_beside, threads - threads // 2)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for name, (run, torch_threads) in variants.items():  # warm-up
            torch.set_num_threads(torch_threads)
            run()
        for _ in range(args.rounds):
            for name, (run, torch_threads) in variants.items():
                torch.set_num_threads(torch_threads)
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["student-alone step"])
        print(f"\n### {threads} thread(s)\n\n| what | median per batch | / student-alone step | "
              "max rel diff vs torch fp32 | top-1 agreement |\n|---|---|---|---|---|")
        for name, values in times.items():
            median = statistics.median(values)
            check = checks.get(name.removeprefix("teacher: "), " | ")
            print(f"| {name} | {median * 1000:.0f} ms | {median / base:.2f} | {check} |")
        for name, why in failures.items():
            print(f"| {name} | fails: {why} | | | |")
    pool.shutdown()
    shutil.rmtree(folder, ignore_errors=True)
    print(f"\nload average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
