"""The device, precision and random state a run executes with."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from asib.errors import RunError


@dataclass(frozen=True)
class Runtime:
    """Where and how a run computes: device, autocast dtype, memory format."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    compile: bool = False

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def maybe_compile(self, module: torch.nn.Module) -> torch.nn.Module:
        """``torch.compile`` the module when the recipe asks for it; parameters stay shared."""
        return torch.compile(module) if self.compile else module  # type: ignore[return-value]

    def to_device(self, module: torch.nn.Module) -> torch.nn.Module:
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when there is one; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("device: cuda was asked for but no CUDA device is visible", hint="use device: auto or cpu")
    return torch.device(name)


def make_runtime(device: str, deterministic: bool = False, compile: bool = False) -> Runtime:
    """bf16 autocast, channels_last, TF32 and cudnn.benchmark on CUDA; plain fp32 on CPU."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = not deterministic
        torch.backends.cudnn.allow_tf32 = not deterministic
        torch.backends.cudnn.benchmark = not deterministic
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Runtime(dev, amp, channels_last=True, compile=compile)
    return Runtime(dev, None, channels_last=False, compile=compile)


def set_random_seed(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; with ``deterministic`` also ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict[str, object]:
    """Every RNG state a run depends on (torch CPU and CUDA, numpy, python)."""
    state: dict[str, object] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, object]) -> None:
    torch.set_rng_state(state["torch"])  # type: ignore[arg-type]
    np.random.set_state(state["numpy"])  # type: ignore[arg-type]
    random.setstate(state["python"])  # type: ignore[arg-type]
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])  # type: ignore[arg-type]
