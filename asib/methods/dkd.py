"""``method: dkd``: decoupled KD (Zhao et al., CVPR 2022) toward the teacher average.

Defaults are the paper's and its official code's: CE weight 1 (``ce_alpha``), alpha 1 (TCKD),
beta 8 (NCKD), tau 4, and a linear warm-up of the DKD term over 1/12 of the student epochs
(20 of 240 there), so a short schedule still reaches full weight.
"""

from __future__ import annotations

from asib.data import Batch
from asib.engine.loop import EpochPlan
from asib.engine.schedules import ramp
from asib.methods.base import DistillMethod, Terms, dominant_labels
from asib.methods.losses import dkd_loss


class DKD(DistillMethod):
    """``ce_alpha * CE + ramp * (alpha * TCKD + beta * NCKD)``; with several teachers, toward their average."""

    name = "dkd"
    min_teachers = 1

    def forward(self, ep: EpochPlan, batch: Batch) -> Terms:
        spec = self.spec
        s = self.student(batch.x).float()
        tau = self.tau_at(ep.phase_epoch)
        target, _ = self.teacher_target(batch.x)
        kd = dkd_loss(self.kd_input(s), self.kd_input(target), dominant_labels(batch), spec.dkd.alpha, spec.dkd.beta, tau)
        return self.kd_terms(s, batch, kd, ramp(ep.phase_epoch, spec.dkd_warmup_epochs), tau)
