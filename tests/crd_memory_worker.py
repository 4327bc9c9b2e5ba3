"""Run by tests/test_crd.py, under torchrun (each rank takes its share of one global batch) or alone (the whole
batch): one CRD training step, then the method's memory banks saved to ``<prefix>-<rank>.pt``."""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from pipeline.methods import create_method

GLOBAL_BATCH, N = 8, 32


def main(prefix: str) -> None:
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(0)  # the same initial embeddings and memories everywhere
    method = create_method("crd", {"negatives": 16, "feat_dim": 4})
    method.num_samples = N
    method.setup(1, [("final", "stage4", (6, 2, 2), (5, 2, 2))], {"stage4": None})
    initial = {f"initial_{k}": v.clone() for k, v in method.state_dict().items() if "memory" in k}
    data = torch.Generator().manual_seed(1)
    student = torch.randn(GLOBAL_BATCH, 6, 2, 2, generator=data)
    teacher = torch.randn(GLOBAL_BATCH, 5, 2, 2, generator=data)
    indices = torch.randperm(N, generator=data)[:GLOBAL_BATCH]
    share = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    torch.manual_seed(100 + rank)  # each rank draws its own negatives, as in training
    method.losses(student_logits=torch.zeros(GLOBAL_BATCH // world, 3),
                  labels=torch.zeros(GLOBAL_BATCH // world, dtype=torch.long), branches={"final": [student[share]]},
                  teacher_feats={"stage4": teacher[share]}, indices=indices[share])
    torch.save({**method.state_dict(), **initial}, f"{prefix}-{rank}.pt")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
