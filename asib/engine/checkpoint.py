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
