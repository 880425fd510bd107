"""The data pipelines: the in-memory loader (recipe augmentation) against a torchvision
``DataLoader`` with PIL transforms over the same images, with 0 and 2 workers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from asib.bench.setting import Setting, endless
from asib.bench.timing import BenchConfig, MemoryMeter, Step, Timing, measure
from asib.data import Batch
from asib.recipe import AugmentSpec


def compare_data(setting: Setting, cfg: BenchConfig, meter: MemoryMeter) -> dict[str, Timing]:
    """Section 1: the in-memory loader vs DataLoader + PIL transforms over the same images."""
    spec = setting.recipe.distill
    n = max(4 * cfg.steps, 8)
    loader = setting.loader(spec.batch_size, spec.augment)
    device = setting.runtime.device
    in_memory = endless(loader)
    variants: dict[str, Step] = {"in_memory": lambda _b: next(in_memory)}
    pil_iters = {w: _pil_batches(setting, spec.batch_size, spec.augment, w, n * (cfg.repeats + 1) + cfg.warmup)
                 for w in cfg.workers}
    for w, it in pil_iters.items():
        variants[f"dataloader_pil_w{w}"] = lambda _b, it=it: next(it)
    dummy = [Batch(torch.zeros(0), torch.zeros(spec.batch_size))]
    data_cfg = dataclasses.replace(cfg, steps=n)
    return measure(variants, dummy, data_cfg, device, meter)


class _PILImages(torch.utils.data.Dataset):
    """What a user's dataset does per item: a PIL image through torchvision transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable[[Any], torch.Tensor]) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def _pil_batches(setting: Setting, batch_size: int, aug: AugmentSpec, workers: int, n_batches: int) -> Iterator[Batch]:
    from torchvision import transforms as T

    h, w = setting.images.shape[-2:]
    steps: list[Any] = [T.RandomCrop((h, w), padding=aug.crop_padding)] if aug.crop_padding else []
    steps += [T.RandomHorizontalFlip()] if aug.hflip else []
    steps += [T.ToTensor(), T.Normalize(setting.mean, setting.std)]
    dataset = _PILImages(setting.images.permute(0, 2, 3, 1).numpy(), setting.labels.numpy(), T.Compose(steps))
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=n_batches * batch_size)
    device, cuda = setting.runtime.device, setting.runtime.device.type == "cuda"
    fmt = torch.channels_last if setting.runtime.channels_last else torch.contiguous_format
    dl = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                     drop_last=True, pin_memory=cuda, persistent_workers=workers > 0)
    for x, y in dl:
        yield Batch(x.to(device, non_blocking=cuda, memory_format=fmt), y.to(device, non_blocking=cuda))
