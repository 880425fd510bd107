"""Checkpoints: safetensors files whose header says what they hold.

A bare checkpoint is enough to rebuild its model: the metadata carries the kind, the
architecture, the class count and names, the input normalisation and the recipe as JSON.
Nothing here unpickles anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asib.engine.io import atomic_write
from asib.errors import CheckpointError

FORMAT_VERSION = "1"
MODEL_KINDS = ("teacher", "student")
KINDS = (*MODEL_KINDS, "synergy")


@dataclass(frozen=True)
class CheckpointInfo:
    """The header of an asib checkpoint, typed."""

    path: Path
    kind: str
    meta: dict[str, str]

    @property
    def arch(self) -> str:
        return self.meta["asib.arch"]

    @property
    def num_classes(self) -> int:
        return int(self.meta["asib.num_classes"])

    @property
    def small_input(self) -> bool:
        return self.meta.get("asib.small_input") == "true"

    def json_field(self, key: str) -> Any:
        raw = self.meta.get(f"asib.{key}")
        return None if raw is None else json.loads(raw)


def _contiguous_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and non-contiguous views; clone keeps them apart.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write tensors with string metadata, atomically."""
    from safetensors.torch import save_file

    header = {"asib.format_version": FORMAT_VERSION}
    for key, value in meta.items():
        header[key] = value if isinstance(value, str) else json.dumps(value)
    tensors = _contiguous_cpu(tensors)
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def model_meta(model: nn.Module, kind: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metadata that lets a bare file rebuild a FeatureClassifier."""
    meta: dict[str, Any] = {
        "asib.kind": kind,
        "asib.arch": model.arch,
        "asib.num_classes": str(model.num_classes),
        "asib.small_input": "true" if model.small_input else "false",
        "asib.feature_dim": str(model.feature_dim),
    }
    for key, value in (extra or {}).items():
        meta[f"asib.{key}"] = value
    return meta


def save_model(path: str | Path, model: nn.Module, kind: str, extra: dict[str, Any] | None = None) -> Path:
    """Save a teacher or student with its rebuild metadata (``extra``: classes, mean, std, recipe...)."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"model checkpoints are {MODEL_KINDS}, not {kind!r}")
    return save_tensors(path, model.state_dict(), model_meta(model, kind, extra))


def read_info(path: str | Path) -> CheckpointInfo:
    """Read and check a checkpoint's header without loading its tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if path.is_dir():
        hint = None
        found = sorted(path.glob("*.safetensors")) + sorted(path.glob("*/*.safetensors"))
        if found:
            hint = "checkpoints in it: " + ", ".join(str(p) for p in found[:4])
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file", hint=hint)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:120]})",
            hint="the file may be truncated or not a checkpoint; re-run the step that wrote it",
        ) from None
    kind = meta.get("asib.kind")
    if kind not in KINDS:
        raise CheckpointError(f"{path}: not an asib checkpoint (no asib.kind in its header)")
    return CheckpointInfo(path, kind, meta)


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint; a truncated body becomes a CheckpointError."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:  # a short read or corrupt body
        raise CheckpointError(
            f"{path}: cannot read its tensors ({str(exc).splitlines()[0][:120]})",
            hint="the file may be truncated; re-run the step that wrote it",
        ) from None


def load_model(
    path: str | Path, kinds: tuple[str, ...] = MODEL_KINDS, device: str | torch.device = "cpu"
) -> tuple[nn.Module, CheckpointInfo]:
    """Rebuild a teacher or student from a bare checkpoint."""
    from asib.models import create_model

    info = read_info(path)
    if info.kind not in kinds:
        wanted = " or ".join(kinds)
        raise CheckpointError(f"{info.path}: is a {info.kind} checkpoint; expected a {wanted} checkpoint")
    model = create_model(info.arch, info.num_classes, small_input=info.small_input)
    state = load_tensors(info.path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{info.path}: does not fit {info.arch} ({len(missing)} missing, {len(unexpected)} unexpected keys,"
            f" e.g. {(list(missing) + list(unexpected))[0]})"
        )
    return model.to(device).eval(), info


def checkpoint_extras(recipe: Any, info: Any, **more: Any) -> dict[str, Any]:
    """Metadata that travels with every model checkpoint: classes, normalisation, recipe.

    ``recipe`` is the run's Recipe, ``info`` the prepared dataset's DatasetInfo.
    """
    return {
        "classes": list(info.classes),
        "mean": list(info.mean),
        "std": list(info.std),
        "image_size": list(info.image_size),
        "recipe": recipe.model_dump(mode="json"),
        **more,
    }


# ------------------------------------------------------------------ synergy checkpoints


def save_synergy(
    path: str | Path,
    ib_mbm: nn.Module,
    head: nn.Module,
    teacher_paths: list[Path],
    student_path: Path,
    spec: Any,
    extra: dict[str, Any],
    adapted_teachers: list[dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Adapters + IB_MBM + head, the teacher and student checkpoints they are queried with,
    and, when teacher blocks were trained on the synergy path, the adapted teachers' weights
    (``teacher{k}.*``), so the ensemble is evaluated exactly as it was trained."""
    tensors = {f"ib_mbm.{k}": v for k, v in ib_mbm.state_dict().items()}
    tensors.update({f"head.{k}": v for k, v in head.state_dict().items()})
    for k, state in enumerate(adapted_teachers or []):
        tensors.update({f"teacher{k}.{name}": v for name, v in state.items()})
    meta = {
        "asib.kind": "synergy",
        "asib.arch": "ib_mbm",
        "asib.num_classes": str(head.net[-1].out_features),
        "asib.teachers": [str(p) for p in teacher_paths],
        "asib.student": json.dumps(str(student_path)),
        "asib.query_dim": ib_mbm.query_dim,
        "asib.teacher_dims": ib_mbm.teacher_dims,
        "asib.ib_mbm": spec.ib_mbm.model_dump(),
        "asib.ib": spec.ib,
        "asib.adapted_teachers": adapted_teachers is not None,
        **{f"asib.{k}": v for k, v in extra.items()},
    }
    return save_tensors(path, tensors, meta)


def _resolve(ref: str, base: Path) -> Path:
    """A referenced checkpoint: as written (relative to the working folder), else beside the synergy file."""
    path = Path(ref)
    if path.exists() or path.is_absolute():
        return path
    beside = base / path.name
    return beside if beside.exists() else path


def _take(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_synergy_predictor(info: CheckpointInfo, runtime: Any):
    """A function x -> synergy logits, rebuilt from a synergy checkpoint and the files it names."""
    from asib.models.ib_mbm import IBMBM, SynergyHead
    from asib.recipe import IBMBMSpec

    base = info.path.parent
    tensors = load_tensors(info.path)
    teachers = []
    for k, ref in enumerate(info.json_field("teachers")):
        teacher, _ = load_model(_resolve(ref, base), kinds=("teacher",), device=runtime.device)
        if info.json_field("adapted_teachers"):
            teacher.load_state_dict(_take(tensors, f"teacher{k}."))
        teachers.append(teacher.eval())
    student, _ = load_model(_resolve(info.json_field("student"), base), kinds=("student",), device=runtime.device)
    ib_spec = IBMBMSpec.model_validate(info.json_field("ib_mbm"))
    ib_mbm = IBMBM(info.json_field("query_dim"), info.json_field("teacher_dims"), ib_spec, ib=info.json_field("ib"))
    head = SynergyHead(ib_spec.dim, info.num_classes, ib_spec.head_dropout)
    ib_mbm.load_state_dict(_take(tensors, "ib_mbm."))
    head.load_state_dict(_take(tensors, "head."))
    ib_mbm.to(runtime.device).eval()
    head.to(runtime.device).eval()

    @torch.inference_mode()
    def predict(x: torch.Tensor) -> torch.Tensor:
        with runtime.autocast():
            feats = [t.features(x) for t in teachers]
            return head(ib_mbm(student.features(x), feats).mu)

    return predict
