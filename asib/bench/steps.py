"""The engine under test: its finetune, ASIB A-step and B-step and ``kd`` steps, each with the
loop's per-step metric sums, and ``compare_steps``, which times each against its bare twin
(and, with compile on, the eager engine)."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from asib.bench.bare import Bare, bare_a_step, bare_b_step, bare_finetune, bare_kd_step
from asib.bench.setting import Setting, model_copies, take_batches
from asib.bench.timing import BenchConfig, MemoryMeter, Step, Timing, count_syncs, measure, paired_ratio
from asib.data import Batch, InMemoryLoader
from asib.engine.loop import EpochPlan, MetricSums
from asib.engine.progress import Progress
from asib.engine.runtime import Runtime
from asib.methods import build_method
from asib.methods.kd import resolve_teacher
from asib.pipeline.distill import DistillTask
from asib.pipeline.finetune import CETask
from asib.recipe import DistillSpec, Recipe, distill_for_method


def engine_step(task: Any, ep: EpochPlan) -> Step:
    """The loop's work per batch: the task's step, then the on-device metric sums."""
    task.begin_epoch(ep)
    sums = MetricSums()
    counter = itertools.count()

    def step(batch: Batch) -> None:
        sums.add(task.step(ep, batch), batch.y.shape[0], next(counter))

    return step


def noop(*_args: Any) -> None:
    """A progress callback that says nothing."""
    return None


def engine_finetune(setting: Setting, runtime: Runtime, loader: InMemoryLoader) -> Step:
    spec = setting.recipe.teachers[0].train
    model = copy.deepcopy(setting.teachers[0])
    task = CETask(model, spec, setting.split_loaders(loader), runtime, noop)
    return engine_step(task, task.plan()[0])


def method_spec(recipe: Recipe, method: str) -> DistillSpec:
    """The recipe's distill section as ``method`` reads it (another method's knobs left out)."""
    return DistillSpec.model_validate(distill_for_method(recipe.distill.model_dump(exclude_unset=True), method))


def distill_task(setting: Setting, runtime: Runtime, loader: InMemoryLoader, method: str,
                 teachers: list[nn.Module], student: nn.Module) -> DistillTask:
    spec = method_spec(setting.recipe, method)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = build_method(spec, teachers, student, [t.name for t in setting.recipe.teachers]).to(runtime.device)
    return DistillTask(m, setting.split_loaders(loader), runtime, noop, Progress(enabled=False))


def last_epoch(task: DistillTask, phase: str) -> EpochPlan | None:
    """The plan's last epoch of a phase: every term that can be on (CCCP from stage 2) is on."""
    eps = [ep for ep in task.plan() if ep.phase == phase]
    return eps[-1] if eps else None


# ------------------------------------------------------------------ each step against its twin


@dataclass
class Comparison:
    """One engine step against its bare twin (and, with compile on, the eager engine)."""

    name: str
    what: str
    engine: Timing
    bare: Timing
    eager: Timing | None = None
    syncs_per_step: int | None = None  # engine step's host-device synchronisations (CUDA only)

    @property
    def ratio(self) -> float:
        return paired_ratio(self.engine, self.bare)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"what": self.what, "engine": self.engine.figures(), "bare": self.bare.figures(),
                               "ratio": round(self.ratio, 4), "syncs_per_step": self.syncs_per_step}
        if self.eager is not None:
            out["compile"] = {
                "eager": self.eager.figures(),
                "speedup": round(paired_ratio(self.eager, self.engine), 4),
                "compile_s": round(max(0.0, self.engine.first_step - self.engine.seconds / self.engine.steps), 2),
            }
        return out


def compare_steps(setting: Setting, cfg: BenchConfig, meter: MemoryMeter, say: Callable[[str], None]) -> list[Comparison]:
    """Section 2 (and 4): every engine step against its bare twin, interleaved."""
    recipe, runtime, bare = setting.recipe, setting.runtime, Bare(setting.runtime)
    eager_rt = dataclasses.replace(runtime, compile=False) if runtime.compile else None
    out: list[Comparison] = []

    def run(name: str, what: str, engine: Callable[[Runtime], Step], bare_step: Step, batches: list[Batch]) -> None:
        say(f"measuring {name}")
        variants = {"engine": engine(runtime), "bare": bare_step}
        if eager_rt is not None:
            variants["eager"] = engine(eager_rt)
        t = measure(variants, batches, cfg, runtime.device, meter)
        syncs = count_syncs(variants["engine"], batches[0], runtime.device)
        out.append(Comparison(name, what, t["engine"], t["bare"], t.get("eager"), syncs))

    if setting.teachers:
        spec = recipe.teachers[0].train
        loader = setting.loader(spec.batch_size, spec.augment)
        batches = take_batches(loader, cfg.steps)
        run("finetune", f"CETask.step on {recipe.teachers[0].name}",
            lambda rt: engine_finetune(setting, rt, loader),
            bare_finetune(copy.deepcopy(setting.teachers[0]), spec, bare), batches)
    if setting.student is None or not setting.teachers:
        return out
    loader = setting.loader(recipe.distill.batch_size, recipe.distill.augment)
    batches = take_batches(loader, cfg.steps)
    runtimes = [rt for rt in (runtime, eager_rt) if rt is not None]
    if len(setting.teachers) >= 2:
        tasks = {rt: distill_task(setting, rt, loader, "asib", *model_copies(setting)) for rt in runtimes}
        ref = tasks[runtime]
        phases = [(phase, ep) for phase in ("A", "B") if (ep := last_epoch(ref, phase)) is not None]
        twins = {phase: _twin(ref, ep) for phase, ep in phases}  # before any engine step prepares a model
        for phase, ep in phases:
            student, teachers, fusion, ib, head = twins[phase]
            if phase == "A":
                bare_step = bare_a_step(student, fusion or teachers, ib, head, recipe, ep, bare)
            else:
                bare_step = bare_b_step(student, teachers, ib, head, recipe, ep, bare, fusion)
            what = {"A": "fusion learns", "B": "the student learns"}[phase]
            run(f"asib {phase}-step", f"stage {ep.stage + 1} {phase}-step: {what}, {len(setting.teachers)} teachers",
                lambda rt, ep=ep: engine_step(tasks[rt], ep), bare_step, batches)
    kd_spec = method_spec(recipe, "kd")
    kd_index = resolve_teacher(kd_spec.kd_teacher, [t.name for t in recipe.teachers])
    kd_tasks = {rt: distill_task(setting, rt, loader, "kd", *model_copies(setting)) for rt in runtimes}
    kd_ep = last_epoch(kd_tasks[runtime], "B")
    if kd_ep is None:
        return out
    student, teachers, _, _, _ = _twin(kd_tasks[runtime], kd_ep)
    run("kd step", f"method kd from {recipe.teachers[kd_index].name}; the bare loop forwards only that teacher",
        lambda rt: engine_step(kd_tasks[rt], kd_ep),
        bare_kd_step(student, teachers[kd_index], kd_spec, kd_ep, bare), batches)
    return out


def _twin(task: DistillTask, ep: EpochPlan) -> tuple[nn.Module, list[nn.Module], list[nn.Module] | None, Any, Any]:
    """Copies of the engine's models as its ``begin_epoch`` leaves them for ``ep``: train/eval
    modes, frozen blocks and frozen norms included, so the bare loop computes the same:
    (student, teachers, the synergy path's adapted teachers or None, IB_MBM, synergy head).
    Taken before the engine's first step (a prepared model may carry a compiled ``features``)."""
    task.begin_epoch(ep)
    m = task.m
    fusion = getattr(m, "fusion_teachers", None)
    return (copy.deepcopy(m.student), [copy.deepcopy(t) for t in m.teachers],
            [copy.deepcopy(t) for t in fusion] if fusion is not None else None,
            copy.deepcopy(getattr(m, "ib_mbm", None)), copy.deepcopy(getattr(m, "synergy_head", None)))


# ------------------------------------------------------------------ one student step of every method


def method_steps(setting: Setting, cfg: BenchConfig, meter: MemoryMeter, say: Callable[[str], None]) -> dict[str, Timing]:
    """Section 5: one student step of every registered method the recipe's teachers allow (and
    ASIB's teacher-side step), interleaved, so their relative costs are measured alike. Each
    method reads the recipe's distill section as it would run it (``asib distill --method``)."""
    from asib.methods import METHODS

    recipe = setting.recipe
    if setting.student is None:
        return {}
    loader = setting.loader(recipe.distill.batch_size, recipe.distill.augment)
    batches = take_batches(loader, cfg.steps)
    variants: dict[str, Step] = {}
    for name, cls in METHODS.items():
        if len(setting.teachers) < cls.min_teachers:
            continue
        task = distill_task(setting, setting.runtime, loader, name, *model_copies(setting))
        for phase in ("B", "A"):
            ep = last_epoch(task, phase)
            if ep is not None:
                variants[name if phase == "B" else f"{name} (teacher side)"] = engine_step(task, ep)
    say(f"measuring one step of {len(variants)} methods")
    return measure(variants, batches, cfg, setting.runtime.device, meter)
