"""Fine-tuning one classifier with cross-entropy: the ``finetune-teacher`` step."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asib.data import Batch
from asib.engine.checkpoint import checkpoint_extras, load_model, save_model
from asib.engine.distributed import convert_sync_bn, init_distributed, route, unwrap
from asib.engine.loaders import SplitLoaders, split_loaders
from asib.engine.loop import EpochPlan, LoopConfig, run_plan
from asib.engine.metrics import EvalResult, evaluate_predictor, top1_of
from asib.engine.optim import build_optimizer, build_scheduler
from asib.engine.progress import Progress
from asib.engine.runfolder import RunFolder
from asib.engine.runtime import Runtime, make_runtime, set_random_seed
from asib.errors import DataError
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
            val = top1_of(self._predict, self.loaders.val.batches(0))
            out["val_top1"] = round(val, 4)
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
    from asib.data import load_info
    from asib.models import model_from_spec

    progress = progress or Progress()
    folder = RunFolder(recipe.teacher_dir(teacher), ("model.safetensors", "last.safetensors"))
    status = folder.check(force=force, resume=resume, recipe_yaml=recipe.to_yaml())
    checkpoint = recipe.teacher_checkpoint(teacher)
    if status == "done":
        (notice or progress.line)(f"{folder.path}: the run has finished; nothing to resume")
        nan = float("nan")
        figures = EvalResult(nan, nan, nan, nan, 0, [])
        return FinetuneResult(folder.path, checkpoint, None, figures, teacher.train.epochs, nan,
                              finished_before=True)
    if status == "restart":
        (notice or progress.line)(f"{folder.path}: no train state to resume; starting the run from the beginning")
    force, resume = force or status == "restart", status == "resume"
    info = load_info(recipe.data_dir)  # fails early, before anything is written
    dist = init_distributed(recipe.device)  # under torchrun: rank 0 alone prints and writes
    folder.writer, progress = dist.is_main, progress if dist.is_main else Progress(enabled=False)
    set_random_seed(recipe.seed, recipe.deterministic)
    runtime = make_runtime(recipe.device, recipe.deterministic, recipe.compile, recipe.precision)
    spec = teacher.train
    model = runtime.to_device(convert_sync_bn(model_from_spec(teacher, info.num_classes), dist, recipe.sync_bn))
    where = f"teachers[{recipe.teachers.index(teacher)}].train.batch_size"
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
        plan = run_plan(task, folder, progress, runtime.device, resume=resume, config=loop,
                        summary_keys=["epoch", "loss", "val_top1", "lr"], dist=dist)
        if dist.is_main:
            save_model(folder.path / "last.safetensors", model, "teacher", {**extras, "epoch": spec.epochs})
        dist.barrier()  # the best checkpoint is on disk for every rank

        best, _ = load_model(checkpoint, device=runtime.device)
        test = evaluate_predictor(best, loaders.test.batches(0), info.num_classes)
        seconds = plan.seconds
        folder.write_summary({
            "teacher": teacher.name,
            "arch": teacher.arch,
            "checkpoint": str(checkpoint),
            "val_top1": task.best_val,
            "test_top1": test.top1,
            "test_top5": test.top5,
            "best_epoch": task.best_epoch,
            "epochs": spec.epochs,
            "seconds": round(seconds, 2),
        })
        folder.finish()
    finally:
        folder.release()  # .lock goes when the run ends, however it ends (finish released it already)
    return FinetuneResult(folder.path, checkpoint, task.best_val, test, spec.epochs, seconds)
