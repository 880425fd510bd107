"""Models: the registry over the CIFAR zoo, torchvision and timm; the feature-classifier
interface every teacher and student has, and its adapter for any nn.Module classifier;
local weights; freezing by block."""

from asib.models import cifar  # noqa: F401  (registers the zoo)
from asib.models.adapt import ModuleClassifier, as_feature_classifier
from asib.models.classifier import (
    FeatureClassifier,
    ModelCfg,
    ModuleGroup,
    TimmClassifier,
    TorchvisionClassifier,
)
from asib.models.freeze import (
    apply_freeze_level,
    count_trainable_parameters,
    setup_partial_freeze_schedule,
    trainable_parameter_names,
)
from asib.models.ib_mbm import (
    IBMBM,
    IBOutput,
    SynergyHead,
    TeacherAdapter,
    build_ib_mbm_from_teachers,
    synergy_target,
)
from asib.models.registry import (
    build_model,
    check_recipe_models,
    create_model,
    create_student_by_name,
    create_teacher_by_name,
    is_known_model,
    list_models,
    model_from_spec,
    zoo_feature_dims,
)
from asib.models.weights import LoadReport, load_weights, read_state_dict
from asib.models.zoo import register_model

__all__ = [
    "IBMBM",
    "IBOutput",
    "SynergyHead",
    "TeacherAdapter",
    "build_ib_mbm_from_teachers",
    "synergy_target",
    "FeatureClassifier",
    "LoadReport",
    "ModuleClassifier",
    "ModelCfg",
    "ModuleGroup",
    "TimmClassifier",
    "TorchvisionClassifier",
    "apply_freeze_level",
    "as_feature_classifier",
    "build_model",
    "check_recipe_models",
    "cifar",
    "count_trainable_parameters",
    "create_model",
    "create_student_by_name",
    "create_teacher_by_name",
    "is_known_model",
    "list_models",
    "load_weights",
    "model_from_spec",
    "read_state_dict",
    "register_model",
    "setup_partial_freeze_schedule",
    "trainable_parameter_names",
    "zoo_feature_dims",
]
