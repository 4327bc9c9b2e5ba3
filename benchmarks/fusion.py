"""Cost of the multi-branch student vs its fused form vs the stock torchvision model, side by side.

For every zoo student: parameters, MACs, and CPU latency (torch eager, batch 1
and 32, at 224x224 and at the default Fashion-MNIST input 32x32), with the
ratios fused/stock (goal 1.00 +- 0.03: fusion must cost nothing) and
multi-branch/fused (what training-time branches would cost if shipped).

    python benchmarks/fusion.py [--students shufflenetv2,resnet18] [--sizes 224,32] [--seconds 4]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch import nn


from models import get_spec, model_names
from models.reparam import build_multibranch_student, fuse_model


def count_macs(model: nn.Module, size: int) -> int:
    total = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * (module.in_channels // module.groups) * k
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    for h in handles:
        h.remove()
    return total


@torch.inference_mode()
def interleaved_latency_ms(models: dict[str, nn.Module], batch: int, size: int, seconds: float) -> dict[str, float]:
    """Median latency of each model, calls interleaved in rotating order so machine noise hits all alike."""
    x = torch.randn(batch, 3, size, size)
    for model in models.values():
        for _ in range(2):
            model(x)
    start = time.perf_counter()
    next(iter(models.values()))(x)
    one = time.perf_counter() - start
    repeats = int(min(200, max(7, seconds / max(one, 1e-6))))
    times: dict[str, list[float]] = {k: [] for k in models}
    keys = list(models)
    for i in range(repeats):
        for key in keys[i % len(keys):] + keys[:i % len(keys)]:
            start = time.perf_counter()
            models[key](x)
            times[key].append(time.perf_counter() - start)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", default=",".join(model_names("student")))
    parser.add_argument("--sizes", default="224,32")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--m", type=int, default=4)
    parser.add_argument("--points", default="multi")
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring time per model and setting")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, m={args.m}, points={args.points}")
    header = (f"{'student':20s} {'size':>4s} {'batch':>5s} {'params mb/fused/stock (M)':>27s} "
              f"{'MACs mb/fused (M)':>18s} {'ms multi':>9s} {'ms fused':>9s} {'ms stock':>9s} "
              f"{'fused/stock':>11s} {'multi/fused':>11s}")
    print(header)
    for name in args.students.split(","):
        spec = get_spec(name, "student")
        for size in map(int, args.sizes.split(",")):
            multi, _ = build_multibranch_student(spec.name, 10, size, args.m, args.points)
            multi.eval()
            fused = fuse_model(multi)
            stock = torchvision.models.get_model(spec.torchvision_name, num_classes=10).eval()
            stock.load_state_dict(fused.state_dict(), strict=True)
            params = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (multi, fused, stock)]
            macs = [count_macs(m, size) / 1e6 for m in (multi, fused)]
            for batch in map(int, args.batches.split(",")):
                ms = interleaved_latency_ms({"multi": multi, "fused": fused, "stock": stock}, batch, size,
                                            args.seconds)
                print(f"{spec.name:20s} {size:4d} {batch:5d} {params[0]:8.2f}/{params[1]:.2f}/{params[2]:.2f}      "
                      f"{macs[0]:8.1f}/{macs[1]:8.1f} {ms['multi']:9.2f} {ms['fused']:9.2f} {ms['stock']:9.2f} "
                      f"{ms['fused'] / ms['stock']:11.3f} {ms['multi'] / ms['fused']:11.3f}", flush=True)


if __name__ == "__main__":
    main()
