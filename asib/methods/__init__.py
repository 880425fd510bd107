"""Distillation methods: one module per method on one interface (``base.DistillMethod``), and
the registry that maps a recipe's ``distill.method`` to its class.

Adding a method is one module with a ``DistillMethod`` subclass plus one line in ``METHODS``
(or ``register_method(cls)`` from outside the package); the distill keys it reads beyond the
shared ones are its ``keys`` (built-in methods list theirs in ``asib.recipe.METHOD_KEYS``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from asib.errors import ModelError, RecipeError, did_you_mean
from asib.methods.asib import ASIB
from asib.methods.avg_kd import AvgKD
from asib.methods.base import Artifacts, DistillMethod, RunContext, Terms
from asib.methods.ca_mkd import CAMKD
from asib.methods.ce import CE
from asib.methods.dist import DIST
from asib.methods.dkd import DKD
from asib.methods.kd import KD
from asib.models.adapt import adapt_all, as_feature_classifier
from asib.recipe import METHOD_KEYS, DistillSpec, register_method_keys, spec_from

METHODS: dict[str, type[DistillMethod]] = {
    "ce": CE,
    "kd": KD,
    "avg_kd": AvgKD,
    "dkd": DKD,
    "ca_mkd": CAMKD,
    "dist": DIST,
    "asib": ASIB,
}


def register_method(cls: type[DistillMethod], defaults: dict[str, Any] | None = None) -> type[DistillMethod]:
    """Make ``cls`` a method recipes can name (``distill.method: <cls.name>``); usable as a decorator.

    ``cls.keys`` lists the distill keys it reads beyond the shared ones; ``defaults`` the
    method's own defaults for loss weights such as ``ce_alpha``.
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    register_method_keys(cls.name, cls.keys, defaults)
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[DistillMethod]:
    if name not in METHODS:
        names = sorted(METHODS)
        raise RecipeError([f"distill.method: unknown method '{name}' (methods: {', '.join(names)}){did_you_mean(name, names)}"])
    return METHODS[name]


def build_method(
    spec: DistillSpec | dict[str, Any],
    teachers: Sequence[nn.Module],
    student: nn.Module,
    teacher_names: Sequence[str] | None = None,
) -> DistillMethod:
    """The recipe's method over these teachers and this student (at least ``min_teachers`` of them).

    Teachers and student may be any ``nn.Module`` classifiers: those that are not
    FeatureClassifiers are adapted (``asib.models.adapt``), keeping their parameters, and one
    that cannot be is refused here, with one line saying what it lacks.
    """
    spec = spec_from(DistillSpec, spec)
    cls = method_class(spec.method)
    if len(teachers) < cls.min_teachers:
        raise RecipeError(
            [f"teachers: method {spec.method} needs at least {cls.min_teachers} teachers; got {len(teachers)}"]
        )
    if spec.teacher_weights is not None and len(spec.teacher_weights) != len(teachers):
        raise RecipeError([f"distill.teacher_weights: {len(spec.teacher_weights)} weights for {len(teachers)} teachers"])
    student = as_feature_classifier(student, where="student")
    adapted = adapt_all(teachers, "teachers")
    for i, teacher in enumerate(adapted):
        if teacher.num_classes != student.num_classes:
            raise ModelError(f"teachers[{i}]: {teacher.arch} has {teacher.num_classes} classes but the student"
                             f" {student.arch} has {student.num_classes}")
    return cls(adapted, student, spec, teacher_names)


__all__ = [
    "ASIB",
    "CAMKD",
    "CE",
    "DIST",
    "DKD",
    "KD",
    "METHODS",
    "METHOD_KEYS",
    "Artifacts",
    "AvgKD",
    "DistillMethod",
    "RunContext",
    "Terms",
    "build_method",
    "method_class",
    "register_method",
]
