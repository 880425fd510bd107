"""Data-parallel training under ``torchrun``: process group, per-rank device, gradient sync.

``torchrun --nproc_per_node=N -m asib distill RECIPE`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set; ``init_distributed`` sees them, joins the process
group (NCCL on CUDA, gloo on CPU) and pins the process to ``cuda:LOCAL_RANK``. Without
those variables it returns a single-process ``Dist`` whose collectives do nothing, so
the engine has one code path.

Gradient sync (``DDPRoute``). The distiller calls ``student.features`` / ``student.head``
directly and which parameters train changes between A-steps, B-steps and stages (freeze
schedules), so wrapping the student alone in DistributedDataParallel would sync nothing
(DDP only arms its gradient hooks inside its own ``forward``). Instead the module the
training step *calls* (the whole ``ASIBDistiller``, whose forward returns the loss terms,
or the fine-tuned classifier) is routed through a DDP wrapper:

- a call with gradients enabled goes through ``DDP.forward``, so every parameter that
  takes part in the loss gets its gradient averaged over ranks during ``backward``;
- ``find_unused_parameters=True`` for the distiller: in an A-step the student (and in a
  B-step the teacher side) hold ``requires_grad`` parameters that the loss does not reach;
  DDP marks them ready (globally unused: their ``.grad`` stays None, their optimizer is
  not stepped in that phase anyway);
- the wrapper is rebuilt whenever the set of ``requires_grad`` parameters changes (a freeze
  level applied in ``begin_epoch``): DDP fixes its buckets at construction;
- calls without gradients (validation, prediction) go to the module itself, so they need
  no other rank.

Every rank's loss is the mean over its own B/N samples, all ranks hold the same number of
samples per step (the train loader drops the last partial batch), and DDP averages the
gradients: the result equals the gradient of the mean over the global batch of B, for
every loss that is a per-sample mean (BatchNorm without ``sync_bn`` and the disagreement-
weighted mean are the exceptions; see docs/distributed.md).
"""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from asib.errors import RecipeError, RunError

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass
class Dist:
    """This process's place in the run: rank, world size, device; collectives are no-ops alone."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _synced: list[nn.Module] = field(default_factory=list, repr=False)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints and writes files."""
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (returned for chaining)."""
        if self.enabled:
            tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX)
        return tensor

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean over ranks, in place (returned for chaining)."""
        if self.enabled:
            tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
            tensor /= self.world_size
        return tensor

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is true on any rank (a collective: every rank must call it)."""
        if not self.enabled:
            return flag
        return bool(self.all_reduce_max(torch.tensor([float(flag)], device=self.device)).item())

    def barrier(self) -> None:
        if self.enabled and self.device.type == "cuda":
            tdist.barrier(device_ids=[self.local_rank])
        elif self.enabled:
            tdist.barrier()

    def per_rank_batch(self, global_batch: int, where: str) -> int:
        """The recipe's batch size is the global batch; each rank takes an equal share."""
        if global_batch % self.world_size:
            raise RecipeError([
                f"{where}: batch size {global_batch} does not divide by the world size {self.world_size}"
            ], hint=f"use a multiple of {self.world_size}")
        return global_batch // self.world_size

    def track_buffers(self, module: nn.Module) -> None:
        """Keep this module's buffers (BatchNorm statistics) equal on every rank at epoch ends."""
        if self.enabled and all(m is not module for m in self._synced):
            self._synced.append(module)

    def sync_buffers(self) -> None:
        """Broadcast rank 0's buffers of the tracked modules, so every rank validates the same model."""
        for module in self._synced:
            for buf in module.buffers():
                tdist.broadcast(buf, src=0)


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in _ENV) and int(os.environ["WORLD_SIZE"]) > 1


def init_distributed(device: str) -> Dist:
    """Join the torchrun process group (once per process) or return the single-process ``Dist``."""
    from asib.engine.runtime import resolve_device

    if not launched_by_torchrun():
        return Dist(device=resolve_device(device))
    rank, world, local = (int(os.environ[name]) for name in _ENV)
    dev = resolve_device(device)
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise RunError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices are visible",
                           hint="use --nproc_per_node at most the number of GPUs per node")
        torch.cuda.set_device(local)  # plain "cuda" now means cuda:LOCAL_RANK
        dev = torch.device("cuda", local)
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world,
                                 device_id=dev if dev.type == "cuda" else None)
        atexit.register(_destroy)
    if rank != 0 and getattr(sys.stdout, "name", None) != os.devnull:  # rank 0 alone prints; errors reach stderr
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the process's lifetime)
    return Dist(rank=rank, world_size=world, local_rank=local, device=dev)


def _destroy() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def convert_sync_bn(module: nn.Module, dist: Dist, enabled: bool) -> nn.Module:
    """BatchNorm to SyncBatchNorm (statistics over the global batch) when asked and distributed."""
    if not (enabled and dist.enabled):
        return module
    if dist.device.type != "cuda":
        raise RecipeError(["sync_bn: SyncBatchNorm needs CUDA devices; this torchrun run is on CPU"],
                          hint="set sync_bn: false (each rank then normalises with its own batch statistics)")
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


class DDPRoute:
    """Stands in for a module: calls with gradients go through a DistributedDataParallel
    wrapper (rebuilt when the trainable parameters change); every attribute read or set,
    and calls without gradients, go to the module itself (see the module docstring)."""

    def __init__(self, module: nn.Module, dist: Dist, find_unused_parameters: bool = False) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_dist", dist)
        object.__setattr__(self, "_find_unused", find_unused_parameters)
        object.__setattr__(self, "_ddp", None)
        object.__setattr__(self, "_key", None)
        dist.track_buffers(module)

    @property
    def module(self) -> nn.Module:
        return self._module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self._module(*args, **kwargs)
        return self._wrapper()(*args, **kwargs)

    def _wrapper(self) -> DistributedDataParallel:
        key = tuple(p.requires_grad for p in self._module.parameters())
        if key != self._key:
            dev = self._dist.device
            ddp = DistributedDataParallel(
                self._module,
                device_ids=[dev.index] if dev.type == "cuda" else None,
                find_unused_parameters=self._find_unused,
                forward_sync_buffers=True,  # BatchNorm statistics stay rank 0's: every rank validates one model
            )
            object.__setattr__(self, "_ddp", ddp)
            object.__setattr__(self, "_key", key)
        return self._ddp

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._module, name, value)


def route(module: nn.Module, dist: Dist, find_unused_parameters: bool = False) -> nn.Module:
    """The module itself alone, a ``DDPRoute`` to it under torchrun (typed as the module it stands for)."""
    if not dist.enabled:
        return module
    return DDPRoute(module, dist, find_unused_parameters)  # type: ignore[return-value]


def unwrap(module: Any) -> nn.Module:
    """The module behind a ``DDPRoute`` (or the module itself)."""
    return module.module if isinstance(module, DDPRoute) else module
