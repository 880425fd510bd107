"""``method: ce``: the student alone, with cross-entropy on the labels (no teacher)."""

from __future__ import annotations

from asib.data import Batch
from asib.engine.loop import EpochPlan
from asib.methods.base import DistillMethod, Terms, accuracy_term
from asib.methods.losses import cross_entropy


class CE(DistillMethod):
    """The reference every KD method should beat: the same student, data and schedule, no teacher."""

    name = "ce"
    uses_teachers = False

    def forward(self, ep: EpochPlan, batch: Batch) -> Terms:
        s = self.student(batch.x).float()
        ce = cross_entropy(s, batch.y, self.spec.label_smoothing, batch.y2, batch.lam)
        return {"loss": ce, "ce": ce.detach(), "train_acc": accuracy_term(s, batch.y)}
