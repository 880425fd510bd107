"""Where a step's time goes: data, every teacher's forward, student forward(+backward), the
fusion modules and the optimizer, each timed on its own (ms per batch)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from asib.bench.bare import bare_ce, bare_optimizer
from asib.bench.setting import Setting, endless, model_copies, take_batches
from asib.bench.steps import distill_task, last_epoch
from asib.bench.timing import BenchConfig, MemoryMeter, Step, Timing, measure
from asib.data import Batch, InMemoryLoader
from asib.engine.runtime import Runtime, as_layout, precision_autocast
from asib.methods.asib import ASIB
from asib.methods.base import frozen_outputs


def breakdown(setting: Setting, cfg: BenchConfig, meter: MemoryMeter) -> dict[str, dict[str, float]]:
    """Section 3: where a step's time goes, each part timed on its own (ms per batch)."""
    recipe, runtime = setting.recipe, setting.runtime
    out: dict[str, dict[str, float]] = {}
    if setting.teachers:
        spec = recipe.teachers[0].train
        loader = setting.loader(spec.batch_size, spec.augment)
        model = copy.deepcopy(setting.teachers[0]).train()
        runtime.prepare(model)
        opt = bare_optimizer(model.parameters(), spec.optim)
        parts = {"data": _data_part(loader), "model forward+backward": _fwd_bwd(model, runtime, spec.label_smoothing),
                 "optimizer": _opt_step(opt)}
        out["finetune"] = _ms(measure(parts, take_batches(loader, cfg.steps), cfg, runtime.device, meter))
    if setting.student is None or len(setting.teachers) < 2:
        return out
    loader = setting.loader(recipe.distill.batch_size, recipe.distill.augment)
    batches = take_batches(loader, cfg.steps)
    task = distill_task(setting, runtime, loader, "asib", *model_copies(setting))
    d = task.m
    assert isinstance(d, ASIB)
    runtime.prepare(*d.models())
    for phase in ("A", "B"):
        ep = last_epoch(task, phase)
        if ep is None:
            continue
        task.begin_epoch(ep)
        with torch.no_grad(), runtime.autocast(), runtime.inference_precision():
            feats, logits = frozen_outputs(d.synergy_teachers, batches[0].x)
            h_s = d.student.features(batches[0].x)
            base = d.synergy_base(logits)
        feats = [f.clone() for f in feats]  # inference tensors cannot be saved for the fusion's backward
        base = None if base is None else base.clone()
        parts: dict[str, Step] = {"data": _data_part(loader)}
        for spec_t, t in zip(recipe.teachers, d.synergy_teachers, strict=True):
            if phase == "A" and any(p.requires_grad for p in t.parameters()):
                parts[f"teacher {spec_t.name} forward+backward (unfrozen blocks)"] = _teacher_train(t, runtime)
                continue
            parts[f"teacher {spec_t.name} forward"] = _teacher_fwd(t, runtime)
            if runtime.plan_of(t).dtype != torch.float32:
                parts[f"teacher {spec_t.name} forward, fp32 (reference)"] = _teacher_fp32(t, runtime)
        if phase == "A":
            parts["student forward (no grad)"] = _student_fwd(d.student, runtime)
            parts["fusion forward+backward"] = _fusion_a(d, h_s, feats, base, runtime)
            parts["optimizer (teacher side)"] = _opt_step(task.optimizers["A"], task.schedulers["A"])
        else:
            parts["student forward+backward"] = _fwd_bwd(d.student, runtime, recipe.distill.label_smoothing)
            parts["fusion forward + synergy target"] = _fusion_b(d, h_s, feats, base, runtime)
            parts["optimizer (student)"] = _opt_step(task.optimizers["B"], task.schedulers["B"])
        out[f"asib {phase}-step"] = _ms(measure(parts, batches, cfg, runtime.device, meter))
    return out


def _data_part(loader: InMemoryLoader) -> Step:
    batches = endless(loader)
    return lambda _batch: next(batches)


def _ms(timings: dict[str, Timing]) -> dict[str, float]:
    return {name: round(t.ms_per_step, 3) for name, t in timings.items()}


def _fwd_bwd(model: nn.Module, runtime: Runtime, smoothing: float) -> Step:
    def step(batch: Batch) -> None:
        model.zero_grad(set_to_none=True)
        with runtime.autocast():
            logits = model(batch.x)
        bare_ce(logits.float(), batch, smoothing).backward()

    return step


def _opt_step(opt: torch.optim.Optimizer, sched: Any = None) -> Step:
    """optimizer.step (+ schedule step) on the gradients the last backward left."""

    def step(_batch: Batch) -> None:
        opt.step()
        if sched is not None:
            sched.step()

    return step


def _teacher_fwd(teacher: nn.Module, runtime: Runtime) -> Step:
    """A frozen teacher's forward as the engine runs it (its inference plan: precision, layout)."""

    def step(batch: Batch) -> None:
        with torch.inference_mode(), runtime.autocast(), runtime.inference_precision():
            frozen_outputs([teacher], batch.x)

    return step


def _teacher_fp32(teacher: nn.Module, runtime: Runtime) -> Step:
    """The same forward in fp32, in the teacher's layout: what a reduced precision is measured against."""
    channels_last = runtime.plan_of(teacher).channels_last

    def step(batch: Batch) -> None:
        with torch.inference_mode(), precision_autocast(torch.float32, runtime.device):
            teacher.head(teacher.features(as_layout(batch.x, channels_last)))

    return step


def _teacher_train(teacher: nn.Module, runtime: Runtime) -> Step:
    """A partly unfrozen teacher in the A-step: forward with gradients, backward into its open blocks."""

    def step(batch: Batch) -> None:
        teacher.zero_grad(set_to_none=True)
        with runtime.autocast():
            h = teacher.features(batch.x)
        h.float().square().mean().backward()

    return step


def _student_fwd(student: nn.Module, runtime: Runtime) -> Step:
    def step(batch: Batch) -> None:
        with torch.no_grad(), runtime.autocast():
            student.head(student.features(batch.x))

    return step


def _fusion_a(d: ASIB, h_s: torch.Tensor, feats: list[torch.Tensor], base: torch.Tensor | None,
              runtime: Runtime) -> Step:
    """IB_MBM + synergy head forward, CE + KL, backward: the A-step's trainable part."""
    from asib.methods.losses import cross_entropy, ib_kl

    def step(batch: Batch) -> None:
        d.ib_mbm.zero_grad(set_to_none=True)
        d.synergy_head.zero_grad(set_to_none=True)
        with runtime.autocast():
            out = d.ib_mbm(h_s, feats)
            g = d.synergy_head(out.z, base).float()
        (cross_entropy(g, batch.y) + d.spec.ib_beta * ib_kl(out.mu, out.logvar)).backward()

    return step


def _fusion_b(d: ASIB, h_s: torch.Tensor, feats: list[torch.Tensor], base: torch.Tensor | None,
              runtime: Runtime) -> Step:
    """IB_MBM forward and the noise-averaged synergy target, without gradients."""
    from asib.models import synergy_target

    spec = d.spec

    def step(_batch: Batch) -> None:
        with torch.no_grad(), runtime.autocast():
            out = d.ib_mbm(h_s, feats)
            synergy_target(d.ib_mbm, d.synergy_head, out, spec.tau, spec.ib_target_samples, mode=spec.synergy_target,
                           base=base)

    return step
