"""The device, precision and random state a run executes with."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import weakref
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np
import torch

from asib.errors import RunError, clip

# The runtime of the running training step, whose plans say how frozen models (teachers) run.
_INFERENCE_RUNTIME: ContextVar[Runtime | None] = ContextVar("asib_inference_runtime", default=None)

# Each compiled model instance keeps its own graphs (train/eval, grad/no-grad); dynamo's
# default of 8 entries per code object is too few once a student and its teachers share one.
_RECOMPILE_LIMIT = 64


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class InferencePlan:
    """How one frozen model runs its forwards: the dtype (fp32: autocast off; bf16 or fp16:
    autocast to it) and the memory layout of its weights and input, and how that was decided:
    ``chosen_by`` is ``measurement`` (``ms``: each candidate's median ms per batch, ``cached``:
    the figures came from an earlier run's measurement) or why nothing was measured."""

    dtype: torch.dtype
    channels_last: bool
    ms: dict[str, float] = field(default_factory=dict, compare=False)
    cached: bool = False
    chosen_by: str = "measurement"
    seconds: float = 0.0  # the measurement's wall time (0 when cached or not measured)
    note: str = ""  # e.g. why a precision was not timed

    @property
    def label(self) -> str:
        return f"{DTYPE_NAMES.get(self.dtype, str(self.dtype))} {'channels_last' if self.channels_last else 'nchw'}"

    def to_dict(self) -> dict[str, object]:
        """The summary.json record."""
        out: dict[str, object] = {"dtype": str(self.dtype).replace("torch.", ""), "channels_last": self.channels_last,
                                  "ms": dict(self.ms), "cached": self.cached, "chosen_by": self.chosen_by}
        if self.note:
            out["note"] = self.note
        return out


class InferencePlans:
    """The inference plans of a run's frozen models: set per model; a copy of a planned model
    (ASIB's synergy-path teachers, the bench's copies) finds its original's plan by architecture."""

    def __init__(self) -> None:
        self._own: weakref.WeakKeyDictionary[torch.nn.Module, InferencePlan] = weakref.WeakKeyDictionary()
        self._by_arch: dict[str, InferencePlan] = {}
        self._found: weakref.WeakKeyDictionary[torch.nn.Module, InferencePlan | None] = weakref.WeakKeyDictionary()

    def set(self, model: torch.nn.Module, plan: InferencePlan, arch: str | None = None) -> None:
        """Give ``model`` its plan and put its weights in the plan's layout."""
        set_layout(model, plan.channels_last)
        self._own[model] = plan
        self._by_arch[arch or architecture_key(model)] = plan
        self._found = weakref.WeakKeyDictionary()

    def find(self, model: torch.nn.Module) -> InferencePlan | None:
        """The model's plan, or its architecture's (then its weights move to that layout, once)."""
        plan = self._own.get(model)
        if plan is not None or not self._by_arch:
            return plan
        if model in self._found:
            return self._found[model]
        plan = self._by_arch.get(architecture_key(model))
        if plan is not None:
            set_layout(model, plan.channels_last)
        self._found[model] = plan
        return plan

    def layout(self, model: torch.nn.Module) -> bool | None:
        """The layout a plan already gave the model (its own, or one found for it), else None."""
        plan = self._own.get(model)
        if plan is None and model in self._found:
            plan = self._found[model]
        return None if plan is None else plan.channels_last


@dataclass(frozen=True)
class Runtime:
    """Where and how a run computes: device, autocast dtype, memory format, compilation.

    ``inference_dtype`` is the precision of frozen teachers' forwards (no gradient) where no
    measurement chose one (``asib.engine.inference.plan_inference`` does, per model, with
    ``precision: auto``): bf16 on CUDA and on CPUs with AMX bf16 units; ``None`` keeps them in
    the training precision. ``plans`` holds the per-model choices (shared by runtimes derived
    with ``dataclasses.replace``); ``precision`` and ``deterministic`` are the recipe's.
    """

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    compile: bool = False
    inference_dtype: torch.dtype | None = None
    precision: str = "auto"
    deterministic: bool = False
    plans: InferencePlans = field(default_factory=InferencePlans, compare=False, repr=False)
    _prepared: weakref.WeakSet = field(default_factory=weakref.WeakSet, init=False, compare=False, repr=False)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @contextlib.contextmanager
    def inference_precision(self) -> Iterator[None]:
        """Declare this runtime's plans for the frozen-model forwards inside (``inference_plan``)."""
        token = _INFERENCE_RUNTIME.set(self)
        try:
            yield
        finally:
            _INFERENCE_RUNTIME.reset(token)

    def fixed_plan(self, chosen_by: str = "rule") -> InferencePlan:
        """The plan of a frozen model nothing measured: ``inference_dtype`` (else the training
        precision) in the runtime's layout."""
        dtype = self.inference_dtype or self.amp_dtype or torch.float32
        return InferencePlan(dtype, self.channels_last, chosen_by=chosen_by)

    def plan_of(self, model: torch.nn.Module) -> InferencePlan:
        """How ``model`` runs as a frozen model: its measured plan, else the fixed one."""
        return self.plans.find(model) or self.fixed_plan()

    def maybe_compile(self, module: torch.nn.Module) -> torch.nn.Module:
        """``torch.compile`` the module when the recipe asks for it; parameters stay shared."""
        return torch.compile(module) if self.compile else module  # type: ignore[return-value]

    def to_device(self, module: torch.nn.Module) -> torch.nn.Module:
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def prepare(self, *modules: torch.nn.Module) -> None:
        """Once per module, in place: the runtime's memory format (a planned frozen model keeps
        its plan's), and with ``compile`` its ``features`` (or its forward) through ``torch.compile``.

        Training steps call it on every step (after the first it returns at once), so models
        built anywhere (teachers read from checkpoints included) run in the runtime's format.
        Parameters keep their identity (optimizers stay valid) and state-dict names do not change.
        """
        for module in modules:
            if module in self._prepared:
                continue
            planned = self.plans.layout(module)
            if planned is not None:
                set_layout(module, planned)
            elif self.channels_last:
                module.to(memory_format=torch.channels_last)
            if self.compile:
                compile_in_place(module)
            self._prepared.add(module)


def set_layout(module: torch.nn.Module, channels_last: bool) -> None:
    """Put a module's 4-d weights in channels_last or in the plain (NCHW) layout, in place."""
    module.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def as_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """An image batch in the layout asked for (itself when it is in it already)."""
    if x.ndim != 4:
        return x
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def architecture_key(model: torch.nn.Module) -> str:
    """What identifies a model's architecture: its arch name (else its class) and a digest of
    its parameter and buffer names, shapes and dtypes (so the class count counts too)."""
    digest = hashlib.sha1()
    for name, t in model.state_dict().items():
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    arch = getattr(model, "arch", None)
    name = arch if isinstance(arch, str) and arch else type(model).__qualname__
    return f"{clip(name, 80)}#{digest.hexdigest()[:12]}"


def inference_plan(model: torch.nn.Module) -> InferencePlan | None:
    """How a frozen model runs inside the running step (``Runtime.inference_precision``);
    None outside a step: then nothing changes."""
    runtime = _INFERENCE_RUNTIME.get()
    return None if runtime is None else runtime.plan_of(model)


def precision_autocast(dtype: torch.dtype, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype``; fp32 turns an enclosing autocast off (on CPU and CUDA)."""
    if dtype != torch.float32:
        return torch.autocast(device_type=device.type, dtype=dtype)
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


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
    without bf16 trains in fp32: fp16 training would need loss scaling); on CPU fp32 training
    with channels_last where oneDNN runs. Each frozen model's precision and layout is then
    measured (``asib.engine.inference.plan_inference``); ``inference_dtype`` is only the
    fallback for models nothing measured (bf16 on CUDA, fp16 on a GPU without bf16, bf16 on
    CPUs with AMX). ``fp32``: no autocast anywhere, teachers included, and no TF32. ``bf16``:
    bf16 autocast for training and teachers, on CPU too. ``deterministic`` turns off cuDNN
    autotuning and TF32 on CUDA, keeps the NCHW layout on CPU and measures nothing.
    """
    dev = resolve_device(device)
    if precision not in ("auto", "fp32", "bf16"):
        raise RunError(f"precision must be auto, fp32 or bf16, not {precision!r}")
    same = {"compile": compile, "precision": precision, "deterministic": deterministic}
    if dev.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if precision == "bf16" and not bf16_ok:
            raise RunError(f"precision: bf16, but {torch.cuda.get_device_name(dev)} has no bf16 support",
                           hint="use precision: auto (fp32 training, fp16 frozen teachers there) or fp32")
        torch.backends.cuda.matmul.allow_tf32 = not deterministic and precision != "fp32"
        torch.backends.cudnn.allow_tf32 = not deterministic and precision != "fp32"
        torch.backends.cudnn.benchmark = not deterministic
        if precision == "fp32":
            return Runtime(dev, None, channels_last=True, inference_dtype=None, **same)
        if not bf16_ok:  # no gradients flow through fp16 here, so no loss scaling is needed
            return Runtime(dev, None, channels_last=True, inference_dtype=torch.float16, **same)
        return Runtime(dev, torch.bfloat16, channels_last=True, inference_dtype=torch.bfloat16, **same)
    onednn = dev.type == "cpu" and not deterministic and torch.backends.mkldnn.is_available()
    if precision == "bf16":
        return Runtime(dev, torch.bfloat16, channels_last=onednn, inference_dtype=torch.bfloat16, **same)
    teacher_dtype = torch.bfloat16 if precision == "auto" and onednn and cpu_has_bf16_matrix_units() else None
    return Runtime(dev, None, channels_last=onednn, inference_dtype=teacher_dtype, **same)


def cpu_has_bf16_matrix_units() -> bool:
    """True on CPUs with AMX bf16 tiles: the fallback rule for frozen models nothing measured
    (measured, bf16 also pays on CPUs with AVX-512 bf16 and no AMX)."""
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
