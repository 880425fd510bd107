"""The distillation stages as library calls, for scripts and notebooks (re-exported by ``asib.api``).

Everything here is a thin layer over the engine the CLI uses: the optimizers are the ones
``DistillTraining`` builds, one A-step or B-step epoch is ``DistillTraining.begin_epoch`` +
``step`` over a loader, and ``run_training_stages`` runs the whole plan through the one
training loop (``asib.engine.loop.run_plan``), with its finiteness guard and metrics file.

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
from asib.engine.distill import DistillTraining
from asib.engine.distiller import ASIBDistiller
from asib.engine.evaluate import top1_of
from asib.engine.loaders import SplitLoaders
from asib.engine.loop import EpochPlan, LoopConfig, MetricSums, check_finite, run_plan
from asib.engine.progress import Progress
from asib.engine.run import RunFolder
from asib.engine.runtime import Runtime
from asib.errors import DataError, RecipeError
from asib.recipe import DistillSpec, spec_from


class Optimizers(NamedTuple):
    """The two sides' optimizers and per-step schedulers; the teacher side is None unless method asib."""

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


def _runtime_of(distiller: ASIBDistiller) -> Runtime:
    """fp32 on the device the student lives on."""
    device = next(distiller.student.parameters()).device
    return Runtime(device, None, channels_last=False)


def _spec(distiller: ASIBDistiller, spec: DistillSpec | dict[str, Any] | None) -> DistillSpec:
    """The spec to plan with; it must be the distiller's, whose losses use it."""
    if spec is None:
        return distiller.spec
    spec = spec_from(DistillSpec, spec)
    if spec != distiller.spec:
        raise RecipeError(
            ["distill: the spec differs from the one the ASIBDistiller was built with"],
            hint="build the distiller with the same spec (or pass spec=None)",
        )
    return spec


def _training(
    distiller: ASIBDistiller,
    spec: DistillSpec,
    loaders: SplitLoaders,
    runtime: Runtime,
    optimizers: Optimizers | None = None,
    teacher_val: list[float] | None = None,
    save_best: Any = None,
    progress: Progress | None = None,
) -> DistillTraining:
    """The engine's DistillTraining, with the caller's optimizers when given."""
    training = DistillTraining(
        distiller, spec, loaders, runtime, list(teacher_val or []),
        save_best or (lambda _epoch: None), progress or Progress(enabled=False),
    )  # fmt: skip
    if optimizers is not None:
        training.teacher_opt, training.teacher_sched = optimizers.teacher_optimizer, optimizers.teacher_scheduler
        training.student_opt, training.student_sched = optimizers.student_optimizer, optimizers.student_scheduler
    return training


def create_optimizers_and_schedulers(
    distiller: ASIBDistiller, spec: DistillSpec | dict[str, Any] | None, steps_per_epoch: int
) -> Optimizers:
    """(teacher optimizer, teacher scheduler, student optimizer, student scheduler), as ``asib distill`` builds them.

    The teacher side (IB_MBM, synergy head, teachers' unfrozen blocks) uses
    ``spec.teacher_optim`` over every A-epoch; the student uses ``spec.student_optim`` over
    every B-epoch; both schedulers step once per batch.
    """
    spec = _spec(distiller, spec)
    loaders = SplitLoaders(info=None, train=_Steps(steps_per_epoch), val=None, test=None)  # type: ignore[arg-type]
    t = _training(distiller, spec, loaders, _runtime_of(distiller))
    return Optimizers(t.teacher_opt, t.teacher_sched, t.student_opt, t.student_sched)


def _one_epoch(
    distiller: ASIBDistiller,
    loader: InMemoryLoader,
    optimizers: Optimizers,
    ep: EpochPlan,
    runtime: Runtime | None,
) -> dict[str, float]:
    """One epoch of the engine's step over ``loader``; returns the mean of every logged term."""
    loaders = SplitLoaders(info=None, train=loader, val=None, test=None)  # type: ignore[arg-type]
    training = _training(distiller, distiller.spec, loaders, runtime or _runtime_of(distiller), optimizers)
    training.begin_epoch(ep)
    sums = MetricSums()
    for i, batch in enumerate(training.loader(ep).batches(ep.index)):
        sums.add(training.step(ep, batch), batch.y.shape[0], i)
    check_finite(sums, ep)  # the training loop's own guard
    means, _ = sums.read()
    return {k: round(v, 6) for k, v in means.items()}


def teacher_adaptive_update(
    distiller: ASIBDistiller,
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
    if distiller.spec.method != "asib":
        raise RecipeError([f"distill.method: A-steps exist for method asib only (given: {distiller.spec.method})"])
    if optimizers.teacher_optimizer is None:
        raise RecipeError(["optimizers: no teacher-side optimizer; build them with create_optimizers_and_schedulers"])
    ep = EpochPlan(epoch, "A", stage, epoch, epoch if stage_epoch is None else stage_epoch)
    return _one_epoch(distiller, loader, optimizers, ep, runtime)


def student_distillation_update(
    distiller: ASIBDistiller,
    loader: InMemoryLoader,
    optimizers: Optimizers,
    *,
    epoch: int = 0,
    stage: int = 0,
    stage_epoch: int | None = None,
    runtime: Runtime | None = None,
) -> dict[str, float]:
    """One B-step epoch: the student learns from CE, the teacher average and the synergy target (or a baseline's loss).

    ``epoch`` counts B-epochs over all stages (temperature schedule, KD warm-up). Returns
    the epoch means of the logged terms (``loss``, ``ce``, ``kd``, ``kd_ens``, ``tau``, ...).
    """
    ep = EpochPlan(epoch, "B", stage, epoch, epoch if stage_epoch is None else stage_epoch)
    return _one_epoch(distiller, loader, optimizers, ep, runtime)


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
    distiller: ASIBDistiller,
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
    """Every stage (A-step epochs, then B-step epochs) through the one training loop; returns student top-1 (%).

    The student keeps its best-on-val weights (the last epoch's without ``val_loader``) and
    the figure returned is its top-1 on ``test_loader``, else on ``val_loader``.
    ``run_dir`` keeps ``metrics.jsonl``, ``recipe.yaml`` (the distill section) and
    ``student.safetensors``; without it they go to a temporary folder. ``teacher_val``
    (the teachers' val top-1, for the synergy gate) is measured on ``val_loader`` when omitted.
    """
    from asib.engine.checkpoint import save_model

    spec = _spec(distiller, spec)
    final_loader = test_loader or val_loader
    if final_loader is None:
        raise DataError("run_training_stages needs a val_loader or a test_loader to measure the student on")
    runtime = runtime or _runtime_of(distiller)
    if teacher_val is None:
        teacher_val = [] if val_loader is None else [round(top1_of(t.eval(), val_loader), 4) for t in distiller.teachers]
    student = distiller.student
    best: dict[str, Any] = {}

    def save_best(epoch: int) -> None:
        best["state"] = {k: v.detach().clone() for k, v in student.state_dict().items()}
        if run_dir is not None:
            save_model(Path(run_dir) / "student.safetensors", student, "student", {"epoch": epoch, "method": spec.method})

    loaders = SplitLoaders(info=None, train=train_loader, val=val_loader, test=final_loader)  # type: ignore[arg-type]
    progress = progress or Progress(enabled=False)
    training = _training(distiller, spec, loaders, runtime, None, teacher_val, save_best, progress)
    with _run_folder(run_dir, force) as folder:
        folder.start(yaml.safe_dump({"distill": spec.model_dump(mode="json")}, sort_keys=False), force=force, resume=False)
        run_plan(training, folder, progress, runtime.device, config=LoopConfig())
        folder.finish()
    student.load_state_dict(best["state"])
    student.eval()
    return top1_of(student, final_loader)
