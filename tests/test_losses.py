"""Losses and schedules of METHOD.md, checked against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from asib.engine.schedules import get_tau, lr_lambda, ramp
from asib.errors import RecipeError
from asib.methods.asib import cccp_ramp, gate_margin, get_beta
from asib.methods.losses import (
    cccp_loss,
    cross_entropy,
    disagreement_weights,
    dkd_loss,
    ib_kl,
    ib_loss,
    kd_loss_fn,
    kd_to_distribution,
    teacher_average,
    weighted_mean,
)
from asib.recipe import DistillSpec, OptimSpec

# ---------------------------------------------------------------- KL / KD


def test_ib_kl_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(6, 5, generator=g)
    logvar = torch.randn(6, 5, generator=g)
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1).mean()
    torch.testing.assert_close(ib_kl(mu, logvar), expected)
    torch.testing.assert_close(ib_loss(mu, logvar, 0.25), 0.25 * expected)
    assert ib_kl(torch.zeros(3, 4), torch.zeros(3, 4)).abs() < 1e-7


def test_kd_loss_matches_hand_computation() -> None:
    s, t, tau = [1.0, 0.0, -1.0], [0.5, 1.5, 0.0], 2.0
    zs = sum(math.exp(v / tau) for v in s)
    zt = sum(math.exp(v / tau) for v in t)
    p_s = [math.exp(v / tau) / zs for v in s]
    p_t = [math.exp(v / tau) / zt for v in t]
    expected = tau**2 * sum(a * math.log(a / b) for a, b in zip(p_t, p_s, strict=True))
    got = kd_loss_fn(torch.tensor([s]), torch.tensor([t]), tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    per_sample = kd_loss_fn(torch.tensor([s, s]), torch.tensor([t, s]), tau, reduction="none")
    assert per_sample.shape == (2,)
    assert per_sample[0].item() == pytest.approx(expected, rel=1e-5)
    assert per_sample[1].abs().item() < 1e-6


def test_kd_loss_zero_when_equal_and_no_teacher_gradient() -> None:
    logits = torch.randn(4, 7)
    assert kd_loss_fn(logits, logits.clone(), 3.0).abs().item() < 1e-6
    student = torch.randn(4, 7, requires_grad=True)
    teacher = torch.randn(4, 7, requires_grad=True)
    kd_loss_fn(student, teacher, 4.0).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_kd_loss_is_fp32_for_half_inputs() -> None:
    s, t = torch.randn(3, 5).bfloat16(), torch.randn(3, 5).bfloat16()
    assert kd_loss_fn(s, t, 2.0).dtype == torch.float32


def test_kd_to_distribution_equals_kd_to_softmax() -> None:
    s, t, tau = torch.randn(5, 6), torch.randn(5, 6), 2.0
    q = F.softmax(t / tau, dim=-1)
    torch.testing.assert_close(kd_to_distribution(s, q, tau), kd_loss_fn(s, t, tau))
    # A target with exact zeros stays finite.
    q0 = F.one_hot(torch.tensor([1, 2]), 6).float()
    assert torch.isfinite(kd_to_distribution(torch.randn(2, 6), q0, 1.0, reduction="none")).all()


def test_cccp_gradient_through_g_only() -> None:
    g = torch.randn(4, 5, requires_grad=True)
    s = torch.randn(4, 5, requires_grad=True)
    loss = cccp_loss(g, s, 2.0)
    loss.backward()
    assert g.grad is not None and g.grad.abs().sum() > 0
    assert s.grad is None or s.grad.abs().sum() == 0
    # Same value as KD with the roles: KL(p(g) || p(s)).
    torch.testing.assert_close(loss.detach(), kd_loss_fn(s.detach(), g.detach(), 2.0))


# ---------------------------------------------------------------- DKD


def test_dkd_matches_hand_computation() -> None:
    # One sample, three classes, target class 0, tau 2, alpha 1, beta 2.
    s, t, tau, alpha, beta = [1.0, 2.0, 0.0], [2.0, 1.0, 0.0], 2.0, 1.0, 2.0
    es = [math.exp(v / tau) for v in s]
    et = [math.exp(v / tau) for v in t]
    ps_gt, pt_gt = es[0] / sum(es), et[0] / sum(et)
    tckd = pt_gt * math.log(pt_gt / ps_gt) + (1 - pt_gt) * math.log((1 - pt_gt) / (1 - ps_gt))
    ns = [es[1] / (es[1] + es[2]), es[2] / (es[1] + es[2])]  # non-target classes only
    nt = [et[1] / (et[1] + et[2]), et[2] / (et[1] + et[2])]
    nckd = sum(a * math.log(a / b) for a, b in zip(nt, ns, strict=True))
    expected = (alpha * tckd + beta * nckd) * tau**2
    assert expected == pytest.approx(0.567023875, rel=1e-7)
    got = dkd_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([0]), alpha, beta, tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_dkd_terms_are_separate_and_teacher_gets_no_gradient() -> None:
    s = torch.tensor([[1.0, 2.0, 0.0]], requires_grad=True)
    t = torch.tensor([[2.0, 1.0, 0.0]], requires_grad=True)
    y = torch.tensor([0])
    tckd = dkd_loss(s, t, y, 1.0, 0.0, 2.0)
    nckd = dkd_loss(s, t, y, 0.0, 1.0, 2.0)
    assert tckd.item() == pytest.approx(0.08584589 * 4, rel=1e-5)
    assert nckd.item() == pytest.approx(0.02795504 * 4, rel=1e-5)
    (tckd + nckd).backward()
    assert t.grad is None
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # Batch mean over rows; zero when student equals teacher.
    both = dkd_loss(
        torch.tensor([[1.0, 2.0, 0.0]] * 2), torch.tensor([[2.0, 1.0, 0.0]] * 2), y.repeat(2), 1, 2, 2
    )
    assert both.item() == pytest.approx(0.567023875, rel=1e-5)
    same = torch.randn(3, 4)
    assert dkd_loss(same, same, torch.tensor([0, 1, 3]), 1.0, 8.0, 4.0).abs().item() < 1e-5


def _dkd64(
    s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, alpha: float, beta: float, tau: float
) -> torch.Tensor:
    """Decoupled KD written out in float64: TCKD on (p_target, 1 - p_target), NCKD on the
    non-target distribution renormalised to sum 1, both times tau^2, batch mean."""
    def softmax(a: torch.Tensor) -> torch.Tensor:
        e = torch.exp(a - a.max(dim=-1, keepdim=True).values)
        return e / e.sum(dim=-1, keepdim=True)

    p_s, p_t = softmax(s / tau), softmax(t / tau)
    rows = torch.arange(len(y))
    gt_s, gt_t = p_s[rows, y], p_t[rows, y]
    tckd = gt_t * torch.log(gt_t / gt_s) + (1 - gt_t) * torch.log((1 - gt_t) / (1 - gt_s))
    rest = torch.ones_like(p_s, dtype=torch.bool)
    rest[rows, y] = False
    c = s.shape[1]
    n_s = p_s[rest].reshape(-1, c - 1) / (1 - gt_s).unsqueeze(1)
    n_t = p_t[rest].reshape(-1, c - 1) / (1 - gt_t).unsqueeze(1)
    nckd = (n_t * torch.log(n_t / n_s)).sum(dim=1)
    return ((alpha * tckd + beta * nckd) * tau**2).mean()


@pytest.mark.parametrize(
    ("b", "c", "tau", "alpha", "beta"),
    [(2, 3, 1.0, 1.0, 8.0), (7, 10, 4.0, 1.0, 2.0), (16, 100, 2.0, 0.5, 8.0), (5, 2, 3.0, 2.0, 1.0)],
)
def test_dkd_value_and_gradient_match_float64_formula(
    b: int, c: int, tau: float, alpha: float, beta: float
) -> None:
    gen = torch.Generator().manual_seed(b * 1000 + c)
    s = torch.randn(b, c, generator=gen) * 3
    t = torch.randn(b, c, generator=gen) * 3
    y = torch.randint(0, c, (b,), generator=gen)
    s32, s64 = s.clone().requires_grad_(True), s.double().requires_grad_(True)
    got = dkd_loss(s32, t, y, alpha, beta, tau)
    want = _dkd64(s64, t.double(), y, alpha, beta, tau)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    (g32,) = torch.autograd.grad(got, s32)
    (g64,) = torch.autograd.grad(want, s64)
    torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=5e-5 * g64.abs().max().item() + 1e-12)


# ---------------------------------------------------------------- teacher side helpers


def _logits(preds: list[int], classes: int = 3) -> torch.Tensor:
    return F.one_hot(torch.tensor(preds), classes).float() * 5.0


def test_disagreement_weights_each_mode() -> None:
    y = torch.tensor([0, 1, 2, 0])
    # sample 0: both right; 1: both wrong, differ; 2: one wrong, differ; 3: both wrong, agree.
    teachers = [_logits([0, 0, 2, 1]), _logits([0, 2, 1, 1])]
    hi, lo = 2.0, 0.5
    expected = {
        "both_wrong": [0.5, 2.0, 0.5, 2.0],
        "pred": [0.5, 2.0, 2.0, 0.5],
        "any_wrong": [0.5, 2.0, 2.0, 2.0],
        "none": [1.0, 1.0, 1.0, 1.0],
    }
    for mode, want in expected.items():
        w = disagreement_weights(teachers, y, mode, hi, lo)
        assert w.dtype == torch.float32
        assert w.tolist() == want, mode


def test_disagreement_both_wrong_needs_every_teacher_wrong() -> None:
    y = torch.tensor([0, 1])
    teachers = [_logits([1, 0]), _logits([2, 0]), _logits([1, 1])]  # third right on sample 1
    assert disagreement_weights(teachers, y, "both_wrong", 1.5, 1.0).tolist() == [1.5, 1.0]


def test_weighted_mean_reshapes_not_rescales() -> None:
    v = torch.tensor([1.0, 2.0, 3.0, 6.0])
    torch.testing.assert_close(weighted_mean(v, torch.full((4,), 3.0)), v.mean())
    assert weighted_mean(
        torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 2.0])
    ).item() == pytest.approx(2.25)
    assert weighted_mean(v, torch.zeros(4)).item() == 0.0


def test_teacher_average() -> None:
    t1, t2 = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(teacher_average([t1, t2]), (t1 + t2) / 2)
    torch.testing.assert_close(teacher_average([t1, t2], [3.0, 1.0]), 0.75 * t1 + 0.25 * t2)
    with pytest.raises(RecipeError):
        teacher_average([t1, t2], [1.0])
    with pytest.raises(RecipeError):
        teacher_average([t1, t2], [0.0, 0.0])


def test_cross_entropy_label_smoothing_and_mixup() -> None:
    logits, y, y2 = torch.randn(4, 5), torch.tensor([0, 1, 2, 3]), torch.tensor([4, 3, 2, 1])
    torch.testing.assert_close(cross_entropy(logits, y), F.cross_entropy(logits, y))
    torch.testing.assert_close(cross_entropy(logits, y, 0.1), F.cross_entropy(logits, y, label_smoothing=0.1))
    mixed = cross_entropy(logits, y, 0.1, y2=y2, lam=0.3)
    expected = 0.3 * F.cross_entropy(logits, y, label_smoothing=0.1) + 0.7 * F.cross_entropy(
        logits, y2, label_smoothing=0.1
    )
    torch.testing.assert_close(mixed, expected)


# ---------------------------------------------------------------- schedules


def test_get_beta() -> None:
    spec = {"ib_beta": 1e-3, "ib_beta_warmup_epochs": 3}
    assert [get_beta(e, spec) for e in (0, 1, 2, 10)] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3])
    assert get_beta(0, DistillSpec(ib=False)) == 0.0
    assert get_beta(0, {"ib_beta": 0.01, "ib_beta_warmup_epochs": 0}) == pytest.approx(0.01)


def test_get_tau() -> None:
    assert get_tau(7, DistillSpec(tau=2.0), 20) == 2.0
    spec = {"tau_start": 1.0, "tau_end": 4.0}
    assert [get_tau(e, spec, 4) for e in range(4)] == pytest.approx([1.0, 2.0, 3.0, 4.0])
    assert get_tau(0, spec, 1) == 1.0


def test_ramps() -> None:
    assert [cccp_ramp(e, {"cccp_ramp_epochs": 2}) for e in (0, 1, 5)] == [0.5, 1.0, 1.0]
    assert cccp_ramp(0, {"cccp_ramp_epochs": 0}) == 1.0
    assert ramp(0, 0) == 1.0
    assert [ramp(e, 4) for e in (0, 3, 9)] == [0.25, 1.0, 1.0]


def test_dkd_warmup_scales_with_the_schedule() -> None:
    """DKD's warm-up is the paper's 20 of 240 epochs: 1/12 of the student epochs, at least 1."""
    paper = DistillSpec(method="dkd", num_stages=1, student_epochs=240)
    assert paper.dkd_warmup_epochs == 20
    assert DistillSpec(method="dkd", num_stages=2, student_epochs=8).dkd_warmup_epochs == 1
    assert DistillSpec(method="dkd", num_stages=4, student_epochs=12).dkd_warmup_epochs == 4
    assert DistillSpec(method="dkd", dkd={"warmup_epochs": 0}).dkd_warmup_epochs == 0
    spec = DistillSpec(method="dkd")
    assert (spec.ce_alpha, spec.dkd.alpha, spec.dkd.beta, spec.tau) == (1.0, 1.0, 8.0, 4.0)


def test_gate_margin_is_two_standard_errors() -> None:
    assert gate_margin(92.7, 1000) == pytest.approx(200 * math.sqrt(0.927 * 0.073 / 1000))
    assert gate_margin(92.7, 1000) == pytest.approx(1.645, abs=1e-3)
    assert gate_margin(100.0, 1000) == 0.0 and gate_margin(50.0, 0) == 0.0


def test_lr_lambda_cosine_and_constant() -> None:
    f = lr_lambda({"warmup_epochs": 1, "schedule": "cosine"}, steps_per_epoch=10, total_epochs=3)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(20) == pytest.approx(0.5)
    assert f(30) == pytest.approx(0.0, abs=1e-12)
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    floor = lr_lambda(OptimSpec(min_lr_ratio=0.1), steps_per_epoch=10, total_epochs=2)
    assert floor(0) == pytest.approx(1.0)
    assert floor(20) == pytest.approx(0.1)
    const = lr_lambda({"schedule": "constant", "warmup_epochs": 0.5}, steps_per_epoch=4, total_epochs=5)
    assert [const(s) for s in (0, 1, 2, 19)] == pytest.approx([0.5, 1.0, 1.0, 1.0])


def test_lr_lambda_drives_lambdalr() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(OptimSpec(), steps_per_epoch=2, total_epochs=2))
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx(
        [2.0, 2.0 * 0.5 * (1 + math.cos(math.pi / 4)), 1.0, 2.0 * 0.5 * (1 + math.cos(3 * math.pi / 4))]
    )
