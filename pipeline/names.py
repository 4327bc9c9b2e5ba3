"""What the logs, the curves and the report call each model of a run: one name for one model everywhere."""
from __future__ import annotations

TEACHER = "teacher"
DISTILLED = "distilled student"  # the multi-branch student trained with the run's method
FUSED = "fused student"  # the distilled student with its branches folded: what is exported


def baseline(method: str = "none") -> str:
    """The same student trained with the same budget alone (``none``) or with another method at its defaults."""
    return "student alone (baseline)" if method == "none" else f"student with {method} (baseline)"


def student(method: str) -> str:
    """The distill stage's model: the distilled student, or with ``--method none`` a student trained alone."""
    return DISTILLED if method != "none" else "student (no distillation)"
