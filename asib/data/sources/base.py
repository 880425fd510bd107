"""What every raw source shares: the ``RawData`` type and its checked constructor, the
stratified split, torchvision's downloader, and the registry from a recipe's ``data.source``
name to the function that reads it.

A source module registers its loader with ``@register_source("name")``; the package's
``__init__`` imports every source module, so ``load_source`` sees them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from asib.errors import DataError
from asib.recipe import DataSpec


@dataclass(frozen=True)
class RawData:
    """One dataset as read from its files: train and test images, labels, class names."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]


def _raw(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], classes: Any) -> RawData:
    """Build a RawData with the dtypes every caller relies on, checking the labels fit the classes."""
    data = RawData(
        train_images=np.require(train[0], np.uint8, ["C", "W"]),  # writable: torch.from_numpy wants that
        train_labels=np.asarray(train[1], dtype=np.int64),
        test_images=np.require(test[0], np.uint8, ["C", "W"]),
        test_labels=np.asarray(test[1], dtype=np.int64),
        classes=tuple(str(c) for c in classes),
    )
    for split, images, labels in (
        ("train", data.train_images, data.train_labels),
        ("test", data.test_images, data.test_labels),
    ):
        if images.ndim not in (3, 4) or len(images) != len(labels):
            raise DataError(
                f"{split}: {len(images)} images of shape {images.shape[1:]} but {len(labels)} labels"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= len(data.classes)):
            raise DataError(f"{split}: labels outside 0..{len(data.classes) - 1}")
    return data


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int, stream: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, held-out) with about ``fraction`` of every class held out.

    The held-out total is exactly round(fraction * N); per-class shares are rounded by
    largest remainder, so small classes are not starved. Both index arrays are sorted.
    ``stream`` keeps different splits drawn with one seed (subset, validation) independent.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(np.random.SeedSequence([seed % 2**63, stream]))
    classes, counts = np.unique(labels, return_counts=True)
    want = fraction * counts
    take = np.floor(want).astype(np.int64)
    short = int(round(fraction * len(labels))) - int(take.sum())
    if short > 0:
        order = np.argsort(-(want - take), kind="stable")
        take[order[:short]] += 1
    held = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=True)]
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    kept_idx = np.setdiff1d(np.arange(len(labels)), held_idx)
    return kept_idx.astype(np.int64), held_idx.astype(np.int64)


def torchvision_download(name: str, root: Path) -> RawData:
    """Let torchvision fetch and checksum the official files, then take its arrays."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, name)
    root.mkdir(parents=True, exist_ok=True)
    try:
        train, test = cls(str(root), train=True, download=True), cls(str(root), train=False, download=True)
    except (OSError, RuntimeError) as exc:
        raise DataError(
            f"{name}: download into {root} failed ({exc})", hint="check the network, or set data.root"
        ) from None
    return _raw(
        (np.asarray(train.data), np.asarray(train.targets)),
        (np.asarray(test.data), np.asarray(test.targets)),
        train.classes,
    )


# ---------------------------------------------------------------- registry

SourceLoader = Callable[[DataSpec], RawData]
LOADERS: dict[str, SourceLoader] = {}  # data.source name -> loader, in registration order


def register_source(*names: str) -> Callable[[SourceLoader], SourceLoader]:
    """Decorator: the function reads the raw data of a DataSpec whose ``source`` is one of ``names``."""

    def add(loader: SourceLoader) -> SourceLoader:
        for name in names:
            if name in LOADERS:
                raise ValueError(f"data source '{name}' is registered twice")
            LOADERS[name] = loader
        return loader

    return add


def load_source(spec: DataSpec) -> RawData:
    """Read the raw train and test data a DataSpec names."""
    loader = LOADERS.get(spec.source)
    if loader is None:
        raise DataError(f"unknown data source '{spec.source}' (have {', '.join(LOADERS)})")
    return loader(spec)
