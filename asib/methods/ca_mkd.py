"""``method: ca_mkd``: confidence-aware multi-teacher KD (Zhang, Chen and Wang, ICASSP 2022).

Each teacher's per-sample weight comes from its cross-entropy on the true label (on raw
logits): ``w_ik = (1 - softmax_k(CE_ik)) / (K - 1)``, so the teacher that is more right on a
sample teaches it more. The KD term is a weighted sum of per-teacher KD terms (avg_kd has
one KD toward the averaged logits); the defaults are avg_kd's (``ce_alpha`` 0.3, ``kd_alpha``
0.7, the same tau and warm-up), so the two differ by how the teachers are combined only, and
coincide when the teachers agree.

The optional feature term (``ca_mkd.feature_weight``) regresses each teacher's *pooled
penultimate* feature from the student's with one Linear layer per teacher, and weights the
squared errors by the same confidence formula applied to the CE of teacher k's own head on
the regressed feature. The paper matches intermediate *feature maps* with convolutional
regressors; pooled features keep the method architecture-agnostic (any pair of models
with ``features``/``head`` works) at the cost of the spatial detail.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from asib.data import Batch
from asib.engine.loop import EpochPlan
from asib.methods.base import DistillMethod, Terms, accuracy_term, dominant_labels, frozen_outputs
from asib.methods.losses import (
    ca_mkd_feature_loss,
    ca_mkd_kd_loss,
    ca_mkd_weights,
    cross_entropy,
    disagreement_share,
)
from asib.recipe import DistillSpec, OptimSpec


class CAMKD(DistillMethod):
    """``ce_alpha * CE + ramp * (kd_alpha * mean_i sum_k w_ik KD_tau(s_i <- t_ik) + feature_weight * feat)``.

    With several teachers of mixed quality, the KD toward each is weighted by its confidence.
    """

    name = "ca_mkd"
    min_teachers = 2

    def __init__(
        self,
        teachers: Sequence[nn.Module],
        student: nn.Module,
        spec: DistillSpec,
        teacher_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(teachers, student, spec, teacher_names)
        # One regressor per teacher, student width -> teacher width; only with the feature term on.
        self.regressors: nn.ModuleList | None = None
        if spec.ca_mkd.feature_weight > 0:
            d_s = int(student.feature_dim)
            self.regressors = nn.ModuleList(nn.Linear(d_s, int(t.feature_dim)) for t in teachers)

    def optim_groups(self) -> dict[str, tuple[list[nn.Module], OptimSpec]]:
        modules: list[nn.Module] = [self.student, *([self.regressors] if self.regressors is not None else [])]
        return {"B": (modules, self.spec.student_optim)}

    def trained_modules(self) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {"student": self.student}
        if self.regressors is not None:
            out["regressors"] = self.regressors
        return out

    def forward(self, ep: EpochPlan, batch: Batch) -> Terms:
        spec = self.spec
        y_conf = dominant_labels(batch)  # the label that carries most of a mixed target
        if self.regressors is None:
            h_s = None
            s = self.student(batch.x).float()
        else:
            h_s = self.student.features(batch.x)
            s = self.student.head(h_s).float()
        t_feats, t_logits = frozen_outputs(self.teachers, batch.x)
        tau = self.tau_at(ep.phase_epoch)
        ce = cross_entropy(s, batch.y, spec.label_smoothing, batch.y2, batch.lam)
        w = ca_mkd_weights(t_logits, y_conf)  # raw logits: confidence is judged as the teachers predict
        s_kd = self.kd_input(s)
        kd = ca_mkd_kd_loss(s_kd, [self.kd_input(t) for t in t_logits], w, tau)
        warm = self.kd_ramp(ep.phase_epoch)
        loss = spec.ce_alpha * ce + warm * spec.kd_alpha * kd
        terms: Terms = {
            "ce": ce.detach(),
            "kd": kd.detach(),
            "tau": float(tau),
            "kd_w": float(warm * spec.kd_alpha),
            "train_acc": accuracy_term(s, batch.y),
            "disagree": disagreement_share(t_logits),
        }
        mean_w = w.mean(dim=0)
        terms.update({f"w_t{k}": mean_w[k] for k in range(mean_w.shape[0])})
        if self.regressors is not None and h_s is not None:
            feat, w_feat = self._feature_term(h_s, t_feats, y_conf)
            weight = warm * spec.ca_mkd.feature_weight
            loss = loss + weight * feat
            terms.update({"feat": feat.detach(), "feat_w": float(weight)})
            mean_wf = w_feat.mean(dim=0)
            terms.update({f"wf_t{k}": mean_wf[k] for k in range(mean_wf.shape[0])})
        terms["loss"] = loss
        return terms

    def _feature_term(self, h_s: Tensor, t_feats: Sequence[Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
        """The confidence-weighted regression of the teachers' pooled features, and its weights.

        Teacher k's weight on a sample comes from the CE of teacher k's own head on the
        regressed student feature r_k: a regression its teacher already reads correctly
        weighs more. The weights carry no gradient.
        """
        assert self.regressors is not None
        regressed = [reg(h_s).float() for reg in self.regressors]
        with torch.no_grad():
            head_logits = [t.head(r.detach()) for t, r in zip(self.teachers, regressed, strict=True)]
        w_feat = ca_mkd_weights(head_logits, y)
        return ca_mkd_feature_loss(regressed, t_feats, w_feat), w_feat
