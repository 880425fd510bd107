"""Fine-tuning one classifier with cross-entropy: the ``finetune-teacher`` step."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from asib.data import Batch
from asib.engine.checkpoint import checkpoint_extras, load_model, save_model
from asib.engine.distributed import convert_sync_bn, init_distributed, route, unwrap
from asib.engine.loaders import SplitLoaders, split_loaders
from asib.engine.loop import EpochPlan, LoopConfig, run_plan
from asib.engine.metrics import EvalResult, collect_logits, compute_accuracy, evaluate_predictor
from asib.engine.optim import build_optimizer, build_scheduler
from asib.engine.progress import Progress
from asib.engine.runfolder import RunFolder
from asib.engine.runtime import Runtime, make_runtime, set_random_seed
from asib.engine.tracking import check_tracking, environment
from asib.errors import AsibError, DataError
from asib.methods.losses import cross_entropy
from asib.recipe import Recipe, TeacherSpec, TrainSpec


@dataclass(frozen=True)
class FinetuneResult:
    run_dir: Path
    checkpoint: Path
    val_top1: float | None
    test: EvalResult
    epochs: int
    seconds: float
    finished_before: bool = False  # --resume found the run finished: nothing ran (figures: its summary.json)
    summary: dict[str, Any] = field(default_factory=dict)  # what summary.json says


def val_figures(predict: Any, batches: Any) -> tuple[float, float]:
    """Top-1 (%) and mean cross-entropy of one pass over the validation batches (the same logits)."""
    logits, targets = collect_logits(predict, batches)
    return compute_accuracy(logits, targets, 1), float(F.cross_entropy(logits.float(), targets).item())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tell(progress: Progress, folder: RunFolder) -> Callable[[str], None]:
    """A note shown with the progress lines and kept in the run's train.log."""

    def say(text: str) -> None:
        folder.log_line(text)
        progress.line(text)

    return say


def planned_steps(recipe: Recipe, teacher: TeacherSpec) -> int:
    """The optimizer steps a teacher's run will take (rank 0 under torchrun), from dataset.json
    alone, for the progress display's ETA before its data is loaded (0 when unknown)."""
    from asib.data import load_info

    try:
        n = load_info(recipe.data_dir).counts.get("train", 0)
    except AsibError:  # no prepared data yet: the run itself says so
        return 0
    world = max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    batch = max(1, teacher.train.batch_size // world)
    per_rank = n // world if n // world > batch else math.ceil(n / world)
    steps = per_rank // batch if n // world > batch else math.ceil(per_rank / batch)
    return steps * teacher.train.epochs


class CETask:
    """Cross-entropy training of one model; keeps the best-on-val weights."""

    def __init__(
        self,
        model: nn.Module,
        spec: TrainSpec,
        loaders: SplitLoaders,
        runtime: Runtime,
        save_best: Any,
    ) -> None:
        self.model, self.spec, self.loaders, self.runtime = model, spec, loaders, runtime
        self.optimizer = build_optimizer([model], spec.optim)
        self.scheduler = build_scheduler(self.optimizer, spec.optim, len(loaders.train), spec.epochs)
        self.save_best = save_best
        self.best_val: float | None = None
        self.best_epoch = 0

    def plan(self) -> list[EpochPlan]:
        return [EpochPlan(e, "train", 0, e, e) for e in range(self.spec.epochs)]

    def steps(self, ep: EpochPlan) -> int:
        return len(self.loaders.train)

    def batches(self, ep: EpochPlan, start: int = 0) -> Iterator[Batch]:
        return self.loaders.train.batches(ep.index, start)

    def begin_epoch(self, ep: EpochPlan) -> None:
        self.model.train()

    def step(self, ep: EpochPlan, batch: Batch) -> dict[str, torch.Tensor]:
        self.runtime.prepare(self.model)  # channels_last / torch.compile, once
        with self.runtime.autocast():
            logits = self.model(batch.x)
        loss = cross_entropy(logits.float(), batch.y, self.spec.label_smoothing, batch.y2, batch.lam)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return {"loss": loss.detach()}

    def end_epoch(self, ep: EpochPlan, record: dict[str, Any]) -> dict[str, Any]:
        self.model.eval()
        out: dict[str, Any] = {"lr": self.scheduler.get_last_lr()[0]}
        if self.loaders.val is not None:
            val, val_loss = val_figures(self._predict, self.loaders.val.batches(0))
            out["val_top1"] = round(val, 4)
            out["val_loss"] = round(val_loss, 6)
            if self.best_val is None or val > self.best_val:
                self.best_val, self.best_epoch = val, ep.index + 1
                self.save_best(self.model, val, ep.index + 1)
        else:  # no validation split: the last epoch is the selected one
            self.best_epoch = ep.index + 1
            self.save_best(self.model, None, ep.index + 1)
        return out

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        with self.runtime.autocast():
            return self.model(x)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.best_val, self.best_epoch = state["best_val"], state["best_epoch"]


def check_classes(model: nn.Module, num_classes: int, what: str) -> None:
    if model.num_classes != num_classes:
        raise DataError(f"{what} has {model.num_classes} classes but the data has {num_classes}")


def finetune_teacher(
    recipe: Recipe,
    teacher: TeacherSpec,
    *,
    force: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
    loop: LoopConfig | None = None,
    notice: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Fine-tune one teacher of the recipe; write its run folder and checkpoint.

    With ``resume`` a run without a train state starts from the beginning and a finished run
    is left as it is (``finished_before``); ``notice`` (default: the progress lines) hears which.
    """
    progress = progress or Progress()
    try:
        return _finetune(recipe, teacher, force, resume, progress, loop, notice)
    finally:
        progress.close()  # the live display is down before the command prints its table


def _finetune(
    recipe: Recipe,
    teacher: TeacherSpec,
    force: bool,
    resume: bool,
    progress: Progress,
    loop: LoopConfig | None,
    notice: Callable[[str], None] | None,
) -> FinetuneResult:
    from asib.data import load_info
    from asib.models import model_from_spec

    folder = RunFolder(recipe.teacher_dir(teacher), ("model.safetensors", "last.safetensors"))
    status = folder.check(force=force, resume=resume, recipe_yaml=recipe.to_yaml())
    checkpoint = recipe.teacher_checkpoint(teacher)
    if status == "done":
        (notice or progress.line)(f"{folder.path}: the run has finished; nothing to resume")
        progress.skip_plan()
        nan = float("nan")
        figures = EvalResult(nan, nan, nan, nan, 0, [])
        return FinetuneResult(folder.path, checkpoint, None, figures, teacher.train.epochs, nan,
                              finished_before=True, summary=folder.summary())
    started = None
    if status == "restart":
        started = f"{folder.path}: no train state to resume; starting the run from the beginning"
        (notice or progress.line)(started)
    force, resume = force or status == "restart", status == "resume"
    check_tracking(recipe.tracking)
    progress.status(f"teacher {teacher.name}: reading the data")
    info = load_info(recipe.data_dir)  # fails early, before anything is written
    dist = init_distributed(recipe.device)  # under torchrun: rank 0 alone prints and writes
    folder.writer, progress = dist.is_main, progress if dist.is_main else Progress(enabled=False)
    set_random_seed(recipe.seed, recipe.deterministic)
    runtime = make_runtime(recipe.device, recipe.deterministic, recipe.compile, recipe.precision)
    spec = teacher.train
    progress.status(f"teacher {teacher.name}: building {teacher.arch}")
    model = runtime.to_device(convert_sync_bn(model_from_spec(teacher, info.num_classes), dist, recipe.sync_bn))
    where = f"teachers[{recipe.teachers.index(teacher)}].train.batch_size"
    progress.status(f"teacher {teacher.name}: loading the data onto {runtime.device.type}")
    loaders = split_loaders(
        recipe.data_dir, runtime, dist.per_rank_batch(spec.batch_size, where), spec.eval_batch_size, spec.augment,
        recipe.seed, dist.rank, dist.world_size,
    )
    extras = checkpoint_extras(recipe, loaders.info, teacher=teacher.name)

    def save_best(m: nn.Module, val: float | None, epoch: int) -> None:
        if dist.is_main:
            save_model(checkpoint, unwrap(m), "teacher", {**extras, "val_top1": val, "epoch": epoch})

    task = CETask(route(model, dist), spec, loaders, runtime, save_best)
    dist.barrier()  # every rank has checked the folder before rank 0 writes to it
    folder.start(recipe.to_yaml(), force=force, resume=resume)
    try:
        if started:
            folder.log_line(f"note: {started}")
        folder.open_tracking(recipe.tracking, resume=resume, name=f"{recipe.name}-{teacher.name}",
                             config=recipe.model_dump(mode="json"), note=tell(progress, folder))
        plan = run_plan(task, folder, progress, runtime.device, resume=resume, config=loop,
                        summary_keys=["epoch", "loss", "val_loss", "val_top1", "lr"], dist=dist,
                        label=f"teacher {teacher.name}")
        progress.status(f"teacher {teacher.name}: testing the best-on-val weights")
        if dist.is_main:
            save_model(folder.path / "last.safetensors", model, "teacher", {**extras, "epoch": spec.epochs})
        dist.barrier()  # the best checkpoint is on disk for every rank

        best, _ = load_model(checkpoint, device=runtime.device)
        test = evaluate_predictor(best, loaders.test.batches(0), info.num_classes)
        seconds = plan.seconds
        summary = {
            "teacher": teacher.name,
            "arch": teacher.arch,
            "checkpoint": str(checkpoint),
            "val_top1": task.best_val,
            "test_top1": test.top1,
            "test_top5": test.top5,
            "best_epoch": task.best_epoch,
            "epochs": spec.epochs,
            "params": count_parameters(best),
            **environment(runtime.device),
            "seconds": round(seconds, 2),
        }
        folder.write_summary(summary)
        val = "-" if task.best_val is None else f"{task.best_val:.2f}"
        folder.log_line(f"{teacher.name}: best epoch {task.best_epoch}/{spec.epochs}, val top-1 {val},"
                        f" test top-1 {test.top1:.2f} in {seconds:.1f}s -> {checkpoint}")
        folder.finish()
    finally:
        folder.release()  # .lock goes when the run ends, however it ends (finish released it already)
    return FinetuneResult(folder.path, checkpoint, task.best_val, test, spec.epochs, seconds, summary=summary)
