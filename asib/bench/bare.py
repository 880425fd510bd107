"""Bare PyTorch, the reference: for each engine step, the loop a user would write by hand with
plain torch ops (forward, losses, backward, optimizer step) on the same models, batches,
training precision and memory format. Its frozen teachers run in one precision for all, in the
batch's layout: the bench builds a twin per precision it may try (fp32, and bf16 where the
device has it) and keeps the faster (``asib.bench.steps``)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from asib.bench.timing import Step
from asib.data import Batch
from asib.engine.loop import EpochPlan
from asib.engine.runtime import Runtime, precision_autocast
from asib.engine.schedules import get_tau, ramp
from asib.methods.asib import cccp_ramp, get_beta
from asib.recipe import DistillSpec, OptimSpec, Recipe


def bare_optimizer(params: Any, spec: OptimSpec) -> torch.optim.Optimizer:
    """The optimizer a bare loop would build: one group, the recipe's hyper-parameters."""
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
                               nesterov=spec.nesterov and spec.momentum > 0)
    return torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)


def bare_ce(logits: torch.Tensor, batch: Batch, smoothing: float) -> torch.Tensor:
    loss = F.cross_entropy(logits, batch.y, label_smoothing=smoothing)
    if batch.y2 is None:
        return loss
    return batch.lam * loss + (1 - batch.lam) * F.cross_entropy(logits, batch.y2, label_smoothing=smoothing)


class Bare:
    """Contexts and compiled forwards of the bare loops, mirroring the runtime by hand; the
    frozen teachers' forwards autocast to ``teacher_dtype`` (default: the runtime's fixed plan)."""

    def __init__(self, runtime: Runtime, teacher_dtype: torch.dtype | None = None) -> None:
        self.device, self.amp = runtime.device, runtime.amp_dtype
        self.teacher_dtype = teacher_dtype or runtime.fixed_plan().dtype
        self.compile = runtime.compile

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)

    def teacher_autocast(self) -> Any:
        return precision_autocast(self.teacher_dtype, self.device)

    def features(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        return torch.compile(model.features) if self.compile else model.features


def bare_finetune(model: nn.Module, spec: Any, bare: Bare) -> Step:
    """Forward, CE, backward, optimizer step: the loop every tutorial writes."""
    model.train()
    opt = bare_optimizer(model.parameters(), spec.optim)
    forward = torch.compile(model) if bare.compile else model

    def step(batch: Batch) -> torch.Tensor:
        with bare.autocast():
            logits = forward(batch.x)
        loss = bare_ce(logits.float(), batch, spec.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def bare_fusion(ib: nn.Module, h_s: torch.Tensor, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """IB_MBM by hand: query token, adapted teacher tokens, attention, bottleneck (mu, logvar)."""
    q = ib.q_norm(ib.q_proj(h_s.float())).unsqueeze(1)
    v = torch.stack([a(h.float()) for a, h in zip(ib.adapters, feats, strict=True)], dim=1) + ib.teacher_embed
    fused, _ = ib.mha(q, v, v, need_weights=False)
    u = ib.out_norm(q + fused).squeeze(1)
    return ib.mu_proj(u), ib.logvar_proj(u).clamp(-ib.logvar_clamp, ib.logvar_clamp)


def bare_a_step(student: nn.Module, teachers: list[nn.Module], ib: nn.Module, head: nn.Module,
                recipe: Recipe, ep: EpochPlan, bare: Bare) -> Step:
    """Teacher side learns: CE on the synergy logits + beta KL_IB (+ CCCP toward the fixed student).

    The models come as the engine left them for this stage: teacher blocks that the
    recipe's ``teacher_freeze_schedule`` unfreezes keep ``requires_grad`` and are trained too.
    """
    spec = recipe.distill
    s_feat, t_feats = bare.features(student), [bare.features(t) for t in teachers]
    unfrozen = [[p for p in t.parameters() if p.requires_grad] for t in teachers]
    opt = bare_optimizer([*ib.parameters(), *head.parameters(), *itertools.chain(*unfrozen)], spec.teacher_optim)
    ce_only = ep.stage == 0 and ep.stage_epoch < spec.synergy_warmup_epochs
    beta = 0.0 if ce_only else get_beta(ep.phase_epoch, spec)
    tau = get_tau(sum(spec.stage_epochs()[: ep.stage]), spec, sum(spec.stage_epochs()))
    first_a = spec.synergy_warmup_epochs + spec.teacher_adapt_epochs
    on = spec.cccp and ep.stage >= 1 and not ce_only
    cccp_w = spec.effective_cccp_alpha * cccp_ramp(ep.phase_epoch - first_a, spec) if on else 0.0

    def teacher_feature(f: Callable[[torch.Tensor], torch.Tensor], trains: list, x: torch.Tensor) -> torch.Tensor:
        if trains:
            return f(x)
        with torch.no_grad(), bare.teacher_autocast():
            return f(x)

    def step(batch: Batch) -> torch.Tensor:
        with bare.autocast():
            with torch.no_grad():
                h_s = s_feat(batch.x)
                s = student.head(h_s).float()
            feats = [teacher_feature(f, u, batch.x) for f, u in zip(t_feats, unfrozen, strict=True)]
            mu, logvar = bare_fusion(ib, h_s, feats)
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if ib.ib else mu
            g = head(z).float()
        mu, logvar = mu.float(), logvar.float()
        loss = bare_ce(g, batch, spec.synergy_label_smoothing)
        loss = loss + beta * (0.5 * (mu.square() + logvar.exp() - logvar - 1)).sum(-1).mean()
        if cccp_w > 0:
            log_g = F.log_softmax(g / tau, dim=-1)
            loss = loss + cccp_w * tau * tau * (log_g.exp() * (log_g - F.log_softmax(s / tau, dim=-1))).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def bare_b_step(student: nn.Module, teachers: list[nn.Module], ib: nn.Module, head: nn.Module,
                recipe: Recipe, ep: EpochPlan, bare: Bare, fusion: list[nn.Module] | None = None) -> Step:
    """Student learns: CE + KD to the teacher average + KD to the noise-averaged synergy target.

    ``fusion``: the synergy path's adapted teacher copies when blocks were unfrozen (the
    teacher average still comes from ``teachers``)."""
    spec = recipe.distill
    s_feat, t_feats = bare.features(student), [bare.features(t) for t in teachers]
    f_feats = [bare.features(t) for t in fusion] if fusion is not None else None
    opt = bare_optimizer(student.parameters(), spec.student_optim)
    tau = get_tau(ep.phase_epoch, spec, sum(spec.stage_epochs()))
    warm = ramp(ep.phase_epoch, spec.kd_warmup_epochs)
    weights = spec.teacher_weights or [1.0] * len(teachers)
    pi = [w / sum(weights) for w in weights]
    samples = spec.ib_target_samples if ib.ib and spec.synergy_target == "noise_avg" else 0

    def disagreement(t_logits: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        preds = torch.stack([t.argmax(-1) for t in t_logits])
        wrong = preds != y
        hit = {"both_wrong": wrong.all(0), "any_wrong": wrong.any(0), "pred": (preds != preds[:1]).any(0)}
        return torch.where(hit[spec.disagreement], spec.lambda_high, spec.lambda_low)

    def step(batch: Batch) -> torch.Tensor:
        with bare.autocast():
            h_s = s_feat(batch.x)
            s = student.head(h_s).float()
            with torch.inference_mode(), bare.teacher_autocast():
                feats = [f(batch.x) for f in t_feats]
                t_logits = [t.head(h) for t, h in zip(teachers, feats, strict=True)]
                if f_feats is not None:
                    feats = [f(batch.x) for f in f_feats]
            with torch.no_grad():
                mu, logvar = bare_fusion(ib, h_s, feats)
                if samples:
                    eps = torch.randn((samples, *mu.shape), device=mu.device, dtype=mu.dtype)
                    z = (mu + torch.exp(0.5 * logvar) * eps).reshape(samples * mu.shape[0], -1)
                    q = F.softmax(head(z).float() / tau, dim=-1).reshape(samples, mu.shape[0], -1).mean(0)
                else:
                    q = F.softmax(head(mu).float() / tau, dim=-1)
                t_bar = sum(p * t.float() for p, t in zip(pi, t_logits, strict=True))
        log_s = F.log_softmax(s / tau, dim=-1)
        kd = F.kl_div(log_s, F.log_softmax(t_bar / tau, dim=-1), log_target=True, reduction="batchmean")
        if spec.disagreement == "none":
            kd_ens = F.kl_div(log_s, q, reduction="batchmean")
        else:
            w = disagreement(t_logits, batch.y)
            kd_ens = (w * F.kl_div(log_s, q, reduction="none").sum(-1)).sum() / w.sum()
        ce = bare_ce(s, batch, spec.label_smoothing)
        loss = spec.ce_alpha * ce + warm * tau * tau * (spec.kd_alpha * kd + spec.kd_ens_alpha * kd_ens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def bare_kd_step(student: nn.Module, teacher: nn.Module, spec: DistillSpec, ep: EpochPlan, bare: Bare) -> Step:
    """Classic KD from one teacher: CE + tau^2 KL(p_t || p_s)."""
    forward, t_feat = (torch.compile(student) if bare.compile else student), bare.features(teacher)
    opt = bare_optimizer(student.parameters(), spec.student_optim)
    tau = get_tau(ep.phase_epoch, spec, sum(spec.stage_epochs()))
    weight = ramp(ep.phase_epoch, spec.kd_warmup_epochs) * spec.kd_alpha * tau * tau

    def step(batch: Batch) -> torch.Tensor:
        with bare.autocast():
            s = forward(batch.x).float()
            with torch.inference_mode(), bare.teacher_autocast():
                t = teacher.head(t_feat(batch.x))
        log_t = F.log_softmax(t.float() / tau, dim=-1)
        kd = F.kl_div(F.log_softmax(s / tau, dim=-1), log_t, log_target=True, reduction="batchmean")
        loss = spec.ce_alpha * bare_ce(s, batch, spec.label_smoothing) + weight * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step
