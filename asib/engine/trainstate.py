"""The train state behind ``--resume``: nested Python state in one safetensors file, no pickle.

Tensors (model and optimizer states, RNG states) become safetensors entries; everything
around them (positions, counters, metrics so far) becomes a JSON skeleton kept in the same
file's header, so the state is written and replaced in one atomic step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asib.engine.checkpoint import load_tensors, save_tensors
from asib.errors import CheckpointError, clip, first_line

STATE_KEY = "asib.train_state"


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"train state cannot hold {type(obj).__name__}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy()
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_train_state(path: str | Path, state: dict[str, Any]) -> Path:
    """Write the whole train state atomically."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(state, tensors)
    if not tensors:  # safetensors needs at least one entry
        tensors["_empty"] = torch.zeros(0)
    return save_tensors(path, tensors, {"asib.kind": "train_state", STATE_KEY: json.dumps(skeleton)})


def load_train_state(path: str | Path) -> dict[str, Any]:
    """Read a train state; a damaged or foreign file is a CheckpointError, never a traceback."""
    from safetensors import safe_open

    path = Path(path)
    hint = "the file may be damaged or not from asib; use --force to start the run over"
    if not path.is_file():
        raise CheckpointError(f"{path}: no train state to resume from", hint="start without --resume")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CheckpointError(
            f"{path}: train state is unreadable ({first_line(exc, 100)})", hint=hint
        ) from None
    if STATE_KEY not in meta:
        raise CheckpointError(f"{path}: not an asib train state", hint=hint)
    tensors = load_tensors(path)
    try:
        state = _decode(json.loads(meta[STATE_KEY]), tensors)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        # ValueError covers bad JSON; KeyError a tensor the skeleton names but the file lacks.
        raise CheckpointError(
            f"{path}: train state is damaged ({exc.__class__.__name__}: {clip(str(exc), 100)})", hint=hint
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: train state is damaged (its skeleton is not a mapping)", hint=hint)
    return state
