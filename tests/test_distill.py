"""The distill task and the methods on tiny models: what each step may touch, that every
switch acts, and that methods compare like for like."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from asib.data import Batch, InMemoryLoader
from asib.engine.loaders import SplitLoaders
from asib.engine.loop import EpochPlan
from asib.engine.progress import Progress
from asib.engine.runtime import make_runtime
from asib.errors import RecipeError, RunError
from asib.methods import METHODS, build_method
from asib.methods.asib import ASIB
from asib.methods.losses import cross_entropy, dist_loss, dist_relations_to_distribution, dkd_loss, kd_loss_fn
from asib.models import create_model, synergy_target
from asib.pipeline.distill import DistillTask
from asib.recipe import DistillSpec, distill_for_method, method_keys

NUM_CLASSES = 5
BASE = {"num_stages": 2, "student_epochs": 1, "teacher_adapt_epochs": 1, "batch_size": 16,
        "ib_mbm": {"dim": 16, "heads": 2, "head_dropout": 0.0}}


def make_spec(**kw: object) -> DistillSpec:
    method = str(kw.get("method", "asib"))
    return DistillSpec.model_validate(distill_for_method({**BASE, **kw}, method))


def make_models(archs: tuple[str, ...] = ("resnet8", "vgg8")) -> tuple[list, torch.nn.Module]:
    torch.manual_seed(0)
    teachers = [create_model(a, NUM_CLASSES).eval() for a in archs]
    student = create_model("resnet8", NUM_CLASSES)
    return teachers, student


def make_loaders(n: int = 32, augment: object = None) -> SplitLoaders:
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=gen)
    labels = torch.arange(n) % NUM_CLASSES

    def loader(shuffle: bool, aug: object = None) -> InMemoryLoader:
        return InMemoryLoader(images, labels, batch_size=16, mean=[0.5] * 3, std=[0.25] * 3, augment=aug,  # type: ignore[arg-type]
                              shuffle=shuffle, seed=0, device="cpu", drop_last=False, num_classes=NUM_CLASSES)

    return SplitLoaders(info=None, train=loader(True, augment), val=loader(False), test=loader(False))  # type: ignore[arg-type]


def make_task(spec: DistillSpec, archs: tuple[str, ...] = ("resnet8", "vgg8"), precision: str = "auto",
              teacher_val: list[float] | None = None, **kw: object) -> DistillTask:
    teachers, student = make_models(archs)
    method = build_method(spec, teachers, student)
    return DistillTask(method, make_loaders(), make_runtime("cpu", precision=precision), lambda _epoch: None,
                       Progress(enabled=False), [50.0, 60.0] if teacher_val is None else teacher_val, **kw)  # type: ignore[arg-type]


def at(phase: str, stage: int = 0, phase_epoch: int = 0, stage_epoch: int = 0) -> EpochPlan:
    return EpochPlan(0, phase, stage, phase_epoch, stage_epoch)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_step(task: DistillTask, ep: EpochPlan) -> dict[str, torch.Tensor]:
    task.begin_epoch(ep)
    return task.step(ep, next(iter(task.batches(ep))))


def first(task: DistillTask, phase: str) -> EpochPlan:
    return next(ep for ep in task.plan() if ep.phase == phase)


XY = (torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(5)), torch.arange(8) % NUM_CLASSES)


# ---------------------------------------------------------------- the plan and the interface


def test_plan_orders_a_then_b_per_stage() -> None:
    task = make_task(make_spec(synergy_warmup_epochs=1, num_stages=2, student_epochs=[2, 1]))
    assert [(ep.phase, ep.stage) for ep in task.plan()] == [
        ("A", 0), ("A", 0), ("B", 0), ("B", 0), ("A", 1), ("B", 1)]
    baseline = make_task(make_spec(method="avg_kd", num_stages=2, student_epochs=[2, 1]))
    assert [ep.phase for ep in baseline.plan()] == ["B", "B", "B"]
    assert set(baseline.optimizers) == {"B"} and set(task.optimizers) == {"A", "B"}


def test_every_method_trains_through_the_task() -> None:
    for name in METHODS:
        task = make_task(make_spec(method=name))
        terms = one_step(task, first(task, "B"))
        assert torch.isfinite(terms["loss"]) and "train_acc" in terms, name


def test_a_plug_in_method_is_one_class_and_one_registration() -> None:
    """The extension point: a toy method defined here, registered, validated and trained."""
    from asib.methods import DistillMethod, register_method
    from asib.recipe import METHOD_DEFAULTS, METHOD_KEYS

    class Toy(DistillMethod):
        """CE plus the squared distance of the student's logits to the first teacher's."""

        name = "toy"
        min_teachers = 1
        keys = frozenset({"ce_alpha"})

        def forward(self, ep: EpochPlan, batch: Batch) -> dict[str, torch.Tensor | float]:
            s = self.student(batch.x).float()
            t = self.teacher_logits(batch.x, [0])[0].float()
            ce = cross_entropy(s, batch.y)
            mse = (s - t).square().mean()
            return {"loss": self.spec.ce_alpha * ce + mse, "ce": ce.detach(), "mse": mse.detach()}

    try:
        register_method(Toy, defaults={"ce_alpha": 0.5})
        spec = DistillSpec.model_validate({"method": "toy", "num_stages": 1, "student_epochs": 1})
        assert spec.ce_alpha == 0.5
        with pytest.raises(RecipeError, match="distill.tau: not used by method toy"):
            from asib.recipe import recipe_from_dict

            recipe_from_dict({"name": "x", "distill": {"method": "toy", "tau": 2.0}})
        task = make_task(spec)
        before = snapshot(task.m.student)
        terms = one_step(task, first(task, "B"))
        assert {"ce", "mse"} <= set(terms) and not same(before, snapshot(task.m.student))
    finally:
        METHODS.pop("toy", None)
        METHOD_KEYS.pop("toy", None)
        METHOD_DEFAULTS.pop("toy", None)


def test_too_few_teachers_is_a_recipe_error() -> None:
    teachers, student = make_models(("resnet8",))
    with pytest.raises(RecipeError, match="method asib needs at least 2 teachers"):
        build_method(make_spec(), teachers, student)


# ---------------------------------------------------------------- what each ASIB step touches


def test_a_step_changes_no_student_parameter() -> None:
    task = make_task(make_spec())
    d = task.m
    student, side = snapshot(d.student), snapshot(d.ib_mbm) | {f"h.{k}": v for k, v in snapshot(d.synergy_head).items()}
    teachers = [snapshot(t) for t in d.teachers]
    one_step(task, first(task, "A"))
    assert same(snapshot(d.student), student)  # weights and BN buffers, bitwise
    after = snapshot(d.ib_mbm) | {f"h.{k}": v for k, v in snapshot(d.synergy_head).items()}
    assert not same(after, side)
    assert all(same(snapshot(t), s) for t, s in zip(d.teachers, teachers, strict=True))  # frozen by default


def test_b_step_changes_no_teacher_side_parameter() -> None:
    task = make_task(make_spec())
    d = task.m
    one_step(task, first(task, "A"))
    student, ib, head = snapshot(d.student), snapshot(d.ib_mbm), snapshot(d.synergy_head)
    teachers = [snapshot(t) for t in d.teachers]
    terms = one_step(task, first(task, "B"))
    assert torch.isfinite(terms["loss"])
    assert same(snapshot(d.ib_mbm), ib) and same(snapshot(d.synergy_head), head)
    assert all(same(snapshot(t), s) for t, s in zip(d.teachers, teachers, strict=True))
    assert not same(snapshot(d.student), student)


def _a_grads(cccp: bool, head_shift: torch.Tensor) -> list[torch.Tensor]:
    """A-step gradients of the teacher side in stage 2 when only the student's logits change."""
    spec = make_spec(cccp=cccp, cccp_ramp_epochs=0)
    teachers, student = make_models()
    with torch.no_grad():
        student.classifier.bias.add_(head_shift)  # same features, different logits
    torch.manual_seed(3)
    d = build_method(spec, teachers, student).eval()
    d.ib_mbm.train()
    torch.manual_seed(4)  # same bottleneck noise in both calls
    terms = d(at("A", stage=1, phase_epoch=1), Batch(*XY))
    params = list(d.ib_mbm.parameters()) + list(d.synergy_head.parameters())
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
    d = build_method(spec, teachers, student)
    batch = Batch(XY[0][:4], XY[1][:4])
    warm = d(at("A", 0, 0, 0), batch)
    assert float(warm["beta"]) == 0 and float(warm["cccp_w"]) == 0
    stage1 = d(at("A", 0, 1, 1), batch)
    assert float(stage1["cccp_w"]) == 0 and float(stage1["beta"]) > 0
    stage2 = d(at("A", 1, 2, 0), batch)
    assert float(stage2["cccp_w"]) == pytest.approx(spec.kd_ens_alpha)


def test_synergy_gate_moves_the_weight_and_keeps_a_noise_margin() -> None:
    spec = make_spec(kd_alpha=0.2, kd_ens_alpha=0.5, ce_alpha=0.3)
    task = make_task(spec, teacher_val=[92.7, 95.0])  # the val split has 32 images
    d = task.m
    assert isinstance(d, ASIB)
    ep = first(task, "B")
    d.eval()
    d.student.train()
    d.gate_open = True
    torch.manual_seed(0)
    open_terms = d(at("B"), Batch(*XY))
    assert float(open_terms["kd_w"]) == pytest.approx(0.2) and float(open_terms["kd_ens_w"]) == pytest.approx(0.5)
    d.gate_open = False
    torch.manual_seed(0)
    closed = d(at("B"), Batch(*XY))
    assert float(closed["kd_w"]) == pytest.approx(0.7) and float(closed["kd_ens_w"]) == 0
    expected = 0.3 * closed["ce"] + 0.7 * closed["kd"]
    assert closed["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    # METHOD.md: closed only below the weakest teacher by more than two standard errors of the split
    margin = 200 * (0.927 * 0.073 / 32) ** 0.5  # 9.2 points on 32 images
    d.synergy_val = 92.7 - margin + 0.01
    d._set_gate(ep)
    assert d.gate_open is True  # within noise of the weakest teacher
    d.synergy_val = 92.7 - margin - 0.01
    d._set_gate(ep)
    assert d.gate_open is False
    ungated = make_task(make_spec(synergy_gate=False)).m
    ungated.synergy_val = 0.0
    ungated._set_gate(ep)
    assert ungated.gate_open is True


def test_synergy_target_mode_acts() -> None:
    values = {}
    for mode in ("noise_avg", "mu"):
        d = make_task(make_spec(synergy_target=mode, ib_mbm={"dim": 16, "heads": 2, "logvar_clamp": 3})).m
        with torch.no_grad():
            d.ib_mbm.logvar_proj.bias.fill_(3.0)  # a wide bottleneck, so the average differs from G(mu)
        d.eval()
        torch.manual_seed(0)
        values[mode] = d(at("B"), Batch(*XY))["kd_ens"].item()
    assert values["noise_avg"] != pytest.approx(values["mu"], rel=1e-3)


def test_disagreement_weights_reach_the_b_step() -> None:
    d = make_task(make_spec(disagreement="any_wrong", lambda_high=2.0)).m.eval()
    x, y = torch.randn(16, 3, 8, 8), torch.arange(16) % NUM_CLASSES
    terms = d(at("B"), Batch(x, y))
    assert 0 < terms["weighted_share"].item() <= 1  # untrained teachers are wrong somewhere
    none = make_task(make_spec(disagreement="none")).m.eval()
    assert none(at("B"), Batch(x, y))["weighted_share"].item() == 0


def test_mixed_batches_use_mixed_targets_in_both_steps() -> None:
    """MixUp/CutMix: the A-step's CE and the disagreement weights follow the mixed targets."""
    d = make_task(make_spec(disagreement="any_wrong", ib=False, cccp=False)).m.eval()
    x, y = XY
    y2 = (y + 1) % NUM_CLASSES
    a = d(at("A"), Batch(x, y, y2, 0.3))
    with torch.no_grad():
        g = d.synergy_logits(x)
    mixed = 0.3 * cross_entropy(g, y, 0.1) + 0.7 * cross_entropy(g, y2, 0.1)
    assert a["syn_ce"].item() == pytest.approx(mixed.item(), rel=1e-5)
    # correctness is judged against the label that carries most of the target (y2 at lam 0.3)
    with torch.no_grad():
        t_logits = [t(x) for t in d.teachers]
    wrong_y2 = torch.stack([t.argmax(1) != y2 for t in t_logits]).any(0).float().mean()
    b = d(at("B"), Batch(x, y, y2, 0.3))
    assert b["weighted_share"].item() == pytest.approx(wrong_y2.item())


def test_synergy_kd_alpha_teaches_the_head_the_teachers_soft_predictions() -> None:
    d = make_task(make_spec(ib=False, cccp=False, synergy_kd_alpha=0.5, tau=2.0)).m
    d.ib_mbm.train()
    terms = d(at("A"), Batch(*XY))
    with torch.no_grad():
        g = d.synergy_logits(XY[0])
        t_bar = sum(t(XY[0]) for t in d.teachers) / 2
    assert terms["syn_kd"].item() == pytest.approx(kd_loss_fn(g, t_bar, 2.0).item(), rel=1e-4)
    assert terms["loss"].item() == pytest.approx((terms["syn_ce"] + 0.5 * terms["syn_kd"]).item(), rel=1e-5)
    off = make_task(make_spec(ib=False, cccp=False, synergy_kd_alpha=0.0)).m
    off.ib_mbm.train()
    assert off(at("A"), Batch(*XY))["syn_kd"].item() == 0



def test_kd_loss_dist_puts_dist_relations_in_both_b_step_terms() -> None:
    """``kd_loss: dist``: the teacher-average and synergy terms are DIST's relations at tau."""
    spec = make_spec(kd_loss="dist", tau=2.0, ce_alpha=1.0, kd_alpha=0.4, kd_ens_alpha=0.6, disagreement="none")
    d = make_task(spec).m.eval()
    d.student.train()
    torch.manual_seed(0)
    terms = d(at("B"), Batch(*XY))
    x, y = XY
    with torch.no_grad():
        t_bar = sum(t(x) for t in d.teachers) / 2
        s = d.student(x)
        torch.manual_seed(0)  # the bottleneck's noise of the synergy target, drawn as the B-step draws it
        out = d.ib_mbm(d.student.features(x), [t.features(x) for t in d.teachers])
        q = synergy_target(d.ib_mbm, d.synergy_head, out, 2.0, spec.ib_target_samples)
    assert terms["kd"].item() == pytest.approx(dist_loss(s, t_bar, 2.0).item(), rel=1e-4)
    ens = 4.0 * sum(dist_relations_to_distribution(s, q, 2.0))
    assert terms["kd_ens"].item() == pytest.approx(float(ens), rel=1e-4)
    expected = cross_entropy(s, y) + 0.4 * terms["kd"] + 0.6 * terms["kd_ens"]
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    kl = make_task(make_spec(tau=2.0, disagreement="none", kd_loss="kl")).m.eval()
    kl.student.train()
    assert kl(at("B"), Batch(*XY))["kd"].item() == pytest.approx(kd_loss_fn(s, t_bar, 2.0).item(), rel=1e-4)
    assert "kd_loss" in method_keys("asib") and "kd_loss" not in method_keys("dist")  # asib's knob alone


def test_three_teachers_of_different_widths() -> None:
    task = make_task(make_spec(), archs=("resnet8", "vgg8", "wrn_16_1"))
    assert len({t.feature_dim for t in task.m.teachers}) >= 2
    a = one_step(task, first(task, "A"))
    assert {"attn_t0", "attn_t1", "attn_t2"} <= set(a)
    assert sum(a[f"attn_t{k}"].item() for k in range(3)) == pytest.approx(1.0, abs=1e-5)
    assert torch.isfinite(one_step(task, first(task, "B"))["loss"])


def test_ib_off_gives_no_kl_weight() -> None:
    d = make_task(make_spec(ib=False, cccp=False, synergy_kd_alpha=0.0)).m
    d.ib_mbm.train()
    terms = d(at("A"), Batch(*XY))
    assert float(terms["beta"]) == 0
    assert terms["loss"].item() == pytest.approx(terms["syn_ce"].item(), rel=1e-6)


def test_baseline_losses() -> None:
    x, y = XY
    for method in ("kd", "avg_kd", "dkd", "ce"):
        spec = make_spec(method=method, ce_alpha=0.4, kd_alpha=0.6, tau=2.0, kd_teacher=1,
                         dkd={"alpha": 1.0, "beta": 2.0, "warmup_epochs": 0})
        teachers, student = make_models()
        d = build_method(spec, teachers, student).eval()
        terms = d(at("B"), Batch(x, y))
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


def test_method_defaults() -> None:
    """kd and avg_kd put 0.7 on KD (ASIB's whole KD budget); DKD its paper's defaults."""
    assert make_spec(method="avg_kd").kd_alpha == 0.7 and make_spec(method="kd").kd_alpha == 0.7
    dkd = make_spec(method="dkd")
    assert (dkd.ce_alpha, dkd.tau, dkd.dkd.alpha, dkd.dkd.beta) == (1.0, 4.0, 1.0, 8.0)


# ---------------------------------------------------------------- freezing


def test_student_freeze_level_holds_during_b_step() -> None:
    task = make_task(make_spec(student_freeze_schedule=[0, -1]))
    before = snapshot(task.m.student)
    one_step(task, first(task, "B"))
    after = snapshot(task.m.student)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("classifier.") for k in changed)


def test_pretrained_student_gets_the_default_freeze_schedule() -> None:
    spec = make_spec(num_stages=4)
    assert make_task(spec, student_pretrained=True).student_levels == [-1, 2, 1, 0]
    assert make_task(spec).student_levels == [-1, -1, -1, -1]


def test_unfrozen_teacher_blocks_train_copies_on_the_synergy_path_only() -> None:
    task = make_task(make_spec(teacher_freeze_schedule=[1, 1]))
    d = task.m
    assert isinstance(d, ASIB) and d.fusion_teachers is not None
    originals = [snapshot(t) for t in d.teachers]
    copies = [snapshot(t) for t in d.fusion_teachers]
    one_step(task, first(task, "A"))
    assert any(not same(a, snapshot(b)) for a, b in zip(copies, d.fusion_teachers, strict=True))
    assert all(same(a, snapshot(b)) for a, b in zip(originals, d.teachers, strict=True))  # t_bar's teachers
    for t in d.fusion_teachers:  # the teacher's own classifier is not on the synergy path
        assert all(not p.requires_grad for p in t.classifier.parameters())
    mid = [snapshot(t) for t in d.fusion_teachers]
    one_step(task, first(task, "B"))
    assert all(same(snapshot(t), m) for t, m in zip(d.fusion_teachers, mid, strict=True))


# ---------------------------------------------------------------- like for like


def test_every_method_starts_from_the_same_student_and_batches(tmp_path: Path) -> None:
    """At one seed: the same initial student weights and the same first student epoch."""
    from asib.pipeline.distill import build_models
    from asib.recipe import recipe_from_dict

    teachers, _ = make_models()
    from asib.engine.checkpoint import save_model

    paths = []
    for k, t in enumerate(teachers):
        paths.append(save_model(tmp_path / f"t{k}.safetensors", t, "teacher"))
    runtime = make_runtime("cpu")
    students, streams = {}, {}
    for name in METHODS:
        recipe = recipe_from_dict({
            "name": "pair", "seed": 3, "student": {"arch": "resnet8"},
            "teachers": [{"name": f"t{k}", "arch": a, "checkpoint": str(p)}
                         for k, (a, p) in enumerate(zip(("resnet8", "vgg8"), paths, strict=True))],
            "distill": distill_for_method({**BASE, "synergy_warmup_epochs": 1}, name),
        })
        torch.manual_seed(123)  # whatever ran before
        method, _ = build_models(recipe, NUM_CLASSES, runtime)
        students[name] = snapshot(method.student)
        task = DistillTask(method, make_loaders(augment=recipe.distill.augment), runtime, lambda _e: None,
                           Progress(enabled=False))
        ep = first(task, "B")
        streams[name] = [(b.y.clone(), b.x.clone()) for b in task.batches(ep)]
    ref = students["ce"]
    assert all(same(s, ref) for s in students.values())
    for name, batches in streams.items():
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                   for a, b in zip(batches, streams["ce"], strict=True)), name


def test_teacher_side_epochs_draw_their_own_stream() -> None:
    task = make_task(make_spec())
    a = next(iter(task.batches(first(task, "A"))))
    b = next(iter(task.batches(first(task, "B"))))
    assert not torch.equal(a.y, b.y)


# ---------------------------------------------------------------- resume and precision


def test_state_dict_round_trip() -> None:
    task = make_task(make_spec(teacher_freeze_schedule=[1, 1]))
    one_step(task, first(task, "A"))
    task.m.gate_log = [False]
    state = copy.deepcopy(task.state_dict())
    other = make_task(make_spec(teacher_freeze_schedule=[1, 1]))
    other.load_state_dict(state)
    assert same(snapshot(other.m.ib_mbm), snapshot(task.m.ib_mbm))
    assert same(snapshot(other.m.student), snapshot(task.m.student))
    assert same(snapshot(other.m.fusion_teachers), snapshot(task.m.fusion_teachers))
    assert other.m.gate_log == [False]


def test_precision_knob_on_cpu() -> None:
    fp32, bf16 = make_runtime("cpu", precision="fp32"), make_runtime("cpu", precision="bf16")
    assert fp32.amp_dtype is None and fp32.inference_dtype is None
    assert bf16.amp_dtype == bf16.inference_dtype == torch.bfloat16
    with pytest.raises(RunError, match="precision must be"):
        make_runtime("cpu", precision="fp8")
    task = make_task(make_spec(), precision="bf16")  # bf16 autocast in both steps
    d = task.m
    for phase, module in (("A", d.synergy_head), ("B", d.student)):
        before = snapshot(module)
        terms = one_step(task, first(task, phase))
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
