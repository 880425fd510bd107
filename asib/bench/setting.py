"""What every measurement shares: the runtime, the images (prepared or synthetic), the
models (teachers from their checkpoints when these fit, else fresh) with each teacher's
inference precision and layout chosen as ``asib distill`` chooses them (measured or cached),
and batches taken from the in-memory loader before any timing."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from asib.bench.timing import BenchConfig
from asib.data import Batch, DatasetInfo, InMemoryLoader, load_info, load_split
from asib.engine.checkpoint import load_model, read_info
from asib.engine.inference import plan_inference
from asib.engine.loaders import SplitLoaders
from asib.engine.runtime import Runtime, make_runtime, set_random_seed
from asib.errors import DataError
from asib.models import create_model
from asib.recipe import AugmentSpec, ModelSpec, Recipe


@dataclass
class Setting:
    """Everything the measurements share."""

    recipe: Recipe
    runtime: Runtime
    info: DatasetInfo | None
    images: torch.Tensor  # uint8 (N, C, H, W) on the CPU
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    data_source: str
    teachers: list[nn.Module]  # on the device, never trained by the bench (copied per use)
    teacher_sources: list[str]
    student: nn.Module | None
    inference: dict[str, dict[str, Any]] = field(default_factory=dict)  # per teacher: its plan's record

    def loader(self, batch_size: int, augment: AugmentSpec | None) -> InMemoryLoader:
        if self.images.shape[0] < batch_size:
            raise DataError(f"{self.images.shape[0]} images make no batch of {batch_size}",
                            hint="use more --synthetic images or a smaller batch_size")
        return InMemoryLoader(
            self.images, self.labels, batch_size=batch_size, mean=self.mean, std=self.std, augment=augment,
            shuffle=True, seed=self.recipe.seed, device=self.runtime.device, drop_last=True,
            num_classes=self.num_classes, channels_last=self.runtime.channels_last,
        )

    def split_loaders(self, loader: InMemoryLoader) -> SplitLoaders:
        return SplitLoaders(self.info, loader, None, loader)  # type: ignore[arg-type]


def build_setting(recipe: Recipe, cfg: BenchConfig, say: Callable[[str], None] | None = None) -> Setting:
    """Runtime, images (prepared or synthetic) and models: teachers from their checkpoints when
    these exist and fit, else freshly built from their arch (no download); with a student, each
    teacher's inference plan on a batch of the distill step (``plan_inference``, lines to ``say``)."""
    runtime = make_runtime(cfg.device or recipe.device, recipe.deterministic, recipe.compile, recipe.precision)
    set_random_seed(recipe.seed)
    info = load_info(recipe.data_dir) if (recipe.data_dir / "dataset.json").is_file() or cfg.synthetic is None else None
    if cfg.synthetic is None:
        images, labels = load_split(recipe.data_dir, "train")
        source = f"prepared {recipe.data_dir} (train split)"
        num_classes, mean, std = info.num_classes, info.mean, info.std
    else:
        size = info.image_size if info else (recipe.data.image_size or 32,) * 2
        num_classes = info.num_classes if info else (cfg.classes or 10)
        gen = torch.Generator().manual_seed(recipe.seed)
        images = torch.randint(0, 256, (cfg.synthetic, 3, *size), dtype=torch.uint8, generator=gen)
        labels = torch.arange(cfg.synthetic) % num_classes
        mean, std = (info.mean, info.std) if info else ((0.5,) * 3, (0.25,) * 3)
        source = f"synthetic: {cfg.synthetic} random images {size[0]}x{size[1]}, {num_classes} classes"
    teachers, sources = [], []
    for spec in recipe.teachers:
        model, origin = _teacher(recipe, spec, num_classes, runtime)
        teachers.append(model.eval())
        sources.append(origin)
    student = _fresh(recipe.student, num_classes, runtime) if recipe.student is not None else None
    setting = Setting(recipe, runtime, info, images, labels, tuple(mean), tuple(std), num_classes, source,
                      teachers, sources, student)
    if student is not None and teachers:
        example = take_batches(setting.loader(recipe.distill.batch_size, recipe.distill.augment), 1)[0].x
        names = [t.name for t in recipe.teachers]
        setting.inference = plan_inference(runtime, dict(zip(names, teachers, strict=True)), example, say)
    return setting


def _fresh(spec: ModelSpec, num_classes: int, runtime: Runtime) -> nn.Module:
    model = create_model(spec.arch, num_classes, small_input=spec.small_input, drop_rate=spec.drop_rate)
    return runtime.to_device(model)


def _teacher(recipe: Recipe, spec: Any, num_classes: int, runtime: Runtime) -> tuple[nn.Module, str]:
    path = recipe.teacher_checkpoint(spec)
    if path.is_file():
        info = read_info(path)
        if info.kind == "teacher" and info.num_classes == num_classes:
            model, _ = load_model(path, kinds=("teacher",), device=runtime.device)
            return runtime.to_device(model), f"checkpoint {path}"
        why = f"checkpoint {path} is a {info.kind} of {info.num_classes} classes"
        return _fresh(spec, num_classes, runtime), f"fresh {spec.arch} ({why})"
    return _fresh(spec, num_classes, runtime), f"fresh {spec.arch} (no checkpoint)"


def take_batches(loader: InMemoryLoader, n: int) -> list[Batch]:
    """``n`` batches of the loader, made before any timing (epochs repeat when it has fewer)."""
    return list(itertools.islice(endless(loader), n))


def endless(loader: InMemoryLoader) -> Iterator[Batch]:
    """The loader's batches, epoch after epoch, without end."""
    for epoch in itertools.count():
        yield from loader.batches(epoch)


def model_copies(setting: Setting) -> tuple[list[nn.Module], nn.Module]:
    """Fresh copies of the setting's teachers and student, for one variant to train."""
    return [copy.deepcopy(t) for t in setting.teachers], copy.deepcopy(setting.student)
