"""Loading torchvision-format state dicts into zoo models, tolerant of head and window changes."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from models.errors import ModelError

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What a partial load did: every key is in exactly one list."""

    loaded: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"loaded": len(self.loaded), "shape_mismatch": self.shape_mismatch,
                "missing": self.missing, "unexpected": self.unexpected}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a plain state dict (optionally nested under 'model'/'state_dict'), weights only."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt archives and unpickling errors have many types; keep the first line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"corrupt or unreadable weights file {path}: {first}") from exc
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path} does not hold a state dict of tensors")
    return obj


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], classifier: str | None = None,
                  adaptable: tuple[str, ...] = ()) -> LoadReport:
    """Load every tensor whose name and shape fit; the rest stays as initialised.

    A classifier whose class count differs shows up as a shape mismatch and
    keeps its fresh initialisation: that is how the head is "replaced".
    Keys containing one of ``adaptable`` (e.g. Swin's relative-position
    tables, sized by the window) may differ in shape too; any other shape
    mismatch means the file is for another architecture and is an error.
    """
    own = model.state_dict()
    report = LoadReport()
    usable = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            report.shape_mismatch.append(key)
        else:
            usable[key] = value
            report.loaded.append(key)
    report.missing = [k for k in own if k not in state]
    allowed = tuple(a for a in (*adaptable, f"{classifier}." if classifier else None) if a)
    wrong = [k for k in report.shape_mismatch if not (k.startswith(allowed) or any(a in k for a in adaptable))]
    if wrong:
        shown = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:3])
        raise ModelError(f"weights do not fit this model: {len(wrong)} tensors have wrong shapes ({shown}"
                         f"{', ...' if len(wrong) > 3 else ''})")
    if not usable:
        raise ModelError("no tensor of the weights file fits this model (wrong architecture?)")
    model.load_state_dict(usable, strict=False)
    head_replaced = classifier is not None and any(k.startswith(classifier + ".") for k in report.shape_mismatch)
    log.info("loaded %d tensors; %d shape mismatches%s; %d missing; %d unexpected", len(report.loaded),
             len(report.shape_mismatch), " (classifier head replaced)" if head_replaced else "",
             len(report.missing), len(report.unexpected))
    for kind in ("shape_mismatch", "missing", "unexpected"):
        keys = getattr(report, kind)
        if keys:
            log.info("%s keys: %s", kind, ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
    return report
