"""The CIFAR-zoo registry: ``register_model`` and the table of registered builders.

Kept apart from ``registry`` (which resolves any name, zoo, timm or torchvision) so that the
zoo's modules register themselves here without importing the resolver.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Builder = Callable[..., Any]


@dataclass(frozen=True)
class ZooEntry:
    """A registered zoo model: its builder and the feature width it produces."""

    name: str
    builder: Builder
    feature_dim: int | None


ZOO: dict[str, ZooEntry] = {}


def register_model(
    name: str | Builder | None = None, *, feature_dim: int | None = None
) -> Callable[[Builder], Builder] | Builder:
    """Register a zoo builder ``fn(num_classes, drop_rate=0.0, arch=name, **kw)``.

    Use as ``@register_model`` (the function's name) or ``@register_model("name", feature_dim=64)``.
    """
    if callable(name):
        return register_model(None)(name)

    def wrap(fn: Builder) -> Builder:
        key = name or fn.__name__
        if key in ZOO:
            raise ValueError(f"zoo model '{key}' is registered twice")
        ZOO[key] = ZooEntry(key, fn, feature_dim)
        return fn

    return wrap


