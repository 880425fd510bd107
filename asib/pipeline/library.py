"""The distill step as library calls, for scripts, notebooks and your own training loop (re-exported by ``asib.api``).

Everything here is a thin layer over what ``asib distill`` runs. ``Distiller`` is built once
from a method: it owns the ``DistillTask``'s optimizers and per-step schedulers and a runtime
(by default the CLI's: ``make_runtime(device)`` with the recipe's defaults, so bf16 and
channels_last where the CLI would use them). ``Distiller.step(images, labels)`` is one
optimizer step of the method, in the engine's precision, returning the loss terms as device
tensors (no host sync); ``Distiller.epoch(loader)`` is a whole epoch built on it.

The older epoch helpers (``create_optimizers_and_schedulers``, ``teacher_adaptive_update``,
``student_distillation_update``) are ``Distiller`` calls; ``run_training_stages`` runs the
whole plan through the one training loop (``asib.engine.loop.run_plan``), with its finiteness
guard and metrics file. Schedules (IB beta, temperature, ramps) are per epoch, so a step
names its epoch; validation, gating and checkpoints between epochs are the caller's, or
``run_training_stages``'s.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml

from asib.data import Batch, InMemoryLoader
from asib.engine.inference import plan_inference
from asib.engine.loaders import SplitLoaders
from asib.engine.loop import EpochPlan, LoopConfig, MetricSums, check_finite, run_plan
from asib.engine.metrics import top1_of
from asib.engine.progress import Progress
from asib.engine.runfolder import RunFolder
from asib.engine.runtime import Runtime, make_runtime
from asib.errors import DataError, RecipeError
from asib.methods import DistillMethod
from asib.pipeline.distill import STUDENT_STREAM, TEACHER_SIDE_STREAM, DistillTask
from asib.recipe import DistillSpec, Recipe, spec_from


class Optimizers(NamedTuple):
    """The two sides' optimizers and per-step schedulers; the teacher side is None for methods without A-steps."""

    teacher_optimizer: torch.optim.Optimizer | None
    teacher_scheduler: torch.optim.lr_scheduler.LRScheduler | None
    student_optimizer: torch.optim.Optimizer
    student_scheduler: torch.optim.lr_scheduler.LRScheduler


class _Steps:
    """Stands in for a train loader where only its length (steps per epoch) matters."""

    def __init__(self, steps: int) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise DataError(f"steps_per_epoch must be a whole number of at least 1 (given: {steps!r})")
        self.steps = steps

    def __len__(self) -> int:
        return self.steps


def default_runtime(device: str | torch.device) -> Runtime:
    """The runtime ``asib distill`` would use on ``device``: ``make_runtime`` with the recipe's defaults
    (``precision: auto``, not deterministic, not compiled)."""
    fields = Recipe.model_fields
    return make_runtime(str(device), fields["deterministic"].default, fields["compile"].default,
                        fields["precision"].default)


def _runtime_of(method: DistillMethod) -> Runtime:
    """The CLI's runtime on the device the student lives on."""
    return default_runtime(next(method.student.parameters()).device)


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


# ---------------------------------------------------------------- the step object


class Distiller:
    """A distillation method trained step by step, as ``asib distill`` trains it.

        distiller = asib.Distiller(asib.build_method(spec, teachers, student), steps_per_epoch=len(loader))
        for ep in distiller.plan():  # every stage's A-epochs (ASIB), then its B-epochs, as the CLI runs them
            for images, labels in my_batches():
                terms = distiller.step(images, labels, phase=ep.phase, epoch=ep.phase_epoch)  # device tensors

    Built once: the optimizers and per-step schedulers are the ones ``asib distill`` builds
    from the method's spec (``steps_per_epoch`` sets the schedules' length); ``runtime``
    defaults to the CLI's on the student's device (``default_runtime``). ``optimizers`` (from
    ``create_optimizers_and_schedulers``) replaces the built ones.
    """

    def __init__(
        self,
        method: DistillMethod,
        steps_per_epoch: int,
        *,
        runtime: Runtime | None = None,
        optimizers: Optimizers | None = None,
    ) -> None:
        if not isinstance(method, DistillMethod):
            raise RecipeError([f"method: expected a method from asib.api.build_method, got {type(method).__name__}"])
        self.method = method
        self.runtime = runtime or _runtime_of(method)
        method.to(self.runtime.device)  # parameters keep their identity
        loaders = SplitLoaders(info=None, train=_Steps(steps_per_epoch), val=None, test=None)  # type: ignore[arg-type]
        self.task = _task(method, loaders, self.runtime, optimizers)
        self.steps_per_epoch = steps_per_epoch
        self._plan = self.task.plan()
        self._placed: dict[tuple[str, int, int | None, int | None], EpochPlan] = {}
        self._epoch: EpochPlan | None = None
        # Each frozen teacher's precision and layout (``plan_inference``), chosen at the first step on
        # its batch: measured under ``precision: auto`` (cached), fixed otherwise; records by teacher name.
        self.inference: dict[str, dict[str, Any]] | None = None

    @property
    def optimizers(self) -> Optimizers:
        t = self.task
        return Optimizers(t.optimizers.get("A"), t.schedulers.get("A"), t.optimizers["B"], t.schedulers["B"])

    @property
    def student(self) -> torch.nn.Module:
        return self.method.student

    def plan(self) -> list[EpochPlan]:
        """Every epoch of the spec's stages in the CLI's order (phase, stage, counters)."""
        return list(self._plan)

    def epoch_plan(self, phase: str, epoch: int, stage: int | None = None, stage_epoch: int | None = None) -> EpochPlan:
        """The epoch ``epoch`` of ``phase`` (counted over all stages), placed in its stage by the spec's plan.

        ``stage`` (with ``stage_epoch``, default ``epoch``) places it by hand instead.
        """
        key = (phase, epoch, stage, stage_epoch)
        if key not in self._placed:
            self._placed[key] = self._place(*key)
        return self._placed[key]

    def _place(self, phase: str, epoch: int, stage: int | None, stage_epoch: int | None) -> EpochPlan:
        groups = self.method.optim_groups()
        if phase not in groups:
            have = " and ".join(sorted(groups))
            raise RecipeError([f"phase: method {self.method.name} has {have} steps, not {phase!r}"],
                              hint="A is ASIB's teacher-side step, B the student's")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise RecipeError([f"epoch: a whole number from 0 (given: {epoch!r})"])
        if stage is not None:
            return EpochPlan(epoch, phase, stage, epoch, epoch if stage_epoch is None else stage_epoch)
        for ep in self._plan:
            if ep.phase == phase and ep.phase_epoch == epoch:
                return ep
        total = sum(1 for ep in self._plan if ep.phase == phase)
        raise RecipeError(
            [f"epoch: {phase}-epoch {epoch} is past the spec's {total} {phase}-epochs"],
            hint="the schedules run over the spec's epochs: raise num_stages / student_epochs, or pass stage=",
        )

    def begin_epoch(self, ep: EpochPlan) -> None:
        """Freeze levels and train/eval modes for ``ep`` (``step`` calls it when the epoch changes)."""
        self.task.begin_epoch(ep)
        self._epoch = ep

    def step(
        self,
        images: torch.Tensor | Batch,
        labels: torch.Tensor | None = None,
        *,
        phase: str = "B",
        epoch: int = 0,
        stage: int | None = None,
        stage_epoch: int | None = None,
    ) -> dict[str, torch.Tensor | float]:
        """One optimizer step of ``phase`` ("B": the student; "A": ASIB's teacher side) on one batch.

        ``images`` are float images as the models take them (normalised), on any device;
        or a ``Batch`` from an asib loader (mixup/cutmix partners included) with no ``labels``.
        Runs in the runtime's precision and memory format; steps the optimizer and the
        per-step scheduler. Returns the loss terms: tensors on the device (detached), and
        plain floats for schedule values (``tau``, ``beta``); nothing waits for the device.
        """
        ep = self.epoch_plan(phase, epoch, stage, stage_epoch)
        if ep != self._epoch:
            self.begin_epoch(ep)
        if isinstance(images, Batch):
            batch = images
        elif labels is None:
            raise DataError("step needs labels with plain images (or a Batch from an asib loader)")
        else:
            batch = Batch(images, labels)
        return self._step(ep, batch)

    def _step(self, ep: EpochPlan, batch: Batch) -> dict[str, torch.Tensor | float]:
        batch = self._on_device(batch)
        if self.inference is None:  # the first batch: each frozen teacher's plan, as asib distill measures it
            self.inference = plan_inference(self.runtime, dict(zip(self.method.teacher_names, self.method.teachers,
                                                                   strict=False)), batch.x)
        student = self.method.student
        if ep.phase == "B" and not student.training:  # evaluated since the epoch began
            student.train()
        terms = self.task.step(ep, batch)
        return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in terms.items()}

    def _on_device(self, batch: Batch) -> Batch:
        """The batch on the runtime's device, in its memory format (no copy when it is already)."""
        dev = self.runtime.device
        x = batch.x.to(dev, non_blocking=True)
        if self.runtime.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        y = batch.y.to(dev, torch.int64, non_blocking=True)
        y2 = None if batch.y2 is None else batch.y2.to(dev, torch.int64, non_blocking=True)
        idx = None if batch.idx is None else batch.idx.to(dev, non_blocking=True)
        return Batch(x, y, y2, batch.lam, idx)

    def epoch(
        self,
        loader: InMemoryLoader | Iterable[Any],
        *,
        phase: str = "B",
        epoch: int = 0,
        stage: int | None = None,
        stage_epoch: int | None = None,
    ) -> dict[str, float]:
        """``step`` over every batch of ``loader``; returns the epoch means of the terms (one host sync).

        An asib loader gives the epoch's batches as ``asib distill`` would (its data streams);
        any other iterable gives ``(images, labels)`` pairs or ``Batch``es. A non-finite term
        stops it with the training loop's error.
        """
        return self._run_epoch(self.epoch_plan(phase, epoch, stage, stage_epoch), loader)

    def _run_epoch(self, ep: EpochPlan, loader: InMemoryLoader | Iterable[Any]) -> dict[str, float]:
        self.begin_epoch(ep)
        sums = MetricSums()
        for i, batch in enumerate(_batches(loader, ep)):
            sums.add(self._step(ep, batch), batch.y.shape[0], i)
        check_finite(sums, ep)  # the training loop's own guard
        means, _ = sums.read()
        return {k: round(v, 6) for k, v in means.items()}

    def state_dict(self) -> dict[str, Any]:
        """The trained modules, optimizers, schedulers and the method's state (``DistillTask.state_dict``)."""
        return self.task.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.task.load_state_dict(state)


def _batches(loader: InMemoryLoader | Iterable[Any], ep: EpochPlan) -> Iterator[Batch]:
    """The epoch's batches: an asib loader's streams as the distill task draws them, else the items."""
    if isinstance(loader, InMemoryLoader):
        yield from loader.batches(ep.phase_epoch, stream=STUDENT_STREAM if ep.phase == "B" else TEACHER_SIDE_STREAM)
        return
    for item in loader:
        if isinstance(item, Batch):
            yield item
        elif isinstance(item, tuple | list) and len(item) == 2:
            yield Batch(item[0], item[1])
        else:
            raise DataError(f"a loader item must be (images, labels) or a Batch, not {type(item).__name__}")


# ---------------------------------------------------------------- the epoch helpers, on Distiller


def create_optimizers_and_schedulers(
    method: DistillMethod, spec: DistillSpec | dict[str, Any] | None, steps_per_epoch: int
) -> Optimizers:
    """(teacher optimizer, teacher scheduler, student optimizer, student scheduler), as ``asib distill`` builds them.

    ASIB's teacher side (IB_MBM, synergy head, teachers' unfrozen blocks) uses
    ``spec.teacher_optim`` over every A-epoch; the student uses ``spec.student_optim`` over
    every student epoch; both schedulers step once per batch. ``Distiller(method,
    steps_per_epoch).optimizers`` is the same.
    """
    _spec(method, spec)
    return Distiller(method, steps_per_epoch).optimizers


def _helper_epoch(
    method: DistillMethod,
    loader: InMemoryLoader,
    optimizers: Optimizers,
    ep: EpochPlan,
    runtime: Runtime | None,
) -> dict[str, float]:
    """One epoch of a Distiller over the caller's optimizers."""
    return Distiller(method, max(1, len(loader)), runtime=runtime, optimizers=optimizers)._run_epoch(ep, loader)


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
    return _helper_epoch(method, loader, optimizers, ep, runtime)


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
    return _helper_epoch(method, loader, optimizers, ep, runtime)


@contextlib.contextmanager
def _run_folder(run_dir: str | Path | None, force: bool) -> Iterator[RunFolder]:
    """The caller's run folder, or a temporary one removed afterwards; its lock is released
    however the block ends."""
    if run_dir is not None:
        folder = RunFolder(run_dir, ("student.safetensors",))
        folder.check(force=force, resume=False)
        try:
            yield folder
        finally:
            folder.release()
        return
    with tempfile.TemporaryDirectory(prefix="asib-stages-") as tmp:
        folder = RunFolder(tmp, ())
        try:
            yield folder
        finally:
            folder.release()


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
