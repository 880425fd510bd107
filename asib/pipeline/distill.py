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
from asib.engine.inference import plan_inference
from asib.engine.loaders import SplitLoaders, split_loaders
from asib.engine.loop import EpochPlan, LoopConfig, run_plan
from asib.engine.metrics import evaluate_predictor
from asib.engine.optim import build_optimizer, build_scheduler
from asib.engine.progress import Progress
from asib.engine.runfolder import RunFolder
from asib.engine.runtime import Runtime, make_runtime, seeded, set_random_seed
from asib.engine.tracking import check_tracking, environment
from asib.errors import CheckpointError, RecipeError, clip
from asib.methods import Artifacts, DistillMethod, RunContext, build_method, method_class
from asib.models import apply_freeze_level, model_from_spec, setup_partial_freeze_schedule
from asib.pipeline.finetune import count_parameters, tell, val_figures
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
        """The final table: per model its size and top-1 on val and test, then the best epoch and
        the student's gain over the teachers' average logits."""
        s = self.summary
        archs, params = s.get("teacher_archs") or [], s.get("teacher_params") or []
        val = s.get("teacher_val_top1") or []
        rows: list[tuple[str, str, str, str, str]] = []
        for i, (name, test) in enumerate(zip(self.teacher_names, self.teacher_test_top1, strict=True)):
            rows.append((f"teacher {name}", _at(archs, i), _count(_at(params, i)), _pct(_at(val, i)), _pct(test)))
        if s.get("teacher_average_test_top1") is not None:
            rows.append(("teacher average (logits)", "", "", "", _pct(s["teacher_average_test_top1"])))
        if self.synergy_test_top1 is not None:
            rows.append(("synergy (fused teachers)", "", "", "", _pct(self.synergy_test_top1)))
        rows.append((f"student ({self.method})", str(s.get("student_arch", "")), _count(s.get("student_params")),
                     _pct(self.student_val_top1), _pct(self.student_test_top1)))
        head = ("model", "arch", "params", "val top-1", "test top-1")
        widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
        lines = ["  ".join(cell.ljust(w) if c < 2 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths,
                 strict=True))).rstrip() for row in [head, *rows]]
        if s.get("best_epoch"):
            lines.append(f"student kept: epoch {s['best_epoch']} of {s.get('epochs', '?')} (best val top-1)")
        gain = s.get("student_gain_over_teacher_average")
        if gain is not None:
            lines.append(f"student - teacher average: {gain:+.2f} points test top-1")
        lines.append(f"run folder: {self.run_dir} ({self.seconds:.1f}s)")
        return lines


def _at(values: list[Any], i: int) -> Any:
    return values[i] if i < len(values) else None


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def _count(n: Any) -> str:
    """A parameter count: 78.2k, 11.17M."""
    if not isinstance(n, int):
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1_000_000 else f"{n / 1e3:.1f}k" if n >= 1000 else str(n)


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
        acc, loss = val_figures(self._predict_student, val.batches(0))
        acc = round(acc, 4)
        student.train(was_training)
        out["student_val_top1"] = acc
        out["student_val_loss"] = round(loss, 6)
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
    progress = progress or Progress()
    try:
        return _distill(recipe, force, resume, progress, loop, run_dir, notice)
    finally:
        progress.close()  # the live display is down before the command prints its table


def _distill(
    recipe: Recipe,
    force: bool,
    resume: bool,
    progress: Progress,
    loop: LoopConfig | None,
    run_dir: str | Path | None,
    notice: Callable[[str], None] | None,
) -> DistillResult:
    from asib.data import load_info

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
    started = None
    if status == "restart":
        started = f"{folder.path}: no train state to resume; starting the run from the beginning"
        (notice or progress.line)(started)
    force, resume = force or status == "restart", status == "resume"
    check_tracking(recipe.tracking)
    progress.status("reading the data")
    info = load_info(recipe.data_dir)
    dist = init_distributed(recipe.device)  # under torchrun: rank 0 alone prints and writes
    folder.writer, progress = dist.is_main, progress if dist.is_main else Progress(enabled=False)
    batch_size = dist.per_rank_batch(spec.batch_size, "distill.batch_size")
    set_random_seed(recipe.seed, recipe.deterministic)
    runtime = make_runtime(recipe.device, recipe.deterministic, recipe.compile, recipe.precision)
    n_teachers = len(recipe.teachers) if cls.uses_teachers else 0
    progress.status(f"building the student and loading {n_teachers} teacher{'s' * (n_teachers != 1)}")
    method, teacher_paths = build_models(recipe, info.num_classes, runtime)
    convert_sync_bn(method, dist, recipe.sync_bn)  # in place: student, teachers, fusion
    progress.status(f"loading the data onto {runtime.device.type}")
    loaders = split_loaders(recipe.data_dir, runtime, batch_size, spec.eval_batch_size, spec.augment, recipe.seed,
                            dist.rank, dist.world_size)
    # Each frozen teacher's precision and layout: measured on a real batch (or cached), printed once.
    inference = plan_inference(runtime, dict(zip(method.teacher_names, method.teachers, strict=False)),
                               next(iter(loaders.train)).x, progress.line)

    progress.status("measuring the teachers on the val and test splits")
    teacher_val, teacher_test, teacher_average = teacher_figures(list(method.teachers), loaders, runtime)
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
            "synergy_val_top1", "student_val_loss", "student_val_top1"]
    try:
        if started:
            folder.log_line(f"note: {started}")
        folder.open_tracking(recipe.tracking, resume=resume, name=f"{recipe.name}-{spec.method}-s{recipe.seed}",
                             config=recipe.model_dump(mode="json"), note=tell(progress, folder))
        plan = run_plan(task, folder, progress, runtime.device, resume=resume, config=loop, summary_keys=keys,
                        dist=dist, label=f"distill ({spec.method})")
        progress.status("testing the best student")
        dist.barrier()  # the best checkpoints are on disk for every rank

        best, _ = load_model(student_path, kinds=("student",), device=runtime.device)
        student_test = evaluate_predictor(best, loaders.test.batches(0), info.num_classes).top1
        figures = method.test_figures(folder.path, loaders.test, info.num_classes)
        gain = None if teacher_average is None else round(student_test - teacher_average, 4)
        teachers = list(recipe.teachers) if method.teachers else []
        summary = {
            "method": spec.method,
            "seed": recipe.seed,
            "student_arch": recipe.student.arch,
            "teachers": [t.name for t in teachers],
            "teacher_archs": [t.arch for t in teachers],
            "student_val_top1": task.best_val,
            "student_test_top1": student_test,
            "synergy_test_top1": figures.pop("synergy_test_top1", None),
            "teacher_test_top1": teacher_test,
            "teacher_val_top1": teacher_val,
            "teacher_average_test_top1": teacher_average,
            "student_gain_over_teacher_average": gain,
            "teacher_figures_of": "the teachers as loaded (their checkpoints), before any adaptation",
            "best_epoch": task.best_epoch,
            "inference": inference,
            "epochs": len(plan.records),
            "student_params": count_parameters(method.student),
            "teacher_params": [count_parameters(t) for t in method.teachers],
            **figures,
            **method.summary(),
            **environment(runtime.device),
            "seconds": round(plan.seconds, 2),
        }
        folder.write_summary(summary)
        result = DistillResult(folder.path, spec.method, summary["teachers"], teacher_test,
                               summary["synergy_test_top1"], task.best_val, student_test, plan.seconds, summary)
        folder.log_line("\n".join(result.table_lines()))
        folder.finish()
    finally:
        folder.release()  # .lock goes when the run ends, however it ends (finish released it already)
    return result


def teacher_figures(
    teachers: list[nn.Module], loaders: SplitLoaders, runtime: Runtime
) -> tuple[list[float], list[float], float | None]:
    """Validation (for the synergy gate) and test top-1 of every teacher as loaded, and the test
    top-1 of the teachers' average logits (None without teachers), in one pass over each split."""
    if not teachers:
        return [], [], None
    for teacher in teachers:
        teacher.eval()
    val = _top1s(teachers, loaders.val.batches(0), runtime)[:-1] if loaders.val is not None else []
    *test, average = _top1s(teachers, loaders.test.batches(0), runtime)
    return val, test, average


@torch.inference_mode()
def _top1s(teachers: list[nn.Module], batches: Iterator[Batch], runtime: Runtime) -> list[float]:
    """Top-1 (%) of each teacher and, last, of their average logits; counted on the device."""
    hits: torch.Tensor | None = None
    n = 0
    for batch in batches:
        with runtime.autocast():
            logits = [t(batch.x).float() for t in teachers]
        logits.append(torch.stack(logits).mean(0))
        preds = torch.stack([x.topk(1, dim=1).indices[:, 0] for x in logits])
        batch_hits = (preds == batch.y).sum(1)
        hits = batch_hits if hits is None else hits + batch_hits
        n += batch.y.numel()
    counts = hits.tolist() if hits is not None else [0] * (len(teachers) + 1)
    return [round(100.0 * c / max(1, n), 4) for c in counts]
