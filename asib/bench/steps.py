"""The engine under test: its finetune, ASIB A-step and B-step and ``kd`` steps, each with the
loop's per-step metric sums, and ``compare_steps``, which times each against the fastest of
its bare twins (one per precision of the frozen teachers: fp32, and bf16 where the device has
it) and, with compile on, against the eager engine."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from asib.bench.bare import Bare, bare_a_step, bare_b_step, bare_finetune, bare_kd_step
from asib.bench.setting import Setting, model_copies, take_batches
from asib.bench.timing import BenchConfig, MemoryMeter, Step, Timing, count_syncs, measure, paired_ratio
from asib.data import Batch, InMemoryLoader
from asib.engine.inference import candidates
from asib.engine.loop import EpochPlan, MetricSums
from asib.engine.progress import Progress
from asib.engine.runtime import DTYPE_NAMES, Runtime, set_layout
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
    """One engine step against the fastest of its bare twins (and, with compile on, the eager engine).

    ``bare_teachers``: the frozen teachers' precision in the kept bare twin (None for a step
    without frozen teachers); ``bare_all``: every bare twin's timing by that precision.
    """

    name: str
    what: str
    engine: Timing
    bare: Timing
    eager: Timing | None = None
    syncs_per_step: int | None = None  # engine step's host-device synchronisations (CUDA only)
    bare_teachers: str | None = None
    bare_all: dict[str, Timing] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return paired_ratio(self.engine, self.bare)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"what": self.what, "engine": self.engine.figures(), "bare": self.bare.figures(),
                               "ratio": round(self.ratio, 4), "syncs_per_step": self.syncs_per_step,
                               "bare_teachers": self.bare_teachers,
                               "bare_by_teacher_precision": {k: t.figures() for k, t in self.bare_all.items()}}
        if self.eager is not None:
            out["compile"] = {
                "eager": self.eager.figures(),
                "speedup": round(paired_ratio(self.eager, self.engine), 4),
                "compile_s": round(max(0.0, self.engine.first_step - self.engine.seconds / self.engine.steps), 2),
            }
        return out


def bare_teacher_dtypes(runtime: Runtime) -> list[torch.dtype]:
    """The precisions the bare twins run their frozen teachers in: every one ``precision: auto``
    may choose from on this device (fp32, and bf16 or fp16 where it has them), else the forced one."""
    cands, _ = candidates(runtime)
    dtypes = list(dict.fromkeys(c.dtype for c in cands))
    return dtypes or [runtime.fixed_plan().dtype]


def compare_steps(setting: Setting, cfg: BenchConfig, meter: MemoryMeter, say: Callable[[str], None]) -> list[Comparison]:
    """Section 2 (and 4): every engine step against its bare twins, interleaved; the kept twin is
    the fastest (per frozen-teacher precision)."""
    recipe, runtime = setting.recipe, setting.runtime
    eager_rt = dataclasses.replace(runtime, compile=False) if runtime.compile else None
    dtypes = bare_teacher_dtypes(runtime)
    out: list[Comparison] = []

    def run(name: str, what: str, engine: Callable[[Runtime], Step], bares: dict[str, Step],
            batches: list[Batch]) -> None:
        say(f"measuring {name}")
        variants = {"engine": engine(runtime), **{f"bare {k}": step for k, step in bares.items()}}
        if eager_rt is not None:
            variants["eager"] = engine(eager_rt)
        t = measure(variants, batches, cfg, runtime.device, meter)
        syncs = count_syncs(variants["engine"], batches[0], runtime.device)
        timed = {k: t[f"bare {k}"] for k in bares}
        kept = min(timed, key=lambda k: timed[k].seconds)
        out.append(Comparison(name, what, t["engine"], timed[kept], t.get("eager"), syncs,
                              kept or None, timed if kept else {}))

    def per_dtype(make: Callable[[Bare], Step], frozen: bool = True) -> dict[str, Step]:
        """A bare twin per frozen-teacher precision (one, unnamed, for a step without frozen teachers)."""
        if not frozen:
            return {"": make(Bare(runtime))}
        return {DTYPE_NAMES.get(d, str(d)): make(Bare(runtime, d)) for d in dtypes}

    if setting.teachers:
        spec = recipe.teachers[0].train
        loader = setting.loader(spec.batch_size, spec.augment)
        batches = take_batches(loader, cfg.steps)
        run("finetune", f"CETask.step on {recipe.teachers[0].name}",
            lambda rt: engine_finetune(setting, rt, loader),
            per_dtype(lambda b: bare_finetune(bare_layout(copy.deepcopy(setting.teachers[0]), runtime), spec, b),
                      frozen=False), batches)
    if setting.student is None or not setting.teachers:
        return out
    loader = setting.loader(recipe.distill.batch_size, recipe.distill.augment)
    batches = take_batches(loader, cfg.steps)
    runtimes = [rt for rt in (runtime, eager_rt) if rt is not None]
    if len(setting.teachers) >= 2:
        tasks = {rt: distill_task(setting, rt, loader, "asib", *model_copies(setting)) for rt in runtimes}
        ref = tasks[runtime]
        phases = [(phase, ep) for phase in ("A", "B") if (ep := last_epoch(ref, phase)) is not None]
        # The twins' models are copied before any engine step prepares (or compiles) a model.
        bares = {phase: per_dtype(lambda b, phase=phase, ep=ep: _bare_asib(ref, ep, phase, recipe, b, runtime),
                                  frozen=phase == "B" or _any_frozen(ref, ep))
                 for phase, ep in phases}
        for phase, ep in phases:
            what = {"A": "fusion learns", "B": "the student learns"}[phase]
            run(f"asib {phase}-step", f"stage {ep.stage + 1} {phase}-step: {what}, {len(setting.teachers)} teachers",
                lambda rt, ep=ep: engine_step(tasks[rt], ep), bares[phase], batches)
    kd_spec = method_spec(recipe, "kd")
    kd_index = resolve_teacher(kd_spec.kd_teacher, [t.name for t in recipe.teachers])
    kd_tasks = {rt: distill_task(setting, rt, loader, "kd", *model_copies(setting)) for rt in runtimes}
    kd_ep = last_epoch(kd_tasks[runtime], "B")
    if kd_ep is None:
        return out

    def bare_kd(b: Bare) -> Step:
        student, teachers, _, _, _ = _twin(kd_tasks[runtime], kd_ep, runtime)
        return bare_kd_step(student, teachers[kd_index], kd_spec, kd_ep, b)

    kd_bares = per_dtype(bare_kd)
    run("kd step", f"method kd from {recipe.teachers[kd_index].name}; the bare loop forwards only that teacher",
        lambda rt: engine_step(kd_tasks[rt], kd_ep), kd_bares, batches)
    return out


def _bare_asib(task: DistillTask, ep: EpochPlan, phase: str, recipe: Recipe, bare: Bare, runtime: Runtime) -> Step:
    """The bare twin of an ASIB step, on its own copies of the engine's models."""
    student, teachers, fusion, ib, head = _twin(task, ep, runtime)
    if phase == "A":
        return bare_a_step(student, fusion or teachers, ib, head, recipe, ep, bare)
    return bare_b_step(student, teachers, ib, head, recipe, ep, bare, fusion)


def _any_frozen(task: DistillTask, ep: EpochPlan) -> bool:
    """Whether the A-step of ``ep`` runs a teacher with no block unfrozen (a frozen forward)."""
    task.begin_epoch(ep)
    m = task.m
    side = getattr(m, "fusion_teachers", None) or m.teachers
    return any(not any(p.requires_grad for p in t.parameters()) for t in side)


def bare_layout(model: nn.Module, runtime: Runtime) -> nn.Module:
    """A bare loop's model in the runtime's layout (the batch's), whatever a plan gave the original."""
    set_layout(model, runtime.channels_last)
    return model


def _twin(task: DistillTask, ep: EpochPlan, runtime: Runtime) -> tuple[
        nn.Module, list[nn.Module], list[nn.Module] | None, Any, Any]:
    """Copies of the engine's models as its ``begin_epoch`` leaves them for ``ep``: train/eval
    modes, frozen blocks and frozen norms included, so the bare loop computes the same:
    (student, teachers, the synergy path's adapted teachers or None, IB_MBM, synergy head),
    every one in the runtime's layout. Taken before the engine's first step (a prepared model
    may carry a compiled ``features``)."""
    task.begin_epoch(ep)
    m = task.m
    fusion = getattr(m, "fusion_teachers", None)
    return (bare_layout(copy.deepcopy(m.student), runtime),
            [bare_layout(copy.deepcopy(t), runtime) for t in m.teachers],
            [bare_layout(copy.deepcopy(t), runtime) for t in fusion] if fusion is not None else None,
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
