"""The ``distill`` step: any method's stages on the one training loop, and its run folder.

``DistillTask`` is the same for every method: per stage, the method's teacher-side epochs
(ASIB's A-steps; none for the baselines), then the student's epochs; student freezing,
validation, best-on-val checkpoints and the train state. The method (``asib.methods``)
supplies what trains and the loss of one step.

Like for like: at one seed, every method starts from the same student weights (built under
a seed stream of their own, whatever was loaded before) and its n-th student epoch sees the
same batches and augmentations (stream 0 of the loader; teacher-side epochs draw stream 1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asib.data import Batch
from asib.engine.checkpoint import checkpoint_extras, load_model, read_info, save_model
from asib.engine.distributed import convert_sync_bn, init_distributed, route
from asib.engine.loaders import SplitLoaders, split_loaders
from asib.engine.loop import EpochPlan, LoopConfig, run_plan
from asib.engine.metrics import evaluate_predictor, top1_of
from asib.engine.optim import build_optimizer, build_scheduler
from asib.engine.progress import Progress
from asib.engine.runfolder import RunFolder
from asib.engine.runtime import Runtime, make_runtime, seeded, set_random_seed
from asib.errors import CheckpointError, RecipeError, clip
from asib.methods import Artifacts, DistillMethod, RunContext, build_method, method_class
from asib.models import apply_freeze_level, model_from_spec, setup_partial_freeze_schedule
from asib.recipe import Recipe

# Data streams of the train loader (see InMemoryLoader.batches).
STUDENT_STREAM, TEACHER_SIDE_STREAM = 0, 1


@dataclass
class DistillResult:
    run_dir: Path
    method: str
    teacher_names: list[str]
    teacher_test_top1: list[float]
    synergy_test_top1: float | None
    student_val_top1: float | None
    student_test_top1: float
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)
    finished_before: bool = False  # --resume found the run finished: nothing ran (figures: ``summary``)

    def table_lines(self) -> list[str]:
        rows = [(f"teacher {n}", acc) for n, acc in zip(self.teacher_names, self.teacher_test_top1, strict=True)]
        if self.synergy_test_top1 is not None:
            rows.append(("synergy (fused teachers)", self.synergy_test_top1))
        rows.append((f"student ({self.method})", self.student_test_top1))
        width = max(len(r[0]) for r in rows)
        lines = [f"{'model'.ljust(width)}  test top-1"]
        lines += [f"{name.ljust(width)}  {acc:9.2f}" for name, acc in rows]
        lines.append(f"run folder: {self.run_dir} ({self.seconds:.1f}s)")
        return lines


# ------------------------------------------------------------------ models


def load_teachers(recipe: Recipe, num_classes: int, device: torch.device) -> tuple[list[nn.Module], list[Path]]:
    """Every teacher from the checkpoint finetune-teacher wrote; kind and class count checked."""
    models, paths = [], []
    for i, teacher in enumerate(recipe.teachers):
        path = recipe.teacher_checkpoint(teacher)
        if not path.exists():
            raise CheckpointError(
                f"teachers[{i}] ({teacher.name}): no checkpoint at {path}",
                hint=f"run `asib finetune-teacher RECIPE --teacher {teacher.name}` first",
            )
        info = read_info(path)
        if info.kind != "teacher":
            raise CheckpointError(f"teachers[{i}] ({teacher.name}): {path} is a {info.kind} checkpoint, not a teacher")
        if info.num_classes != num_classes:
            raise CheckpointError(
                f"teachers[{i}] ({teacher.name}): trained on {info.num_classes} classes but the data has {num_classes}"
            )
        if info.arch != teacher.arch:
            raise CheckpointError(
                f"teachers[{i}] ({teacher.name}): {path} holds a {clip(info.arch, 100)}, but the recipe's teacher"
                f" is a {teacher.arch}",
                hint=f"point teachers[{i}].checkpoint at a {teacher.arch} checkpoint, or set teachers[{i}].arch"
                f" to {clip(info.arch, 100)}",
            )
        model, _ = load_model(path, kinds=("teacher",), device=device)
        models.append(model)
        paths.append(path)
    return models, paths


def check_distill_recipe(recipe: Recipe) -> None:
    """What the distill step needs of a recipe beyond its schema: a student, enough teachers."""
    if recipe.student is None:
        raise RecipeError(["student: the distill step needs a student section"])
    cls = method_class(recipe.distill.method)
    if len(recipe.teachers) < cls.min_teachers:
        raise RecipeError([
            f"teachers: method {cls.name} needs at least {cls.min_teachers} teachers; the recipe has {len(recipe.teachers)}"
        ])


def build_models(
    recipe: Recipe, num_classes: int, runtime: Runtime
) -> tuple[DistillMethod, list[Path]]:
    """The student, the teachers and the method, built so that the method does not change the student.

    The student is built under the seed stream ``"student"`` and the method's own modules under
    ``"method"``; loading teachers leaves the global generator alone. So at one seed every
    method starts from the same student and the training step's random stream starts at the
    same place.
    """
    assert recipe.student is not None
    cls = method_class(recipe.distill.method)
    with seeded(recipe.seed, "student"):
        student = model_from_spec(recipe.student, num_classes)
    teachers: list[nn.Module] = []
    paths: list[Path] = []
    if cls.uses_teachers:
        with torch.random.fork_rng(devices=[]):
            teachers, paths = load_teachers(recipe, num_classes, runtime.device)
    with seeded(recipe.seed, "method"):
        method = build_method(recipe.distill, teachers, runtime.to_device(student), [t.name for t in recipe.teachers])
    return method.to(runtime.device), paths


# ------------------------------------------------------------------ the plan on the loop


class DistillTask:
    """The distill plan for the loop: per stage, the method's teacher-side (A) epochs, then
    the student's (B) epochs; student freezing, validation and best-on-val checkpoints."""

    def __init__(
        self,
        method: DistillMethod,
        loaders: SplitLoaders,
        runtime: Runtime,
        save_best: Callable[[int], None],
        progress: Progress,
        teacher_val: list[float] | None = None,
        student_pretrained: bool = False,
        routed: Any = None,
    ) -> None:
        self.m, self.loaders, self.runtime, self.progress = method, loaders, runtime, progress
        self.routed = routed if routed is not None else method  # under torchrun: the DDP route to the method
        self.spec = spec = method.spec
        self.save_best = save_best
        self.student_levels, _ = setup_partial_freeze_schedule(spec, spec.num_stages, student_pretrained)
        steps = len(loaders.train)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = {}
        for phase, (modules, optim_spec) in method.optim_groups().items():
            self.optimizers[phase] = opt = build_optimizer(modules, optim_spec)
            self.schedulers[phase] = build_scheduler(opt, optim_spec, steps, max(1, self.phase_epochs(phase)))
        self.best_val: float | None = None
        self.best_epoch = 0
        method.bind(RunContext(runtime, list(teacher_val or []), loaders.val, progress.line))

    def phase_epochs(self, phase: str) -> int:
        return sum(1 for ep in self.plan() if ep.phase == phase)

    # -------------------------------------------------------------- the plan

    def plan(self) -> list[EpochPlan]:
        plan: list[EpochPlan] = []
        count = {"A": 0, "B": 0}
        for stage, b_epochs in enumerate(self.spec.stage_epochs()):
            for phase, n in (("A", self.m.a_epochs(stage)), ("B", b_epochs)):
                for e in range(n):
                    plan.append(EpochPlan(len(plan), phase, stage, count[phase], e))
                    count[phase] += 1
        return plan

    def steps(self, ep: EpochPlan) -> int:
        return len(self.loaders.train)

    def batches(self, ep: EpochPlan, start: int = 0) -> Iterator[Batch]:
        """The student's n-th epoch is epoch n of stream 0 for every method."""
        stream = STUDENT_STREAM if ep.phase == "B" else TEACHER_SIDE_STREAM
        return self.loaders.train.batches(ep.phase_epoch, start, stream=stream)

    def begin_epoch(self, ep: EpochPlan) -> None:
        apply_freeze_level(self.m.student, self.student_levels[ep.stage])
        self.m.begin_epoch(ep)

    def step(self, ep: EpochPlan, batch: Batch) -> dict[str, torch.Tensor | float]:
        self.runtime.prepare(*self.m.models())  # channels_last / torch.compile, once
        with self.runtime.autocast(), self.runtime.inference_precision():
            terms = self.routed(ep, batch)
        opt = self.optimizers[ep.phase]
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        self.schedulers[ep.phase].step()
        terms["loss"] = terms["loss"].detach()
        return terms

    # -------------------------------------------------------------- validation

    def _predict_student(self, x: torch.Tensor) -> torch.Tensor:
        with self.runtime.autocast():
            return self.m.student(x)

    def end_epoch(self, ep: EpochPlan, record: dict[str, Any]) -> dict[str, Any]:
        lr = self.schedulers[ep.phase].get_last_lr()[0]
        out: dict[str, Any] = {"lr" if ep.phase == "B" else "lr_teacher_side": lr}
        out.update(self.m.end_epoch(ep, record))
        if ep.phase != "B":
            return out
        val = self.loaders.val
        if val is None:  # no validation split: the last epoch is the selected one
            self.best_epoch = ep.index + 1
            self.save_best(ep.index + 1)
            return out
        student = self.m.student
        was_training = student.training
        student.eval()
        acc = round(top1_of(self._predict_student, val.batches(0)), 4)
        student.train(was_training)
        out["student_val_top1"] = acc
        if self.best_val is None or acc > self.best_val:
            self.best_val, self.best_epoch = acc, ep.index + 1
            self.save_best(ep.index + 1)
        return out

    # -------------------------------------------------------------- resume

    def state_dict(self) -> dict[str, Any]:
        return {
            "modules": {name: m.state_dict() for name, m in self.m.trained_modules().items()},
            "optimizers": {phase: opt.state_dict() for phase, opt in self.optimizers.items()},
            "schedulers": {phase: s.state_dict() for phase, s in self.schedulers.items()},
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "method": self.m.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, module in self.m.trained_modules().items():
            module.load_state_dict(state["modules"][name])
        for phase, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][phase])
            self.schedulers[phase].load_state_dict(state["schedulers"][phase])
        self.best_val, self.best_epoch = state["best_val"], state["best_epoch"]
        self.m.load_extra_state(state["method"])


# ------------------------------------------------------------------ the step


def distill(
    recipe: Recipe,
    *,
    force: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
    loop: LoopConfig | None = None,
    run_dir: str | Path | None = None,
    notice: Callable[[str], None] | None = None,
) -> DistillResult:
    """Run the recipe's distill section; write the student, the method's artifacts and the summary.

    ``run_dir`` (default: the recipe's run folder) receives this run only; the teachers are
    always read from the recipe's checkpoint paths, so sweeps can share them. With ``resume``
    a run without a train state starts from the beginning and a finished run is left as it
    is (``finished_before``); ``notice`` (default: the progress lines) hears which.
    """
    from asib.data import load_info

    progress = progress or Progress()
    spec = recipe.distill
    check_distill_recipe(recipe)
    assert recipe.student is not None
    cls = method_class(spec.method)
    folder = RunFolder(run_dir or recipe.run_dir, ("student.safetensors", *cls.artifact_names))
    status = folder.check(force=force, resume=resume, recipe_yaml=recipe.to_yaml())
    if status == "done":
        (notice or progress.line)(f"{folder.path}: the run has finished; nothing to resume")
        summary = folder.summary()
        nan = float("nan")
        return DistillResult(folder.path, spec.method, [], [], None, None, nan, nan, summary,
                             finished_before=True)
    if status == "restart":
        (notice or progress.line)(f"{folder.path}: no train state to resume; starting the run from the beginning")
    force, resume = force or status == "restart", status == "resume"
    info = load_info(recipe.data_dir)
    dist = init_distributed(recipe.device)  # under torchrun: rank 0 alone prints and writes
    folder.writer, progress = dist.is_main, progress if dist.is_main else Progress(enabled=False)
    batch_size = dist.per_rank_batch(spec.batch_size, "distill.batch_size")
    set_random_seed(recipe.seed, recipe.deterministic)
    runtime = make_runtime(recipe.device, recipe.deterministic, recipe.compile, recipe.precision)
    method, teacher_paths = build_models(recipe, info.num_classes, runtime)
    convert_sync_bn(method, dist, recipe.sync_bn)  # in place: student, teachers, fusion
    loaders = split_loaders(recipe.data_dir, runtime, batch_size, spec.eval_batch_size, spec.augment, recipe.seed,
                            dist.rank, dist.world_size)

    teacher_val, teacher_test = teacher_figures(list(method.teachers), loaders, runtime)
    student_path = folder.path / "student.safetensors"
    extras = checkpoint_extras(recipe, loaders.info)

    def save_best(epoch: int) -> None:
        if not dist.is_main:
            return
        save_model(student_path, method.student, "student", {**extras, "epoch": epoch, "method": spec.method})
        method.save_artifacts(Artifacts(folder.path, student_path, teacher_paths, epoch))

    # The step calls the method: under torchrun through DDP (asib.engine.distributed).
    routed = route(method, dist, find_unused_parameters=True)
    task = DistillTask(method, loaders, runtime, save_best, progress, teacher_val, recipe.student.pretrained, routed)
    dist.barrier()  # every rank has checked the folder before rank 0 writes to it
    folder.start(recipe.to_yaml(), force=force, resume=resume)
    keys = ["epoch", "phase", "loss", "syn_ce", "ib_kl", "cccp", "ce", "kd", "kd_ens",
            "synergy_val_top1", "student_val_top1"]
    try:
        plan = run_plan(task, folder, progress, runtime.device, resume=resume, config=loop, summary_keys=keys,
                        dist=dist)
        dist.barrier()  # the best checkpoints are on disk for every rank

        best, _ = load_model(student_path, kinds=("student",), device=runtime.device)
        student_test = evaluate_predictor(best, loaders.test.batches(0), info.num_classes).top1
        figures = method.test_figures(folder.path, loaders.test, info.num_classes)
        summary = {
            "method": spec.method,
            "seed": recipe.seed,
            "student_arch": recipe.student.arch,
            "teachers": [t.name for t in recipe.teachers] if method.teachers else [],
            "student_val_top1": task.best_val,
            "student_test_top1": student_test,
            "synergy_test_top1": figures.pop("synergy_test_top1", None),
            "teacher_test_top1": teacher_test,
            "teacher_val_top1": teacher_val,
            "teacher_figures_of": "the teachers as loaded (their checkpoints), before any adaptation",
            "best_epoch": task.best_epoch,
            **figures,
            **method.summary(),
            "seconds": round(plan.seconds, 2),
        }
        folder.write_summary(summary)
        folder.finish()
    finally:
        folder.release()  # .lock goes when the run ends, however it ends (finish released it already)
    return DistillResult(folder.path, spec.method, summary["teachers"], teacher_test, summary["synergy_test_top1"],
                         task.best_val, student_test, plan.seconds, summary)


def teacher_figures(
    teachers: list[nn.Module], loaders: SplitLoaders, runtime: Runtime
) -> tuple[list[float], list[float]]:
    """Validation (for the synergy gate) and test top-1 of every teacher as loaded, once."""
    val, test = [], []
    for teacher in teachers:
        teacher.eval()

        def predict(x: torch.Tensor, t: nn.Module = teacher) -> torch.Tensor:
            with runtime.autocast():
                return t(x)

        if loaders.val is not None:
            val.append(round(top1_of(predict, loaders.val.batches(0)), 4))
        test.append(round(top1_of(predict, loaders.test.batches(0)), 4))
    return val, test
