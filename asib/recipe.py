"""Recipes: the pydantic models of a whole pipeline, and how a YAML file becomes one.

A recipe describes data, teachers, student and the distillation step; each command
runs its own part of it. This module must not import torch (a test checks it), so
``asib recipe check`` and ``--help`` stay fast. Model names are checked against the
registry later, by ``asib.models.check_recipe_models``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from asib.errors import RecipeError, clip, did_you_mean, short_repr

# Bounds on values that drive work or memory. They are far above anything meant (a typo such
# as an extra zero still passes), and low enough that a value beyond them fails here, before
# any allocation, instead of running for ever or exhausting memory. Each is in the schema.
MAX_EPOCHS = 10_000  # epochs of one phase (and warm-up/ramp lengths, in epochs)
MAX_STAGES = 100
MAX_BATCH = 65_536  # images per batch
MAX_IMAGE_SIZE = 4_096  # pixels per side of a prepared image
MAX_CROP_PADDING = 256
MAX_TEACHERS = 64
MAX_IB_DIM = 65_536
MAX_HEADS = 1_024
MAX_IB_SAMPLES = 1_024
MAX_SEED = 2**63  # seeds are in [-2**63, 2**63): what every generator accepts
# A recipe file, and what it expands to (YAML aliases repeat what they point to).
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_VALUES = 100_000
MAX_RECIPE_DEPTH = 32


class Spec(BaseModel):
    """Base of every recipe section: typos are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- data


class AugmentSpec(Spec):
    """Batched augmentation applied by the in-memory loader on the training device."""

    crop_padding: int = Field(
        4, ge=0, le=MAX_CROP_PADDING,
        description="random crop after zero padding by this many pixels; 0 turns it off",
    )
    hflip: bool = Field(True, description="random horizontal flip")
    mixup_alpha: float = Field(0.0, ge=0, description="Beta(alpha, alpha) mixup; 0 turns it off")
    cutmix_alpha: float = Field(0.0, ge=0, description="Beta(alpha, alpha) cutmix; 0 turns it off")
    mix_prob: float = Field(1.0, ge=0, le=1, description="probability that a batch is mixed when mixup/cutmix is on")


class DataSpec(Spec):
    """Where the images come from and where the prepared tensors go."""

    source: Literal["digits", "fashion_mnist", "cifar10", "cifar100", "imagefolder"] = "digits"
    root: str | None = Field(None, description="folder of the raw data (source-specific default when omitted)")
    download: bool = Field(False, description="let torchvision download the raw data into root")
    dir: str | None = Field(None, description="folder of the prepared data; default data/<name>")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of train carved out as validation (seeded)")
    image_size: int | None = Field(
        None, gt=0, le=MAX_IMAGE_SIZE,
        description=f"resize every image to this square size (at most {MAX_IMAGE_SIZE})",
    )
    train_subset: int | None = Field(None, gt=0, description="keep only this many training images (seeded, stratified)")
    transfer_subset: int | None = Field(
        None, gt=0, description="after the validation split is carved, keep only this many of the training split"
        " (seeded, stratified): a smaller transfer set with the same validation and test splits"
    )
    transfer_split: Literal["subset", "rest"] = Field(
        "subset", description="with transfer_subset: keep the subset (the transfer set), or the rest of the"
        " training split, so that teachers trained on the rest never see the transfer set of a recipe with the"
        " same source, val_fraction, transfer_subset and split_seed"
    )
    split_seed: int = Field(0, ge=-MAX_SEED, lt=MAX_SEED, description="seed of the train/val split and the subset")
    test_fraction: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="imagefolder without a test/ or val/ folder: share of the images carved out as the test"
        " split (seeded by split_seed, stratified); default 0.2. An error where the data has a test split",
    )

    @field_validator("test_fraction")
    @classmethod
    def _test_fraction_only_to_carve(cls, value: float | None, info: Any) -> float | None:
        source = info.data.get("source")
        if value is not None and source is not None and source != "imagefolder":
            raise ValueError(f"source {source} has its own test split; only imagefolder data without a test/"
                             " or val/ folder has one carved")
        return value

    @model_validator(mode="after")
    def _rest_of_a_subset(self) -> DataSpec:
        if self.transfer_split == "rest" and self.transfer_subset is None:
            raise ValueError("transfer_split 'rest' needs transfer_subset: the rest of which subset?")
        return self


# ---------------------------------------------------------------- training


class OptimSpec(Spec):
    """Optimizer and learning-rate schedule."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    weight_decay: float = Field(
        5e-4, ge=0, description="not applied to norms and biases unless decay_norms_and_biases"
    )
    decay_norms_and_biases: bool = Field(
        False, description="true: weight_decay on every parameter, as plain torch.optim.SGD/AdamW do"
    )
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = Field(True, description="SGD only: Nesterov momentum (false: plain momentum)")
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = Field(
        0.0, ge=0, le=MAX_EPOCHS, description="linear warm-up from 0, in epochs (fractions allowed)"
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of lr")


class TrainSpec(Spec):
    """Fine-tuning settings of one model trained with cross-entropy."""

    epochs: int = Field(10, ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(128, ge=1, le=MAX_BATCH)
    optim: OptimSpec = OptimSpec()
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    augment: AugmentSpec = AugmentSpec()
    eval_batch_size: int = Field(512, ge=1, le=MAX_BATCH)


class ModelSpec(Spec):
    """A classifier: any timm name, a torchvision classifier (``tv.`` prefix), or a CIFAR-zoo model."""

    name: str = Field(..., min_length=1)
    arch: str = Field(..., min_length=1)
    small_input: bool = Field(False, description="3x3 stride-1 stem and no max-pool, for 32x32 images")
    pretrained: bool = Field(False, description="timm/torchvision pretrained weights (downloaded)")
    weights: str | None = Field(None, description="local .safetensors or weights-only .pth to start from")
    drop_rate: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _one_weight_source(self) -> ModelSpec:
        if self.pretrained and self.weights:
            raise ValueError("give either pretrained: true or weights: PATH, not both")
        return self


class TeacherSpec(ModelSpec):
    """A teacher: a model, the checkpoint it is written to, and how it is fine-tuned."""

    checkpoint: str | None = Field(None, description="default <out_dir>/teachers/<name>/model.safetensors")
    train: TrainSpec = TrainSpec()


class StudentSpec(ModelSpec):
    name: str = "student"


# ---------------------------------------------------------------- distillation


class IBMBMSpec(Spec):
    """Size of the fusion module; the query width is read from the student."""

    dim: int = Field(1024, ge=8, le=MAX_IB_DIM, description="token width D")
    heads: int = Field(8, ge=1, le=MAX_HEADS)
    dropout: float = Field(0.0, ge=0, lt=1, description="attention dropout")
    head_dropout: float = Field(0.1, ge=0, lt=1, description="dropout in the synergy head")
    logvar_clamp: float = Field(10.0, gt=0, description="logvar is clamped to [-c, c]")

    @model_validator(mode="after")
    def _heads_divide(self) -> IBMBMSpec:
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        return self


class DKDSpec(Spec):
    """Decoupled KD (Zhao et al. 2022); defaults are the paper's and its official code's."""

    alpha: float = Field(1.0, ge=0, description="weight of the target-class term (TCKD)")
    beta: float = Field(8.0, ge=0, description="weight of the non-target-class term (NCKD)")
    warmup_epochs: int | None = Field(
        None, ge=0, le=MAX_EPOCHS,
        description="linear ramp of the DKD term in student epochs; default 1/12 of them (20 of 240 in the paper)"
    )


class CAMKDSpec(Spec):
    """Confidence-aware multi-teacher KD (Zhang, Chen and Wang, ICASSP 2022)."""

    feature_weight: float = Field(
        0.0, ge=0,
        description="weight of the confidence-weighted regression of each teacher's pooled penultimate"
        " feature from the student's (one linear regressor per teacher); 0 turns it off. The paper"
        " regresses feature maps",
    )


class DISTSpec(Spec):
    """DIST (Huang et al., NeurIPS 2022): correlation-based relations instead of the KL."""

    beta: float = Field(1.0, ge=0, description="weight of the inter-class relation (per sample)")
    gamma: float = Field(1.0, ge=0, description="weight of the intra-class relation (per class)")


# Distill keys every method reads; each method adds its own (METHOD_KEYS). A key that the
# chosen method does not read is a recipe error, so a typo'd or misplaced knob never
# passes silently. Plug-in methods add their entry with ``register_method_keys``.
SHARED_DISTILL_KEYS = frozenset({
    "method", "num_stages", "student_epochs", "batch_size", "eval_batch_size", "student_optim", "augment",
    "label_smoothing", "student_freeze_schedule",
})
_TAU = frozenset({"tau", "tau_start", "tau_end"})
_KD = frozenset({"ce_alpha", "kd_alpha", "kd_warmup_epochs"}) | _TAU
_LS = frozenset({"logit_standardization"})
METHOD_KEYS: dict[str, frozenset[str]] = {
    "ce": frozenset(),
    "kd": _KD | _LS | {"kd_teacher"},
    "avg_kd": _KD | _LS | {"teacher_weights"},
    "dkd": _TAU | _LS | {"ce_alpha", "teacher_weights", "dkd"},
    "ca_mkd": _KD | _LS | {"ca_mkd"},
    "dist": _TAU | _LS | {"ce_alpha", "kd_warmup_epochs", "teacher_weights", "dist"},
    "asib": _KD | _LS | {
        "kd_ens_alpha", "teacher_adapt_epochs", "synergy_warmup_epochs", "teacher_optim", "synergy_label_smoothing",
        "ib", "ib_beta", "ib_beta_warmup_epochs", "ib_target_samples", "cccp", "cccp_alpha", "cccp_ramp_epochs",
        "synergy_target", "synergy_gate", "disagreement", "lambda_high", "lambda_low", "teacher_weights",
        "teacher_freeze_schedule", "ib_mbm", "synergy_kd_alpha", "synergy_crossfit", "synergy_residual", "kd_loss",
    },
}
# Loss weights whose default depends on the method (a missing key takes the method's value).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "kd": {"kd_alpha": 0.7},
    "avg_kd": {"kd_alpha": 0.7},
    "dkd": {"ce_alpha": 1.0},
    "ca_mkd": {"kd_alpha": 0.7},
    "dist": {"ce_alpha": 1.0, "tau": 1.0},
    # ASIB's shipped defaults: the configuration its validation search chose on the study's
    # yardstick B (README, "The study"): DIST's balance of CE and KD, KD split between the teacher
    # average and the synergy target (kd_alpha, kd_ens_alpha, kd_loss, synergy_kd_alpha: field defaults).
    "asib": {"ce_alpha": 1.0},
}


def register_method_keys(name: str, keys: frozenset[str] | set[str], defaults: dict[str, Any] | None = None) -> None:
    """Declare a (plug-in) method's name and the distill keys it reads beyond the shared ones."""
    unknown = set(keys) - set(DistillSpec.model_fields)
    if unknown:
        raise ValueError(f"method {name}: no distill field named {', '.join(sorted(unknown))}")
    METHOD_KEYS[name] = frozenset(keys)
    METHOD_DEFAULTS[name] = dict(defaults or {})


def method_keys(method: str) -> frozenset[str]:
    """Every distill key the method reads, shared ones included."""
    return SHARED_DISTILL_KEYS | METHOD_KEYS[method]


def distill_for_method(distill: dict[str, Any], method: str) -> dict[str, Any]:
    """The keys of a distill section that ``method`` reads, with ``method`` set to it.

    A recipe's distill section is written for one method; to run the same recipe under
    another (``asib compare``), the other method's knobs are left out rather than refused.
    """
    if method not in METHOD_KEYS:
        raise RecipeError([f"distill.method: unknown method '{method}'{did_you_mean(method, list(METHOD_KEYS))}"])
    keep = method_keys(method)
    return {**{k: v for k, v in distill.items() if k in keep}, "method": method}


_Epochs = Annotated[int, Field(ge=0, le=MAX_EPOCHS)]


class DistillSpec(Spec):
    """The distillation step: method, stages, losses and their weights (METHOD.md).

    Which keys a method reads is ``method_keys(method)``; ``ce_alpha`` and ``kd_alpha`` default
    per method (``METHOD_DEFAULTS``: kd, avg_kd and ca_mkd put 0.7 on KD, dkd and dist 1.0 on CE;
    dist's tau is 1; asib puts 1.0 on CE).
    """

    method: str = Field(
        "asib", description="asib, ce, kd, avg_kd, dkd, ca_mkd, dist (or a registered plug-in method)"
    )
    num_stages: int = Field(4, ge=1, le=MAX_STAGES)
    student_epochs: _Epochs | list[_Epochs] = Field(
        5, description="B-step epochs per stage (one number or one per stage)"
    )
    teacher_adapt_epochs: int = Field(2, ge=0, le=MAX_EPOCHS, description="A-step epochs per stage")
    synergy_warmup_epochs: int = Field(
        0, ge=0, le=MAX_EPOCHS, description="extra CE-only A-epochs before the first stage"
    )
    batch_size: int = Field(128, ge=1, le=MAX_BATCH)
    eval_batch_size: int = Field(512, ge=1, le=MAX_BATCH)
    student_optim: OptimSpec = OptimSpec(name="adamw", lr=1e-3, weight_decay=5e-4)
    teacher_optim: OptimSpec = OptimSpec(name="adamw", lr=1e-3, weight_decay=1e-4, schedule="constant")
    augment: AugmentSpec = AugmentSpec()
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="student CE label smoothing")
    synergy_label_smoothing: float = Field(0.1, ge=0, lt=1)
    synergy_kd_alpha: float = Field(
        1.0, ge=0, description="A-step: weight of KD from the teacher average into the synergy head, so its"
        " targets keep the teachers' soft predictions as well as the labels; 0 turns it off"
    )
    synergy_crossfit: bool = Field(
        False, description="two fusion paths (IB_MBM + synergy head), each trained on one half of the training"
        " images (index % 2); the B-step target of an image comes from the path that never trained on it, and"
        " outside the training split the synergy is the mean of both paths' logits (about twice the fusion"
        " module's parameters and time). Not with teacher blocks that train (teacher_freeze_schedule)"
    )
    synergy_residual: bool = Field(
        False, description="the synergy logits are the teacher average's logits (of the synergy path's teachers,"
        " with teacher_weights) plus the synergy head's output, whose last layer starts at zero: the synergy"
        " starts as the teacher average and the A-step learns a correction to it"
    )
    kd_loss: Literal["kl", "dist"] = Field(
        "dist", description="asib's B-step KD terms, toward the teacher average and toward the synergy target:"
        " 'kl' (tau^2 KL) or 'dist' (DIST's relation loss, tau^2 (inter + intra), beta = gamma = 1)"
    )
    ce_alpha: float = Field(0.3, ge=0, description="weight of the student's CE (asib, dkd, dist: 1.0)")
    kd_alpha: float = Field(
        0.5, ge=0, description="KD toward the teacher average (kd, avg_kd: 0.7); ca_mkd: weighted KD (0.7)"
    )
    kd_ens_alpha: float = Field(0.5, ge=0, description="KD toward the synergy ensemble")
    kd_warmup_epochs: int = Field(0, ge=0, le=MAX_EPOCHS)
    tau: float = Field(4.0, gt=0, description="KD temperature (dist: 1.0)")
    tau_start: float | None = Field(None, gt=0, description="with tau_end: linear tau over all student epochs")
    tau_end: float | None = Field(None, gt=0)
    ib: bool = True
    ib_beta: float = Field(1e-3, ge=0)
    ib_beta_warmup_epochs: int = Field(3, ge=0, le=MAX_EPOCHS)
    ib_target_samples: int = Field(8, ge=1, le=MAX_IB_SAMPLES)
    cccp: bool = True
    cccp_alpha: float | None = Field(None, ge=0, description="default: kd_ens_alpha")
    cccp_ramp_epochs: int = Field(1, ge=0, le=MAX_EPOCHS)
    synergy_target: Literal["noise_avg", "mu"] = Field(
        "noise_avg", description="B-step target: noise-averaged predictive distribution, or G(mu) (ablation)"
    )
    synergy_gate: bool = Field(
        True, description="drop the synergy term while the synergy head is below the weakest teacher on val by more"
        " than two standard errors of the split"
    )
    disagreement: Literal["none", "both_wrong", "pred", "any_wrong"] = "none"
    lambda_high: float = Field(1.5, ge=0)
    lambda_low: float = Field(1.0, ge=0)
    teacher_weights: list[float] | None = None
    kd_teacher: int | str = Field(0, description="method kd: the teacher, by index or name")
    student_freeze_schedule: list[int] | None = Field(
        None, description="per stage: -1 all train, L: head + last L blocks; default all -1, or [-1, ..., 1, 0]"
        " for a pretrained student"
    )
    teacher_freeze_schedule: list[int] | None = None
    ib_mbm: IBMBMSpec = IBMBMSpec()
    dkd: DKDSpec = DKDSpec()
    ca_mkd: CAMKDSpec = CAMKDSpec()
    dist: DISTSpec = DISTSpec()
    logit_standardization: bool = Field(
        False,
        description="z-score every logit vector that enters a KD term's temperature softmax (student,"
        " target; ASIB: synergy target and CCCP too) along the classes before dividing by tau (Sun et al.,"
        " CVPR 2024). tau is then in units of the logits' standard deviation: the softmax sees logits of"
        " standard deviation 1/tau whatever the model's logit scale, so good values differ from those without"
        " it. CE on labels stays on raw logits",
    )

    @model_validator(mode="before")
    @classmethod
    def _method_keys(cls, data: Any) -> Any:
        """Refuse keys the method does not read; fill the method's own default weights."""
        if not isinstance(data, dict):
            return data
        method = data.get("method", "asib")
        if not isinstance(method, str) or method not in METHOD_KEYS:
            return data  # the field's own check reports it
        unused = sorted(k for k in data if k in cls.model_fields and k not in method_keys(method))
        if unused:
            raise PydanticCustomError(
                "unused_key", "not used by method {method}", {"method": method, "keys": unused}
            )
        return {**METHOD_DEFAULTS.get(method, {}), **data}

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHOD_KEYS:
            names = sorted(METHOD_KEYS)
            raise ValueError(f"unknown method '{value}' (methods: {', '.join(names)}){did_you_mean(value, names)}")
        return value

    @model_serializer(mode="wrap")
    def _only_used_keys(self, handler: Any) -> dict[str, Any]:
        """A resolved dump holds the keys this method reads, so it validates again as it is."""
        keep = method_keys(self.method)
        return {k: v for k, v in handler(self).items() if k in keep}

    @model_validator(mode="after")
    def _consistent(self) -> DistillSpec:
        if isinstance(self.student_epochs, list) and len(self.student_epochs) != self.num_stages:
            raise ValueError(
                f"student_epochs has {len(self.student_epochs)} entries but num_stages is {self.num_stages}"
            )
        if (self.tau_start is None) != (self.tau_end is None):
            raise ValueError("give both tau_start and tau_end, or neither")
        for name in ("student_freeze_schedule", "teacher_freeze_schedule"):
            sched = getattr(self, name)
            if sched is not None:
                if len(sched) != self.num_stages:
                    raise ValueError(f"{name} has {len(sched)} entries but num_stages is {self.num_stages}")
                if any(level < -1 for level in sched):
                    raise ValueError(f"{name}: levels are -1 (all train) or >= 0 (head + last L blocks)")
        if self.synergy_crossfit and any(level != 0 for level in self.teacher_freeze_schedule or []):
            raise ValueError(
                "synergy_crossfit needs frozen teachers (teacher_freeze_schedule all 0): adapted teacher blocks"
                " would be shared by both fusion paths and see both halves of the training images"
            )
        return self

    def stage_epochs(self) -> list[int]:
        """B-step epochs of every stage."""
        if isinstance(self.student_epochs, int):
            return [self.student_epochs] * self.num_stages
        return list(self.student_epochs)

    @property
    def total_student_epochs(self) -> int:
        return sum(self.stage_epochs())

    @property
    def effective_cccp_alpha(self) -> float:
        return self.kd_ens_alpha if self.cccp_alpha is None else self.cccp_alpha

    @property
    def dkd_warmup_epochs(self) -> int:
        """DKD's ramp: as given, or 1/12 of the student epochs (the paper's 20 of 240), at least 1."""
        if self.dkd.warmup_epochs is not None:
            return self.dkd.warmup_epochs
        return max(1, round(self.total_student_epochs / 12))


# ---------------------------------------------------------------- the recipe


class Recipe(Spec):
    """One pipeline: data, teachers, student, distillation.

    Values that drive work or memory have generous upper bounds (each field's ``maximum``); a
    recipe file is at most 1 MiB of UTF-8 YAML, gives each key once, and expands (YAML aliases
    included) to at most 100000 values nested at most 32 levels deep.
    """

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, ge=-MAX_SEED, lt=MAX_SEED)
    out_dir: str | None = Field(None, description="run folder; default runs/<name>")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = Field(False, description="bit-for-bit repeatable on CPU (slower on CUDA)")
    compile: bool = Field(False, description="torch.compile the trained model (pays a compile time once)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="auto: bf16 autocast on CUDA; fp32 training on CPU, teachers in bf16 where the CPU has"
        " bf16 matrix units. fp32: no autocast, no TF32. bf16: bf16 autocast everywhere",
    )
    tracking: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list,
        max_length=2,
        description="experiment trackers besides metrics.csv: tensorboard (pip install 'asib[tensorboard]'),"
        " wandb (pip install 'asib[wandb]'; offline without an API key)",
    )
    sync_bn: bool = Field(False, description="under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm)")
    data: DataSpec = DataSpec()
    teachers: list[TeacherSpec] = Field(default_factory=list, max_length=MAX_TEACHERS)
    student: StudentSpec | None = None
    distill: DistillSpec = DistillSpec()

    @field_validator("teachers")
    @classmethod
    def _unique_teacher_names(cls, teachers: list[TeacherSpec]) -> list[TeacherSpec]:
        names = [t.name for t in teachers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"teacher names must be unique; repeated: {', '.join(dup)}")
        return teachers

    # Derived paths live here, in one place, so every command agrees on them.
    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir else Path("runs") / self.name

    @property
    def data_dir(self) -> Path:
        return Path(self.data.dir) if self.data.dir else Path("data") / self.name

    def teacher_dir(self, teacher: TeacherSpec) -> Path:
        return self.run_dir / "teachers" / teacher.name

    def teacher_checkpoint(self, teacher: TeacherSpec) -> Path:
        return Path(teacher.checkpoint) if teacher.checkpoint else self.teacher_dir(teacher) / "model.safetensors"

    def find_teacher(self, key: str) -> TeacherSpec:
        """A teacher by name or by index (as text)."""
        for t in self.teachers:
            if t.name == key:
                return t
        if re.fullmatch(r"-?\d+", key):
            idx = int(key)
            if -len(self.teachers) <= idx < len(self.teachers):
                return self.teachers[idx]
        names = [t.name for t in self.teachers]
        raise RecipeError(
            [f"--teacher: no teacher '{key}' (have {', '.join(names) or 'none'}){did_you_mean(key, names)}"]
        )

    def to_yaml(self) -> str:
        """The resolved recipe, every default filled in, as YAML."""
        return yaml.safe_dump(json.loads(self.model_dump_json()), sort_keys=False)


# ---------------------------------------------------------------- loading


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that gives one key twice (plain YAML keeps the last and says nothing)."""

    def __init__(self, key: Any, first: yaml.Mark, again: yaml.Mark) -> None:
        super().__init__(
            None, None, f"key {short_repr(key, 80)} given twice (lines {first.line + 1} and {again.line + 1})",
            again,
        )
        self.key = key


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping.

    Anchors, aliases and merge keys (``<<: *base``) work as in YAML: a key that a merge brings
    in may be given again explicitly (that is what merging is for); only keys written twice
    in the same mapping are refused.
    """

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Called on every mapping before its merge keys are folded in (also on a mapping that
        # another one merges), so each is checked once, as written.
        checked = self.__dict__.setdefault("_checked", set())
        if id(node) not in checked:
            checked.add(id(node))
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    raise DuplicateKeyError(key, seen[key], key_node.start_mark)
                seen[key] = key_node.start_mark
        super().flatten_mapping(node)


def _yaml_path(text: str, index: int) -> str | None:
    """The YAML path (``distill.tau``) of the mapping key that starts at character ``index``."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    stack: list[tuple[yaml.Node, tuple[Any, ...]]] = [(root, ())] if root is not None else []
    seen: set[int] = set()
    while stack:
        node, loc = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                here = (*loc, key_node.value if isinstance(key_node, yaml.ScalarNode) else "?")
                if key_node.start_mark.index == index:
                    return _loc_text(here)
                stack.append((value_node, here))
        elif isinstance(node, yaml.SequenceNode):
            stack += [(item, (*loc, i)) for i, item in enumerate(node.value)]
    return None


def _parse_yaml(text: str) -> Any:
    """YAML through ``RecipeLoader`` (a key given twice is an error)."""
    loader = RecipeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _yaml_problem(exc: Exception, text: str) -> str:
    """One line for a YAML that does not load: where, and what."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    if isinstance(exc, DuplicateKeyError) and mark is not None:
        path = _yaml_path(text, mark.index)
        return f"{path or short_repr(exc.key, 80)}: {exc.problem}; give each key once"
    if isinstance(exc, yaml.YAMLError):
        return f"not valid YAML{where}: {clip(str(getattr(exc, 'problem', None) or exc), 200)}"
    return f"not valid YAML: {clip(str(exc), 200)}"  # a value PyYAML cannot build (a 5000-digit int, 2020-13-45)


def check_size(data: Any) -> list[str]:
    """Problems with the sheer size of loaded YAML: more values than any recipe has, or deeper
    nesting (YAML aliases can repeat a block many times over, or point into themselves).

    Walks at most ``MAX_RECIPE_VALUES`` values, so it is fast whatever the aliases expand to.
    """
    count = 0
    stack: list[tuple[Any, tuple[Any, ...]]] = [(data, ())]
    while stack:
        value, loc = stack.pop()
        count += 1
        if count > MAX_RECIPE_VALUES:
            where = _loc_text(loc) or "(top level)"
            return [f"{where}: the recipe expands to more than {MAX_RECIPE_VALUES} values"
                    " (YAML aliases repeat what they point to); a recipe holds a few hundred"]
        if len(loc) > MAX_RECIPE_DEPTH:
            return [f"{_loc_text(loc[:MAX_RECIPE_DEPTH])}: nested more than {MAX_RECIPE_DEPTH} levels deep"
                    " (does a YAML alias point into itself?)"]
        if isinstance(value, dict):
            stack += [(v, (*loc, str(k))) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(v, (*loc, i)) for i, v in enumerate(value)]
    return []


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (value parsed as YAML; ``teachers.1.arch`` or
    ``teachers[1].arch`` address list items). Returns a new dict; ``data`` is not changed.

    Every section on an override's path is copied before it is changed, so a block that the
    YAML shares between items through an anchor changes for the addressed item only.
    """
    out = dict(data)
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"--set {clip(item, 200)}: expected key.sub=value")
            continue
        key, raw = item.split("=", 1)
        key = clip(key, 200)
        parts = [p for p in re.split(r"\.|\[(\d+)\]", key.strip()) if p]
        if not parts:
            problems.append(f"--set {clip(item, 200)}: the key before '=' is empty")
            continue
        try:
            value = _parse_yaml(raw)
        except (yaml.YAMLError, ValueError) as exc:
            problems.append(f"--set {key}: value is not valid YAML ({_yaml_problem(exc, raw)})")
            continue
        node: Any = out
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not re.fullmatch(r"-?[0-9]{1,9}", part) or not -len(node) <= int(part) < len(node):
                    problems.append(f"--set {key}: '{part}' is not an index of a list of {len(node)}")
                    break
                slot: Any = int(part)
            elif isinstance(node, dict):
                slot = part
            else:
                problems.append(f"--set {key}: '{'.'.join(parts[:i])}' is a value, not a section")
                break
            if last:
                node[slot] = value
                break
            child = node[slot] if isinstance(node, list) else node.get(slot, {})
            child = list(child) if isinstance(child, list) else dict(child) if isinstance(child, dict) else child
            node[slot] = child  # a copy of its own: anchors shared with other items stay as they were
            node = child
    if problems:
        raise RecipeError(problems)
    return out


def _loc_text(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text


def _model_at(loc: tuple[Any, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    """The pydantic model class that holds the field at ``loc`` (for did-you-mean on keys)."""
    model: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        model = _first_model(ann)
        if model is None:
            return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _first_model(arg)
        if found is not None:
            return found
    return None


_TYPES = frozenset({"int", "str", "float", "bool"})  # union member names pydantic puts in an error's loc


def _union_member(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part.removeprefix("constrained-") in _TYPES)


def format_validation_error(exc: ValidationError, root: type[BaseModel] | None = None) -> list[str]:
    """One line per problem: ``path: what is wrong (given: value)``."""
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        # pydantic puts union member names (e.g. 'int', 'list[int]') in loc; drop them.
        loc = tuple(p for p in loc if not _union_member(p))
        path = clip(_loc_text(loc) or "(top level)", 200)
        if err["type"] == "unused_key":
            ctx = err.get("ctx") or {}
            where = f"{_loc_text(loc)}." if loc else ""
            lines += [f"{where}{clip(str(key), 200)}: not used by method {ctx.get('method')}"
                      for key in ctx.get("keys", [])]
            continue
        if err["type"] == "extra_forbidden":
            owner = _model_at(loc, root or Recipe)
            hint = did_you_mean(str(loc[-1]), list(owner.model_fields)) if owner else ""
            lines.append(f"{path}: unknown key{hint}")
            continue
        msg = clip(err["msg"].removeprefix("Value error, "), 200)
        given = err.get("input")
        shown = "" if err["type"] == "missing" or isinstance(given, dict) else f" (given: {short_repr(given)})"
        lines.append(f"{path}: {msg}{shown}")
    # Union types report the same location more than once; keep the first of each.
    seen: dict[str, str] = {}
    for line in lines:
        seen.setdefault(line.split(":", 1)[0], line)
    return list(seen.values())


def recipe_from_dict(data: Any, source: str | None = None) -> Recipe:
    """Validate a plain dict into a Recipe, with the CLI's error lines."""
    if not isinstance(data, dict):
        raise RecipeError(["(top level): a recipe is a mapping of sections"], source)
    too_big = check_size(data)
    if too_big:
        raise RecipeError(too_big, source)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc), source) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None, method: str | None = None) -> Recipe:
    """Read a YAML recipe, apply ``--set`` overrides, validate.

    ``method`` runs the recipe under another distillation method: its distill section keeps
    the keys that method reads (``distill_for_method``); ``--set distill.method=...`` instead
    keeps every key, so another method's knob is an error there.
    """
    path = Path(path)
    text = read_recipe_text(path)
    try:
        data = _parse_yaml(text) or {}
    except (yaml.YAMLError, ValueError) as exc:
        raise RecipeError([_yaml_problem(exc, text)], str(path)) from None
    if isinstance(data, dict) and "name" not in data:
        data = {"name": path.stem, **data}
    data = apply_overrides(data, overrides or []) if isinstance(data, dict) else data
    if method is not None and isinstance(data, dict):
        distill = data.get("distill") or {}
        data = {**data, "distill": distill_for_method(distill if isinstance(distill, dict) else {}, method)}
    return recipe_from_dict(data, str(path))


def read_recipe_text(path: Path) -> str:
    """The text of a recipe file: a file (not a folder), of a recipe's size, in UTF-8."""
    if not path.exists():
        from asib.builtin_recipes import missing_hint

        raise RecipeError([f"{path}: no such file"], hint=missing_hint(path))
    if path.is_dir():
        raise RecipeError([f"{path}: is a folder, not a YAML recipe"])
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise RecipeError([f"{path}: cannot be read ({exc.strerror or exc.__class__.__name__})"]) from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError([f"(file): larger than {MAX_RECIPE_BYTES // 1024} KiB; a recipe is a few kB of YAML"],
                          str(path))
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RecipeError(
            [f"(file): not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line})"], str(path),
            hint="save the recipe as UTF-8",
        ) from None


def canonical_recipe(text: str) -> str:
    """A resolved recipe.yaml as this asib resolves it: a field added since the file was
    written (with its default) does not make two runs' recipes differ. Text that is not a
    whole recipe (the library's distill-only record) is returned as it is."""
    try:
        data = yaml.safe_load(text)
        return recipe_from_dict(data).to_yaml() if isinstance(data, dict) and "name" in data else text
    except (yaml.YAMLError, RecipeError):
        return text


def spec_from(spec_cls: type[Spec], value: Spec | dict[str, Any]) -> Any:
    """Accept either a typed spec or a plain dict (validated, with recipe-style errors)."""
    if isinstance(value, spec_cls):
        return value
    try:
        return spec_cls.model_validate(value)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, spec_cls)) from None
