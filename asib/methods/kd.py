"""``method: kd``: Hinton KD from one teacher (``distill.kd_teacher``, by index or name)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from asib.data import Batch
from asib.engine.loop import EpochPlan
from asib.errors import RecipeError
from asib.methods.base import DistillMethod, Terms
from asib.methods.losses import kd_loss_fn
from asib.recipe import DistillSpec


class KD(DistillMethod):
    """``ce_alpha * CE + kd_alpha * KD_tau(s <- t)``; only the chosen teacher is run."""

    name = "kd"
    min_teachers = 1

    def __init__(
        self, teachers: Sequence[nn.Module], student: nn.Module, spec: DistillSpec,
        teacher_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(teachers, student, spec, teacher_names)
        self.kd_teacher = resolve_teacher(spec.kd_teacher, self.teacher_names)

    def forward(self, ep: EpochPlan, batch: Batch) -> Terms:
        spec = self.spec
        s = self.student(batch.x).float()
        tau = self.tau_at(ep.phase_epoch)
        target = self.teacher_logits(batch.x, [self.kd_teacher])[0]
        kd = kd_loss_fn(self.kd_input(s), self.kd_input(target), tau)
        return self.kd_terms(s, batch, kd, self.kd_ramp(ep.phase_epoch) * spec.kd_alpha, tau)


def resolve_teacher(key: int | str, names: Sequence[str]) -> int:
    """A teacher by index or by name; a recipe error when there is none."""
    if isinstance(key, int):
        if not -len(names) <= key < len(names):
            raise RecipeError([f"distill.kd_teacher: index {key} is out of range ({len(names)} teachers)"])
        return key % len(names)
    if key not in names:
        raise RecipeError([f"distill.kd_teacher: no teacher named '{key}' (teachers: {', '.join(names)})"])
    return list(names).index(key)
