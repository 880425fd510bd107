"""asib as a library: one import for building, fusing, training, freezing and measuring.

    import asib.api as asib
    method = asib.build_method({"method": "kd"}, [my_teacher], my_student)  # any nn.Module classifiers
    distiller = asib.Distiller(method, steps_per_epoch=100)  # the CLI's optimizers, precision, layout
    terms = distiller.step(images, labels, epoch=0)  # one optimizer step; device tensors, no host sync

Every name here lives in its own module (``asib.models``, ``asib.methods``, ``asib.pipeline``,
``asib.data``, ``asib.engine``); this module only gathers them. Functions that take a recipe
spec accept the typed spec or a plain dict, which is validated first with the same error
lines as the CLI. Training runs in the CLI's runtime (``make_runtime(device)``: bf16 and
channels_last where ``asib distill`` uses them) unless a ``runtime`` is given.
"""

from __future__ import annotations

from asib.data import InMemoryLoader, load_info, make_loader
from asib.data.tasks import (
    ClassInfoMixin,
    TaskSplit,
    get_split_loaders,
    prepare_dataset,
    task_classes,
    tensor_loader,
)
from asib.engine.checkpoint import load_model, read_info, save_model
from asib.engine.logging import ExperimentLogger, get_logger, track
from asib.engine.metrics import compute_accuracy
from asib.engine.progress import Progress
from asib.engine.runtime import Runtime, make_runtime, set_random_seed
from asib.engine.schedules import get_tau
from asib.methods import METHODS, DistillMethod, build_method, register_method
from asib.methods.asib import get_beta
from asib.methods.losses import ib_loss, kd_loss_fn
from asib.models import (
    FeatureClassifier,
    apply_freeze_level,
    as_feature_classifier,
    build_ib_mbm_from_teachers,
    build_model,
    count_trainable_parameters,
    create_student_by_name,
    create_teacher_by_name,
    setup_partial_freeze_schedule,
)
from asib.pipeline.library import (
    Distiller,
    Optimizers,
    create_optimizers_and_schedulers,
    default_runtime,
    run_training_stages,
    student_distillation_update,
    teacher_adaptive_update,
)
from asib.recipe import AugmentSpec, DistillSpec, OptimSpec, Recipe, load_recipe, spec_from

__all__ = [
    # models
    "build_model",
    "create_teacher_by_name",
    "create_student_by_name",
    "as_feature_classifier",
    "FeatureClassifier",
    "count_trainable_parameters",
    "load_model",
    "read_info",
    "save_model",
    # fusing teachers
    "build_ib_mbm_from_teachers",
    "build_method",
    "DistillMethod",
    "METHODS",
    "register_method",
    # training
    "Distiller",
    "Optimizers",
    "create_optimizers_and_schedulers",
    "run_training_stages",
    "teacher_adaptive_update",
    "student_distillation_update",
    # runtime: device, precision, memory format
    "Runtime",
    "make_runtime",
    "default_runtime",
    # freezing
    "setup_partial_freeze_schedule",
    "apply_freeze_level",
    # losses and schedules
    "ib_loss",
    "kd_loss_fn",
    "get_tau",
    "get_beta",
    # data
    "prepare_dataset",
    "ClassInfoMixin",
    "get_split_loaders",
    "task_classes",
    "TaskSplit",
    "InMemoryLoader",
    "make_loader",
    "tensor_loader",
    "load_info",
    # utilities
    "compute_accuracy",
    "set_random_seed",
    "Progress",
    "track",
    "ExperimentLogger",
    "get_logger",
    # recipe specs
    "AugmentSpec",
    "DistillSpec",
    "OptimSpec",
    "Recipe",
    "load_recipe",
    "spec_from",
]
