"""Each frozen model's inference precision and memory layout, chosen by measurement.

Whether bf16 or channels_last pays depends on the processor, the model and the input size
(bf16 autocast doubled a resnet18 teacher's speed on an AVX-512-bf16 EPYC without AMX; on an
AVX2-only EPYC, where oneDNN has no bf16 kernels, it is 10-20x slower than fp32), so with
``precision: auto`` ``plan_inference`` times a few forwards of the real model on a real batch,
on the device in use, for each candidate (fp32 and, where the device has it, bf16 or fp16;
the batch's layout and the other one), interleaved, and keeps the fastest:

- another layout must beat the batch's by ``LAYOUT_MARGIN`` (it pays a conversion of the
  batch, which the timing includes);
- bf16 (fp16) must beat the fastest fp32 by ``LOW_PRECISION_MARGIN``: fp32 is exact, so
  a tie goes to it.

The choice is cached in ``inference.json`` under ``$ASIB_CACHE_DIR`` (default
``$XDG_CACHE_HOME/asib`` or ``~/.cache/asib``), keyed by architecture, input shape and
layout, batch size, device name, threads and torch version, so a second run measures
nothing. ``precision: fp32`` / ``bf16`` and ``deterministic: true`` measure nothing either.
The trained model's own precision is not measured here (bf16 training is a change of the
results, not only of speed; the recipe decides it).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asib.engine.runtime import (
    DTYPE_NAMES,
    InferencePlan,
    Runtime,
    architecture_key,
    as_layout,
    precision_autocast,
    set_layout,
)
from asib.errors import AsibError, clip

CACHE_ENV = "ASIB_CACHE_DIR"
CACHE_FILE = "inference.json"
CACHE_FORMAT = 1
MAX_CACHE_ENTRIES = 512  # the oldest go first
MAX_CACHE_BYTES = 4 * 2**20  # a larger file is not read (and is rewritten)

LAYOUT_MARGIN = 0.02
LOW_PRECISION_MARGIN = 0.05
BUDGET_S = 1.0  # measuring stops after this (and at least MIN_ROUNDS rounds)
MIN_ROUNDS, MAX_ROUNDS = 3, 10

Say = Callable[[str], None]


@dataclass(frozen=True)
class Candidate:
    """One way to run a frozen model: a dtype (fp32: no autocast) and a layout."""

    dtype: torch.dtype
    channels_last: bool

    @property
    def label(self) -> str:
        return f"{DTYPE_NAMES.get(self.dtype, str(self.dtype))} {'channels_last' if self.channels_last else 'nchw'}"


# A timer: median ms per forward of the model on the batch, by candidate label.
Timer = Callable[[nn.Module, torch.Tensor, list[Candidate], torch.device], dict[str, float]]


# ------------------------------------------------------------------ what may be tried


def bf16_supported() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (AVX-512 or AMX); elsewhere bf16 runs
    through reference code, many times slower than fp32, so it is not even timed."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and check is not None and check())


def low_precision(device: torch.device) -> tuple[torch.dtype | None, str]:
    """The reduced precision frozen forwards may try on ``device`` and, when none, why."""
    if device.type == "cuda":
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16), ""
    if device.type == "cpu":
        if bf16_supported():
            return torch.bfloat16, ""
        return None, "bf16 not timed: oneDNN has no bf16 kernels on this CPU (it needs AVX-512 or AMX)"
    return None, f"bf16 not timed on {device.type}"


def candidates(runtime: Runtime) -> tuple[list[Candidate], str]:
    """What ``precision: auto`` times for a frozen model, the batch's layout first (and a note
    on what it leaves out); nothing under a forced precision or ``deterministic``."""
    if runtime.precision != "auto" or runtime.deterministic:
        return [], ""
    low, note = low_precision(runtime.device)
    layouts = [True, False] if runtime.channels_last else [False]
    # Same layouts side by side: the timer converts the weights only when the layout changes.
    out = [Candidate(torch.float32, layouts[0])]
    if low is not None:
        out += [Candidate(low, cl) for cl in layouts]
    out += [Candidate(torch.float32, cl) for cl in layouts[1:]]
    return out, note


def fixed_reason(runtime: Runtime) -> str:
    """Why nothing is measured."""
    if runtime.deterministic:
        return "deterministic"
    if runtime.precision != "auto":
        return f"precision: {runtime.precision}"
    return "nothing to choose on this device"


# ------------------------------------------------------------------ the choice


def choose(ms: Mapping[str, float], cands: list[Candidate], batch_channels_last: bool) -> Candidate:
    """The candidate to run: per dtype, the batch's layout unless the other layout is faster by
    ``LAYOUT_MARGIN``; then fp32 unless the reduced precision is faster by ``LOW_PRECISION_MARGIN``."""

    def best(dtype: torch.dtype) -> Candidate | None:
        own = [c for c in cands if c.dtype == dtype and c.label in ms]
        if not own:
            return None
        ref = next((c for c in own if c.channels_last == batch_channels_last), own[0])
        fastest = min(own, key=lambda c: ms[c.label])
        return fastest if ms[fastest.label] < ms[ref.label] * (1 - LAYOUT_MARGIN) else ref

    fp32 = best(torch.float32)
    lows = [c for c in (best(d) for d in dict.fromkeys(c.dtype for c in cands) if d != torch.float32) if c]
    low = min(lows, key=lambda c: ms[c.label]) if lows else None
    if fp32 is None:
        if low is None:
            raise ValueError("no candidate was timed")
        return low
    if low is not None and ms[low.label] < ms[fp32.label] * (1 - LOW_PRECISION_MARGIN):
        return low
    return fp32


# ------------------------------------------------------------------ the measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_candidates(model: nn.Module, x: torch.Tensor, cands: list[Candidate], device: torch.device,
                    budget_s: float = BUDGET_S) -> dict[str, float]:
    """Median ms per forward (features and head, ``inference_mode``, the batch converted to the
    candidate's layout inside the timed part) for each candidate: warm-up passes, then rounds
    of every candidate in alternating order until ``budget_s`` is spent (``MIN_ROUNDS`` to
    ``MAX_ROUNDS``). The model's weights end in the last candidate's layout; its mode is kept."""
    times: dict[str, list[float]] = {c.label: [] for c in cands}
    layout: list[bool | None] = [None]

    def forward(c: Candidate) -> float:
        if layout[0] != c.channels_last:  # outside inference_mode: the weights stay normal tensors
            set_layout(model, c.channels_last)
            layout[0] = c.channels_last
        _sync(device)
        tick = time.perf_counter()
        with torch.inference_mode(), precision_autocast(c.dtype, device):
            model.head(model.features(as_layout(x, c.channels_last)))
        _sync(device)
        return time.perf_counter() - tick

    was_training = model.training
    model.eval()
    try:
        start = time.perf_counter()
        for _ in range(2 if device.type == "cuda" else 1):  # first passes: kernel selection, caches
            for c in cands:
                forward(c)
        for rounds in range(1, MAX_ROUNDS + 1):
            for c in cands if rounds % 2 else cands[::-1]:
                times[c.label].append(forward(c))
            elapsed = time.perf_counter() - start
            if (rounds >= MIN_ROUNDS and elapsed >= budget_s) or elapsed >= 4 * budget_s:
                break
    finally:
        model.train(was_training)
    return {label: round(1000 * statistics.median(t), 3) for label, t in times.items()}


# ------------------------------------------------------------------ the cache


def cache_path() -> Path:
    """``$ASIB_CACHE_DIR/inference.json``, else under ``$XDG_CACHE_HOME/asib`` or ``~/.cache/asib``."""
    folder = os.environ.get(CACHE_ENV)
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        folder = str(Path(base) / "asib")
    return Path(folder) / CACHE_FILE


def device_name(device: torch.device) -> str:
    """The processor the measurement ran on: the GPU's name, or the CPU's model and vector unit."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    if device.type == "cpu":
        return f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()})"
    return device.type


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` says."""
    info = Path("/proc/cpuinfo")
    try:
        text = info.read_text(encoding="utf-8", errors="replace") if info.is_file() else ""
    except OSError:
        text = ""  # unreadable: platform's answer below
    for line in text.splitlines():
        if line.startswith("model name") and ":" in line:
            return clip(line.split(":", 1)[1].strip(), 100)
    return clip(platform.processor() or platform.machine() or "unknown cpu", 100)


def cache_key(arch: str, x: torch.Tensor, runtime: Runtime, cands: list[Candidate]) -> str:
    """Architecture, input (shape per image, layout), batch size, device, threads, torch, candidates."""
    shape = "x".join(str(d) for d in x.shape[1:])
    layout = "channels_last" if runtime.channels_last else "nchw"
    threads = f"{torch.get_num_threads()} threads" if runtime.device.type == "cpu" else "gpu"
    tried = ",".join(c.label for c in cands)
    return " | ".join((arch, f"{shape} {layout} {str(x.dtype).replace('torch.', '')}", f"batch {x.shape[0]}",
                       device_name(runtime.device), threads, f"torch {torch.__version__}", tried))


class InferenceCache:
    """The measured choices, one JSON file written atomically; a file that cannot be read or
    does not parse counts as empty (and is rewritten with the next measurement)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self) -> dict[str, Any]:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_CACHE_BYTES + 1)
        except OSError:
            return {}
        if len(raw) > MAX_CACHE_BYTES:
            return {}
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            return {}
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), dict):
            return {}
        return {k: v for k, v in data["entries"].items()
                if isinstance(v, dict) and isinstance(v.get("choice"), str) and isinstance(v.get("ms"), dict)}

    def get(self, key: str, cands: list[Candidate]) -> InferencePlan | None:
        """The cached plan of ``key``, None when there is none or it does not make sense."""
        entry = self.entries().get(key)
        if not isinstance(entry, dict):
            return None
        chosen = next((c for c in cands if c.label == entry.get("choice")), None)
        ms = entry.get("ms")
        if chosen is None or not isinstance(ms, dict) or set(ms) != {c.label for c in cands}:
            return None
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                   for v in ms.values()):
            return None
        return InferencePlan(chosen.dtype, chosen.channels_last, {k: float(v) for k, v in ms.items()}, cached=True)

    def put(self, key: str, plan: InferencePlan) -> str | None:
        """Store a measured plan (the file's other entries kept); the error line when it cannot be written."""
        from asib.engine.io import atomic_write_json

        entries = self.entries()
        entries.pop(key, None)
        entries[key] = {"choice": plan.label, "ms": plan.ms, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
        while len(entries) > MAX_CACHE_ENTRIES:
            entries.pop(next(iter(entries)))
        try:
            atomic_write_json(self.path, {"format": CACHE_FORMAT, "entries": entries})
        except AsibError as exc:
            return str(exc)
        return None


# ------------------------------------------------------------------ planning a run's frozen models


def plan_inference(
    runtime: Runtime,
    models: Mapping[str, nn.Module],
    example: torch.Tensor,
    say: Say | None = None,
    *,
    timer: Timer | None = None,
    cache: InferenceCache | None = None,
) -> dict[str, dict[str, Any]]:
    """Choose each frozen model's precision and layout (measured, or from the cache), give it
    to the model through ``runtime.plans`` (its weights move to the chosen layout), print one
    line per model and return the records for summary.json, by name.

    ``example`` is a real batch of the run (its shape, layout and device); ``timer`` and
    ``cache`` replace the measurement and the cache file (tests).
    """
    say = say or (lambda _line: None)
    cands, note = candidates(runtime)
    out: dict[str, dict[str, Any]] = {}
    if not models:
        return out
    if len(cands) < 2:
        plan = runtime.fixed_plan(fixed_reason(runtime))
        for name, model in models.items():
            runtime.plans.set(model, plan)
            out[name] = plan.to_dict()
        say(f"inference: teachers run {plan.label} ({plan.chosen_by}; nothing measured)")
        return out
    cache = cache or InferenceCache(cache_path())
    timer = timer or time_candidates
    batch_cl = runtime.channels_last
    measured: dict[str, InferencePlan] = {}  # key -> plan, for teachers of one architecture
    warned = False
    for name, model in models.items():
        arch = architecture_key(model)
        key = cache_key(arch, example, runtime, cands)
        plan = measured.get(key) or cache.get(key, cands)
        if plan is None:
            tick = time.perf_counter()
            ms = timer(model, example, cands, runtime.device)
            chosen = choose(ms, cands, batch_cl)
            plan = InferencePlan(chosen.dtype, chosen.channels_last, dict(ms), cached=False,
                                 seconds=round(time.perf_counter() - tick, 2))
            error = cache.put(key, plan)
            if error and not warned:
                say(f"inference: the measurement is not cached: {error}")
                warned = True
        measured[key] = plan
        if note:
            plan = InferencePlan(plan.dtype, plan.channels_last, plan.ms, plan.cached, plan.chosen_by, plan.seconds, note)
        runtime.plans.set(model, plan, arch)
        out[name] = plan.to_dict()
        say(describe(name, plan, example))
    return out


def describe(name: str, plan: InferencePlan, example: torch.Tensor) -> str:
    """One line: what the model runs in, and the figures that decided it."""
    shape = "x".join(str(d) for d in example.shape)
    figures = ", ".join(f"{label} {ms:.1f}" for label, ms in sorted(plan.ms.items(), key=lambda kv: kv[1]))
    how = "cached measurement" if plan.cached else f"measured in {plan.seconds:.1f} s"
    line = f"inference: {name} runs {plan.label} ({how}; ms per batch of {shape}: {figures})"
    return f"{line}; {plan.note}" if plan.note else line
