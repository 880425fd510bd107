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


def ib_kl(mu: Tensor, logvar: Tensor, reduction: Reduction = "mean") -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)): summed over latent dims, averaged over the batch
    (``reduction="none"``: one value per sample)."""
    mu, logvar = mu.float(), logvar.float()
    return _reduce((0.5 * (mu.square() + logvar.exp() - logvar - 1.0)).sum(dim=-1), reduction)


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


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of per-sample ``values`` over the samples where ``mask`` is true: 0 (not NaN) when
    none is, and the samples left out get exactly zero gradient."""
    kept = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return kept.sum() / mask.sum().clamp_min(1).to(values.dtype)


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
    reduction: Reduction = "mean",
) -> Tensor:
    """CE with label smoothing in fp32; mixup/cutmix-aware: lam CE(y) + (1 - lam) CE(y2)."""
    logits = logits.float()
    loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing, reduction=reduction)
    if y2 is None:
        return loss
    return lam * loss + (1.0 - lam) * F.cross_entropy(logits, y2, label_smoothing=label_smoothing, reduction=reduction)


# ---------------------------------------------------------------- logit standardization

STANDARDIZE_EPS = 1e-7


def standardize_logits(logits: Tensor, eps: float = STANDARDIZE_EPS) -> Tensor:
    """Z-score each logit vector along the class dimension, fp32 (Sun et al., CVPR 2024).

    ``(a - mean(a)) / (std(a) + eps)`` with the population standard deviation (divide by C),
    as in the paper's formula. A softmax at temperature tau then sees logits of standard
    deviation 1/tau whatever the model's logit scale. The variance is clamped at the smallest
    normal float before the square root, so constant logits give zeros and a finite gradient.
    """
    a = logits.float()
    centred = a - a.mean(dim=-1, keepdim=True)
    var = centred.square().mean(dim=-1, keepdim=True)
    return centred / (var.clamp_min(torch.finfo(torch.float32).tiny).sqrt() + eps)


# ---------------------------------------------------------------- CA-MKD


def ca_mkd_weights(teacher_logits: Sequence[Tensor], y: Tensor) -> Tensor:
    """Confidence weights of CA-MKD (Zhang, Chen and Wang, ICASSP 2022), (B, K) fp32, no gradient.

    ``w_ik = (1 - softmax_k(CE_ik)) / (K - 1)`` with ``CE_ik`` teacher k's cross-entropy on
    sample i's label: the teacher that is more right weighs more, and each row sums to 1.
    """
    k = len(teacher_logits)
    if k < 2:
        raise ValueError(f"CA-MKD weights need at least 2 teachers, got {k}")
    ce = torch.stack(
        [F.cross_entropy(t.detach().float(), y, reduction="none") for t in teacher_logits], dim=-1
    )
    return (1.0 - F.softmax(ce, dim=-1)) / (k - 1)


def ca_mkd_kd_loss(
    student_logits: Tensor, teacher_logits: Sequence[Tensor], weights: Tensor, temperature: float | Tensor
) -> Tensor:
    """``mean_i sum_k w_ik KD_tau(s_i <- t_ik)``: per-sample KD toward each teacher, confidence-weighted."""
    per = torch.stack(
        [kd_loss_fn(student_logits, t, temperature, reduction="none") for t in teacher_logits], dim=-1
    )
    return (weights.detach().float() * per).sum(dim=-1).mean()


def ca_mkd_feature_loss(
    regressed: Sequence[Tensor], teacher_features: Sequence[Tensor], weights: Tensor
) -> Tensor:
    """``mean_i sum_k w_ik mean_d (r_ik - h_ik)^2``: weighted regression of the teachers' features.

    ``r_k`` is the student's feature mapped to teacher k's width (it gets the gradient),
    ``h_k`` teacher k's feature (no gradient).
    """
    pairs = zip(regressed, teacher_features, strict=True)
    per = torch.stack([(r.float() - h.detach().float()).square().mean(dim=-1) for r, h in pairs], dim=-1)
    return (weights.detach().float() * per).sum(dim=-1).mean()


# ---------------------------------------------------------------- DIST

PEARSON_EPS = 1e-8


def _pearson(a: Tensor, b: Tensor, dim: int, eps: float = PEARSON_EPS) -> Tensor:
    """Pearson correlation of a and b along ``dim``: centred dot product over (norm * norm + eps).

    The product of squared norms is clamped at the smallest normal float before the square
    root, so an all-constant slice gives correlation 0 and a finite gradient.
    """
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    squared = a.square().sum(dim=dim) * b.square().sum(dim=dim)
    norms = squared.clamp_min(torch.finfo(torch.float32).tiny).sqrt()
    return (a * b).sum(dim=dim) / (norms + eps)


def dist_relations(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float | Tensor
) -> tuple[Tensor, Tensor]:
    """DIST's two relation losses (Huang et al., NeurIPS 2022) on tau-softened probabilities, fp32.

    inter = 1 - mean_i pearson_c(p_s[i, :], p_t[i, :])  (each sample's ranking of the classes);
    intra = 1 - mean_c pearson_i(p_s[:, c], p_t[:, c])  (each class's ranking of the samples).
    The teacher gets no gradient.
    """
    p_t = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return dist_relations_to_distribution(student_logits, p_t, temperature)


def dist_relations_to_distribution(
    student_logits: Tensor, q: Tensor, temperature: float | Tensor, weights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """DIST's relations toward a given target distribution ``q`` (B, C) (no gradient), fp32.

    ``weights`` (B,), when given, weigh each sample's inter-class term (``weighted_mean``); the
    intra-class term correlates whole columns of the batch, so it has no per-sample weight.
    """
    p_s = F.softmax(student_logits.float() / temperature, dim=-1)
    q = q.detach().float()
    per_sample = 1.0 - _pearson(p_s, q, dim=1)
    inter = per_sample.mean() if weights is None else weighted_mean(per_sample, weights)
    intra = 1.0 - _pearson(p_s, q, dim=0).mean()
    return inter, intra


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float | Tensor,
    beta: float | Tensor = 1.0,
    gamma: float | Tensor = 1.0,
) -> Tensor:
    """DIST: ``tau^2 * (beta * inter + gamma * intra)`` (see ``dist_relations``)."""
    inter, intra = dist_relations(student_logits, teacher_logits, temperature)
    return (temperature * temperature) * (beta * inter + gamma * intra)
