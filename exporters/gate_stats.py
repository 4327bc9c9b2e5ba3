"""Exact intervals for the INT8 gate's two figures, so that a verdict on a few hundred images is not noise.

On 200 test images a 1-point top-1 drop is 2 images. The gate therefore judges
each figure with its 95% interval and fails an INT8 model only where the
interval lies wholly beyond the limit (the evidence of a breach is clear):

- **top-1 drop** (paired: INT8 and float answer the same images): only the
  images on which exactly one of the two is right move the drop; ``lost`` of
  them the float model got right and INT8 wrong, ``gained`` the reverse. Given
  ``lost + gained`` such images, ``lost`` is binomial, and the exact
  (Clopper-Pearson) interval of its share is mapped onto the drop in points:
  the inversion of the exact McNemar test;
- **top-1 agreement**: the Clopper-Pearson interval of the share of images on
  which both give the same class.

On thousands of images the intervals are a fraction of a point wide, so the
verdict is that of the point estimates wherever the evidence is clear.
"""
from __future__ import annotations

from dataclasses import dataclass

CONFIDENCE = 0.95


def clopper_pearson(successes: int, trials: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact two-sided interval for a binomial proportion (0..1); ``(0, 1)`` when there are no trials."""
    from scipy.stats import beta  # (scipy comes with NNCF; the device runtime never judges, so never needs it)

    if trials <= 0:
        return 0.0, 1.0
    tail = (1.0 - confidence) / 2.0
    low = 0.0 if successes <= 0 else float(beta.ppf(tail, successes, trials - successes + 1))
    high = 1.0 if successes >= trials else float(beta.ppf(1.0 - tail, successes + 1, trials - successes))
    return low, high


@dataclass(frozen=True)
class PairedCounts:
    """How an INT8 model's answers differ from its float model's on the same labelled images."""

    images: int
    agree: int  # same class from both
    lost: int  # float right, INT8 wrong
    gained: int  # float wrong, INT8 right

    def drop_interval(self, confidence: float = CONFIDENCE) -> tuple[float, float]:
        """Interval of the top-1 drop (float minus INT8), in points."""
        discordant = self.lost + self.gained
        if discordant == 0 or self.images == 0:
            return 0.0, 0.0
        low, high = clopper_pearson(self.lost, discordant, confidence)
        scale = 100.0 * discordant / self.images
        return (2.0 * low - 1.0) * scale, (2.0 * high - 1.0) * scale

    def agreement_interval(self, confidence: float = CONFIDENCE) -> tuple[float, float]:
        """Interval of the top-1 agreement, in percent."""
        low, high = clopper_pearson(self.agree, self.images, confidence)
        return 100.0 * low, 100.0 * high

    def mcnemar_p(self) -> float:
        """Exact McNemar p-value (two-sided) for "INT8 and float are equally often right"; 1.0 when they never
        differ in being right."""
        from scipy.stats import binomtest

        discordant = self.lost + self.gained
        return 1.0 if discordant == 0 else float(binomtest(self.lost, discordant, 0.5).pvalue)
