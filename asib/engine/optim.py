"""Optimizers and learning-rate schedules built from an ``OptimSpec``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from asib.engine.schedules import lr_lambda
from asib.recipe import OptimSpec, spec_from


def param_groups(
    modules: Iterable[nn.Module], weight_decay: float, decay_norms_and_biases: bool = False
) -> list[dict[str, Any]]:
    """Weights with decay, and norms/biases/embeddings-of-rank-1 without; with
    ``decay_norms_and_biases`` one group, every parameter decayed (plain torch optimizers)."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for param in module.parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if param.ndim <= 1 and not decay_norms_and_biases else decay).append(param)
    if decay_norms_and_biases:
        return [{"params": decay, "weight_decay": weight_decay}]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(modules: Iterable[nn.Module], spec: OptimSpec | dict[str, Any]) -> torch.optim.Optimizer:
    """SGD (Nesterov unless ``nesterov: false``) or AdamW over every parameter of ``modules``,
    frozen ones included; norms and biases are not decayed unless ``decay_norms_and_biases``.

    Frozen parameters get no gradient, so the optimizer skips them; keeping them in the
    groups lets a later stage unfreeze blocks without rebuilding the optimizer.
    """
    spec = spec_from(OptimSpec, spec)
    groups = param_groups(modules, spec.weight_decay, spec.decay_norms_and_biases)
    if spec.name == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov and spec.momentum > 0)
    return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas)


def build_scheduler(
    optimizer: torch.optim.Optimizer, spec: OptimSpec | dict[str, Any], steps_per_epoch: int, total_epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule: warm-up, then cosine or constant."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec, steps_per_epoch, total_epochs))
