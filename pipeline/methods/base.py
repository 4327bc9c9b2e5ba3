"""The distillation method contract and its registry.

A method is one ``nn.Module`` class with one job: given the student's (and,
when it needs one, the teacher's) logits and feature taps plus the labels,
return a dict of named loss tensors; the training loss is their sum. A
method owns its training-only modules (projectors and the like), which live
in the training task and never in the saved student.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import unknown_name

log = logging.getLogger(__name__)
_METHODS: dict[str, type["KDMethod"]] = {}


def register_method(name: str) -> Callable[[type["KDMethod"]], type["KDMethod"]]:
    def add(cls: type["KDMethod"]) -> type["KDMethod"]:
        if name in _METHODS:
            raise ValueError(f"method '{name}' registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return add


def method_names() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> type["KDMethod"]:
    if name not in _METHODS:
        raise unknown_name("method", name, method_names())
    return _METHODS[name]


def option_defaults(cls: type["KDMethod"]) -> dict[str, Any]:
    """Every option of a method class with its default (``inspect.Parameter.empty`` where it has none): its own
    ``__init__``'s and those its ``**options`` pass on to its parents' (RKD's ``beta`` is its parent's), the
    subclass's default winning. ``label_smoothing`` is the training recipe's, not an option."""
    found: dict[str, Any] = {}
    for klass in cls.__mro__:
        if klass is KDMethod or not issubclass(klass, KDMethod):
            break
        if "__init__" not in vars(klass):
            continue
        parameters = list(inspect.signature(klass.__init__).parameters.values())[1:]  # without self
        for p in parameters:
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "label_smoothing":
                found.setdefault(p.name, p.default)
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break  # this __init__ passes nothing on
    return found


def create_method(name: str, options: dict[str, Any], label_smoothing: float = 0.0) -> "KDMethod":
    """The method ``name`` with its options; a ValueError names an unknown or invalid option."""
    cls = get_method(name)
    valid = option_defaults(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"method '{cls.name}' has no option(s) {', '.join(unknown)}; "
                         f"valid: {', '.join(sorted(valid)) or 'none'}")
    try:
        return cls(label_smoothing=label_smoothing, **options)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"method '{cls.name}': {exc}") from None


def method_settings(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Every option of method ``name`` with its value: the given ones over the defaults. What a run records and
    fingerprints, so that a change of a default retrains instead of reusing a student trained with the old one."""
    defaults = {key: value for key, value in option_defaults(get_method(name)).items()
                if value is not inspect.Parameter.empty}
    return {**defaults, **options}


def check(condition: bool, message: str) -> None:
    """Option validation: a ValueError that the stage reports as bad input."""
    if not condition:
        raise ValueError(message)


# (student point tap, teacher tap, student feature C x H x W, teacher feature C x H x W)
FeaturePair = tuple[str, str, tuple[int, int, int], tuple[int, int, int]]


class KDMethod(nn.Module):
    """The whole contract of a distillation method.

    Class attributes: ``needs_teacher`` (the distill stage loads a teacher) and
    ``uses_features`` (the stage pairs the student's distillation points with
    teacher taps and calls :meth:`setup` before training); ``num_samples`` is
    the training set's size (set before :meth:`setup`; the engine passes each
    image's index in it to :meth:`losses`). Constructor keyword arguments are
    the method's ``--method-option`` settings.
    """

    name = "base"
    needs_teacher = True
    uses_features = False
    num_samples = 0  # the training set's size, set by the stage before setup

    def __init__(self, label_smoothing: float = 0.0, **options: Any):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.epoch_progress = 0.0  # fractional epochs done, set by the task each step (for warm-ups)

    def setup(self, m: int, pairs: list[FeaturePair], next_parts: dict[str, nn.Module | None]) -> None:
        """Build the method's training-only modules once the feature shapes are known (``uses_features``).

        ``m``: branches per distillation point; ``next_parts``: the teacher's frozen module after each teacher
        tap (None where the teacher has none)."""

    @property
    def teacher_taps(self) -> list[str]:
        """The teacher feature taps :meth:`losses` needs in ``teacher_feats`` (none for logit methods)."""
        return []

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def losses(self, *, student_logits: torch.Tensor, labels: torch.Tensor,
               teacher_logits: torch.Tensor | None = None, teacher_feats: dict[str, torch.Tensor] | None = None,
               branches: dict[str, list[torch.Tensor]] | None = None,
               indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Named loss terms (their sum is trained). ``branches``: each distillation point's branch outputs
        (the m parallel features), by student tap; ``indices``: the batch's positions in the training set."""
        raise NotImplementedError


@register_method("none")
class StudentAlone(KDMethod):
    """No teacher: the multi-branch student trained with cross-entropy alone (the baseline)."""

    needs_teacher = False

    def losses(self, *, student_logits, labels, **_: Any) -> dict[str, torch.Tensor]:
        return {"ce": self.cross_entropy(student_logits, labels)}
