"""Learning-rate schedules shared by the tumor and mitosis trainers."""

from __future__ import annotations

import math


def cosine_lr(base: float, epoch: int, total: int, floor: float) -> float:
    """Learning rate of 0-based `epoch` of `total`: cosine from `base` down to `floor * base`.

    Set per epoch from the epoch number alone, so a run resumed from a checkpoint continues
    on the same curve.
    """
    t = epoch / max(1, total - 1)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))
