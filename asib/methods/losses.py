"""Loss functions of every method (METHOD.md, "Losses"): pure tensor functions, fp32 inside.

All of them run in the training step, so none synchronises with the device: they take
tensors (or Python numbers) and return tensors. ``p^tau(a) = softmax(a / tau)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from asib.errors import RecipeError

Reduction = Literal["mean", "sum", "none"]
DisagreementMode = Literal["none", "both_wrong", "pred", "any_wrong"]


def _reduce(values: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "none":
        return values
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _kl_logits(target_logits: Tensor, learner_logits: Tensor, tau: float | Tensor) -> Tensor:
    """Per-sample tau^2 * KL(p^tau(target) || p^tau(learner)), summed over classes, fp32.

    No detaching here: callers decide which side receives the gradient.
    """
    log_p_t = F.log_softmax(target_logits.float() / tau, dim=-1)
    log_p_s = F.log_softmax(learner_logits.float() / tau, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1) * (tau * tau)


def kd_loss_fn(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float | Tensor, reduction: Reduction = "mean"
) -> Tensor:
    """KD_tau(s <- t) = tau^2 KL(p^tau(t) || p^tau(s)); the teacher gets no gradient."""
    return _reduce(_kl_logits(teacher_logits.detach(), student_logits, temperature), reduction)


def kd_to_distribution(
    student_logits: Tensor, q: Tensor, temperature: float | Tensor, reduction: Reduction = "mean"
) -> Tensor:
    """KD_tau(s <- q) = tau^2 KL(q || p^tau(s)) for a given target distribution q (no gradient)."""
    q = q.detach().float()
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_sample = (torch.xlogy(q, q) - q * log_p_s).sum(dim=-1) * (temperature * temperature)
    return _reduce(per_sample, reduction)


def ib_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)): summed over latent dims, averaged over the batch."""
    mu, logvar = mu.float(), logvar.float()
    return (0.5 * (mu.square() + logvar.exp() - logvar - 1.0)).sum(dim=-1).mean()


def ib_loss(mu: Tensor, logvar: Tensor, beta: float | Tensor) -> Tensor:
    """beta * KL_IB: the bottleneck's rate term of the A-step."""
    return beta * ib_kl(mu, logvar)


def cccp_loss(
    g_logits: Tensor, s_logits: Tensor, tau: float | Tensor, reduction: Reduction = "mean"
) -> Tensor:
    """CCCP coupling D_tau(g, s) = tau^2 KL(p^tau(g) || p^tau(s)), differentiated through g only.

    For the synergy logits g this is a reverse KL toward the (fixed) student.
    """
    return _reduce(_kl_logits(g_logits, s_logits.detach(), tau), reduction)


def teacher_average(teacher_logits: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """t_bar = sum_k pi_k t_k in fp32, pi the normalised weights (equal when None)."""
    k = len(teacher_logits)
    if k == 0:
        raise ValueError("teacher_average needs at least one teacher's logits")
    if weights is None:
        weights = [1.0] * k
    if len(weights) != k:
        raise RecipeError(
            [f"distill.teacher_weights: {len(weights)} weights for {k} teachers (given: {list(weights)})"]
        )
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise RecipeError(
            [f"distill.teacher_weights: weights must be >= 0 with a positive sum (given: {list(weights)})"]
        )
    # Python-float weights: no host-to-device copy (and so no sync) in the training step.
    total = float(sum(weights))
    out = (weights[0] / total) * teacher_logits[0].float()
    for w, t in zip(weights[1:], teacher_logits[1:], strict=True):
        out = out + (w / total) * t.float()
    return out


def disagreement_weights(
    teacher_logits: Sequence[Tensor],
    y: Tensor,
    mode: DisagreementMode,
    lambda_high: float,
    lambda_low: float,
) -> Tensor:
    """Per-sample weights w (B,) in fp32: lambda_high where the mode's condition holds, else lambda_low.

    ``both_wrong``: every teacher's argmax is wrong; ``pred``: the teachers' argmaxes differ;
    ``any_wrong``: at least one is wrong; ``none``: all ones.
    """
    if mode == "none":
        return torch.ones(y.shape[0], dtype=torch.float32, device=y.device)
    preds = torch.stack([t.argmax(dim=-1) for t in teacher_logits], dim=0)  # (K, B)
    wrong = preds != y.unsqueeze(0)
    if mode == "both_wrong":
        hit = wrong.all(dim=0)
    elif mode == "any_wrong":
        hit = wrong.any(dim=0)
    elif mode == "pred":
        hit = (preds != preds[:1]).any(dim=0)
    else:
        raise ValueError(f"unknown disagreement mode {mode!r}")
    high = torch.full(hit.shape, float(lambda_high), dtype=torch.float32, device=hit.device)
    low = torch.full(hit.shape, float(lambda_low), dtype=torch.float32, device=hit.device)
    return torch.where(hit, high, low)


def disagreement_share(teacher_logits: Sequence[Tensor]) -> Tensor:
    """Share of the batch on which the teachers' argmaxes differ (a device tensor, for the log)."""
    preds = torch.stack([t.argmax(dim=-1) for t in teacher_logits])
    return (preds != preds[0:1]).any(0).float().mean()


def weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    """sum(w * v) / sum(w): the weights reshape the term, they do not rescale it.

    All-zero weights give 0 rather than NaN.
    """
    values, weights = values.float(), weights.float()
    return (weights * values).sum() / weights.sum().clamp_min(torch.finfo(torch.float32).tiny)


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    y: Tensor,
    alpha: float | Tensor,
    beta: float | Tensor,
    temperature: float | Tensor,
) -> Tensor:
    """Decoupled KD (Zhao et al. 2022): alpha * TCKD + beta * NCKD, batch mean, fp32.

    TCKD is the KL between the binary (target, rest) probabilities of teacher and student;
    NCKD the KL between their distributions over the non-target classes alone. Both are
    scaled by tau^2. The teacher gets no gradient.
    """
    tau = temperature
    s = student_logits.float() / tau
    t = teacher_logits.detach().float() / tau
    target = F.one_hot(y, num_classes=s.shape[-1]).bool()

    # Binary probabilities in log space: log p_target and log(1 - p_target) = logsumexp(rest).
    def log_binary(logits: Tensor) -> Tensor:
        log_p = F.log_softmax(logits, dim=-1)
        log_gt = log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        log_rest = torch.logsumexp(log_p.masked_fill(target, float("-inf")), dim=-1)
        return torch.stack([log_gt, log_rest], dim=-1)

    lb_t, lb_s = log_binary(t), log_binary(s)
    tckd = (lb_t.exp() * (lb_t - lb_s)).sum(dim=-1)

    # Non-target distribution: the target logit is pushed far down before the softmax and
    # its (zero-probability) term is dropped from the sum.
    big = 1e9
    ln_t = F.log_softmax(t.masked_fill(target, -big), dim=-1)
    ln_s = F.log_softmax(s.masked_fill(target, -big), dim=-1)
    nckd = (ln_t.exp() * (ln_t - ln_s)).masked_fill(target, 0.0).sum(dim=-1)

    return ((alpha * tckd + beta * nckd) * (tau * tau)).mean()


def cross_entropy(
    logits: Tensor,
    y: Tensor,
    label_smoothing: float = 0.0,
    y2: Tensor | None = None,
    lam: float | Tensor = 1.0,
) -> Tensor:
    """CE with label smoothing in fp32; mixup/cutmix-aware: lam CE(y) + (1 - lam) CE(y2)."""
    logits = logits.float()
    loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    if y2 is None:
        return loss
    return lam * loss + (1.0 - lam) * F.cross_entropy(logits, y2, label_smoothing=label_smoothing)
