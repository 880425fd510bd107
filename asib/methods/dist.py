"""``method: dist``: DIST (Huang et al., NeurIPS 2022), KD by correlation instead of exact match.

On tau-softened probabilities the student matches the teacher's *relations*: per sample, the
Pearson correlation across classes (inter-class relation), and per class, the Pearson
correlation across the batch (intra-class relation). The term is
``tau^2 * (beta * (1 - inter_corr) + gamma * (1 - intra_corr))``; the defaults are the
paper's base setting (beta = gamma = 1, tau = 1, CE weight 1). With several teachers the
target is the (weighted) teacher average of logits, as for avg_kd and dkd.
"""

from __future__ import annotations

from asib.data import Batch
from asib.engine.loop import EpochPlan
from asib.methods.base import DistillMethod, Terms
from asib.methods.losses import dist_relations


class DIST(DistillMethod):
    """``ce_alpha * CE + ramp * tau^2 * (beta * inter + gamma * intra)`` toward the teacher average."""

    name = "dist"
    min_teachers = 1

    def forward(self, ep: EpochPlan, batch: Batch) -> Terms:
        spec = self.spec
        s = self.student(batch.x).float()
        tau = self.tau_at(ep.phase_epoch)
        target, _ = self.teacher_target(batch.x)
        inter, intra = dist_relations(self.kd_input(s), self.kd_input(target), tau)
        kd = (tau * tau) * (spec.dist.beta * inter + spec.dist.gamma * intra)  # = losses.dist_loss
        return self.kd_terms(s, batch, kd, self.kd_ramp(ep.phase_epoch), tau, inter=inter, intra=intra)
