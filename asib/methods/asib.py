"""``method: asib``: teachers fused by the student-queried IB_MBM into a synergy head, and the
student taught by it (METHOD.md).

Per stage, A-steps train the teacher side (adapters, IB_MBM, synergy head, and the teacher
blocks ``teacher_freeze_schedule`` unfreezes) with the student fixed; then B-steps train the
student toward the teacher average and the synergy target. Every term is logged separately.

Unfrozen teacher blocks serve the synergy path only: they train in copies of the teachers,
while the teacher average, the disagreement weights and the gate's weakest teacher use the
original teachers throughout; ``synergy.safetensors`` stores the adapted blocks.

With ``synergy_crossfit`` there are two fusion paths (IB_MBM + synergy head): path k learns on
the training images of fold ``index % 2 == k`` only, and an image's B-step target comes from
the other path, which never fitted it; elsewhere the synergy is the mean of both paths' logits.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from asib.data import Batch, InMemoryLoader
from asib.engine.checkpoint import load_synergy_predictor, read_info, save_synergy
from asib.engine.loop import EpochPlan
from asib.engine.metrics import evaluate_predictor, top1_of
from asib.engine.runtime import derive_seed
from asib.engine.schedules import ramp
from asib.errors import DataError
from asib.methods.base import (
    Artifacts,
    DistillMethod,
    Terms,
    accuracy_term,
    dominant_labels,
    frozen_outputs,
)
from asib.methods.losses import (
    cccp_loss,
    cross_entropy,
    disagreement_share,
    disagreement_weights,
    dist_loss,
    dist_relations_to_distribution,
    ib_kl,
    kd_loss_fn,
    kd_to_distribution,
    masked_mean,
    standardize_logits,
    teacher_average,
    weighted_mean,
)
from asib.models import (
    IBMBM,
    SynergyHead,
    apply_freeze_level,
    build_ib_mbm_from_teachers,
    setup_partial_freeze_schedule,
    synergy_target,
)
from asib.recipe import DistillSpec, OptimSpec, spec_from

SYNERGY_FILE = "synergy.safetensors"


def get_beta(epoch: int, spec: DistillSpec | dict[str, Any]) -> float:
    """IB weight of A-step epoch ``epoch`` (counted over all stages); 0 with the IB off."""
    spec = spec_from(DistillSpec, spec)
    if not spec.ib:
        return 0.0
    return spec.ib_beta * ramp(epoch, spec.ib_beta_warmup_epochs)


def cccp_ramp(epoch_since_start: int, spec: DistillSpec | dict[str, Any]) -> float:
    """r(e) of the CCCP coupling, ``e`` counted from the stage where the coupling starts."""
    spec = spec_from(DistillSpec, spec)
    return ramp(epoch_since_start, spec.cccp_ramp_epochs)


def gate_margin(weakest_top1: float, n: int) -> float:
    """Two standard errors (in points) of an accuracy of ``weakest_top1`` % measured on ``n`` images."""
    a = min(max(weakest_top1 / 100.0, 0.0), 1.0)
    return 200.0 * math.sqrt(a * (1.0 - a) / n) if n > 0 else 0.0


class ASIB(DistillMethod):
    """Teachers, student, IB_MBM and synergy head, and the losses that tie them."""

    name = "asib"
    min_teachers = 2
    artifact_names = (SYNERGY_FILE,)

    def __init__(
        self,
        teachers: Sequence[nn.Module],
        student: nn.Module,
        spec: DistillSpec,
        teacher_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(teachers, student, spec, teacher_names)
        _, self.teacher_levels = setup_partial_freeze_schedule(spec, spec.num_stages)
        # The synergy path's teachers: copies whose unfrozen blocks train, or the frozen teachers.
        adapts = any(level != 0 for level in self.teacher_levels)
        self.fusion_teachers = nn.ModuleList(copy.deepcopy(t) for t in teachers) if adapts else None
        self.ib_mbm, self.synergy_head = build_ib_mbm_from_teachers(teachers, student, spec)
        # synergy_crossfit: the second fusion path, from a seed stream of its own (derived from the
        # generator's seed, so a run's weights depend on its seed only and path 0 is unchanged).
        self.ib_mbm1: IBMBM | None = None
        self.synergy_head1: SynergyHead | None = None
        if spec.synergy_crossfit:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(torch.initial_seed(), "synergy_path1"))
                self.ib_mbm1, self.synergy_head1 = build_ib_mbm_from_teachers(teachers, student, spec)
        self.first_stage_a_epochs = spec.synergy_warmup_epochs + spec.teacher_adapt_epochs
        self.gate_open = True  # set at each stage's first B-epoch from the synergy head's val accuracy
        self.gate_log: list[bool] = []
        self.synergy_val: float | None = None

    # ------------------------------------------------------------ what trains

    def a_epochs(self, stage: int) -> int:
        return self.spec.teacher_adapt_epochs + (self.spec.synergy_warmup_epochs if stage == 0 else 0)

    def fusion_paths(self) -> list[tuple[IBMBM, SynergyHead]]:
        """The (IB_MBM, synergy head) pairs: one, or two with ``synergy_crossfit``."""
        paths = [(self.ib_mbm, self.synergy_head)]
        if self.ib_mbm1 is not None and self.synergy_head1 is not None:
            paths.append((self.ib_mbm1, self.synergy_head1))
        return paths

    def optim_groups(self) -> dict[str, tuple[list[nn.Module], OptimSpec]]:
        side: list[nn.Module] = [m for pair in self.fusion_paths() for m in pair]
        side += list(self.fusion_teachers or [])
        return {"A": (side, self.spec.teacher_optim), "B": ([self.student], self.spec.student_optim)}

    def trained_modules(self) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {"student": self.student, "ib_mbm": self.ib_mbm, "head": self.synergy_head}
        if self.ib_mbm1 is not None and self.synergy_head1 is not None:
            out["ib_mbm1"], out["head1"] = self.ib_mbm1, self.synergy_head1
        if self.fusion_teachers is not None:
            out["fusion_teachers"] = self.fusion_teachers
        return out

    def models(self) -> list[nn.Module]:
        return [*super().models(), *(self.fusion_teachers or [])]

    @property
    def synergy_teachers(self) -> nn.ModuleList:
        """The teachers on the synergy path (adapted copies when blocks unfreeze)."""
        return self.fusion_teachers if self.fusion_teachers is not None else self.teachers

    # ------------------------------------------------------------ epochs

    def begin_epoch(self, ep: EpochPlan) -> None:
        if self.fusion_teachers is not None:
            for teacher in self.fusion_teachers:
                apply_freeze_level(teacher, self.teacher_levels[ep.stage], train_head=False)
        self.teachers.eval()
        if ep.phase == "A":
            self.student.eval()
            for teacher in self.fusion_teachers or []:
                teacher.train(any(p.requires_grad for p in teacher.parameters()))
            for ib_mbm, head in self.fusion_paths():
                ib_mbm.train()
                head.train()
            return
        self.student.train()
        self.synergy_teachers.eval()
        for ib_mbm, head in self.fusion_paths():
            ib_mbm.eval()
            head.eval()
        if ep.stage_epoch == 0:
            self._set_gate(ep)

    def _set_gate(self, ep: EpochPlan) -> None:
        """Keep the synergy term unless the synergy head is below the weakest teacher on val by
        more than two standard errors of the split (METHOD.md); without a val split it stays on."""
        ctx = self.ctx
        teacher_val = ctx.teacher_val if ctx is not None else []
        n = ctx.val.num_images if ctx is not None and ctx.val is not None else 0
        weakest = min(teacher_val) if teacher_val else 0.0
        margin = gate_margin(weakest, n)
        judged = self.spec.synergy_gate and self.synergy_val is not None and bool(teacher_val)
        self.gate_open = not judged or self.synergy_val >= weakest - margin
        del self.gate_log[ep.stage:]  # one entry per stage; a resume that repeats a stage's first epoch overwrites it
        self.gate_log.append(self.gate_open)
        if not self.gate_open and ctx is not None:
            ctx.say(
                f"synergy gate closed for stage {ep.stage + 1}: synergy val top-1 {self.synergy_val:.2f} < weakest "
                f"teacher {weakest:.2f} - {margin:.2f} (two standard errors); its KD weight moves to the teacher average"
            )

    def end_epoch(self, ep: EpochPlan, record: dict[str, Any]) -> dict[str, Any]:
        ctx = self.ctx
        if ep.phase == "A":
            if ctx is None or ctx.val is None:
                return {}
            self.synergy_val = round(top1_of(self._predict_synergy, ctx.val.batches(0)), 4)
            return {"synergy_val_top1": self.synergy_val}
        out: dict[str, Any] = {"gate_open": self.gate_open}
        if self.spec.disagreement != "none" and record.get("weighted_share", 1.0) == 0.0:
            out["warning"] = "no sample got a disagreement weight: the teachers are right on every image"
            if ctx is not None:
                ctx.say(f"warning: {out['warning']}")
        return out

    def _predict_synergy(self, x: Tensor) -> Tensor:
        fusion = [m for pair in self.fusion_paths() for m in pair]
        modes = {m: m.training for m in (self.student, *fusion, self.synergy_teachers)}
        for m in modes:
            m.eval()
        try:
            autocast = self.ctx.runtime.autocast() if self.ctx is not None else torch.autocast("cpu", enabled=False)
            with autocast:
                return self.synergy_logits(x)
        finally:
            for m, flag in modes.items():
                m.train(flag)

    def synergy_logits(self, x: Tensor) -> Tensor:
        """Logits of the fused teachers queried by the student (the evaluable ensemble); with
        ``synergy_crossfit`` the mean of both paths' logits (as ``synergy.safetensors`` predicts)."""
        feats, logits = frozen_outputs(self.synergy_teachers, x)
        base = self.synergy_base(logits)
        if self.ib_mbm1 is None:
            return self.synergy_head(self.ib_mbm(self.student.features(x), feats).mu, base)
        h_s = self.student.features(x)
        return torch.stack([head(ib_mbm(h_s, feats).mu, base) for ib_mbm, head in self.fusion_paths()]).mean(0)

    def synergy_base(self, logits: Sequence[Tensor]) -> Tensor | None:
        """With ``synergy_residual``, what the synergy head corrects: the average of the synergy
        path's teachers' logits (``teacher_weights``); None otherwise."""
        return teacher_average(logits, self.spec.teacher_weights) if self.spec.synergy_residual else None

    def folds(self, batch: Batch) -> Tensor:
        """Each image's fold (its index in the training split, mod 2) under ``synergy_crossfit``."""
        if batch.idx is None:
            raise DataError(
                "synergy_crossfit needs each batch's image indices in the training split (Batch.idx) and this"
                " batch has none: train from an asib loader, or build the batch as Batch(..., idx=indices)"
            )
        if batch.idx.shape != batch.y.shape:
            raise DataError(f"Batch.idx has shape {tuple(batch.idx.shape)}, the labels {tuple(batch.y.shape)}")
        return batch.idx.remainder(2)

    # ------------------------------------------------------------ the two steps

    def forward(self, ep: EpochPlan, batch: Batch) -> Terms:
        return self.a_step(ep, batch) if ep.phase == "A" else self.b_step(ep, batch)

    def _fusion_outputs(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """The synergy path's teacher features and logits (the trained blocks' logits only with
        ``synergy_residual``, the one reader); gradients reach the blocks that train."""
        feats, logits = [], []
        for teacher in self.synergy_teachers:
            if torch.is_grad_enabled() and any(p.requires_grad for p in teacher.parameters()):
                h = teacher.features(x)
                feats.append(h)
                if self.spec.synergy_residual:
                    logits.append(teacher.head(h))
            else:
                (h,), (t,) = frozen_outputs([teacher], x)
                feats.append(h)
                logits.append(t)
        return feats, logits

    def a_step(self, ep: EpochPlan, batch: Batch) -> Terms:
        """Teacher side learns: CE on synergy logits + beta * KL_IB (+ CCCP coupling, + KD toward
        the teacher average with ``synergy_kd_alpha``). Student fixed."""
        spec = self.spec
        with torch.no_grad():
            h_s = self.student.features(batch.x)
            s = self.student.head(h_s).float()
        t_logits: list[Tensor] = []
        if self.fusion_teachers is None:  # one forward gives the fusion's features and the teachers' logits
            feats, t_logits = frozen_outputs(self.teachers, batch.x)
            base = self.synergy_base(t_logits)
        else:
            feats, fusion_logits = self._fusion_outputs(batch.x)
            base = self.synergy_base(fusion_logits)
            if spec.synergy_kd_alpha > 0:
                t_logits = self.teacher_logits(batch.x)
        ce_only = ep.stage == 0 and ep.stage_epoch < spec.synergy_warmup_epochs
        beta = 0.0 if ce_only else get_beta(ep.phase_epoch, spec)
        tau = self.tau_at(sum(spec.stage_epochs()[: ep.stage]))
        cccp_w = 0.0
        if spec.cccp and ep.stage >= 1 and not ce_only:
            cccp_w = spec.effective_cccp_alpha * cccp_ramp(ep.phase_epoch - self.first_stage_a_epochs, spec)
        if self.ib_mbm1 is not None:
            return self._a_step_crossfit(batch, h_s, s, feats, t_logits, base, beta, cccp_w, tau)
        out = self.ib_mbm(h_s, feats)
        g = self.synergy_head(out.z, base).float()
        ce = cross_entropy(g, batch.y, spec.synergy_label_smoothing, batch.y2, batch.lam)
        kl = ib_kl(out.mu, out.logvar)
        if cccp_w > 0:
            coupling = cccp_loss(self.kd_input(g), self.kd_input(s), tau)
        else:
            coupling = torch.zeros((), device=g.device)
        syn_kd = torch.zeros((), device=g.device)
        if spec.synergy_kd_alpha > 0:  # the head keeps the teachers' soft predictions, not only the labels
            t_bar = teacher_average(t_logits, spec.teacher_weights)
            syn_kd = kd_loss_fn(self.kd_input(g), self.kd_input(t_bar), tau)
        terms: Terms = {
            "loss": ce + beta * kl + cccp_w * coupling + spec.synergy_kd_alpha * syn_kd,
            "syn_ce": ce.detach(),
            "syn_kd": syn_kd.detach(),
            "ib_kl": kl.detach(),
            "cccp": coupling.detach(),
            "beta": float(beta),
            "cccp_w": float(cccp_w),
            "tau": float(tau),
            "syn_train_acc": accuracy_term(g, dominant_labels(batch)),
        }
        terms.update(attention_terms(out.attn))
        return terms

    def _a_step_crossfit(
        self, batch: Batch, h_s: Tensor, s: Tensor, feats: list[Tensor], t_logits: list[Tensor],
        base: Tensor | None, beta: float, cccp_w: float, tau: float,
    ) -> Terms:
        """The A-step with two paths: each term per sample, path k's loss the mean over the
        batch's images of fold k only (0 when the batch has none), so path k never learns from
        the other fold. Logged terms are of each image's own path, over the whole batch."""
        spec = self.spec
        fold = self.folds(batch)
        t_bar = teacher_average(t_logits, spec.teacher_weights) if spec.synergy_kd_alpha > 0 else None
        loss = torch.zeros((), device=h_s.device)
        per_path: list[dict[str, Tensor]] = []
        for k, (ib_mbm, head) in enumerate(self.fusion_paths()):
            out = ib_mbm(h_s, feats)
            g = head(out.z, base).float()
            zeros = torch.zeros(g.shape[0], device=g.device)
            terms = {
                "ce": cross_entropy(g, batch.y, spec.synergy_label_smoothing, batch.y2, batch.lam, reduction="none"),
                "kl": ib_kl(out.mu, out.logvar, reduction="none"),
                "cccp": cccp_loss(self.kd_input(g), self.kd_input(s), tau, reduction="none") if cccp_w > 0 else zeros,
                "syn_kd": zeros if t_bar is None else kd_loss_fn(self.kd_input(g), self.kd_input(t_bar), tau,
                                                                 reduction="none"),
            }
            sample = terms["ce"] + beta * terms["kl"] + cccp_w * terms["cccp"] + spec.synergy_kd_alpha * terms["syn_kd"]
            loss = loss + masked_mean(sample, fold == k)
            per_path.append({**terms, "g": g.detach(), "attn": out.attn.detach()})
        own = _by_fold(per_path, fold)
        out_terms: Terms = {
            "loss": loss,
            "syn_ce": own["ce"].detach().mean(),
            "syn_kd": own["syn_kd"].detach().mean(),
            "ib_kl": own["kl"].detach().mean(),
            "cccp": own["cccp"].detach().mean(),
            "beta": float(beta),
            "cccp_w": float(cccp_w),
            "tau": float(tau),
            "syn_train_acc": accuracy_term(own["g"], dominant_labels(batch)),
        }
        out_terms.update(attention_terms(own["attn"]))
        return out_terms

    def b_step(self, ep: EpochPlan, batch: Batch) -> Terms:
        """Student learns: CE + KD to the teacher average + weighted KD to the synergy target
        (each KD term a tau^2 KL, or DIST's relation loss with ``kd_loss: dist``)."""
        spec, x = self.spec, batch.x
        h_s = self.student.features(x)
        s = self.student.head(h_s).float()
        tau = self.tau_at(ep.phase_epoch)
        with torch.no_grad():
            feats, t_logits = frozen_outputs(self.teachers, x)
            fusion_logits = t_logits
            if self.fusion_teachers is not None:  # adapted copies on the synergy path, originals for the rest
                feats, fusion_logits = frozen_outputs(self.fusion_teachers, x)
            base = self.synergy_base(fusion_logits)
            targets = []
            for ib_mbm, head in self.fusion_paths():
                out = ib_mbm(h_s.detach(), feats)
                q = synergy_target(
                    ib_mbm, head, out, tau, spec.ib_target_samples, mode=spec.synergy_target,
                    standardize=standardize_logits if spec.logit_standardization else None, base=base,
                )
                targets.append({"q": q, "attn": out.attn})
            if len(targets) == 2:  # cross-fitted: an image of fold k takes path 1 - k's target
                other = _by_fold(targets[::-1], self.folds(batch))
                q, attn = other["q"], other["attn"]
            else:
                q, attn = targets[0]["q"], targets[0]["attn"]
            t_bar = teacher_average(t_logits, spec.teacher_weights)
            w = disagreement_weights(t_logits, dominant_labels(batch), spec.disagreement, spec.lambda_high, spec.lambda_low)
        ce = cross_entropy(s, batch.y, spec.label_smoothing, batch.y2, batch.lam)
        s_kd = self.kd_input(s)  # the student's logits as both KD terms' softmaxes take them
        if spec.kd_loss == "dist":  # DIST's relations (beta = gamma = 1) instead of the KL match
            kd = dist_loss(s_kd, self.kd_input(t_bar), tau)
            inter, intra = dist_relations_to_distribution(s_kd, q, tau, w)
            kd_ens = (tau * tau) * (inter + intra)
        else:
            kd = kd_loss_fn(s_kd, self.kd_input(t_bar), tau)
            kd_ens = weighted_mean(kd_to_distribution(s_kd, q, tau, reduction="none"), w)
        warm = self.kd_ramp(ep.phase_epoch)
        kd_a, ens_a = spec.kd_alpha, spec.kd_ens_alpha
        if not self.gate_open:  # synergy weaker than the weakest teacher: its weight moves to t_bar
            kd_a, ens_a = kd_a + ens_a, 0.0
        terms: Terms = {
            "loss": spec.ce_alpha * ce + warm * (kd_a * kd + ens_a * kd_ens),
            "ce": ce.detach(),
            "kd": kd.detach(),
            "kd_ens": kd_ens.detach(),
            "tau": float(tau),
            "kd_w": float(warm * kd_a),
            "kd_ens_w": float(warm * ens_a),
            "weighted_share": (w != 1).float().mean(),
            "train_acc": accuracy_term(s, batch.y),
            "disagree": disagreement_share(t_logits),
        }
        terms.update(attention_terms(attn))
        return terms

    # ------------------------------------------------------------ resume and artifacts

    def extra_state(self) -> dict[str, Any]:
        return {"gate_open": self.gate_open, "gate_log": list(self.gate_log), "synergy_val": self.synergy_val}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.gate_open = bool(state["gate_open"])
        self.gate_log = [bool(v) for v in state["gate_log"]]
        self.synergy_val = state["synergy_val"]

    def save_artifacts(self, where: Artifacts) -> None:
        adapted = None
        if self.fusion_teachers is not None:
            adapted = [t.state_dict() for t in self.fusion_teachers]
        save_synergy(
            where.folder / SYNERGY_FILE, self.ib_mbm, self.synergy_head, where.teacher_paths, where.student,
            self.spec, {"epoch": where.epoch}, adapted_teachers=adapted, more_paths=self.fusion_paths()[1:] or None,
            residual_weights=self._residual_weights(),
        )

    def _residual_weights(self) -> list[float] | None:
        """``synergy_residual``: the normalised teacher weights of the base the head corrects."""
        if not self.spec.synergy_residual:
            return None
        weights = self.spec.teacher_weights or [1.0] * len(self.teachers)
        return [float(w) / float(sum(weights)) for w in weights]

    def test_figures(self, folder: Path, test: InMemoryLoader, num_classes: int) -> dict[str, Any]:
        """The synergy ensemble as saved (its adapted teacher blocks included), on the test split."""
        assert self.ctx is not None
        predict = load_synergy_predictor(read_info(folder / SYNERGY_FILE), self.ctx.runtime)
        return {"synergy_test_top1": evaluate_predictor(predict, test.batches(0), num_classes).top1}

    def summary(self) -> dict[str, Any]:
        return {"gate_open_per_stage": list(self.gate_log), "teachers_adapted": self.fusion_teachers is not None}


def _by_fold(per_path: Sequence[dict[str, Tensor]], fold: Tensor) -> dict[str, Tensor]:
    """Per sample, the entries of path ``fold[i]`` (two paths): each key's rows picked by fold."""
    pick = fold == 0
    out = {}
    for key, first in per_path[0].items():
        second = per_path[1][key]
        out[key] = torch.where(pick.view(-1, *([1] * (first.ndim - 1))), first, second)
    return out


def attention_terms(attn: Tensor) -> dict[str, Tensor]:
    """The attention each teacher gets from the student's query, averaged over the batch."""
    mean = attn.detach().float().mean(0)
    return {f"attn_t{k}": mean[k] for k in range(mean.shape[0])}
