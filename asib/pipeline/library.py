"""The distill step as library calls, for scripts and notebooks (re-exported by ``asib.api``).

Everything here is a thin layer over what ``asib distill`` runs: the optimizers are the ones
``DistillTask`` builds, one epoch is ``DistillTask.begin_epoch`` + ``step`` over a loader, and
``run_training_stages`` runs the whole plan through the one training loop
(``asib.engine.loop.run_plan``), with its finiteness guard and metrics file.

The update functions run ONE EPOCH (every batch of the loader once), not one batch: the
schedules (IB beta, temperature, ramps) are per epoch, so an epoch is the unit they are
defined on. Validation, gating and checkpoints between epochs are the caller's, or use
``run_training_stages`` which does all of it as ``asib distill`` does.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml

from asib.data import InMemoryLoader
from asib.engine.loaders import SplitLoaders
from asib.engine.loop import EpochPlan, LoopConfig, MetricSums, check_finite, run_plan
from asib.engine.metrics import top1_of
from asib.engine.progress import Progress
from asib.engine.runfolder import RunFolder
from asib.engine.runtime import Runtime
from asib.errors import DataError, RecipeError
from asib.methods import DistillMethod
from asib.pipeline.distill import DistillTask
from asib.recipe import DistillSpec, spec_from


class Optimizers(NamedTuple):
    """The two sides' optimizers and per-step schedulers; the teacher side is None for methods without A-steps."""

    teacher_optimizer: torch.optim.Optimizer | None
    teacher_scheduler: torch.optim.lr_scheduler.LRScheduler | None
    student_optimizer: torch.optim.Optimizer
    student_scheduler: torch.optim.lr_scheduler.LRScheduler


class _Steps:
    """Stands in for a train loader where only its length (steps per epoch) matters."""

    def __init__(self, steps: int) -> None:
        if steps < 1:
            raise DataError(f"steps_per_epoch must be at least 1 (given: {steps})")
        self.steps = steps

    def __len__(self) -> int:
        return self.steps


def _runtime_of(method: DistillMethod) -> Runtime:
    """fp32 on the device the student lives on."""
    device = next(method.student.parameters()).device
    return Runtime(device, None, channels_last=False)


def _spec(method: DistillMethod, spec: DistillSpec | dict[str, Any] | None) -> DistillSpec:
    """The spec to plan with; it must be the method's, whose losses use it."""
    if spec is None:
        return method.spec
    spec = spec_from(DistillSpec, spec)
    if spec != method.spec:
        raise RecipeError(
            ["distill: the spec differs from the one the method was built with"],
            hint="build the method with the same spec (or pass spec=None)",
        )
    return spec


def _task(
    method: DistillMethod,
    loaders: SplitLoaders,
    runtime: Runtime,
    optimizers: Optimizers | None = None,
    teacher_val: list[float] | None = None,
    save_best: Any = None,
    progress: Progress | None = None,
) -> DistillTask:
    """The engine's DistillTask, with the caller's optimizers when given."""
    task = DistillTask(method, loaders, runtime, save_best or (lambda _epoch: None), progress or Progress(enabled=False),
                       teacher_val)
    if optimizers is not None:
        task.optimizers["B"], task.schedulers["B"] = optimizers.student_optimizer, optimizers.student_scheduler
        if optimizers.teacher_optimizer is not None and optimizers.teacher_scheduler is not None:
            task.optimizers["A"], task.schedulers["A"] = optimizers.teacher_optimizer, optimizers.teacher_scheduler
    return task


def create_optimizers_and_schedulers(
    method: DistillMethod, spec: DistillSpec | dict[str, Any] | None, steps_per_epoch: int
) -> Optimizers:
    """(teacher optimizer, teacher scheduler, student optimizer, student scheduler), as ``asib distill`` builds them.

    ASIB's teacher side (IB_MBM, synergy head, teachers' unfrozen blocks) uses
    ``spec.teacher_optim`` over every A-epoch; the student uses ``spec.student_optim`` over
    every student epoch; both schedulers step once per batch.
    """
    _spec(method, spec)
    loaders = SplitLoaders(info=None, train=_Steps(steps_per_epoch), val=None, test=None)  # type: ignore[arg-type]
    t = _task(method, loaders, _runtime_of(method))
    return Optimizers(t.optimizers.get("A"), t.schedulers.get("A"), t.optimizers["B"], t.schedulers["B"])


def _one_epoch(
    method: DistillMethod, loader: InMemoryLoader, optimizers: Optimizers, ep: EpochPlan, runtime: Runtime | None
) -> dict[str, float]:
    """One epoch of the engine's step over ``loader``; returns the mean of every logged term."""
    loaders = SplitLoaders(info=None, train=loader, val=None, test=None)  # type: ignore[arg-type]
    task = _task(method, loaders, runtime or _runtime_of(method), optimizers)
    task.begin_epoch(ep)
    sums = MetricSums()
    for i, batch in enumerate(task.batches(ep)):
        sums.add(task.step(ep, batch), batch.y.shape[0], i)
    check_finite(sums, ep)  # the training loop's own guard
    means, _ = sums.read()
    return {k: round(v, 6) for k, v in means.items()}


def teacher_adaptive_update(
    method: DistillMethod,
    loader: InMemoryLoader,
    optimizers: Optimizers,
    *,
    epoch: int = 0,
    stage: int = 0,
    stage_epoch: int | None = None,
    runtime: Runtime | None = None,
) -> dict[str, float]:
    """One A-step epoch: the teacher side (IB_MBM, synergy head, unfrozen teacher blocks) learns, the student is fixed.

    ``epoch`` counts A-epochs over all stages (it drives the IB beta warm-up and the CCCP ramp);
    ``stage_epoch`` is the epoch within this stage (default: ``epoch``, right for stage 0).
    Returns the epoch means of the logged terms (``loss``, ``syn_ce``, ``ib_kl``, ``beta``, ...).
    """
    if "A" not in method.optim_groups():
        raise RecipeError([f"distill.method: method {method.name} has no teacher-side (A) steps; ASIB has them"])
    if optimizers.teacher_optimizer is None:
        raise RecipeError(["optimizers: no teacher-side optimizer; build them with create_optimizers_and_schedulers"])
    ep = EpochPlan(epoch, "A", stage, epoch, epoch if stage_epoch is None else stage_epoch)
    return _one_epoch(method, loader, optimizers, ep, runtime)


def student_distillation_update(
    method: DistillMethod,
    loader: InMemoryLoader,
    optimizers: Optimizers,
    *,
    epoch: int = 0,
    stage: int = 0,
    stage_epoch: int | None = None,
    runtime: Runtime | None = None,
) -> dict[str, float]:
    """One student epoch: ASIB's B-step (CE, teacher average, synergy target) or a baseline's loss.

    ``epoch`` counts student epochs over all stages (temperature schedule, KD warm-up). Returns
    the epoch means of the logged terms (``loss``, ``ce``, ``kd``, ``kd_ens``, ``tau``, ...).
    """
    ep = EpochPlan(epoch, "B", stage, epoch, epoch if stage_epoch is None else stage_epoch)
    return _one_epoch(method, loader, optimizers, ep, runtime)


@contextlib.contextmanager
def _run_folder(run_dir: str | Path | None, force: bool) -> Iterator[RunFolder]:
    """The caller's run folder, or a temporary one removed afterwards."""
    if run_dir is not None:
        folder = RunFolder(run_dir, ("student.safetensors",))
        folder.check(force=force, resume=False)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="asib-stages-") as tmp:
        yield RunFolder(tmp, ())


def run_training_stages(
    method: DistillMethod,
    spec: DistillSpec | dict[str, Any] | None,
    train_loader: InMemoryLoader,
    val_loader: InMemoryLoader | None,
    test_loader: InMemoryLoader | None = None,
    *,
    runtime: Runtime | None = None,
    run_dir: str | Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
    teacher_val: list[float] | None = None,
) -> float:
    """Every stage (teacher-side epochs, then student epochs) through the one training loop; returns student top-1 (%).

    The student keeps its best-on-val weights (the last epoch's without ``val_loader``) and
    the figure returned is its top-1 on ``test_loader``, else on ``val_loader``.
    ``run_dir`` keeps ``metrics.jsonl``, ``recipe.yaml`` (the distill section) and
    ``student.safetensors``; without it they go to a temporary folder. ``teacher_val``
    (the teachers' val top-1, for the synergy gate) is measured on ``val_loader`` when omitted.
    """
    from asib.engine.checkpoint import save_model

    spec = _spec(method, spec)
    final_loader = test_loader or val_loader
    if final_loader is None:
        raise DataError("run_training_stages needs a val_loader or a test_loader to measure the student on")
    runtime = runtime or _runtime_of(method)
    if teacher_val is None:
        teacher_val = [] if val_loader is None else [round(top1_of(t.eval(), val_loader), 4) for t in method.teachers]
    student = method.student
    best: dict[str, Any] = {}

    def save_best(epoch: int) -> None:
        best["state"] = {k: v.detach().clone() for k, v in student.state_dict().items()}
        if run_dir is not None:
            save_model(Path(run_dir) / "student.safetensors", student, "student", {"epoch": epoch, "method": spec.method})

    loaders = SplitLoaders(info=None, train=train_loader, val=val_loader, test=final_loader)  # type: ignore[arg-type]
    progress = progress or Progress(enabled=False)
    task = _task(method, loaders, runtime, None, teacher_val, save_best, progress)
    with _run_folder(run_dir, force) as folder:
        folder.start(yaml.safe_dump({"distill": spec.model_dump(mode="json")}, sort_keys=False), force=force, resume=False)
        run_plan(task, folder, progress, runtime.device, config=LoopConfig())
        folder.finish()
    student.load_state_dict(best["state"])
    student.eval()
    return top1_of(student, final_loader)
