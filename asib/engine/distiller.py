"""The losses of one distillation step: ASIB's A-step and B-step, and the baselines.

``ASIBDistiller.forward(x, y, epoch, phase)`` returns the dict of loss terms of one batch
(``loss`` is the one to backpropagate); the training loop in ``distill.py`` owns the
optimizers. METHOD.md is the definition; every term is logged separately.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from asib.engine.losses import (
    cccp_loss,
    cross_entropy,
    disagreement_weights,
    dkd_loss,
    ib_kl,
    kd_loss_fn,
    kd_to_distribution,
    teacher_average,
    weighted_mean,
)
from asib.engine.runtime import inference_autocast
from asib.engine.schedules import cccp_ramp, dkd_warmup, get_beta, get_tau, kd_warmup
from asib.models.ib_mbm import IBMBM, SynergyHead, synergy_target
from asib.recipe import DistillSpec, spec_from


class ASIBDistiller(nn.Module):
    """Teachers, student, IB_MBM and synergy head, and the losses that tie them (METHOD.md)."""

    def __init__(
        self,
        teachers: Sequence[nn.Module],
        student: nn.Module,
        ib_mbm: IBMBM | None,
        synergy_head: SynergyHead | None,
        spec: DistillSpec | dict[str, Any],
        kd_teacher: int = 0,
    ) -> None:
        super().__init__()
        self.spec = spec_from(DistillSpec, spec)
        self.teachers = nn.ModuleList(teachers)
        self.student = student
        self.ib_mbm = ib_mbm
        self.synergy_head = synergy_head
        self.kd_teacher = kd_teacher
        self.total_student_epochs = sum(self.spec.stage_epochs())
        self.first_stage_a_epochs = self.spec.synergy_warmup_epochs + self.spec.teacher_adapt_epochs
        self.gate_open = True  # set by the loop from the synergy head's validation accuracy
        if self.spec.method == "asib" and (ib_mbm is None or synergy_head is None):
            raise ValueError("method asib needs the IB_MBM and the synergy head")

    # ------------------------------------------------------------ forwards

    def teacher_outputs(self, x: Tensor, which: Sequence[int] | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """Pooled features and logits of every teacher; gradients only reach unfrozen blocks.

        A frozen teacher runs without autograd (in inference mode when the caller records no
        gradient either) and in the inference precision the training step declared (bf16 on
        CUDA and on AMX CPUs); an unfrozen one runs like the rest of the step.
        """
        feats, logits = [], []
        outer_grad = torch.is_grad_enabled()
        chosen = self.teachers if which is None else [self.teachers[i] for i in which]
        for teacher in chosen:
            if outer_grad and any(p.requires_grad for p in teacher.parameters()):
                h = teacher.features(x)
                feats.append(h)
                logits.append(teacher.head(h).detach())
                continue
            # Inference tensors cannot enter a graph that records gradients (the A-step's fusion).
            frozen = torch.no_grad() if outer_grad else torch.inference_mode()
            with frozen, inference_autocast(x.device):
                h = teacher.features(x)
                feats.append(h)
                logits.append(teacher.head(h))
        return feats, logits

    def synergy_logits(self, x: Tensor) -> Tensor:
        """Logits of the fused teachers queried by the student (the evaluable ensemble)."""
        assert self.ib_mbm is not None and self.synergy_head is not None
        feats, _ = self.teacher_outputs(x)
        out = self.ib_mbm(self.student.features(x), feats)
        return self.synergy_head(out.mu)

    def tau_at(self, student_epoch: int) -> float:
        return get_tau(min(student_epoch, max(0, self.total_student_epochs - 1)), self.spec, self.total_student_epochs)

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        epoch: int,
        phase: str = "B",
        stage: int = 0,
        stage_epoch: int = 0,
        y2: Tensor | None = None,
        lam: float = 1.0,
    ) -> dict[str, Tensor | float]:
        """Loss terms of one batch. ``epoch`` counts epochs of ``phase`` over all stages."""
        if phase == "A":
            return self.a_step(x, y, epoch, stage, stage_epoch)
        if self.spec.method == "asib":
            return self.b_step(x, y, epoch, y2, lam)
        return self.baseline_step(x, y, epoch, y2, lam)

    # ------------------------------------------------------------ A-step

    def a_step(self, x: Tensor, y: Tensor, epoch: int, stage: int, stage_epoch: int) -> dict[str, Tensor | float]:
        """Teacher side learns: CE on synergy logits + beta * KL_IB (+ CCCP coupling). Student fixed."""
        assert self.ib_mbm is not None and self.synergy_head is not None
        spec = self.spec
        with torch.no_grad():
            h_s = self.student.features(x)
            s = self.student.head(h_s).float()
        feats, _ = self.teacher_outputs(x)
        out = self.ib_mbm(h_s, feats)
        g = self.synergy_head(out.z).float()
        ce = cross_entropy(g, y, spec.synergy_label_smoothing)
        ce_only = stage == 0 and stage_epoch < spec.synergy_warmup_epochs
        beta = 0.0 if ce_only else get_beta(epoch, spec)
        kl = ib_kl(out.mu, out.logvar)
        tau = self.tau_at(sum(spec.stage_epochs()[:stage]))
        cccp_w = 0.0
        if spec.cccp and stage >= 1 and not ce_only:
            cccp_w = spec.effective_cccp_alpha * cccp_ramp(epoch - self.first_stage_a_epochs, spec)
        coupling = cccp_loss(g, s, tau) if cccp_w > 0 else torch.zeros((), device=g.device)
        loss = ce + beta * kl + cccp_w * coupling
        terms = {
            "loss": loss,
            "syn_ce": ce.detach(),
            "ib_kl": kl.detach(),
            "cccp": coupling.detach(),
            "beta": float(beta),
            "cccp_w": float(cccp_w),
            "tau": float(tau),
            "syn_train_acc": (g.detach().argmax(1) == y).float().mean() * 100,
        }
        terms.update(self._attention_terms(out.attn))
        return terms

    # ------------------------------------------------------------ B-step

    def b_step(
        self, x: Tensor, y: Tensor, epoch: int, y2: Tensor | None = None, lam: float = 1.0
    ) -> dict[str, Tensor | float]:
        """Student learns: CE + KD to the teacher average + weighted KD to the synergy target."""
        assert self.ib_mbm is not None and self.synergy_head is not None
        spec = self.spec
        h_s = self.student.features(x)
        s = self.student.head(h_s).float()
        tau = self.tau_at(epoch)
        with torch.no_grad():
            feats, t_logits = self.teacher_outputs(x)
            out = self.ib_mbm(h_s.detach(), feats)
            q = synergy_target(self.ib_mbm, self.synergy_head, out, tau, spec.ib_target_samples, mode=spec.synergy_target)
            t_bar = teacher_average(t_logits, spec.teacher_weights)
            w = disagreement_weights(t_logits, y, spec.disagreement, spec.lambda_high, spec.lambda_low)
        ce = cross_entropy(s, y, spec.label_smoothing, y2, lam)
        kd = kd_loss_fn(s, t_bar, tau)
        kd_ens = weighted_mean(kd_to_distribution(s, q, tau, reduction="none"), w)
        ramp = kd_warmup(epoch, spec)
        kd_a, ens_a = spec.kd_alpha, spec.kd_ens_alpha
        if not self.gate_open:  # synergy weaker than the weakest teacher: its weight moves to t_bar
            kd_a, ens_a = kd_a + ens_a, 0.0
        loss = spec.ce_alpha * ce + ramp * (kd_a * kd + ens_a * kd_ens)
        terms = {
            "loss": loss,
            "ce": ce.detach(),
            "kd": kd.detach(),
            "kd_ens": kd_ens.detach(),
            "tau": float(tau),
            "kd_w": float(ramp * kd_a),
            "kd_ens_w": float(ramp * ens_a),
            "weighted_share": (w != 1).float().mean(),
            "train_acc": (s.detach().argmax(1) == y).float().mean() * 100,
        }
        terms.update(self._teacher_terms(t_logits))
        terms.update(self._attention_terms(out.attn))
        return terms

    def baseline_step(
        self, x: Tensor, y: Tensor, epoch: int, y2: Tensor | None = None, lam: float = 1.0
    ) -> dict[str, Tensor | float]:
        """ce: CE alone; kd / avg_kd: ce_alpha CE + (kd_alpha + kd_ens_alpha) KD; dkd: ce_alpha CE + DKD."""
        spec = self.spec
        s = self.student(x).float()
        tau = self.tau_at(epoch)
        if spec.method == "ce":
            ce = cross_entropy(s, y, spec.label_smoothing, y2, lam)
            return {"loss": ce, "ce": ce.detach(), "train_acc": (s.detach().argmax(1) == y).float().mean() * 100}
        with torch.no_grad():  # method kd forwards its one teacher only
            _, t_logits = self.teacher_outputs(x, [self.kd_teacher] if spec.method == "kd" else None)
            target = t_logits[0] if spec.method == "kd" else teacher_average(t_logits, spec.teacher_weights)
        ce = cross_entropy(s, y, spec.label_smoothing, y2, lam)
        if spec.method == "dkd":
            ramp = dkd_warmup(epoch, spec)
            kd = dkd_loss(s, target, y, spec.dkd.alpha, spec.dkd.beta, tau)
            weight = ramp
        else:
            ramp = kd_warmup(epoch, spec)
            kd = kd_loss_fn(s, target, tau)
            weight = ramp * (spec.kd_alpha + spec.kd_ens_alpha)
        loss = spec.ce_alpha * ce + weight * kd
        terms = {
            "loss": loss,
            "ce": ce.detach(),
            "kd": kd.detach(),
            "tau": float(tau),
            "kd_w": float(weight),
            "train_acc": (s.detach().argmax(1) == y).float().mean() * 100,
        }
        if len(t_logits) > 1:
            terms.update(self._teacher_terms(t_logits))
        return terms

    # ------------------------------------------------------------ logging helpers

    def _attention_terms(self, attn: Tensor) -> dict[str, Tensor]:
        mean = attn.detach().float().mean(0)
        return {f"attn_t{k}": mean[k] for k in range(mean.shape[0])}

    def _teacher_terms(self, t_logits: list[Tensor]) -> dict[str, Tensor]:
        preds = torch.stack([t.argmax(1) for t in t_logits])
        disagree = (preds != preds[0:1]).any(0).float().mean()
        return {"disagree": disagree}
