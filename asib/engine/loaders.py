"""The train/val/test loaders of a prepared dataset on the training device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from asib.data import DatasetInfo, InMemoryLoader, load_info, load_split
from asib.engine.runtime import Runtime
from asib.recipe import AugmentSpec


@dataclass
class SplitLoaders:
    info: DatasetInfo
    train: InMemoryLoader
    val: InMemoryLoader | None  # None when the recipe carves no validation split
    test: InMemoryLoader


def eval_loader(data_dir: str | Path, split: str, info: DatasetInfo, batch_size: int, runtime: Runtime) -> InMemoryLoader:
    images, labels = load_split(data_dir, split)
    return InMemoryLoader(
        images,
        labels,
        batch_size=batch_size,
        mean=info.mean,
        std=info.std,
        augment=None,
        shuffle=False,
        seed=0,
        device=runtime.device,
        drop_last=False,
        num_classes=info.num_classes,
        channels_last=runtime.channels_last,
    )


def split_loaders(
    data_dir: str | Path,
    runtime: Runtime,
    batch_size: int,
    eval_batch_size: int,
    augment: AugmentSpec,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> SplitLoaders:
    """Load every split onto the device once; the train loader shuffles and augments in batch."""
    info = load_info(data_dir)
    images, labels = load_split(data_dir, "train")
    train = InMemoryLoader(
        images,
        labels,
        batch_size=batch_size,
        mean=info.mean,
        std=info.std,
        augment=augment,
        shuffle=True,
        seed=seed,
        device=runtime.device,
        drop_last=len(labels) // world_size > batch_size,
        rank=rank,
        world_size=world_size,
        num_classes=info.num_classes,
        channels_last=runtime.channels_last,
    )
    has_val = info.counts.get("val", 0) > 0
    val = eval_loader(data_dir, "val", info, eval_batch_size, runtime) if has_val else None
    test = eval_loader(data_dir, "test", info, eval_batch_size, runtime)
    return SplitLoaders(info, train, val, test)
