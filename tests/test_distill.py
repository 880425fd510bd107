"""ASIB's A-step and B-step on tiny models: what each step may touch, and that every switch acts."""

from __future__ import annotations

import copy

import pytest
import torch

from asib.data import InMemoryLoader
from asib.engine.distill import DistillTraining
from asib.engine.distiller import ASIBDistiller
from asib.engine.loaders import SplitLoaders
from asib.engine.loop import EpochPlan
from asib.engine.losses import cross_entropy, dkd_loss, kd_loss_fn
from asib.engine.progress import Progress
from asib.engine.runtime import make_runtime
from asib.errors import RunError
from asib.models import create_model
from asib.models.ib_mbm import build_ib_mbm_from_teachers
from asib.recipe import DistillSpec

NUM_CLASSES = 5


def make_spec(**kw: object) -> DistillSpec:
    base = {"num_stages": 2, "student_epochs": 1, "teacher_adapt_epochs": 1, "batch_size": 16,
            "ib_mbm": {"dim": 16, "heads": 2, "head_dropout": 0.0}}
    return DistillSpec.model_validate({**base, **kw})


def make_models(archs: tuple[str, ...] = ("resnet8", "vgg8")) -> tuple[list, torch.nn.Module]:
    torch.manual_seed(0)
    teachers = [create_model(a, NUM_CLASSES).eval() for a in archs]
    student = create_model("resnet8", NUM_CLASSES)
    return teachers, student


def make_loaders(n: int = 32) -> SplitLoaders:
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=gen)
    labels = torch.arange(n) % NUM_CLASSES

    def loader(shuffle: bool) -> InMemoryLoader:
        return InMemoryLoader(images, labels, batch_size=16, mean=[0.5] * 3, std=[0.25] * 3, augment=None,
                              shuffle=shuffle, seed=0, device="cpu", drop_last=False, num_classes=NUM_CLASSES)

    return SplitLoaders(info=None, train=loader(True), val=loader(False), test=loader(False))  # type: ignore[arg-type]


def make_training(spec: DistillSpec, archs: tuple[str, ...] = ("resnet8", "vgg8"), precision: str = "auto") -> DistillTraining:
    teachers, student = make_models(archs)
    ib_mbm, head = (None, None)
    if spec.method == "asib":
        ib_mbm, head = build_ib_mbm_from_teachers(teachers, student, spec)
    distiller = ASIBDistiller(teachers, student, ib_mbm, head, spec)
    return DistillTraining(distiller, spec, make_loaders(), make_runtime("cpu", precision=precision), [50.0, 60.0],
                           save_best=lambda epoch: None, progress=Progress(enabled=False))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_step(training: DistillTraining, ep: EpochPlan) -> dict[str, torch.Tensor]:
    training.begin_epoch(ep)
    batch = next(iter(training.loaders.train.batches(ep.index)))
    return training.step(ep, batch)


def first(training: DistillTraining, phase: str) -> EpochPlan:
    return next(ep for ep in training.plan() if ep.phase == phase)


def test_plan_orders_a_then_b_per_stage() -> None:
    training = make_training(make_spec(synergy_warmup_epochs=1, num_stages=2, student_epochs=[2, 1]))
    assert [(ep.phase, ep.stage) for ep in training.plan()] == [
        ("A", 0), ("A", 0), ("B", 0), ("B", 0), ("A", 1), ("B", 1)]
    baseline = make_training(make_spec(method="avg_kd", num_stages=2, student_epochs=[2, 1]))
    assert [ep.phase for ep in baseline.plan()] == ["B", "B", "B"]


def test_a_step_changes_no_student_parameter() -> None:
    training = make_training(make_spec())
    d = training.d
    student, side = snapshot(d.student), snapshot(d.ib_mbm) | {f"h.{k}": v for k, v in snapshot(d.synergy_head).items()}
    teachers = [snapshot(t) for t in d.teachers]
    one_step(training, first(training, "A"))
    assert same(snapshot(d.student), student)  # weights and BN buffers, bitwise
    after = snapshot(d.ib_mbm) | {f"h.{k}": v for k, v in snapshot(d.synergy_head).items()}
    assert not same(after, side)
    assert all(same(snapshot(t), s) for t, s in zip(d.teachers, teachers, strict=True))  # frozen by default


def test_b_step_changes_no_teacher_side_parameter() -> None:
    training = make_training(make_spec())
    d = training.d
    one_step(training, first(training, "A"))
    student, ib, head = snapshot(d.student), snapshot(d.ib_mbm), snapshot(d.synergy_head)
    teachers = [snapshot(t) for t in d.teachers]
    terms = one_step(training, first(training, "B"))
    assert torch.isfinite(terms["loss"])
    assert same(snapshot(d.ib_mbm), ib) and same(snapshot(d.synergy_head), head)
    assert all(same(snapshot(t), s) for t, s in zip(d.teachers, teachers, strict=True))
    assert not same(snapshot(d.student), student)


def _a_grads(cccp: bool, head_shift: float) -> list[torch.Tensor]:
    """A-step gradients of the teacher side in stage 2 when only the student's logits change."""
    spec = make_spec(cccp=cccp, cccp_ramp_epochs=0)
    teachers, student = make_models()
    torch.manual_seed(3)
    ib_mbm, head = build_ib_mbm_from_teachers(teachers, student, spec)
    with torch.no_grad():
        student.classifier.bias.add_(head_shift)  # same features, different logits
    d = ASIBDistiller(teachers, student, ib_mbm, head, spec).eval()
    ib_mbm.train()
    x = torch.randn(8, 3, 8, 8)
    y = torch.arange(8) % NUM_CLASSES
    torch.manual_seed(4)  # same bottleneck noise in both calls
    terms = d(x, y, epoch=1, phase="A", stage=1, stage_epoch=0)
    params = list(ib_mbm.parameters()) + list(head.parameters())
    return list(torch.autograd.grad(terms["loss"], params, allow_unused=True))


def _equal_grads(a: list, b: list) -> bool:
    return all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_cccp_off_gradients_ignore_student_logits() -> None:
    base = torch.zeros(NUM_CLASSES)
    shift = torch.linspace(-3, 3, NUM_CLASSES)
    assert _equal_grads(_a_grads(False, base), _a_grads(False, shift))
    assert not _equal_grads(_a_grads(True, base), _a_grads(True, shift))


def test_cccp_only_from_second_stage_and_after_warmup() -> None:
    spec = make_spec(cccp=True, synergy_warmup_epochs=1, cccp_ramp_epochs=0)
    teachers, student = make_models()
    ib_mbm, head = build_ib_mbm_from_teachers(teachers, student, spec)
    d = ASIBDistiller(teachers, student, ib_mbm, head, spec)
    x, y = torch.randn(4, 3, 8, 8), torch.arange(4)
    warm = d(x, y, epoch=0, phase="A", stage=0, stage_epoch=0)
    assert float(warm["beta"]) == 0 and float(warm["cccp_w"]) == 0
    stage1 = d(x, y, epoch=1, phase="A", stage=0, stage_epoch=1)
    assert float(stage1["cccp_w"]) == 0 and float(stage1["beta"]) > 0
    stage2 = d(x, y, epoch=2, phase="A", stage=1, stage_epoch=0)
    assert float(stage2["cccp_w"]) == pytest.approx(spec.kd_ens_alpha)


def test_synergy_gate_moves_the_weight() -> None:
    spec = make_spec(kd_alpha=0.2, kd_ens_alpha=0.5, ce_alpha=0.3)
    training = make_training(spec)
    d = training.d
    ep = first(training, "B")
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % NUM_CLASSES
    d.eval()
    d.student.train()
    d.gate_open = True
    torch.manual_seed(0)
    open_terms = d(x, y, epoch=0, phase="B")
    assert float(open_terms["kd_w"]) == pytest.approx(0.2) and float(open_terms["kd_ens_w"]) == pytest.approx(0.5)
    d.gate_open = False
    torch.manual_seed(0)
    closed = d(x, y, epoch=0, phase="B")
    assert float(closed["kd_w"]) == pytest.approx(0.7) and float(closed["kd_ens_w"]) == 0
    expected = 0.3 * closed["ce"] + 0.7 * closed["kd"]
    assert closed["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    # the loop opens the gate only when the synergy head is at least as good as the weakest teacher
    training.synergy_val = 49.0
    training._set_gate(ep)
    assert d.gate_open is False
    training.synergy_val = 50.0
    training._set_gate(ep)
    assert d.gate_open is True
    ungated = make_training(make_spec(synergy_gate=False))
    ungated.synergy_val = 0.0
    ungated._set_gate(ep)
    assert ungated.d.gate_open is True


def test_synergy_target_mode_acts() -> None:
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % NUM_CLASSES
    values = {}
    for mode in ("noise_avg", "mu"):
        training = make_training(make_spec(synergy_target=mode, ib_mbm={"dim": 16, "heads": 2, "logvar_clamp": 3}))
        d = training.d
        with torch.no_grad():
            d.ib_mbm.logvar_proj.bias.fill_(3.0)  # a wide bottleneck, so the average differs from G(mu)
        d.eval()
        torch.manual_seed(0)
        values[mode] = d(x, y, epoch=0, phase="B")["kd_ens"].item()
    assert values["noise_avg"] != pytest.approx(values["mu"], rel=1e-3)


def test_disagreement_weights_reach_the_b_step() -> None:
    training = make_training(make_spec(disagreement="any_wrong", lambda_high=2.0))
    d = training.d.eval()
    x, y = torch.randn(16, 3, 8, 8), torch.arange(16) % NUM_CLASSES
    terms = d(x, y, epoch=0, phase="B")
    assert 0 < terms["weighted_share"].item() <= 1  # untrained teachers are wrong somewhere
    none = make_training(make_spec(disagreement="none")).d.eval()
    assert none(x, y, epoch=0, phase="B")["weighted_share"].item() == 0


def test_three_teachers_of_different_widths() -> None:
    training = make_training(make_spec(), archs=("resnet8", "vgg8", "wrn_16_1"))
    dims = {t.feature_dim for t in training.d.teachers}
    assert len(dims) >= 2
    a = one_step(training, first(training, "A"))
    assert {"attn_t0", "attn_t1", "attn_t2"} <= set(a)
    assert sum(a[f"attn_t{k}"].item() for k in range(3)) == pytest.approx(1.0, abs=1e-5)
    b = one_step(training, first(training, "B"))
    assert torch.isfinite(b["loss"])


def test_ib_off_gives_no_kl_weight() -> None:
    training = make_training(make_spec(ib=False, cccp=False))
    d = training.d
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % NUM_CLASSES
    d.ib_mbm.train()
    terms = d(x, y, epoch=0, phase="A", stage=0, stage_epoch=0)
    assert float(terms["beta"]) == 0
    assert terms["loss"].item() == pytest.approx(terms["syn_ce"].item(), rel=1e-6)


def test_baseline_losses() -> None:
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % NUM_CLASSES
    for method in ("kd", "avg_kd", "dkd", "ce"):
        spec = make_spec(method=method, ce_alpha=0.4, kd_alpha=0.3, kd_ens_alpha=0.3, tau=2.0,
                         dkd={"alpha": 1.0, "beta": 2.0, "warmup_epochs": 0})
        teachers, student = make_models()
        d = ASIBDistiller(teachers, student, None, None, spec, kd_teacher=1).eval()
        terms = d(x, y, epoch=0, phase="B")
        s = student(x)
        with torch.no_grad():
            t = [m(x) for m in teachers]
        if method == "ce":
            expected = cross_entropy(s, y)
        elif method == "kd":
            expected = 0.4 * cross_entropy(s, y) + 0.6 * kd_loss_fn(s, t[1], 2.0)
        elif method == "avg_kd":
            expected = 0.4 * cross_entropy(s, y) + 0.6 * kd_loss_fn(s, (t[0] + t[1]) / 2, 2.0)
        else:
            expected = 0.4 * cross_entropy(s, y) + dkd_loss(s, (t[0] + t[1]) / 2, y, 1.0, 2.0, 2.0)
        assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-5), method


def test_student_freeze_level_holds_during_b_step() -> None:
    spec = make_spec(student_freeze_schedule=[0, -1])
    training = make_training(spec)
    d = training.d
    before = snapshot(d.student)
    one_step(training, first(training, "B"))
    after = snapshot(d.student)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("classifier.") for k in changed)


def test_partial_teacher_unfreeze_trains_teacher_blocks_in_a_step_only() -> None:
    spec = make_spec(teacher_freeze_schedule=[1, 1])
    training = make_training(spec)
    d = training.d
    before = [snapshot(t) for t in d.teachers]
    one_step(training, first(training, "A"))
    mid = [snapshot(t) for t in d.teachers]
    assert any(not same(a, b) for a, b in zip(before, mid, strict=True))
    for t in d.teachers:  # the teacher's own classifier is not on the synergy path
        assert all(not p.requires_grad for p in t.classifier.parameters())
    one_step(training, first(training, "B"))
    assert all(same(snapshot(t), m) for t, m in zip(d.teachers, mid, strict=True))


def test_state_dict_round_trip() -> None:
    training = make_training(make_spec())
    one_step(training, first(training, "A"))
    state = copy.deepcopy(training.state_dict())
    other = make_training(make_spec())
    other.load_state_dict(state)
    assert same(snapshot(other.d.ib_mbm), snapshot(training.d.ib_mbm))
    assert same(snapshot(other.d.student), snapshot(training.d.student))


def test_precision_knob_on_cpu() -> None:
    fp32, bf16 = make_runtime("cpu", precision="fp32"), make_runtime("cpu", precision="bf16")
    assert fp32.amp_dtype is None and fp32.inference_dtype is None
    assert bf16.amp_dtype == bf16.inference_dtype == torch.bfloat16
    with pytest.raises(RunError, match="precision must be"):
        make_runtime("cpu", precision="fp8")
    training = make_training(make_spec(), precision="bf16")  # bf16 autocast in both steps
    d = training.d
    for phase, module in (("A", d.synergy_head), ("B", d.student)):
        before = snapshot(module)
        terms = one_step(training, first(training, phase))
        assert all(torch.isfinite(v).all() for v in terms.values() if isinstance(v, torch.Tensor))
        after = snapshot(module)
        assert not same(after, before)
        assert all(v.dtype == before[k].dtype for k, v in after.items())  # weights stay fp32


def test_precision_on_a_cuda_device_without_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """No fp16 training without loss scaling: such a GPU trains in fp32, teachers run in fp16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "an old GPU")
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32  # make_runtime sets these globals
    try:
        auto = make_runtime("cuda")
        assert auto.amp_dtype is None and auto.inference_dtype == torch.float16
        fp32 = make_runtime("cuda", precision="fp32")
        assert fp32.amp_dtype is None and fp32.inference_dtype is None and not matmul.allow_tf32
        with pytest.raises(RunError, match="an old GPU has no bf16 support"):
            make_runtime("cuda", precision="bf16")
    finally:
        cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved
