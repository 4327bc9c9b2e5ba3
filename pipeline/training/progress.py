"""Progress of a training epoch for output that is not a terminal (a pipe, a file, a CI log): log lines.

A terminal gets tqdm's bar; elsewhere a bar prints nothing useful, so a line with the step, the rate and the
time left in the epoch is logged after the first step (the rate is known at once), then every ``interval_s``
seconds or every ``fraction`` of the epoch, whichever comes first, but never twice within ``min_gap_s``.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressLines:
    """The progress lines of one epoch: ``update`` after each step returns the line when one is due."""

    def __init__(self, label: str, epoch: int, epochs: int, steps: int, *, interval_s: float = 30.0,
                 fraction: float = 0.1, min_gap_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.prefix = f"{label} epoch {epoch}/{epochs}"
        self.steps, self.interval_s, self.fraction, self.min_gap_s = steps, interval_s, fraction, min_gap_s
        self.clock = clock
        self.start = self.last = clock()
        self.next_mark = fraction
        self.lines = 0

    def update(self, step: int, images: int, loss: float | None = None) -> str | None:
        """After ``step`` steps (1-based) and ``images`` images of this epoch (all processes): a line, or None."""
        if step >= self.steps:
            return None  # the epoch's own line follows
        now, done = self.clock(), step / self.steps
        since = now - self.last
        due = self.lines == 0 or since >= self.interval_s or (done + 1e-9 >= self.next_mark and since >= self.min_gap_s)
        if not due:
            return None
        self.last, self.lines = now, self.lines + 1
        self.next_mark = (math.floor(done / self.fraction + 1e-9) + 1) * self.fraction
        elapsed = max(now - self.start, 1e-9)
        left = elapsed / step * (self.steps - step)
        return (f"{self.prefix}: step {step}/{self.steps} ({100 * done:.0f}%), {images / elapsed:.0f} img/s"
                + (f", loss {loss:.4f}" if loss is not None else "") + f", epoch ETA {duration(left)}")
