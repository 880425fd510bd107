"""Checkpoints: safetensors files whose header says what they hold.

A bare checkpoint is enough to rebuild its model: the metadata carries the kind, the
architecture, the class count and names, the input normalisation and the recipe as JSON.
Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asib.engine.io import atomic_write
from asib.errors import AsibError, CheckpointError, clip, first_line, short_repr

FORMAT_VERSION = "1"
MODEL_KINDS = ("teacher", "student")
KINDS = (*MODEL_KINDS, "synergy")
MAX_CLASSES = 100_000  # a class count beyond this in a header is not one (ImageNet-21k has 21,841)
MAX_WIDTH = 1 << 16  # feature widths named in a synergy header
REWRITE_HINT = "the file may be damaged or not written by asib; re-run the step that wrote it"


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
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise CheckpointError(f"{self.path}: asib.{key} in its header is not JSON ({short_repr(raw, 80)})",
                                  hint=REWRITE_HINT) from None


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
            f"{path}: not a readable safetensors file ({first_line(exc, 120)})",
            hint="the file may be truncated or not a checkpoint; re-run the step that wrote it",
        ) from None
    kind = meta.get("asib.kind")
    if kind not in KINDS:
        raise CheckpointError(f"{path}: not an asib checkpoint (no asib.kind in its header)")
    arch, classes = meta.get("asib.arch"), meta.get("asib.num_classes")
    if not arch:
        raise CheckpointError(f"{path}: its header has no asib.arch, so the model cannot be rebuilt",
                              hint=REWRITE_HINT)
    if classes is None or not re.fullmatch(r"[0-9]{1,6}", classes) or not 1 <= int(classes) <= MAX_CLASSES:
        raise CheckpointError(
            f"{path}: asib.num_classes in its header is {short_repr(classes, 40)}, not a class count",
            hint=REWRITE_HINT,
        )
    if meta.get("asib.small_input", "false") not in ("true", "false"):
        raise CheckpointError(
            f"{path}: asib.small_input in its header is {short_repr(meta['asib.small_input'], 40)}, not true or false",
            hint=REWRITE_HINT,
        )
    return CheckpointInfo(path, kind, meta)


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint; a truncated body becomes a CheckpointError."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:  # a short read or corrupt body
        raise CheckpointError(
            f"{path}: cannot read its tensors ({first_line(exc, 120)})",
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
    try:
        model = create_model(info.arch, info.num_classes, small_input=info.small_input)
    except AsibError as exc:  # an architecture this installation does not know
        raise CheckpointError(f"{info.path}: {exc.message}", hint=exc.hint) from None
    load_fitting(model, load_tensors(info.path), info.path, info.arch)
    return model.to(device).eval(), info


def load_fitting(module: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Load ``state`` into ``module`` when every name and shape fits, else one CheckpointError
    saying what does not (the tensors of a file are checked before they are used)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not fit {clip(what, 100)} ({len(missing)} missing, {len(unexpected)} unexpected tensors,"
            f" e.g. {clip((missing + unexpected)[0], 100)})", hint=REWRITE_HINT,
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(
                f"{path}: does not fit {clip(what, 100)} (tensor {clip(key, 100)} is {tuple(value.shape)},"
                f" the model's is {tuple(own[key].shape)})", hint=REWRITE_HINT,
            )
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied into the parameter
        raise CheckpointError(f"{path}: does not fit {clip(what, 100)} ({first_line(exc)})",
                              hint=REWRITE_HINT) from None


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
    more_paths: list[tuple[nn.Module, nn.Module]] | None = None,
    residual_weights: list[float] | None = None,
) -> Path:
    """Adapters + IB_MBM + head, the teacher and student checkpoints they are queried with,
    and, when teacher blocks were trained on the synergy path, the adapted teachers' weights
    (``teacher{k}.*``), so the ensemble is evaluated exactly as it was trained.

    ``more_paths``: further (IB_MBM, head) pairs of the same shapes (``synergy_crossfit``),
    stored as ``path{p}.ib_mbm.*`` and ``path{p}.head.*`` from p = 1; the header's
    ``asib.synergy_paths`` counts them all, and the synergy is the mean of the paths' logits.

    ``residual_weights`` (``synergy_residual``): the heads add their output to the teachers'
    logits averaged with these weights; the header's ``asib.synergy_residual`` keeps them."""
    tensors = {f"ib_mbm.{k}": v for k, v in ib_mbm.state_dict().items()}
    tensors.update({f"head.{k}": v for k, v in head.state_dict().items()})
    for p, (more_ib, more_head) in enumerate(more_paths or [], start=1):
        tensors.update({f"path{p}.ib_mbm.{k}": v for k, v in more_ib.state_dict().items()})
        tensors.update({f"path{p}.head.{k}": v for k, v in more_head.state_dict().items()})
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
        **({"asib.synergy_paths": 1 + len(more_paths)} if more_paths else {}),
        **({"asib.synergy_residual": residual_weights} if residual_weights is not None else {}),
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


MAX_SYNERGY_PATHS = 8


def synergy_paths(info: CheckpointInfo) -> int:
    """How many (IB_MBM, head) paths a synergy checkpoint holds: 1 when its header does not say
    (files written before ``synergy_crossfit``)."""
    paths = info.json_field("synergy_paths")
    if paths is None:
        return 1
    if type(paths) is not int or not 1 <= paths <= MAX_SYNERGY_PATHS:
        raise CheckpointError(f"{info.path}: asib.synergy_paths in its header is {short_repr(paths, 40)},"
                              f" not a count of 1 to {MAX_SYNERGY_PATHS}", hint=REWRITE_HINT)
    return paths


def _synergy_header(info: CheckpointInfo) -> tuple[list[str], str, int, list[int], Any, bool, bool]:
    """The fields of a synergy header, each checked (a header is read from a file)."""
    from pydantic import ValidationError

    from asib.recipe import IBMBMSpec

    teachers, student = info.json_field("teachers"), info.json_field("student")
    query_dim, dims = info.json_field("query_dim"), info.json_field("teacher_dims")

    def width(v: Any) -> bool:
        return type(v) is int and 1 <= v <= MAX_WIDTH

    ok = (
        isinstance(teachers, list) and 1 <= len(teachers) <= 64 and all(isinstance(t, str) for t in teachers)
        and isinstance(student, str) and width(query_dim)
        and isinstance(dims, list) and len(dims) == len(teachers) and all(width(d) for d in dims)
    )
    if not ok:
        raise CheckpointError(f"{info.path}: its synergy header is incomplete or malformed", hint=REWRITE_HINT)
    try:
        spec = IBMBMSpec.model_validate(info.json_field("ib_mbm"))
    except ValidationError:
        raise CheckpointError(f"{info.path}: asib.ib_mbm in its header is not a valid ib_mbm section",
                              hint=REWRITE_HINT) from None
    adapted = bool(info.json_field("adapted_teachers"))
    return teachers, student, query_dim, dims, spec, bool(info.json_field("ib")), adapted


def synergy_residual_weights(info: CheckpointInfo) -> list[float] | None:
    """The teacher weights of a residual synergy's base (``asib.synergy_residual``); None when
    its heads are not residual (the field absent: files written before ``synergy_residual``)."""
    weights = info.json_field("synergy_residual")
    if weights is None:
        return None
    teachers = info.json_field("teachers")
    ok = (isinstance(weights, list) and isinstance(teachers, list) and len(weights) == len(teachers)
          and all(type(w) in (int, float) and math.isfinite(w) and w >= 0 for w in weights) and sum(weights) > 0)
    if not ok:
        raise CheckpointError(f"{info.path}: asib.synergy_residual in its header is not one weight per teacher",
                              hint=REWRITE_HINT)
    return [float(w) for w in weights]


def synergy_student_path(info: CheckpointInfo) -> Path:
    """The student checkpoint a synergy checkpoint is queried with: its header says the input
    size, normalisation and recipe the synergy was trained with (the synergy's own does not)."""
    _, student, *_ = _synergy_header(info)
    return _resolve(student, info.path.parent)


def load_synergy_predictor(info: CheckpointInfo, runtime: Any):
    """A function x -> synergy logits, rebuilt from a synergy checkpoint and the files it names."""
    from asib.models.ib_mbm import IBMBM, SynergyHead

    base = info.path.parent
    teacher_refs, student_ref, query_dim, dims, ib_spec, ib, adapted = _synergy_header(info)
    residual = synergy_residual_weights(info)
    tensors = load_tensors(info.path)
    teachers = []
    for k, ref in enumerate(teacher_refs):
        teacher, _ = load_model(_resolve(ref, base), kinds=("teacher",), device=runtime.device)
        if adapted:
            load_fitting(teacher, _take(tensors, f"teacher{k}."), info.path, f"teacher {k} ({teacher.arch})")
        teachers.append(teacher.eval())
    student, _ = load_model(_resolve(student_ref, base), kinds=("student",), device=runtime.device)
    paths = []
    for p in range(synergy_paths(info)):
        prefix, which = ("", "") if p == 0 else (f"path{p}.", f" of path {p}")
        ib_mbm = IBMBM(query_dim, dims, ib_spec, ib=ib)
        head = SynergyHead(ib_spec.dim, info.num_classes, ib_spec.head_dropout, residual=residual is not None)
        load_fitting(ib_mbm, _take(tensors, f"{prefix}ib_mbm."), info.path, f"its fusion module (ib_mbm){which}")
        load_fitting(head, _take(tensors, f"{prefix}head."), info.path, f"its synergy head{which}")
        paths.append((ib_mbm.to(runtime.device).eval(), head.to(runtime.device).eval()))

    @torch.inference_mode()
    def predict(x: torch.Tensor) -> torch.Tensor:
        with runtime.autocast():
            feats = [t.features(x) for t in teachers]
            h_s = student.features(x)
            mean = None
            if residual is not None:  # the teachers' logits, averaged in fp32 with the stored weights
                total = sum(residual)
                mean = sum((w / total) * t.head(f).float() for w, t, f in zip(residual, teachers, feats, strict=True))
            if len(paths) == 1:
                ib_mbm, head = paths[0]
                return head(ib_mbm(h_s, feats).mu, mean)
            return torch.stack([head(ib_mbm(h_s, feats).mu, mean) for ib_mbm, head in paths]).mean(0)

    return predict
