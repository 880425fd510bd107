"""The baselines CA-MKD and DIST and the logit-standardization switch: each loss against an
independent float64 formula (value and gradient), hand-made cases, the methods in the engine,
and their recipe keys."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from asib.data import Batch, InMemoryLoader
from asib.engine.loaders import SplitLoaders
from asib.engine.loop import EpochPlan
from asib.engine.progress import Progress
from asib.engine.runtime import make_runtime
from asib.errors import RecipeError
from asib.methods import METHODS, build_method
from asib.methods.ca_mkd import CAMKD
from asib.methods.losses import (
    ca_mkd_feature_loss,
    ca_mkd_kd_loss,
    ca_mkd_weights,
    cross_entropy,
    dist_loss,
    dist_relations,
    dist_relations_to_distribution,
    kd_loss_fn,
    standardize_logits,
)
from asib.models import create_model, synergy_target
from asib.pipeline.distill import DistillTask
from asib.recipe import DistillSpec, distill_for_method, recipe_from_dict

CASES = [(2, 3, 1.0), (7, 10, 4.0), (16, 100, 2.0)]  # (batch, classes, tau)
NUM_CLASSES = 5
BASE = {"num_stages": 2, "student_epochs": 1, "teacher_adapt_epochs": 1, "batch_size": 16,
        "ib_mbm": {"dim": 16, "heads": 2, "head_dropout": 0.0}}
XY = (torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(5)), torch.arange(8) % NUM_CLASSES)


# ---------------------------------------------------------------- float64 references, written out


def softmax64(a: torch.Tensor) -> torch.Tensor:
    e = torch.exp(a - a.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def kd64(s: torch.Tensor, t: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-sample tau^2 * KL(softmax(t/tau) || softmax(s/tau))."""
    p_t, p_s = softmax64(t / tau), softmax64(s / tau)
    return tau**2 * (p_t * (torch.log(p_t) - torch.log(p_s))).sum(dim=-1)


def zscore64(a: torch.Tensor) -> torch.Tensor:
    """(a - mean) / population std along the classes."""
    mean = a.mean(dim=-1, keepdim=True)
    std = ((a - mean) ** 2).mean(dim=-1, keepdim=True).sqrt()
    return (a - mean) / std


def ce64(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample -log softmax(logits)[y]."""
    return -torch.log(softmax64(logits)[torch.arange(len(y)), y])


def pearson64(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """Centred dot product over the product of the centred norms (+1e-8, as DIST's code)."""
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    return (a * b).sum(dim=dim) / (torch.sqrt((a**2).sum(dim=dim)) * torch.sqrt((b**2).sum(dim=dim)) + 1e-8)


def logits(b: int, c: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(b, c, generator=torch.Generator().manual_seed(seed)) * scale


def check_value_and_grad(
    loss32: torch.Tensor, s32: torch.Tensor, loss64: torch.Tensor, s64: torch.Tensor
) -> None:
    """The fp32 loss and its gradient w.r.t. the student's logits match the float64 formula."""
    (g32,) = torch.autograd.grad(loss32, s32)
    (g64,) = torch.autograd.grad(loss64, s64)
    assert loss32.dtype == torch.float32
    assert loss32.item() == pytest.approx(loss64.item(), rel=1e-5, abs=1e-7)
    scale = g64.abs().max().item()
    # atol: with B = 2 the intra relation is exactly ±1, so its gradient is float noise
    torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=1e-4 * scale + 1e-12)


def pair(b: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same student logits in fp32 and float64, both requiring gradients."""
    s = logits(b, c, seed)
    return s.clone().requires_grad_(True), s.double().requires_grad_(True)


# ---------------------------------------------------------------- logit standardization


@pytest.mark.parametrize(("b", "c", "tau"), CASES)
def test_standardize_logits_value_and_gradient(b: int, c: int, tau: float) -> None:
    s32, s64 = pair(b, c, 0)
    upstream = logits(b, c, 1)
    z = standardize_logits(s32)
    torch.testing.assert_close(z.double(), zscore64(s64).detach(), rtol=1e-4, atol=1e-5)
    assert torch.allclose(z.mean(-1), torch.zeros(b), atol=1e-5)
    assert torch.allclose(z.square().mean(-1), torch.ones(b), atol=1e-4)  # std 1 (population)
    ref = (zscore64(s64) * upstream.double()).sum() / tau
    check_value_and_grad((z * upstream).sum() / tau, s32, ref, s64)


def test_standardize_logits_is_scale_and_shift_free_and_safe_on_constants() -> None:
    a = logits(4, 7, 2)
    torch.testing.assert_close(standardize_logits(5.0 * a + 3.0), standardize_logits(a), rtol=1e-5, atol=1e-5)
    const = torch.full((2, 6), 1.5, requires_grad=True)
    z = standardize_logits(const)
    assert torch.equal(z, torch.zeros(2, 6))
    (z * torch.randn(2, 6)).sum().backward()
    assert const.grad is not None and torch.isfinite(const.grad).all()
    assert standardize_logits(a.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize(("b", "c", "tau"), CASES)
def test_standardized_kd_equals_plain_kd_on_hand_zscored_logits(b: int, c: int, tau: float) -> None:
    s32, s64 = pair(b, c, 3)
    t = logits(b, c, 4, scale=5.0)
    loss32 = kd_loss_fn(standardize_logits(s32), standardize_logits(t), tau)
    loss64 = kd64(zscore64(s64), zscore64(t.double()), tau).mean()
    check_value_and_grad(loss32, s32, loss64, s64)


# ---------------------------------------------------------------- CA-MKD


def ca_mkd64(s: torch.Tensor, teachers: Sequence[torch.Tensor], y: torch.Tensor, tau: float) -> torch.Tensor:
    """mean_i sum_k w_ik KD(s_i <- t_ik), w_ik = (1 - softmax_k(CE_ik)) / (K - 1)."""
    k = len(teachers)
    ce = torch.stack([ce64(t, y) for t in teachers], dim=1)
    w = (1.0 - softmax64(ce)) / (k - 1)
    kd = torch.stack([kd64(s, t, tau) for t in teachers], dim=1)
    return (w * kd).sum(dim=1).mean()


@pytest.mark.parametrize(("b", "c", "tau"), CASES)
def test_ca_mkd_kd_loss_value_and_gradient(b: int, c: int, tau: float) -> None:
    s32, s64 = pair(b, c, 5)
    teachers = [logits(b, c, 10 + k, scale=2.0 + k) for k in range(3)]
    y = torch.randint(0, c, (b,), generator=torch.Generator().manual_seed(6))
    w = ca_mkd_weights(teachers, y)
    assert w.shape == (b, 3) and torch.allclose(w.sum(1), torch.ones(b), atol=1e-6)
    loss32 = ca_mkd_kd_loss(s32, teachers, w, tau)
    check_value_and_grad(loss32, s32, ca_mkd64(s64, [t.double() for t in teachers], y, tau), s64)


def test_ca_mkd_weights_on_known_cases() -> None:
    y = torch.tensor([0, 1])
    right = torch.tensor([[30.0, 0.0, 0.0], [0.0, 30.0, 0.0]])  # certain and right
    wrong = torch.tensor([[0.0, 30.0, 0.0], [0.0, 0.0, 30.0]])  # certain and wrong
    w = ca_mkd_weights([right, wrong], y)
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0], [1.0, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ca_mkd_weights([wrong, right], y), torch.tensor([[0.0, 1.0], [0.0, 1.0]]),
                               atol=1e-6, rtol=0)
    t = logits(2, 3, 7)
    torch.testing.assert_close(ca_mkd_weights([t, t.clone()], y), torch.full((2, 2), 0.5))
    torch.testing.assert_close(ca_mkd_weights([t, t, t], y), torch.full((2, 3), 1 / 3))
    # two teachers: w_right = 1 - sigmoid(CE_right - CE_wrong), by hand
    a, b_ = torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[1.0, 2.0, 0.0]])
    ce_a, ce_b = ce64(a.double(), y[:1]), ce64(b_.double(), y[:1])
    expected = 1 - torch.exp(ce_a) / (torch.exp(ce_a) + torch.exp(ce_b))
    assert ca_mkd_weights([a, b_], y[:1])[0, 0].item() == pytest.approx(expected.item(), rel=1e-6)
    grad_in = t.clone().requires_grad_(True)
    assert not ca_mkd_weights([grad_in, t], y).requires_grad  # weights are constants of the step
    with pytest.raises(ValueError, match="at least 2 teachers"):
        ca_mkd_weights([t], y)


def test_ca_mkd_feature_loss_value_and_gradient() -> None:
    b, widths = 6, (4, 9)
    gen = torch.Generator().manual_seed(8)
    regressed = [torch.randn(b, d, generator=gen).requires_grad_(True) for d in widths]
    feats = [torch.randn(b, d, generator=gen) for d in widths]
    w = torch.softmax(torch.randn(b, 2, generator=gen), dim=1)
    loss32 = ca_mkd_feature_loss(regressed, feats, w)
    r64 = [r.detach().double().requires_grad_(True) for r in regressed]
    loss64 = sum(w[:, k].double() * ((r64[k] - feats[k].double()) ** 2).mean(dim=1) for k in range(2)).mean()
    assert loss32.item() == pytest.approx(loss64.item(), rel=1e-5)
    g32 = torch.autograd.grad(loss32, regressed)
    g64 = torch.autograd.grad(loss64, r64)
    for a, b64 in zip(g32, g64, strict=True):
        torch.testing.assert_close(a.double(), b64, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- DIST


def dist64(s: torch.Tensor, t: torch.Tensor, tau: float, beta: float, gamma: float) -> torch.Tensor:
    p_s, p_t = softmax64(s / tau), softmax64(t / tau)
    inter = 1 - pearson64(p_s, p_t, dim=1).mean()
    intra = 1 - pearson64(p_s, p_t, dim=0).mean()
    return tau**2 * (beta * inter + gamma * intra)


@pytest.mark.parametrize(("b", "c", "tau"), CASES)
@pytest.mark.parametrize(("beta", "gamma"), [(1.0, 1.0), (2.0, 0.5)])
def test_dist_loss_value_and_gradient(b: int, c: int, tau: float, beta: float, gamma: float) -> None:
    s32, s64 = pair(b, c, 9)
    t = logits(b, c, 10)
    loss32 = dist_loss(s32, t, tau, beta, gamma)
    check_value_and_grad(loss32, s32, dist64(s64, t.double(), tau, beta, gamma), s64)


def test_dist_relations_parts_and_limits() -> None:
    s, t = logits(8, 6, 11), logits(8, 6, 12)
    inter, intra = dist_relations(s, t, 2.0)
    p_s, p_t = softmax64(s.double() / 2), softmax64(t.double() / 2)
    assert inter.item() == pytest.approx(1 - pearson64(p_s, p_t, 1).mean().item(), rel=1e-5)
    assert intra.item() == pytest.approx(1 - pearson64(p_s, p_t, 0).mean().item(), rel=1e-5)
    same = dist_relations(s, s.clone(), 3.0)
    assert max(abs(v.item()) for v in same) < 1e-5  # perfectly correlated: both relations 0
    one = torch.randn(1, 6, requires_grad=True)  # a batch of one has no intra-class spread
    loss = dist_loss(one, torch.randn(1, 6), 1.0)
    loss.backward()
    assert torch.isfinite(loss) and one.grad is not None and torch.isfinite(one.grad).all()
    student, teacher = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    dist_loss(student, teacher, 1.0).backward()
    assert teacher.grad is None and student.grad is not None



@pytest.mark.parametrize(("b", "c", "tau"), CASES)
def test_dist_relations_to_a_weighted_distribution(b: int, c: int, tau: float) -> None:
    """ASIB's ``kd_loss: dist`` synergy term: inter-class relations weighted per sample, intra-class not."""
    s32, s64 = pair(b, c, 13)
    q = softmax64(logits(b, c, 14).double() / 1.5)
    w = torch.rand(b, generator=torch.Generator().manual_seed(15)) + 0.5
    inter, intra = dist_relations_to_distribution(s32, q.float(), tau, w)
    p_s = softmax64(s64 / tau)
    inter64 = ((1 - pearson64(p_s, q, dim=1)) * w.double()).sum() / w.double().sum()
    intra64 = 1 - pearson64(p_s, q, dim=0).mean()
    check_value_and_grad(tau**2 * (inter + intra), s32, tau**2 * (inter64 + intra64), s64)
    plain = dist_relations_to_distribution(s32.detach(), q.float(), tau)
    via_logits = dist_relations(s32.detach(), logits(b, c, 14) * (tau / 1.5), tau)  # same q from logits
    assert [v.item() for v in plain] == pytest.approx([v.item() for v in via_logits], rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------- the methods in the engine


def make_spec(**kw: object) -> DistillSpec:
    method = str(kw.get("method", "asib"))
    return DistillSpec.model_validate(distill_for_method({**BASE, **kw}, method))


def make_models(
    archs: tuple[str, ...] = ("resnet8", "vgg8"),
) -> tuple[list[torch.nn.Module], torch.nn.Module]:
    torch.manual_seed(0)
    teachers = [create_model(a, NUM_CLASSES).eval() for a in archs]
    return teachers, create_model("resnet8", NUM_CLASSES)


def make_task(spec: DistillSpec) -> DistillTask:
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=gen)
    labels = torch.arange(32) % NUM_CLASSES

    def loader(shuffle: bool) -> InMemoryLoader:
        return InMemoryLoader(images, labels, batch_size=16, mean=[0.5] * 3, std=[0.25] * 3, augment=None,
                              shuffle=shuffle, seed=0, device="cpu", drop_last=False, num_classes=NUM_CLASSES)

    loaders = SplitLoaders(
        info=None, train=loader(True), val=loader(False), test=loader(False)  # type: ignore[arg-type]
    )
    teachers, student = make_models()
    return DistillTask(build_method(spec, teachers, student), loaders, make_runtime("cpu"), lambda _e: None,
                       Progress(enabled=False), [50.0, 60.0])


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    after = snapshot(module)
    return any(not torch.equal(before[k], after[k]) for k in before)


def one_b_step(task: DistillTask) -> dict[str, torch.Tensor | float]:
    ep = next(ep for ep in task.plan() if ep.phase == "B")
    task.begin_epoch(ep)
    return task.step(ep, next(iter(task.batches(ep))))


def at(phase: str = "B", stage: int = 0, phase_epoch: int = 0) -> EpochPlan:
    return EpochPlan(0, phase, stage, phase_epoch, 0)


@pytest.mark.parametrize("method", ["ca_mkd", "dist"])
def test_new_methods_train_one_step_through_the_task(method: str) -> None:
    task = make_task(make_spec(method=method))
    before = snapshot(task.m.student)
    terms = one_b_step(task)
    assert torch.isfinite(terms["loss"]) and {"ce", "kd", "train_acc"} <= set(terms)
    assert changed(before, task.m.student)
    assert set(task.optimizers) == {"B"}


def test_ca_mkd_feature_term_trains_its_regressors() -> None:
    task = make_task(make_spec(method="ca_mkd", ca_mkd={"feature_weight": 2.0}))
    d = task.m
    assert isinstance(d, CAMKD) and d.regressors is not None
    assert [r.out_features for r in d.regressors] == [t.feature_dim for t in d.teachers]
    assert "regressors" in d.trained_modules() and "regressors" in task.state_dict()["modules"]
    before, student = snapshot(d.regressors), snapshot(d.student)
    terms = one_b_step(task)
    assert {"feat", "feat_w", "w_t0", "w_t1", "wf_t0", "wf_t1"} <= set(terms)
    assert float(terms["feat"]) > 0 and float(terms["feat_w"]) == 2.0
    assert changed(before, d.regressors) and changed(student, d.student)
    off = make_task(make_spec(method="ca_mkd"))
    assert isinstance(off.m, CAMKD) and off.m.regressors is None
    assert "regressors" not in off.m.trained_modules()
    assert "feat" not in one_b_step(off)


def test_ca_mkd_feature_term_by_hand() -> None:
    spec = make_spec(method="ca_mkd", ca_mkd={"feature_weight": 0.5}, ce_alpha=0.2, kd_alpha=0.8, tau=3.0)
    teachers, student = make_models()
    d = build_method(spec, teachers, student).eval()
    assert isinstance(d, CAMKD) and d.regressors is not None
    x, y = XY
    terms = d(at(), Batch(x, y))
    with torch.no_grad():
        h_s = student.features(x)
        s = student.head(h_s)
        feats = [t.features(x) for t in teachers]
        t_logits = [t.head(h) for t, h in zip(teachers, feats, strict=True)]
        r = [reg(h_s) for reg in d.regressors]
        w = ca_mkd_weights(t_logits, y)
        wf = ca_mkd_weights([t.head(rk) for t, rk in zip(teachers, r, strict=True)], y)
    kd = ca_mkd_kd_loss(s, t_logits, w, 3.0)
    feat = ca_mkd_feature_loss(r, feats, wf)
    expected = 0.2 * cross_entropy(s, y) + 0.8 * kd + 0.5 * feat
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert float(terms["w_t0"]) == pytest.approx(w[:, 0].mean().item(), rel=1e-5)
    assert float(terms["w_t0"]) + float(terms["w_t1"]) == pytest.approx(1.0, abs=1e-6)


def test_ca_mkd_uses_the_dominant_label_of_mixed_batches() -> None:
    teachers, student = make_models()
    d = build_method(make_spec(method="ca_mkd", tau=2.0), teachers, student).eval()
    x, y = XY
    y2 = (y + 2) % NUM_CLASSES
    terms = d(at(), Batch(x, y, y2, 0.3))  # y2 carries 70% of the target
    with torch.no_grad():
        s = student(x)
        t_logits = [t(x) for t in teachers]
    kd = ca_mkd_kd_loss(s, t_logits, ca_mkd_weights(t_logits, y2), 2.0)
    assert terms["kd"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(cross_entropy(s, y, 0.0, y2, 0.3).item(), rel=1e-5)


def test_ca_mkd_equals_avg_kd_when_the_teachers_are_equal() -> None:
    """Same defaults, same target when the weights are 1/2: the methods differ by the weighting only."""
    x, y = XY
    losses = {}
    for method in ("ca_mkd", "avg_kd"):
        teachers, student = make_models(("resnet8", "resnet8"))
        teachers[1].load_state_dict(teachers[0].state_dict())
        d = build_method(make_spec(method=method), teachers, student).eval()
        losses[method] = d(at(), Batch(x, y))["loss"].item()
    assert losses["ca_mkd"] == pytest.approx(losses["avg_kd"], rel=1e-5)


def test_dist_method_loss_toward_the_teacher_average() -> None:
    spec = make_spec(
        method="dist", ce_alpha=0.5, tau=2.0, dist={"beta": 2.0, "gamma": 0.5}, teacher_weights=[3.0, 1.0]
    )
    teachers, student = make_models()
    d = build_method(spec, teachers, student).eval()
    x, y = XY
    terms = d(at(), Batch(x, y))
    with torch.no_grad():
        s = student(x)
        t_bar = 0.75 * teachers[0](x) + 0.25 * teachers[1](x)
    expected = 0.5 * cross_entropy(s, y) + dist_loss(s, t_bar, 2.0, 2.0, 0.5)
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    inter, intra = dist_relations(s, t_bar, 2.0)
    assert float(terms["inter"]) == pytest.approx(inter.item(), rel=1e-5)
    assert float(terms["intra"]) == pytest.approx(intra.item(), rel=1e-5)


def test_kd_with_standardization_is_kd_on_hand_zscored_logits() -> None:
    teachers, student = make_models()
    spec = make_spec(method="kd", kd_teacher=1, tau=2.0, logit_standardization=True)
    d = build_method(spec, teachers, student).eval()
    x, y = XY
    terms = d(at(), Batch(x, y))
    with torch.no_grad():
        s, t = student(x).double(), teachers[1](x).double()
    assert terms["kd"].item() == pytest.approx(kd64(zscore64(s), zscore64(t), 2.0).mean().item(), rel=1e-4)
    assert terms["ce"].item() == pytest.approx(cross_entropy(s.float(), y).item(), rel=1e-5)  # CE stays raw


STANDARDIZING = ["kd", "avg_kd", "dkd", "dist", "ca_mkd", "asib"]


@pytest.mark.parametrize("method", STANDARDIZING)
def test_logit_standardization_changes_the_loss_of_every_kd_method(method: str) -> None:
    x, y = XY
    losses = {}
    for on in (False, True):
        teachers, student = make_models()
        spec = make_spec(method=method, logit_standardization=on, dkd={"warmup_epochs": 0})
        d = build_method(spec, teachers, student).eval()
        torch.manual_seed(0)  # the same bottleneck noise for ASIB's synergy target
        terms = d(at(), Batch(x, y))
        losses[on] = (terms["loss"].item(), terms["ce"].item())
    assert losses[True][1] == pytest.approx(losses[False][1], rel=1e-6)  # CE on labels is untouched
    assert losses[True][0] != pytest.approx(losses[False][0], rel=1e-3)


def test_logit_standardization_reaches_asib_synergy_target_and_cccp() -> None:
    x, y = XY
    out = {}
    for on in (False, True):
        teachers, student = make_models()
        d = build_method(make_spec(logit_standardization=on, cccp_ramp_epochs=0), teachers, student).eval()
        torch.manual_seed(0)
        b = d(at(), Batch(x, y))
        torch.manual_seed(0)
        a = d(at("A", stage=1, phase_epoch=1), Batch(x, y))
        out[on] = (b["kd_ens"].item(), a["cccp"].item(), a["syn_ce"].item())
    assert out[True][0] != pytest.approx(out[False][0], rel=1e-3)
    assert out[True][1] != pytest.approx(out[False][1], rel=1e-3)
    assert out[True][2] == pytest.approx(out[False][2], rel=1e-6)  # the synergy head's CE stays raw
    # synergy_target(standardize=standardize_logits) is the softmax of the z-scored head logits
    teachers, student = make_models()
    d = build_method(make_spec(), teachers, student).eval()
    with torch.no_grad():
        feats = [t.features(x) for t in teachers]
        ib_out = d.ib_mbm(student.features(x), feats)
        q = synergy_target(d.ib_mbm, d.synergy_head, ib_out, 2.0, 4, mode="mu", standardize=standardize_logits)
        g = d.synergy_head(ib_out.mu).double()
    torch.testing.assert_close(q.double(), softmax64(zscore64(g) / 2.0), rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # noise_avg: each noise sample's logits are z-scored before its softmax
        torch.manual_seed(7)
        q = synergy_target(d.ib_mbm, d.synergy_head, ib_out, 2.0, 3, ib=True, standardize=standardize_logits)
        torch.manual_seed(7)
        eps = torch.randn((3, *ib_out.mu.shape))
        z = ib_out.mu + torch.exp(0.5 * ib_out.logvar) * eps
        want = torch.stack([softmax64(zscore64(d.synergy_head(z[k]).double()) / 2.0) for k in range(3)]).mean(0)
    torch.testing.assert_close(q.double(), want, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- recipe keys and defaults


def recipe_error(distill: dict[str, object]) -> str:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict({"name": "x", "distill": distill})
    return str(info.value)


@pytest.mark.parametrize(("method", "key", "value"), [
    ("avg_kd", "dist", {"beta": 2.0}),
    ("kd", "ca_mkd", {"feature_weight": 1.0}),
    ("dist", "ca_mkd", {"feature_weight": 1.0}),
    ("ca_mkd", "dist", {"gamma": 2.0}),
    ("dist", "kd_alpha", 0.5),
    ("dist", "dkd", {"beta": 4.0}),
    ("ca_mkd", "teacher_weights", [1.0, 2.0]),
    ("ca_mkd", "kd_teacher", 1),
    ("ce", "logit_standardization", True),
    ("asib", "dist", {"beta": 1.0}),
])
def test_keys_a_method_does_not_read_are_recipe_errors(method: str, key: str, value: object) -> None:
    assert f"distill.{key}: not used by method {method}" in recipe_error({"method": method, key: value})


@pytest.mark.parametrize(("method", "keys"), [
    ("ca_mkd", {"ca_mkd": {"feature_weight": 1.0}, "kd_alpha": 0.5, "kd_warmup_epochs": 2,
                "logit_standardization": True}),
    ("dist", {"dist": {"beta": 2.0, "gamma": 2.0}, "teacher_weights": [1.0, 1.0], "kd_warmup_epochs": 1,
              "logit_standardization": True, "tau": 4.0}),
    ("kd", {"logit_standardization": True}),
    ("avg_kd", {"logit_standardization": True}),
    ("dkd", {"logit_standardization": True}),
    ("asib", {"logit_standardization": True}),
])
def test_keys_a_method_reads_are_accepted(method: str, keys: dict[str, object]) -> None:
    recipe = recipe_from_dict({"name": "x", "distill": {"method": method, **keys}})
    dumped = recipe.distill.model_dump()
    assert set(keys) <= set(dumped)
    assert DistillSpec.model_validate(dumped) == recipe.distill  # a resolved dump validates again


def test_new_methods_are_registered_with_their_defaults() -> None:
    assert {"ca_mkd", "dist"} <= set(METHODS)
    ca = DistillSpec(method="ca_mkd")
    avg = DistillSpec(method="avg_kd")
    assert (ca.ce_alpha, ca.kd_alpha, ca.tau, ca.kd_warmup_epochs) == (avg.ce_alpha, avg.kd_alpha, avg.tau, 0)
    assert (ca.ce_alpha, ca.kd_alpha, ca.ca_mkd.feature_weight) == (0.3, 0.7, 0.0)
    dist = DistillSpec(method="dist")
    assert (dist.ce_alpha, dist.tau, dist.dist.beta, dist.dist.gamma) == (1.0, 1.0, 1.0, 1.0)
    assert DistillSpec().logit_standardization is False
    assert METHODS["ca_mkd"].min_teachers == 2 and METHODS["dist"].min_teachers == 1
    teachers, student = make_models(("resnet8",))
    with pytest.raises(RecipeError, match="method ca_mkd needs at least 2 teachers"):
        build_method(make_spec(method="ca_mkd"), teachers, student)
    assert build_method(make_spec(method="dist"), teachers, student).name == "dist"
