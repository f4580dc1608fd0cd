"""Confidence intervals of the proportions the pages report (accuracy, agreement) on a few hundred images."""

import numpy as np


def wilson_interval(successes: float, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default): honest at 0%, 100% and on few images."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    low = 0.0 if successes <= 0 else max(0.0, centre - half)  # exactly 0 and 1 at the ends, not round-off
    high = 1.0 if successes >= trials else min(1.0, centre + half)
    return float(low), float(high)
