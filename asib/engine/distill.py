"""The ``distill`` step: stages of A-steps and B-steps (or a baseline) on the one training loop."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asib.data import Batch, InMemoryLoader
from asib.engine.checkpoint import (
    CheckpointInfo,
    load_model,
    load_tensors,
    read_info,
    save_model,
    save_tensors,
)
from asib.engine.distiller import ASIBDistiller
from asib.engine.distributed import convert_sync_bn, init_distributed, route
from asib.engine.evaluate import evaluate_predictor, top1_of
from asib.engine.finetune import checkpoint_extras
from asib.engine.loaders import SplitLoaders, split_loaders
from asib.engine.loop import EpochPlan, LoopConfig, run_plan
from asib.engine.optim import build_optimizer, build_scheduler
from asib.engine.progress import Progress
from asib.engine.run import RunFolder
from asib.engine.runtime import Runtime, make_runtime, set_random_seed
from asib.errors import CheckpointError, RecipeError
from asib.recipe import DistillSpec, IBMBMSpec, Recipe

NEEDS_TEACHERS = {"asib": 2, "avg_kd": 2, "kd": 1, "dkd": 1, "ce": 0}


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
        model, _ = load_model(path, kinds=("teacher",), device=device)
        models.append(model)
        paths.append(path)
    return models, paths


def _check_teacher_count(recipe: Recipe) -> None:
    spec = recipe.distill
    need = NEEDS_TEACHERS[spec.method]
    if len(recipe.teachers) < need:
        raise RecipeError(
            [f"teachers: method {spec.method} needs at least {need} teachers; the recipe has {len(recipe.teachers)}"]
        )
    if recipe.student is None:
        raise RecipeError(["student: the distill step needs a student section"])
    if spec.teacher_weights is not None and len(spec.teacher_weights) != len(recipe.teachers):
        raise RecipeError(
            [f"distill.teacher_weights: {len(spec.teacher_weights)} weights for {len(recipe.teachers)} teachers"]
        )


def resolve_kd_teacher(recipe: Recipe) -> int:
    key = recipe.distill.kd_teacher
    if isinstance(key, int):
        if not 0 <= key < len(recipe.teachers):
            raise RecipeError([f"distill.kd_teacher: index {key} is out of range"])
        return key
    return recipe.teachers.index(recipe.find_teacher(key))


class DistillTraining:
    """The distill plan for the loop: per stage, A-step epochs (asib only) then B-step epochs."""

    def __init__(
        self,
        distiller: ASIBDistiller,
        spec: DistillSpec,
        loaders: SplitLoaders,
        runtime: Runtime,
        teacher_val: list[float],
        save_best: Any,
        progress: Progress,
    ) -> None:
        from asib.models import setup_partial_freeze_schedule

        self.d, self.spec, self.loaders, self.runtime = distiller, spec, loaders, runtime
        self.teacher_val = teacher_val
        self.save_best = save_best
        self.progress = progress
        self.student_levels, self.teacher_levels = setup_partial_freeze_schedule(spec, spec.num_stages)
        steps = len(loaders.train)
        b_epochs = sum(spec.stage_epochs())
        self.student_opt = build_optimizer([distiller.student], spec.student_optim)
        self.student_sched = build_scheduler(self.student_opt, spec.student_optim, steps, b_epochs)
        self.asib = spec.method == "asib"
        self.teacher_opt = self.teacher_sched = None
        if self.asib:
            a_epochs = spec.synergy_warmup_epochs + spec.teacher_adapt_epochs * spec.num_stages
            side = [distiller.ib_mbm, distiller.synergy_head, *distiller.teachers]
            self.teacher_opt = build_optimizer(side, spec.teacher_optim)
            self.teacher_sched = build_scheduler(self.teacher_opt, spec.teacher_optim, steps, max(1, a_epochs))
        self.best_val: float | None = None
        self.best_epoch = 0
        self.synergy_val: float | None = None
        self.gate_log: list[bool] = []

    # -------------------------------------------------------------- the plan

    def plan(self) -> list[EpochPlan]:
        plan: list[EpochPlan] = []
        a_count = b_count = 0
        for stage, b_epochs in enumerate(self.spec.stage_epochs()):
            if self.asib:
                n_a = self.spec.teacher_adapt_epochs + (self.spec.synergy_warmup_epochs if stage == 0 else 0)
                for e in range(n_a):
                    plan.append(EpochPlan(len(plan), "A", stage, a_count, e))
                    a_count += 1
            for e in range(b_epochs):
                plan.append(EpochPlan(len(plan), "B", stage, b_count, e))
                b_count += 1
        return plan

    def loader(self, ep: EpochPlan) -> InMemoryLoader:
        return self.loaders.train

    def begin_epoch(self, ep: EpochPlan) -> None:
        from asib.models import apply_freeze_level

        d = self.d
        apply_freeze_level(d.student, self.student_levels[ep.stage])
        for teacher in d.teachers:
            apply_freeze_level(teacher, self.teacher_levels[ep.stage], train_head=False)
        if ep.phase == "A":
            d.student.eval()
            for teacher in d.teachers:
                teacher.train(any(p.requires_grad for p in teacher.parameters()))
            d.ib_mbm.train()
            d.synergy_head.train()
            return
        d.student.train()
        d.teachers.eval()
        if d.ib_mbm is not None:
            d.ib_mbm.eval()
            d.synergy_head.eval()
        if ep.stage_epoch == 0 and self.asib:
            self._set_gate(ep)

    def _set_gate(self, ep: EpochPlan) -> None:
        """Open the synergy term only while the synergy head is at least as good as the weakest teacher.

        Without a validation figure (no val split) the gate cannot judge and stays open.
        """
        d = self.d
        weakest = min(self.teacher_val) if self.teacher_val else 0.0
        judged = self.spec.synergy_gate and self.synergy_val is not None
        d.gate_open = not judged or self.synergy_val >= weakest
        # one entry per stage; a resume that repeats a stage's first epoch overwrites it
        del self.gate_log[ep.stage:]
        self.gate_log.append(d.gate_open)
        if not d.gate_open:
            self.progress.line(
                f"synergy gate closed for stage {ep.stage + 1}: synergy val top-1 {self.synergy_val:.2f} < weakest "
                f"teacher {weakest:.2f}; its KD weight moves to the teacher average"
            )

    def step(self, ep: EpochPlan, batch: Batch) -> dict[str, torch.Tensor]:
        d = self.d
        self.runtime.prepare(d.student, *d.teachers)  # channels_last / torch.compile, once
        with self.runtime.autocast(), self.runtime.inference_precision():
            terms = d(batch.x, batch.y, ep.phase_epoch, ep.phase, ep.stage, ep.stage_epoch, batch.y2, batch.lam)
        opt, sched = (self.teacher_opt, self.teacher_sched) if ep.phase == "A" else (self.student_opt, self.student_sched)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        sched.step()
        terms["loss"] = terms["loss"].detach()
        return terms

    # -------------------------------------------------------------- validation

    def _predict_student(self, x: torch.Tensor) -> torch.Tensor:
        with self.runtime.autocast():
            return self.d.student(x)

    def _predict_synergy(self, x: torch.Tensor) -> torch.Tensor:
        with self.runtime.autocast():
            return self.d.synergy_logits(x)

    def end_epoch(self, ep: EpochPlan, record: dict[str, Any]) -> dict[str, Any]:
        d = self.d
        was_training = {m: m.training for m in (d.student, d.ib_mbm, d.synergy_head) if m is not None}
        for m in was_training:
            m.eval()
        d.teachers.eval()
        out: dict[str, Any] = {}
        val = self.loaders.val
        if ep.phase == "A":
            out["lr_teacher_side"] = self.teacher_sched.get_last_lr()[0]
            if val is not None:
                self.synergy_val = round(top1_of(self._predict_synergy, val.batches(0)), 4)
                out["synergy_val_top1"] = self.synergy_val
        else:
            out["lr"] = self.student_sched.get_last_lr()[0]
            if self.asib:
                out["gate_open"] = d.gate_open
            if self.spec.disagreement != "none" and record.get("weighted_share", 1.0) == 0.0:
                out["warning"] = "no sample got a disagreement weight: the teachers are right on every image"
                self.progress.line(f"warning: {out['warning']}")
            if val is not None:
                acc = round(top1_of(self._predict_student, val.batches(0)), 4)
                out["student_val_top1"] = acc
                if self.best_val is None or acc > self.best_val:
                    self.best_val, self.best_epoch = acc, ep.index + 1
                    self.save_best(ep.index + 1)
            else:
                self.best_epoch = ep.index + 1
                self.save_best(ep.index + 1)
        for m, flag in was_training.items():
            m.train(flag)
        return out

    # -------------------------------------------------------------- resume

    def state_dict(self) -> dict[str, Any]:
        d = self.d
        state: dict[str, Any] = {
            "student": d.student.state_dict(),
            "student_opt": self.student_opt.state_dict(),
            "student_sched": self.student_sched.state_dict(),
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "synergy_val": self.synergy_val,
            "gate_open": d.gate_open,
            "gate_log": list(self.gate_log),
        }
        if self.asib:
            state["ib_mbm"] = d.ib_mbm.state_dict()
            state["head"] = d.synergy_head.state_dict()
            state["teacher_opt"] = self.teacher_opt.state_dict()
            state["teacher_sched"] = self.teacher_sched.state_dict()
            if any(level != 0 for level in self.teacher_levels):  # teacher blocks may have changed
                state["teachers"] = [t.state_dict() for t in d.teachers]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        d = self.d
        d.student.load_state_dict(state["student"])
        self.student_opt.load_state_dict(state["student_opt"])
        self.student_sched.load_state_dict(state["student_sched"])
        self.best_val, self.best_epoch = state["best_val"], state["best_epoch"]
        self.synergy_val, d.gate_open = state["synergy_val"], state["gate_open"]
        self.gate_log = list(state["gate_log"])
        if self.asib:
            d.ib_mbm.load_state_dict(state["ib_mbm"])
            d.synergy_head.load_state_dict(state["head"])
            self.teacher_opt.load_state_dict(state["teacher_opt"])
            self.teacher_sched.load_state_dict(state["teacher_sched"])
            for teacher, sd in zip(d.teachers, state.get("teachers", []), strict=False):
                teacher.load_state_dict(sd)


# ------------------------------------------------------------------ synergy checkpoints


def save_synergy(
    path: Path, distiller: ASIBDistiller, teacher_paths: list[Path], student_path: Path, spec: DistillSpec, extra: dict
) -> None:
    """Adapters + IB_MBM + head, with the teacher and student checkpoints they are queried with."""
    tensors = {f"ib_mbm.{k}": v for k, v in distiller.ib_mbm.state_dict().items()}
    tensors.update({f"head.{k}": v for k, v in distiller.synergy_head.state_dict().items()})
    ib = distiller.ib_mbm
    meta = {
        "asib.kind": "synergy",
        "asib.arch": "ib_mbm",
        "asib.num_classes": str(distiller.student.num_classes),
        "asib.teachers": [str(p) for p in teacher_paths],
        "asib.student": json.dumps(str(student_path)),
        "asib.query_dim": ib.query_dim,
        "asib.teacher_dims": ib.teacher_dims,
        "asib.ib_mbm": spec.ib_mbm.model_dump(),
        "asib.ib": spec.ib,
        **{f"asib.{k}": v for k, v in extra.items()},
    }
    save_tensors(path, tensors, meta)


def _resolve(ref: str, base: Path) -> Path:
    """A referenced checkpoint: as written (relative to the working folder), else beside the synergy file."""
    path = Path(ref)
    if path.exists() or path.is_absolute():
        return path
    beside = base / path.name
    return beside if beside.exists() else path


def load_synergy_predictor(info: CheckpointInfo, runtime: Runtime):
    """A function x -> synergy logits, rebuilt from a synergy checkpoint and the files it names."""
    from asib.models.ib_mbm import IBMBM, SynergyHead

    base = info.path.parent
    teachers = [load_model(_resolve(p, base), kinds=("teacher",), device=runtime.device)[0]
                for p in info.json_field("teachers")]
    student, _ = load_model(_resolve(info.json_field("student"), base), kinds=("student",), device=runtime.device)
    ib_spec = IBMBMSpec.model_validate(info.json_field("ib_mbm"))
    ib_mbm = IBMBM(info.json_field("query_dim"), info.json_field("teacher_dims"), ib_spec, ib=info.json_field("ib"))
    head = SynergyHead(ib_spec.dim, info.num_classes, ib_spec.head_dropout)
    tensors = load_tensors(info.path)
    ib_mbm.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("ib_mbm.")})
    head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
    ib_mbm.to(runtime.device).eval()
    head.to(runtime.device).eval()

    @torch.inference_mode()
    def predict(x: torch.Tensor) -> torch.Tensor:
        with runtime.autocast():
            feats = [t.features(x) for t in teachers]
            return head(ib_mbm(student.features(x), feats).mu)

    return predict


# ------------------------------------------------------------------ the step


def distill(
    recipe: Recipe,
    *,
    force: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
    loop: LoopConfig | None = None,
    run_dir: str | Path | None = None,
) -> DistillResult:
    """Run the recipe's distill section; write the student, the synergy module and the summary.

    ``run_dir`` (default: the recipe's run folder) receives this run only; the teachers are
    always read from the recipe's checkpoint paths, so sweeps can share them.
    """
    from asib.data import load_info
    from asib.models import build_ib_mbm_from_teachers, model_from_spec

    progress = progress or Progress()
    spec = recipe.distill
    _check_teacher_count(recipe)
    folder = RunFolder(run_dir or recipe.run_dir, ("student.safetensors", "synergy.safetensors"))
    folder.check(force=force, resume=resume, recipe_yaml=recipe.to_yaml())
    info = load_info(recipe.data_dir)
    kd_teacher = resolve_kd_teacher(recipe) if spec.method == "kd" else 0
    dist = init_distributed(recipe.device)  # under torchrun: rank 0 alone prints and writes
    folder.writer, progress = dist.is_main, progress if dist.is_main else Progress(enabled=False)
    batch_size = dist.per_rank_batch(spec.batch_size, "distill.batch_size")
    set_random_seed(recipe.seed, recipe.deterministic)
    runtime = make_runtime(recipe.device, recipe.deterministic, recipe.compile, recipe.precision)
    teachers, teacher_paths = ([], []) if spec.method == "ce" else load_teachers(recipe, info.num_classes, runtime.device)
    student = runtime.to_device(model_from_spec(recipe.student, info.num_classes))
    ib_mbm = head = None
    if spec.method == "asib":
        ib_mbm, head = build_ib_mbm_from_teachers(teachers, student, spec)
        ib_mbm, head = ib_mbm.to(runtime.device), head.to(runtime.device)
    distiller = ASIBDistiller(teachers, student, ib_mbm, head, spec, kd_teacher=kd_teacher)
    convert_sync_bn(distiller, dist, recipe.sync_bn)  # in place: student, teachers, fusion
    loaders = split_loaders(recipe.data_dir, runtime, batch_size, spec.eval_batch_size, spec.augment, recipe.seed,
                            dist.rank, dist.world_size)

    teacher_val, teacher_test = _teacher_figures(teachers, loaders, runtime)
    student_path = folder.path / "student.safetensors"
    synergy_path = folder.path / "synergy.safetensors"
    extras = checkpoint_extras(recipe, loaders)

    def save_best(epoch: int) -> None:
        if not dist.is_main:
            return
        save_model(student_path, student, "student", {**extras, "epoch": epoch, "method": spec.method})
        if ib_mbm is not None:
            save_synergy(synergy_path, distiller, teacher_paths, student_path, spec, {"epoch": epoch})

    # The step calls the distiller: under torchrun through DDP (asib.engine.distributed).
    routed = route(distiller, dist, find_unused_parameters=True)
    method = DistillTraining(routed, spec, loaders, runtime, teacher_val, save_best, progress)
    dist.barrier()  # every rank has checked the folder before rank 0 writes to it
    folder.start(recipe.to_yaml(), force=force, resume=resume)
    keys = ["epoch", "phase", "loss", "syn_ce", "ib_kl", "cccp", "ce", "kd", "kd_ens",
            "synergy_val_top1", "student_val_top1"]
    plan = run_plan(method, folder, progress, runtime.device, resume=resume, config=loop, summary_keys=keys, dist=dist)
    dist.barrier()  # the best checkpoints are on disk for every rank

    best, _ = load_model(student_path, kinds=("student",), device=runtime.device)
    student_test = evaluate_predictor(best, loaders.test.batches(0), info.num_classes).top1
    synergy_test = None
    if ib_mbm is not None:
        predict = load_synergy_predictor(read_info(synergy_path), runtime)
        synergy_test = evaluate_predictor(predict, loaders.test.batches(0), info.num_classes).top1
    seconds = plan.seconds
    summary = {
        "method": spec.method,
        "student_arch": recipe.student.arch,
        "teachers": [t.name for t in recipe.teachers] if teachers else [],
        "student_val_top1": method.best_val,
        "student_test_top1": student_test,
        "synergy_test_top1": synergy_test,
        "teacher_test_top1": teacher_test,
        "teacher_val_top1": teacher_val,
        "best_epoch": method.best_epoch,
        "gate_open_per_stage": method.gate_log,
        "seconds": round(seconds, 2),
    }
    folder.write_summary(summary)
    folder.finish()
    names = summary["teachers"]
    return DistillResult(folder.path, spec.method, names, teacher_test, synergy_test, method.best_val,
                         student_test, seconds, summary)


def _teacher_figures(
    teachers: list[nn.Module], loaders: SplitLoaders, runtime: Runtime
) -> tuple[list[float], list[float]]:
    """Validation (for the synergy gate) and test top-1 of every teacher, once."""
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

