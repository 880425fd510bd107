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
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from asib.errors import RecipeError, did_you_mean


class Spec(BaseModel):
    """Base of every recipe section: typos are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- data


class AugmentSpec(Spec):
    """Batched augmentation applied by the in-memory loader on the training device."""

    crop_padding: int = Field(4, ge=0, description="random crop after zero padding by this many pixels; 0 turns it off")
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
    image_size: int | None = Field(None, gt=0, description="resize every image to this square size")
    train_subset: int | None = Field(None, gt=0, description="keep only this many training images (seeded, stratified)")
    split_seed: int = Field(0, description="seed of the train/val split and the subset")


# ---------------------------------------------------------------- training


class OptimSpec(Spec):
    """Optimizer and learning-rate schedule."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    weight_decay: float = Field(5e-4, ge=0, description="not applied to norms and biases")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up from 0, in epochs (fractions allowed)")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of lr")


class TrainSpec(Spec):
    """Fine-tuning settings of one model trained with cross-entropy."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    optim: OptimSpec = OptimSpec()
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    augment: AugmentSpec = AugmentSpec()
    eval_batch_size: int = Field(512, ge=1)


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

    dim: int = Field(1024, ge=8, description="token width D")
    heads: int = Field(8, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1, description="attention dropout")
    head_dropout: float = Field(0.1, ge=0, lt=1, description="dropout in the synergy head")
    logvar_clamp: float = Field(10.0, gt=0, description="logvar is clamped to [-c, c]")

    @model_validator(mode="after")
    def _heads_divide(self) -> IBMBMSpec:
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        return self


class DKDSpec(Spec):
    """Decoupled KD (Zhao et al. 2022)."""

    alpha: float = Field(1.0, ge=0, description="weight of the target-class term (TCKD)")
    beta: float = Field(8.0, ge=0, description="weight of the non-target-class term (NCKD)")
    warmup_epochs: int = Field(20, ge=0, description="linear ramp of the DKD term")


class DistillSpec(Spec):
    """The distillation step: method, stages, losses and their weights (METHOD.md)."""

    method: Literal["asib", "ce", "kd", "avg_kd", "dkd"] = "asib"
    num_stages: int = Field(4, ge=1)
    student_epochs: int | list[int] = Field(5, description="B-step epochs per stage (one number or one per stage)")
    teacher_adapt_epochs: int = Field(2, ge=0, description="A-step epochs per stage")
    synergy_warmup_epochs: int = Field(0, ge=0, description="extra CE-only A-epochs before the first stage")
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    student_optim: OptimSpec = OptimSpec(name="adamw", lr=1e-3, weight_decay=5e-4)
    teacher_optim: OptimSpec = OptimSpec(name="adamw", lr=1e-3, weight_decay=1e-4, schedule="constant")
    augment: AugmentSpec = AugmentSpec()
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="student CE label smoothing")
    synergy_label_smoothing: float = Field(0.1, ge=0, lt=1)
    ce_alpha: float = Field(0.3, ge=0)
    kd_alpha: float = Field(0.35, ge=0, description="KD toward the teacher average")
    kd_ens_alpha: float = Field(0.35, ge=0, description="KD toward the synergy ensemble")
    kd_warmup_epochs: int = Field(0, ge=0)
    tau: float = Field(4.0, gt=0)
    tau_start: float | None = Field(None, gt=0, description="with tau_end: linear tau over all student epochs")
    tau_end: float | None = Field(None, gt=0)
    ib: bool = True
    ib_beta: float = Field(1e-3, ge=0)
    ib_beta_warmup_epochs: int = Field(3, ge=0)
    ib_target_samples: int = Field(8, ge=1)
    cccp: bool = True
    cccp_alpha: float | None = Field(None, ge=0, description="default: kd_ens_alpha")
    cccp_ramp_epochs: int = Field(1, ge=0)
    synergy_target: Literal["noise_avg", "mu"] = Field(
        "noise_avg", description="B-step target: noise-averaged predictive distribution, or G(mu) (ablation)"
    )
    synergy_gate: bool = True
    disagreement: Literal["none", "both_wrong", "pred", "any_wrong"] = "none"
    lambda_high: float = Field(1.5, ge=0)
    lambda_low: float = Field(1.0, ge=0)
    teacher_weights: list[float] | None = None
    kd_teacher: int | str = Field(0, description="method kd: the teacher, by index or name")
    student_freeze_schedule: list[int] | None = None
    teacher_freeze_schedule: list[int] | None = None
    ib_mbm: IBMBMSpec = IBMBMSpec()
    dkd: DKDSpec = DKDSpec()

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
        return self

    def stage_epochs(self) -> list[int]:
        """B-step epochs of every stage."""
        if isinstance(self.student_epochs, int):
            return [self.student_epochs] * self.num_stages
        return list(self.student_epochs)

    @property
    def effective_cccp_alpha(self) -> float:
        return self.kd_ens_alpha if self.cccp_alpha is None else self.cccp_alpha


# ---------------------------------------------------------------- the recipe


class Recipe(Spec):
    """One pipeline: data, teachers, student, distillation."""

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    out_dir: str | None = Field(None, description="run folder; default runs/<name>")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = Field(False, description="bit-for-bit repeatable on CPU (slower on CUDA)")
    compile: bool = Field(False, description="torch.compile the trained model (pays a compile time once)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="auto: bf16 autocast on CUDA; fp32 training on CPU, teachers in bf16 where the CPU has"
        " bf16 matrix units. fp32: no autocast, no TF32. bf16: bf16 autocast everywhere",
    )
    sync_bn: bool = Field(False, description="under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm)")
    data: DataSpec = DataSpec()
    teachers: list[TeacherSpec] = Field(default_factory=list)
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


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (value parsed as YAML; ``teachers.1.arch`` or
    ``teachers[1].arch`` address list items). Returns a new dict."""
    import copy

    out = copy.deepcopy(data)
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"--set {item}: expected key.sub=value")
            continue
        key, raw = item.split("=", 1)
        parts = [p for p in re.split(r"\.|\[(\d+)\]", key.strip()) if p]
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            problems.append(f"--set {key}: value is not valid YAML ({exc.__class__.__name__})")
            continue
        node: Any = out
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                    problems.append(f"--set {key}: '{part}' is not an index of a list of {len(node)}")
                    break
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                problems.append(f"--set {key}: '{'.'.join(parts[:i])}' is a value, not a section")
                break
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


def format_validation_error(exc: ValidationError, root: type[BaseModel] | None = None) -> list[str]:
    """One line per problem: ``path: what is wrong (given: value)``."""
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        # pydantic puts union member names (e.g. 'int', 'list[int]') in loc; drop them.
        loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in {"int", "str", "float"})))
        path = _loc_text(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            owner = _model_at(loc, root or Recipe)
            hint = did_you_mean(str(loc[-1]), list(owner.model_fields)) if owner else ""
            lines.append(f"{path}: unknown key{hint}")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        given = err.get("input")
        shown = "" if err["type"] == "missing" or isinstance(given, dict) else f" (given: {given!r})"
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
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc), source) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply ``--set`` overrides, validate."""
    path = Path(path)
    if not path.exists():
        raise RecipeError([f"{path}: no such file"], hint="recipes/ holds ready recipes, e.g. recipes/digits.yaml")
    if path.is_dir():
        raise RecipeError([f"{path}: is a folder, not a YAML recipe"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError([f"not valid YAML{where}: {getattr(exc, 'problem', exc)}"], str(path)) from None
    if isinstance(data, dict) and "name" not in data:
        data = {"name": path.stem, **data}
    data = apply_overrides(data, overrides or []) if isinstance(data, dict) else data
    return recipe_from_dict(data, str(path))


def spec_from(spec_cls: type[Spec], value: Spec | dict[str, Any]) -> Any:
    """Accept either a typed spec or a plain dict (validated, with recipe-style errors)."""
    if isinstance(value, spec_cls):
        return value
    try:
        return spec_cls.model_validate(value)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, spec_cls)) from None
