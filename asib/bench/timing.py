"""How the bench measures: ``BenchConfig`` (how much to run), ``measure`` (warm-up, then
interleaved blocks of each variant with one device synchronisation per block), ``Timing`` and
``paired_ratio`` (medians over the repeats), ``MemoryMeter`` (peak memory of a block) and
``count_syncs`` (host-device synchronisations of one step, CUDA only)."""

from __future__ import annotations

import ctypes
import os
import resource
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from asib.data import Batch
from asib.errors import DataError

Step = Callable[[Batch], Any]


@dataclass(frozen=True)
class BenchConfig:
    """How much to run: steps per timed block, warm-up steps, interleaved repeats."""

    steps: int | None = None  # per timed block; default 4 on CPU, 10 on CUDA (keeps the GPU queue full)
    warmup: int = 2
    repeats: int = 15
    device: str | None = None  # overrides the recipe's device
    synthetic: int | None = None  # this many random images instead of the prepared data
    classes: int | None = None  # class count of synthetic data without a prepared dataset
    workers: tuple[int, ...] = (0, 2)  # DataLoader workers of the PIL pipeline
    threads: int | None = None  # torch intra-op threads during the bench (default: torch's own)


@dataclass
class Timing:
    """Timed blocks of one variant: seconds per block, images per block, peak memory."""

    block_seconds: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    images: int = 0  # per block
    steps: int = 0  # per block
    first_step: float = 0.0  # seconds of the very first step (includes any compilation)

    @property
    def seconds(self) -> float:
        return statistics.median(self.block_seconds)

    @property
    def ms_per_step(self) -> float:
        return 1000.0 * self.seconds / self.steps

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def peak_mib(self) -> float:
        return max(self.peaks) / 2**20

    def figures(self) -> dict[str, float]:
        return {
            "images_per_s": round(self.images_per_s, 1),
            "ms_per_step": round(self.ms_per_step, 3),
            "peak_mib": round(self.peak_mib, 4),
        }


def paired_ratio(a: Timing, b: Timing) -> float:
    """Median over repeats of a's block time over b's adjacent block time."""
    return statistics.median(x / y for x, y in zip(a.block_seconds, b.block_seconds, strict=True))


# ------------------------------------------------------------------ measuring


def sync(device: torch.device) -> None:
    """Wait for the device: the bench's only synchronisation points."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MemoryMeter:
    """Peak memory of a block above its start: CUDA allocator peak, or CPU resident-set growth."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        libc = ctypes.CDLL(None) if device.type == "cpu" else None
        self._trim = getattr(libc, "malloc_trim", None) if libc is not None else None
        self.method = "cuda_max_memory_allocated" if device.type == "cuda" else self._cpu_method()
        self._base = 0

    @staticmethod
    def _cpu_method() -> str:
        clear = Path("/proc/self/clear_refs")
        return "rss_high_water_mark" if clear.exists() and _writable(clear) else "ru_maxrss"

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return
        if self._trim is not None:
            self._trim(0)  # hand freed heap back, so the block's working set shows as growth
        if self.method == "rss_high_water_mark":
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self._base = _proc_status_kib("VmRSS") * 1024
        else:
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self._base
        if self.method == "rss_high_water_mark":
            return max(0, _proc_status_kib("VmHWM") * 1024 - self._base)
        return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._base)


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK)


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise DataError(f"/proc/self/status has no {key}")


def measure(
    variants: dict[str, Step], batches: list[Batch], cfg: BenchConfig, device: torch.device, meter: MemoryMeter
) -> dict[str, Timing]:
    """Warm every variant up, then time interleaved blocks of ``cfg.steps`` steps of each."""
    timings = {name: Timing(images=sum(batches[i % len(batches)].y.shape[0] for i in range(cfg.steps)),
                            steps=cfg.steps) for name in variants}
    for name, step in variants.items():
        for i in range(max(1, cfg.warmup)):
            tick = time.perf_counter()
            step(batches[i % len(batches)])
            sync(device)
            if i == 0:
                timings[name].first_step = time.perf_counter() - tick
    names = list(variants)
    for r in range(cfg.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            step, timing = variants[name], timings[name]
            meter.start()
            tick = time.perf_counter()
            for i in range(cfg.steps):
                step(batches[i % len(batches)])
            sync(device)
            timing.block_seconds.append(time.perf_counter() - tick)
            timing.peaks.append(meter.peak())
    return timings


def count_syncs(step: Step, batch: Batch, device: torch.device) -> int | None:
    """Host-device synchronisations one step makes, from CUDA's sync debug mode (None off CUDA)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)
