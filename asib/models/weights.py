"""Weights: loading a local file into a FeatureClassifier, and checking that pretrained
weights can be had before timm/torchvision try to download them.

``load_weights`` never re-initialises a layer silently: a key the model needs but the
file lacks is an error, except the classifier (a different class count is normal when
fine-tuning) and the stem that ``small_input`` replaced; both are skipped and reported.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from asib.errors import CheckpointError, ModelError

_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile
_NESTED_KEYS = ("state_dict", "model")


@dataclass
class LoadReport:
    """What ``load_weights`` did: how many tensors were loaded and what was left out."""

    path: str
    loaded: int = 0
    skipped_classifier: list[str] = field(default_factory=list)
    skipped_stem: list[str] = field(default_factory=list)
    missing_classifier: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def classifier_loaded(self) -> bool:
        return not (self.skipped_classifier or self.missing_classifier)

    def summary(self) -> str:
        """One line for the log."""
        parts = [f"loaded {self.loaded} tensors from {self.path}"]
        if self.skipped_classifier:
            parts.append("classifier skipped (other class count)")
        if self.missing_classifier:
            parts.append("classifier not in file")
        if self.skipped_stem:
            parts.append(f"stem kept new for small_input ({', '.join(self.skipped_stem)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unused keys (e.g. {self.unexpected[0]})")
        return "; ".join(parts)


# ---------------------------------------------------------------- reading files


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or weights-only ``.pth/.pt`` file (nested under
    'state_dict' or 'model' is fine), with 'module.' / '_orig_mod.' prefixes stripped."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weights file {path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"weights file {path}: is a folder, not a file")
    if path.suffix == ".safetensors":
        raw: Any = _read_safetensors(path)
    elif path.suffix in _TORCH_SUFFIXES:
        raw = _read_torch(path)
    else:
        raise CheckpointError(
            f"weights file {path}: unknown format '{path.suffix}' (use .safetensors or .pth/.pt)"
        )
    for key in _NESTED_KEYS:
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"weights file {path}: not a state dict of tensors")
    return {_strip_prefixes(str(k)): v for k, v in raw.items()}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except SafetensorError as exc:
        raise CheckpointError(
            f"weights file {path}: not a readable safetensors file (truncated?): {exc}"
        ) from None


def _read_torch(path: Path) -> Any:
    import pickle
    import zipfile

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"weights file {path}: cannot be read as weights only ({first[:160]})",
            hint="save only the state dict (torch.save(model.state_dict(), path)) or convert it to .safetensors",
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"weights file {path}: not a readable torch file (truncated?): {exc}") from None


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


# ---------------------------------------------------------------- loading into a model


def _to_model_key(key: str, model_keys: set[str], model: nn.Module) -> str | None:
    """The model's name for a file key: as is, or a key of the inner timm/torchvision
    module (``layer1.0.conv1.weight`` -> ``model.layer1.0.conv1.weight``, ``fc.weight`` ->
    ``classifier.weight``)."""
    if key in model_keys:
        return key
    inner_head = getattr(model, "inner_classifier_path", None)
    if inner_head and key.startswith(inner_head + "."):
        return "classifier." + key[len(inner_head) + 1 :]
    if "model." + key in model_keys:
        return "model." + key
    return None


def load_weights(model: nn.Module, path: str | Path, strict_report: bool = True) -> LoadReport:
    """Load a local weights file into ``model`` (a FeatureClassifier) and report.

    Raises ModelError when a non-classifier tensor is missing or has another shape (never
    silently keep a random layer); a classifier of another shape is skipped and reported.
    ``strict_report=True`` also makes unused file keys an error (a file for another
    architecture fails loudly); with False they are only listed in the report.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    model_keys = set(own)
    adapted = set(getattr(model, "adapted_param_names", ()))
    report = LoadReport(path=str(path))
    to_load: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    for key, tensor in state.items():
        target = _to_model_key(key, model_keys, model)
        if target is None:
            report.unexpected.append(key)
            continue
        if target.startswith("classifier.") and tensor.dim() == 4 and tensor.shape[2:] == (1, 1):
            tensor = tensor.flatten(1)  # a 1x1-conv classifier (timm DLA, DPN) saved by timm itself
        if tensor.shape == own[target].shape:
            to_load[target] = tensor
        elif target.startswith("classifier."):
            report.skipped_classifier.append(target)
        elif target in adapted:
            report.skipped_stem.append(target)
        else:
            mismatched.append(f"{target} {tuple(tensor.shape)} vs {tuple(own[target].shape)}")
    if mismatched:
        raise ModelError(
            f"weights file {path} does not fit '{_arch(model)}': {len(mismatched)} tensors of another shape "
            f"(e.g. {mismatched[0]})"
        )
    skipped = set(report.skipped_classifier) | set(report.skipped_stem)
    missing = [
        k for k in own if k not in to_load and k not in skipped and not k.endswith("num_batches_tracked")
    ]
    report.missing_classifier = [k for k in missing if k.startswith("classifier.")]
    missing = [k for k in missing if not k.startswith("classifier.")]
    if missing:
        raise ModelError(
            f"weights file {path} lacks {len(missing)} tensors of '{_arch(model)}' (e.g. {missing[0]}); "
            "is it for another architecture or small_input setting?"
        )
    if report.unexpected and strict_report:
        raise ModelError(
            f"weights file {path} has {len(report.unexpected)} tensors '{_arch(model)}' does not use "
            f"(e.g. {report.unexpected[0]}); is it for another architecture?"
        )
    model.load_state_dict(to_load, strict=False)
    report.loaded = len(to_load)
    return report


def _arch(model: nn.Module) -> str:
    return str(getattr(model, "arch", type(model).__name__))


# ---------------------------------------------------------------- pretrained downloads


def offline_requested() -> bool:
    """``HF_HUB_OFFLINE`` set to a true value, read now (not at import time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """One quick TCP connect to the host of ``url``; the hubs' own retries take minutes."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def download_error(arch: str, why: str = "offline?") -> ModelError:
    return ModelError(
        f"could not download pretrained weights for '{arch}' ({why}); use weights: PATH with a local file",
        hint="weights: takes a .safetensors or weights-only .pth file; set pretrained: false",
    )


def timm_pretrained_overlay(arch: str) -> dict[str, str]:
    """Check timm's pretrained weights for ``arch`` can be loaded; return a
    ``pretrained_cfg_overlay`` pointing at a locally cached file when there is one (so no
    network is touched), else an empty dict. Raises ModelError fast when they cannot."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(arch)
    except RuntimeError as exc:
        raise ModelError(f"timm has no pretrained weights '{arch}': {exc}") from None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ModelError(
            f"timm has no pretrained weights for '{arch}'; use weights: PATH or pretrained: false"
        )
    if cfg.file:
        return {}
    if cfg.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        for filename in filter(None, (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin")):
            cached = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(cached, str):
                return {"file": cached}
        url = constants.ENDPOINT
    else:
        cached_url = _torch_hub_cached(str(cfg.url))
        if cached_url:
            return {"file": cached_url}
        url = str(cfg.url)
    if offline_requested():
        raise download_error(arch, "HF_HUB_OFFLINE is set and they are not cached")
    if not _reachable(url):
        raise download_error(arch, f"{urlparse(url).hostname} unreachable; offline?")
    return {}


def _torch_hub_cached(url: str) -> str | None:
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    return str(cached) if cached.is_file() else None


def check_torchvision_pretrained(name: str, arch: str) -> None:
    """Raise ModelError fast when torchvision's DEFAULT weights for ``name`` are neither
    cached (torch hub folder) nor downloadable."""
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    if _torch_hub_cached(weights.url):
        return
    if offline_requested():
        raise download_error(arch, "HF_HUB_OFFLINE is set and they are not cached")
    if not _reachable(weights.url):
        raise download_error(arch, f"{urlparse(weights.url).hostname} unreachable; offline?")
