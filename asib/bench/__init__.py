"""``asib bench``: the engine's throughput against the bare PyTorch a user would otherwise write.

On the recipe's models and data (or synthetic images of the same shape), in one process:

1. data: the in-memory loader (recipe augmentation) vs a torchvision ``DataLoader`` with
   PIL transforms over the same images, with 0 and 2 workers;
2. steps: ``CETask.step`` (first teacher), the ASIB A-step and B-step and a ``kd`` step,
   each with the loop's per-step metric accumulation, vs the fastest bare loop (``bare.py``)
   doing the same forward, losses, backward and optimizer step with plain torch ops, on
   copies of the same models, the same batches, training precision and memory format (and
   ``torch.compile`` when the recipe asks for it). The engine's frozen teachers run as
   ``asib distill`` runs them, each in the precision and layout measured for it
   (``asib.engine.inference``); the bare loop has a twin per precision its frozen teachers
   may run in (fp32, and bf16 where the device has it), all timed, the fastest kept;
3. breakdown: data, every teacher's forward, student forward(+backward), fusion modules and
   optimizer, each timed on its own;
4. compile (``compile: true``): the engine compiled vs eager, and the compile seconds;
5. methods: one student step of every registered method (and ASIB's teacher-side step),
   interleaved, on the recipe's distill section as each method reads it.

How it is measured: after warm-up, blocks of ``steps`` steps of each variant alternate,
the order flipping every repeat, each block timed with one device synchronisation at its
end (the only ones: the steps themselves never synchronise). Figures are medians over the
repeats; a ratio is the median of the adjacent engine/bare pairs, so load from other work
on the machine hits both sides alike. Peak memory: CUDA ``max_memory_allocated`` above
the block's start; CPU the resident-set growth over the block (freed heap returned to the
OS first with ``malloc_trim``, the high-water mark reset through ``/proc/self/clear_refs``).

Modules: ``timing`` (BenchConfig, measure, Timing, MemoryMeter), ``setting`` (the runtime,
data and models the measurements share), ``data`` (section 1), ``bare`` (the bare PyTorch
twins), ``steps`` (the engine's steps, sections 2 and 4), ``breakdown`` (section 3); this
module runs them all (``run_bench``) and holds the figures (``BenchReport``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from asib.bench.breakdown import breakdown
from asib.bench.data import compare_data
from asib.bench.setting import Setting, build_setting, take_batches
from asib.bench.steps import Comparison, bare_teacher_dtypes, compare_steps, method_steps, noop
from asib.bench.timing import BenchConfig, MemoryMeter, Timing, measure, paired_ratio
from asib.engine.runtime import DTYPE_NAMES
from asib.recipe import Recipe

__all__ = [
    "BenchConfig",
    "BenchReport",
    "Comparison",
    "MemoryMeter",
    "Setting",
    "Timing",
    "breakdown",
    "build_setting",
    "compare_data",
    "compare_steps",
    "measure",
    "paired_ratio",
    "run_bench",
    "take_batches",
]


@dataclass
class BenchReport:
    """Every figure of one bench run; ``to_dict`` is what ``--json`` prints."""

    setting: dict[str, Any]
    data: dict[str, Any]
    steps: list[Comparison]
    breakdown: dict[str, dict[str, float]]
    methods: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    @property
    def ratios(self) -> dict[str, float]:
        return {c.name: c.ratio for c in self.steps}

    def to_dict(self) -> dict[str, Any]:
        return {
            "setting": self.setting,
            "data": self.data,
            "steps": {c.name: c.to_dict() for c in self.steps},
            "breakdown": self.breakdown,
            "methods": self.methods,
            "max_ratio": round(max(self.ratios.values()), 4) if self.steps else None,
        }


def run_bench(recipe: Recipe, cfg: BenchConfig, say: Callable[[str], None] | None = None) -> BenchReport:
    """Build the setting, then measure data, steps and breakdown; see the module docstring."""
    previous = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_bench(recipe, cfg, say or noop)
    finally:
        torch.set_num_threads(previous)


def _run_bench(recipe: Recipe, cfg: BenchConfig, say: Callable[[str], None]) -> BenchReport:
    setting = build_setting(recipe, cfg, say)
    runtime = setting.runtime
    if cfg.steps is None:
        cfg = dataclasses.replace(cfg, steps=10 if runtime.device.type == "cuda" else 4)
    meter = MemoryMeter(runtime.device)
    say("measuring the data pipelines")
    data_t = compare_data(setting, cfg, meter)
    data = {name: t.figures() for name, t in data_t.items()}
    for w in cfg.workers:
        data[f"speedup_vs_w{w}"] = round(paired_ratio(data_t[f"dataloader_pil_w{w}"], data_t["in_memory"]), 2)
    steps = compare_steps(setting, cfg, meter, say)
    say("measuring the breakdown")
    parts = breakdown(setting, cfg, meter)
    methods = {name: t.figures() for name, t in method_steps(setting, cfg, meter, say).items()}
    about = {
        "recipe": recipe.name,
        "device": str(runtime.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "data": setting.data_source,
        "image_size": list(setting.images.shape[-2:]),
        "num_classes": setting.num_classes,
        "batch_size": {"finetune": recipe.teachers[0].train.batch_size if recipe.teachers else None,
                       "distill": recipe.distill.batch_size},
        "teachers": {t.name: src for t, src in zip(recipe.teachers, setting.teacher_sources, strict=True)},
        "student": f"fresh {recipe.student.arch}" if recipe.student else None,
        "precision": {
            "train": str(runtime.amp_dtype).replace("torch.", "") + " autocast" if runtime.amp_dtype else "fp32",
            "teachers": "as measured for each" if any(r["chosen_by"] == "measurement" for r in setting.inference.values())
            else runtime.fixed_plan().label,
            "bare_teachers": [DTYPE_NAMES.get(d, str(d)) for d in bare_teacher_dtypes(runtime)],
            "channels_last": runtime.channels_last,
            "compile": runtime.compile,
        },
        "inference": setting.inference,
        "memory": meter.method,
        "steps": cfg.steps,
        "warmup": cfg.warmup,
        "repeats": cfg.repeats,
    }
    return BenchReport(about, data, steps, parts, methods)
