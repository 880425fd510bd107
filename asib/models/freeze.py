"""Partial freezing by block (METHOD.md, "Stages and partial freezing").

Level ``-1``: everything trains. Level ``L >= 0``: the classifier (when ``train_head``) and
the last ``L`` blocks of ``model.blocks()`` train; every other parameter is frozen and
every BatchNorm outside those blocks is put in eval mode, where it stays across later
``model.train()`` calls (``FeatureClassifier.train`` consults ``model.frozen_norms``).
A level above the number of blocks trains every block: recipes give one schedule for
models of any depth.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from asib.errors import RecipeError
from asib.models.classifier import FeatureClassifier
from asib.recipe import DistillSpec, spec_from

_BN = nn.modules.batchnorm._BatchNorm


def apply_freeze_level(model: FeatureClassifier, level: int, train_head: bool = True) -> None:
    """Set ``requires_grad`` and frozen-BatchNorm mode for one freeze level.

    ``train_head=False`` keeps the classifier frozen at every level, ``-1`` included (a
    teacher's classifier is not on the synergy path; its "head" is the adapter).
    """
    if level < -1:
        raise ValueError(f"freeze level must be -1 or >= 0 (given: {level})")
    blocks = model.blocks()
    if level == -1:
        trainable: list[nn.Module] = [model]
    else:
        trainable = blocks[max(0, len(blocks) - level) :] if level > 0 else []
    head = [model.classifier] if train_head else []
    train_ids = {id(p) for module in trainable + head for p in module.parameters()}
    live = {id(m) for module in trainable + head for m in module.modules()}
    if not train_head:
        train_ids -= {id(p) for p in model.classifier.parameters()}
        live -= {id(m) for m in model.classifier.modules()}
    for param in model.parameters():
        param.requires_grad_(id(param) in train_ids)
    frozen = {name for name, m in model.named_modules() if isinstance(m, _BN) and id(m) not in live}
    model.frozen_norms = frozenset(frozen)
    for name, module in model.named_modules():
        if isinstance(module, _BN):
            module.train(model.training and name not in frozen)


def trainable_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that currently require grad."""
    return {name for name, p in model.named_parameters() if p.requires_grad}


def count_trainable_parameters(model: nn.Module) -> int:
    """Number of scalar parameters that currently require grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def default_student_schedule(num_stages: int, pretrained: bool) -> list[int]:
    """All ``-1`` for a student trained from scratch; for a pretrained one, ``-1`` then
    fewer and fewer trainable blocks (``[-1, 2, 1, 0]`` for four stages)."""
    if not pretrained:
        return [-1] * num_stages
    return [-1] + [num_stages - 1 - s for s in range(1, num_stages)]


def setup_partial_freeze_schedule(
    spec: DistillSpec | dict[str, Any], num_stages: int | None = None, student_pretrained: bool = False
) -> tuple[list[int], list[int]]:
    """(student levels, teacher levels), one per stage.

    A missing ``student_freeze_schedule`` means ``default_student_schedule`` (all ``-1``
    unless ``student_pretrained``); a missing ``teacher_freeze_schedule`` means ``0`` at
    every stage: no teacher block trains, and as teachers use ``train_head=False`` the
    teachers are then frozen entirely (the adapters, their "head", live outside them).
    ``num_stages`` defaults to ``spec.num_stages``.
    """
    distill: DistillSpec = spec_from(DistillSpec, spec)
    stages = distill.num_stages if num_stages is None else num_stages
    problems = []
    for name in ("student_freeze_schedule", "teacher_freeze_schedule"):
        sched = getattr(distill, name)
        if sched is not None and len(sched) != stages:
            problems.append(f"distill.{name}: has {len(sched)} entries but there are {stages} stages")
    if problems:
        raise RecipeError(problems)
    student = distill.student_freeze_schedule
    teacher = distill.teacher_freeze_schedule
    if student is None:
        student = default_student_schedule(stages, student_pretrained)
    if teacher is None:
        teacher = [0] * stages
    return list(student), list(teacher)
