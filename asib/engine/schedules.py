"""Schedules shared by every method (METHOD.md): linear ramps, the temperature over the
student epochs, and the learning-rate multiplier for ``torch.optim.lr_scheduler.LambdaLR``.

Every ramp uses the same convention: epoch ``e`` (0-based) gets ``min(1, (e + 1) / W)``, so
the first epoch already has a share of the term and epoch ``W - 1`` has all of it; ``W = 0``
means no ramp. Specs may be typed or plain dicts (validated).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from asib.recipe import DistillSpec, OptimSpec, spec_from


def ramp(epoch: int, warmup_epochs: int) -> float:
    """min(1, (e + 1) / max(1, W)): the share of a term at epoch ``e`` of a ``W``-epoch warm-up."""
    return min(1.0, (epoch + 1) / max(1, warmup_epochs))


def get_tau(epoch: int, spec: DistillSpec | dict[str, Any], total_student_epochs: int) -> float:
    """Temperature of student epoch ``epoch`` (counted over all stages).

    Constant ``tau``, or linear from ``tau_start`` (epoch 0) to ``tau_end`` (last epoch).
    """
    spec = spec_from(DistillSpec, spec)
    if spec.tau_start is None or spec.tau_end is None:
        return spec.tau
    if total_student_epochs <= 1:
        return spec.tau_start
    frac = min(1.0, max(0.0, epoch / (total_student_epochs - 1)))
    return spec.tau_start + (spec.tau_end - spec.tau_start) * frac


def lr_lambda(
    optim_spec: OptimSpec | dict[str, Any], steps_per_epoch: int, total_epochs: int
) -> Callable[[int], float]:
    """Step -> learning-rate multiplier: linear warm-up, then cosine to ``min_lr_ratio`` or constant.

    Warm-up covers ``round(warmup_epochs * steps_per_epoch)`` steps, step ``i`` getting
    ``(i + 1) / warmup_steps`` (never 0, so no step is wasted). The cosine reaches its floor
    at ``total_epochs * steps_per_epoch`` steps and stays there.
    """
    spec = spec_from(OptimSpec, optim_spec)
    steps_per_epoch = max(1, int(steps_per_epoch))
    total_steps = max(1, int(total_epochs) * steps_per_epoch)
    warmup_steps = round(spec.warmup_epochs * steps_per_epoch)
    floor = spec.min_lr_ratio
    cosine = spec.schedule == "cosine"

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if not cosine:
            return 1.0
        progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier
