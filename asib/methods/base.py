"""The one interface every distillation method implements (METHOD.md, "Baselines in the same engine").

A method is a module that owns what it trains besides the student (ASIB: adapters, IB_MBM,
synergy head), says which optimizer trains what in each phase, and computes the loss terms
of one step. Everything around the step (stages, data order, student validation and
checkpoints, train state, resume, DDP) is the distill task's (``asib.pipeline.distill``),
the same for every method, so methods compare like for like.

Phases: ``"B"`` is a student step (every method has it); ``"A"`` a teacher-side step, for
methods whose ``a_epochs`` is above zero (ASIB). ``forward(ep, batch)`` is the loss of one
step, so under torchrun the method is what DistributedDataParallel wraps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from asib.engine.runtime import Runtime, as_layout, inference_plan, precision_autocast
from asib.engine.schedules import get_tau, ramp
from asib.methods.losses import cross_entropy, standardize_logits, teacher_average
from asib.recipe import DistillSpec, OptimSpec

if TYPE_CHECKING:
    from asib.data import Batch, InMemoryLoader
    from asib.engine.loop import EpochPlan

Terms = dict[str, Tensor | float]


@dataclass
class RunContext:
    """What a method may need from the run around it; set once before training."""

    runtime: Runtime
    teacher_val: list[float] = field(default_factory=list)  # the teachers' val top-1 (%), measured once
    val: InMemoryLoader | None = None  # the validation split, None without one
    say: Callable[[str], None] = lambda _line: None  # one line on the console (progress-aware)


@dataclass(frozen=True)
class Artifacts:
    """Where the distill step writes a method's files, and what they refer to."""

    folder: Path
    student: Path
    teacher_paths: list[Path]
    epoch: int


class DistillMethod(nn.Module):
    """Base of every method: the student, the teachers, the spec, and the hooks the task calls."""

    name: ClassVar[str] = ""
    min_teachers: ClassVar[int] = 0
    uses_teachers: ClassVar[bool] = True  # False: the distill step loads no teacher (ce)
    # Extra distill keys a plug-in method reads (built-in methods are listed in asib.recipe.METHOD_KEYS).
    keys: ClassVar[frozenset[str]] = frozenset()
    artifact_names: ClassVar[tuple[str, ...]] = ()  # files of the run folder the method writes

    def __init__(
        self,
        teachers: Sequence[nn.Module],
        student: nn.Module,
        spec: DistillSpec,
        teacher_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.student = student
        self.teachers = nn.ModuleList(teachers)
        self.teacher_names = list(teacher_names or [f"teacher{k}" for k in range(len(teachers))])
        self.ctx: RunContext | None = None
        for teacher in self.teachers:  # the teachers are fixed; a method that trains a copy says so
            teacher.requires_grad_(False)

    # ------------------------------------------------------------ what trains

    def a_epochs(self, stage: int) -> int:
        """Teacher-side (A) epochs before the student epochs of ``stage``; 0 for most methods."""
        return 0

    def optim_groups(self) -> dict[str, tuple[list[nn.Module], OptimSpec]]:
        """Per phase, the modules its optimizer updates and the optimizer's spec."""
        return {"B": ([self.student], self.spec.student_optim)}

    def trained_modules(self) -> dict[str, nn.Module]:
        """The modules whose weights change (saved in the train state); the student under 'student'."""
        return {"student": self.student}

    def models(self) -> list[nn.Module]:
        """The networks that see images (the runtime puts them in its memory format once)."""
        return [self.student, *self.teachers]

    def bind(self, ctx: RunContext) -> None:
        """Receive the run's context before the first epoch."""
        self.ctx = ctx

    # ------------------------------------------------------------ one epoch, one step

    def begin_epoch(self, ep: EpochPlan) -> None:
        """Modes for the epoch: the student trains, the teachers are in eval mode."""
        self.student.train()
        self.teachers.eval()

    def forward(self, ep: EpochPlan, batch: Batch) -> Terms:
        """The loss terms of one step; ``loss`` is the one to backpropagate."""
        raise NotImplementedError

    def end_epoch(self, ep: EpochPlan, record: dict[str, Any]) -> dict[str, Any]:
        """Figures of the method's own to add to the epoch's record (the step terms' means so far)."""
        return {}

    # ------------------------------------------------------------ resume and artifacts

    def extra_state(self) -> dict[str, Any]:
        """State besides the trained modules' weights that a resume needs."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def save_artifacts(self, where: Artifacts) -> None:
        """Write the method's files beside the student checkpoint (when the student is saved)."""

    def test_figures(self, folder: Path, test: InMemoryLoader, num_classes: int) -> dict[str, Any]:
        """Figures of the method's own on the test split, for summary.json."""
        return {}

    def summary(self) -> dict[str, Any]:
        """Entries of the method's own for summary.json."""
        return {}

    # ------------------------------------------------------------ helpers for the losses

    def tau_at(self, student_epoch: int) -> float:
        total = self.spec.total_student_epochs
        return get_tau(min(student_epoch, max(0, total - 1)), self.spec, total)

    def kd_ramp(self, student_epoch: int) -> float:
        return ramp(student_epoch, self.spec.kd_warmup_epochs)

    def kd_input(self, logits: Tensor) -> Tensor:
        """Logits as a KD term's temperature softmax takes them: z-scored per sample along the
        classes when ``logit_standardization`` is on (Sun et al. 2024), else as they are."""
        return standardize_logits(logits) if self.spec.logit_standardization else logits

    def teacher_logits(self, x: Tensor, which: Sequence[int] | None = None) -> list[Tensor]:
        """Logits of the (frozen) teachers, without autograd, in the run's inference precision."""
        return frozen_outputs(self.teachers if which is None else [self.teachers[i] for i in which], x)[1]

    def teacher_target(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The teacher average of the recipe's weights (fp32), and each teacher's logits."""
        logits = self.teacher_logits(x)
        return teacher_average(logits, self.spec.teacher_weights), logits

    def kd_terms(self, s: Tensor, batch: Batch, kd: Tensor, weight: float, tau: float, **logged: Tensor) -> Terms:
        """A logit-KD step's terms: ``loss = ce_alpha * CE + weight * kd`` (CE on the batch's
        labels, mixed ones included), and what it logs: CE, the KD term, ``logged`` (detached),
        tau, the KD weight and the training accuracy."""
        spec = self.spec
        ce = cross_entropy(s, batch.y, spec.label_smoothing, batch.y2, batch.lam)
        return {
            "loss": spec.ce_alpha * ce + weight * kd,
            "ce": ce.detach(),
            "kd": kd.detach(),
            **{k: v.detach() for k, v in logged.items()},
            "tau": float(tau),
            "kd_w": float(weight),
            "train_acc": accuracy_term(s, batch.y),
        }


def frozen_outputs(models: Sequence[nn.Module], x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Pooled features and logits of frozen models: no autograd, each in the precision and
    layout its inference plan chose (``Runtime.plan_of``; outside a step, as they are).

    Inside a step that records gradients (a fusion module learns from the features) they run
    under ``no_grad``; otherwise under ``inference_mode``, which is cheaper. A model whose
    layout differs from the batch's gets the batch converted once per call (shared by the
    models of that layout); the measurement that chose the layout timed that conversion too.
    """
    feats, logits = [], []
    inputs: dict[bool, Tensor] = {}
    guard = torch.no_grad() if torch.is_grad_enabled() else torch.inference_mode()
    with guard:
        for model in models:
            plan = inference_plan(model)
            if plan is None:
                h = model.features(x)
                feats.append(h)
                logits.append(model.head(h))
                continue
            if plan.channels_last not in inputs:
                inputs[plan.channels_last] = as_layout(x, plan.channels_last)
            with precision_autocast(plan.dtype, x.device):
                h = model.features(inputs[plan.channels_last])
                feats.append(h)
                logits.append(model.head(h))
    return feats, logits


def accuracy_term(logits: Tensor, y: Tensor) -> Tensor:
    """Top-1 of a batch in percent, as a device tensor (no host sync)."""
    return (logits.detach().argmax(1) == y).float().mean() * 100


def dominant_labels(batch: Batch) -> Tensor:
    """The label that carries most of a (possibly mixed) batch's target: y, or y2 when lam < 0.5."""
    if batch.y2 is None or batch.lam >= 0.5:
        return batch.y
    return batch.y2
