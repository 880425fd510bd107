"""``method: avg_kd``: KD toward the (weighted) average of the teachers' logits."""

from __future__ import annotations

from asib.data import Batch
from asib.engine.loop import EpochPlan
from asib.methods.base import DistillMethod, Terms
from asib.methods.losses import disagreement_share, kd_loss_fn


class AvgKD(DistillMethod):
    """``ce_alpha * CE + kd_alpha * KD_tau(s <- t_bar)``, ``t_bar`` the teacher average."""

    name = "avg_kd"
    min_teachers = 2

    def forward(self, ep: EpochPlan, batch: Batch) -> Terms:
        spec = self.spec
        s = self.student(batch.x).float()
        tau = self.tau_at(ep.phase_epoch)
        t_bar, t_logits = self.teacher_target(batch.x)
        kd = kd_loss_fn(self.kd_input(s), self.kd_input(t_bar), tau)
        terms = self.kd_terms(s, batch, kd, self.kd_ramp(ep.phase_epoch) * spec.kd_alpha, tau)
        terms["disagree"] = disagreement_share(t_logits)
        return terms
