"""The device, precision and random state a run executes with."""

from __future__ import annotations

import contextlib
import os
import random
import weakref
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np
import torch

from asib.errors import RunError, clip

# Precision of frozen-model (teacher) forwards, declared by the running training step.
_INFERENCE_DTYPE: ContextVar[torch.dtype | None] = ContextVar("asib_inference_dtype", default=None)

# Each compiled model instance keeps its own graphs (train/eval, grad/no-grad); dynamo's
# default of 8 entries per code object is too few once a student and its teachers share one.
_RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class Runtime:
    """Where and how a run computes: device, autocast dtype, memory format, compilation.

    ``inference_dtype`` is the precision of frozen teachers' forwards (no gradient): bf16 on
    CUDA, and on CPUs with AMX bf16 units, where it measures about twice as fast as fp32
    (``asib bench``); ``None`` keeps them in the training precision.
    """

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    compile: bool = False
    inference_dtype: torch.dtype | None = None
    _prepared: weakref.WeakSet = field(default_factory=weakref.WeakSet, init=False, compare=False, repr=False)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @contextlib.contextmanager
    def inference_precision(self) -> Iterator[None]:
        """Declare ``inference_dtype`` for the frozen-model forwards inside (see ``inference_autocast``)."""
        token = _INFERENCE_DTYPE.set(self.inference_dtype)
        try:
            yield
        finally:
            _INFERENCE_DTYPE.reset(token)

    def maybe_compile(self, module: torch.nn.Module) -> torch.nn.Module:
        """``torch.compile`` the module when the recipe asks for it; parameters stay shared."""
        return torch.compile(module) if self.compile else module  # type: ignore[return-value]

    def to_device(self, module: torch.nn.Module) -> torch.nn.Module:
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def prepare(self, *modules: torch.nn.Module) -> None:
        """Once per module, in place: channels_last when the runtime uses it, and with
        ``compile`` its ``features`` (or its forward) through ``torch.compile``.

        Training steps call it on every step (after the first it returns at once), so models
        built anywhere (teachers read from checkpoints included) run in the runtime's format.
        Parameters keep their identity (optimizers stay valid) and state-dict names do not change.
        """
        for module in modules:
            if module in self._prepared:
                continue
            if self.channels_last:
                module.to(memory_format=torch.channels_last)
            if self.compile:
                compile_in_place(module)
            self._prepared.add(module)


def compile_in_place(module: torch.nn.Module) -> None:
    """``torch.compile`` a feature classifier's ``features`` (the heavy part every method calls,
    whether through ``forward`` or directly), or else the module's ``__call__``."""
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, _RECOMPILE_LIMIT)
    features = getattr(module, "features", None)
    if callable(features):
        module.features = torch.compile(features)
    else:
        module.compile()


def inference_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for a frozen model's forward in the precision the running step declared
    (``Runtime.inference_precision``); outside a step, or with none declared, nothing changes."""
    dtype = _INFERENCE_DTYPE.get()
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when there is one. ``cpu``, ``cuda``, ``cuda:N`` and ``mps`` are
    taken when the machine has them; anything else (or a device it lacks) is a user error."""
    hint = "use auto, cpu, cuda or cuda:N"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise RunError(f"device: unknown device {clip(repr(name), 100)}", hint=hint) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"device: {name} was asked for but no CUDA device is visible",
                           hint="use device: auto or cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RunError(f"device: {name}, but this machine has {torch.cuda.device_count()} CUDA device(s)",
                           hint=f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise RunError("device: mps was asked for but it is not available here", hint=hint)
    elif dev.type != "cpu":
        raise RunError(f"device: {clip(repr(name), 100)} is not a device asib trains or evaluates on",
                       hint=hint)
    return dev


def make_runtime(device: str, deterministic: bool = False, compile: bool = False, precision: str = "auto") -> Runtime:
    """The device and precision a run computes with.

    ``precision: auto``: on CUDA bf16 autocast, channels_last, TF32 and cudnn.benchmark (a GPU
    without bf16 trains in fp32 and runs only the frozen teachers in fp16: fp16 training would
    need loss scaling); on CPU fp32 training, with channels_last and bf16 teacher
    forwards where oneDNN makes them faster (measured with ``asib bench``). ``fp32``: no
    autocast anywhere, teachers included, and no TF32. ``bf16``: bf16 autocast for training
    and teachers, on CPU too. ``deterministic`` turns off cuDNN autotuning and TF32 on CUDA
    and keeps the NCHW layout on CPU.
    """
    dev = resolve_device(device)
    if precision not in ("auto", "fp32", "bf16"):
        raise RunError(f"precision must be auto, fp32 or bf16, not {precision!r}")
    if dev.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if precision == "bf16" and not bf16_ok:
            raise RunError(f"precision: bf16, but {torch.cuda.get_device_name(dev)} has no bf16 support",
                           hint="use precision: auto (fp32 training, fp16 frozen teachers there) or fp32")
        torch.backends.cuda.matmul.allow_tf32 = not deterministic and precision != "fp32"
        torch.backends.cudnn.allow_tf32 = not deterministic and precision != "fp32"
        torch.backends.cudnn.benchmark = not deterministic
        if precision == "fp32":
            return Runtime(dev, None, channels_last=True, compile=compile, inference_dtype=None)
        if not bf16_ok:  # no gradients flow through fp16 here, so no loss scaling is needed
            return Runtime(dev, None, channels_last=True, compile=compile, inference_dtype=torch.float16)
        return Runtime(dev, torch.bfloat16, channels_last=True, compile=compile, inference_dtype=torch.bfloat16)
    onednn = dev.type == "cpu" and not deterministic and torch.backends.mkldnn.is_available()
    if precision == "bf16":
        return Runtime(dev, torch.bfloat16, channels_last=onednn, compile=compile, inference_dtype=torch.bfloat16)
    teacher_dtype = torch.bfloat16 if precision == "auto" and onednn and cpu_has_bf16_matrix_units() else None
    return Runtime(dev, None, channels_last=onednn, compile=compile, inference_dtype=teacher_dtype)


def cpu_has_bf16_matrix_units() -> bool:
    """True on CPUs with AMX bf16 tiles, where oneDNN's bf16 convolutions beat fp32."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check is not None and check())


def set_random_seed(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; with ``deterministic`` also ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False


def derive_seed(seed: int, stream: str) -> int:
    """A seed of its own for one use of a run's seed (e.g. ``"student"``), stable across runs and platforms."""
    import zlib

    return int(np.random.SeedSequence([seed % 2**63, zlib.crc32(stream.encode())]).generate_state(1, np.uint64)[0] >> 1)


@contextlib.contextmanager
def seeded(seed: int, stream: str) -> Iterator[None]:
    """Run the block with torch's CPU generator seeded by ``(seed, stream)`` and restore it after.

    Models are built on the CPU under it, so a model's initial weights depend on the seed and
    its stream only, never on what was built or loaded before: at one seed every method
    starts from the same student.
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(derive_seed(seed, stream))
        yield


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
