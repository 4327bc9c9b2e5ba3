"""The stages of ``pipeline run``, in order; each module declares its own :class:`StageSpec`.

Adding a stage: a module here that ends with ``STAGE = StageSpec(...)``, and its
place in :data:`STAGES` below (see docs/architecture.md).
"""
from pipeline.stages import bench, distill, export, fuse, report, teacher
from pipeline.stages.base import StageRun, StageSpec

STAGES: tuple[StageSpec, ...] = (teacher.STAGE, distill.STAGE, distill.BASELINE, fuse.STAGE, export.STAGE,
                                 bench.STAGE, report.STAGE)


def stage_names() -> tuple[str, ...]:
    return tuple(spec.name for spec in STAGES)


__all__ = ["STAGES", "StageRun", "StageSpec", "stage_names"]
