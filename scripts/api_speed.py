"""The Python API trains at the CLI's speed: the same KD work timed both ways, side by side.

    .venv/bin/python scripts/api_speed.py [--device cpu] [--threads 1] [--rounds 8] [--steps 8]

The work: the ``kd`` method with a torchvision ResNet-18 teacher (10 classes, untrained: the
speed does not depend on the weights) and a small CNN student, 32x32 images in batches of 64,
the recipe's default augmentation (4-pixel crop, flip), the student's default AdamW.

- ``cli``: what ``asib distill`` runs: ``make_runtime(device)`` with the recipe's defaults,
  the train loader built as ``asib.engine.loaders.split_loaders`` builds it (in the runtime's
  memory format), ``DistillTask.step`` and the loop's on-device metric sums.
- ``api``: what a library user writes: ``asib.Distiller(method, steps_per_epoch)`` with no
  runtime given, ``asib.tensor_loader`` with its defaults, ``Distiller.step(x, y)`` and the
  same metric sums.
- ``fp32`` (with ``--old``): the API's runtime before it took the CLI's (fp32, NCHW).

Both (all) arms start from the same weights, each on its own copy, and take turns: every
round times ``--steps`` steps of each arm, the order alternating between rounds, after a
warm-up. Printed: each arm's median and best images/s over the rounds, and the median of the
per-round ratios cli/api (1.00: the same speed; the goal is within 5%), by the wall clock and
by this process's CPU time. On a shared machine the wall-clock rounds wander with the other
processes; with ``--threads 1`` the CPU-time figures do not wait for them, so they are the
steadier comparison there.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torchvision
from torch import nn

import asib.api as asib
from asib.data import InMemoryLoader
from asib.engine.loaders import SplitLoaders
from asib.engine.loop import EpochPlan, MetricSums
from asib.engine.progress import Progress
from asib.pipeline.distill import DistillTask
from asib.recipe import AugmentSpec

NUM_CLASSES, SIZE, BATCH, IMAGES = 10, 32, 64, 2048
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


class SmallCNN(nn.Module):
    """A library user's own student."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


Step = Callable[[int], None]  # runs the arm's next n steps


def cli_arm(method: asib.DistillMethod, images: torch.Tensor, labels: torch.Tensor, device: str) -> Step:
    """The distill command's runtime, loader and step."""
    runtime = asib.default_runtime(device)  # = make_runtime(recipe.device, ...) with the recipe's defaults
    train = InMemoryLoader(images, labels, batch_size=BATCH, mean=MEAN, std=STD, augment=AugmentSpec(), shuffle=True,
                           seed=0, device=runtime.device, drop_last=True, num_classes=NUM_CLASSES,
                           channels_last=runtime.channels_last)
    method.to(runtime.device)
    task = DistillTask(method, SplitLoaders(None, train, None, train), runtime,  # type: ignore[arg-type]
                       lambda _e: None, Progress(enabled=False))
    return _stepper(lambda ep: task.batches(ep), task.begin_epoch, task.step, len(train))


def api_arm(
    method: asib.DistillMethod, images: torch.Tensor, labels: torch.Tensor, device: str, runtime: asib.Runtime | None
) -> Step:
    """A library user's loop: tensor_loader and Distiller.step, the runtime left to its default."""
    train = asib.tensor_loader(images, labels, batch_size=BATCH, train=True, augment=True, mean=MEAN, std=STD,
                               device=device)
    distiller = asib.Distiller(method, steps_per_epoch=len(train), runtime=runtime)
    sums = MetricSums()
    state = {"epoch": 0, "it": iter(train.batches(0)), "i": 0}

    def run(n: int) -> None:
        for _ in range(n):
            batch = next(state["it"], None)  # type: ignore[call-overload]
            if batch is None:
                state["epoch"] += 1
                state["it"] = iter(train.batches(state["epoch"]))
                batch = next(state["it"])
            terms = distiller.step(batch.x, batch.y, epoch=state["epoch"])
            sums.add(terms, batch.y.shape[0], state["i"])
            state["i"] += 1
        _finish(sums)

    return run


def _stepper(batches: Callable, begin: Callable, step: Callable, per_epoch: int) -> Step:
    """The loop's inner part over a task: begin each epoch, step, sum the terms on the device."""
    sums = MetricSums()
    state = {"epoch": 0, "i": 0}
    ep = EpochPlan(0, "B", 0, 0, 0)
    begin(ep)
    it = iter(batches(ep))

    def run(n: int) -> None:
        nonlocal ep, it
        for _ in range(n):
            batch = next(it, None)
            if batch is None:
                state["epoch"] += 1
                ep = EpochPlan(state["epoch"], "B", 0, state["epoch"], state["epoch"])
                begin(ep)
                it = iter(batches(ep))
                batch = next(it)
            sums.add(step(ep, batch), batch.y.shape[0], state["i"])
            state["i"] += 1
        _finish(sums)

    return run


def _finish(sums: MetricSums) -> None:
    """Wait for the device: the sums are read (as the loop does once per epoch)."""
    sums.read()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="steps per arm per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per arm first")
    parser.add_argument("--old", action="store_true", help="also time the API's former fp32/NCHW runtime")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, NUM_CLASSES, (IMAGES,), generator=gen)
    images = torch.randint(0, 256, (IMAGES, 3, SIZE, SIZE), generator=gen, dtype=torch.uint8)
    torch.manual_seed(0)
    teacher, student = torchvision.models.resnet18(num_classes=NUM_CLASSES), SmallCNN(NUM_CLASSES)
    spec = {"method": "kd", "num_stages": 1, "student_epochs": 50, "batch_size": BATCH}
    base = asib.build_method(spec, [teacher], student)
    arms: dict[str, Step] = {
        "cli": cli_arm(copy.deepcopy(base), images, labels, args.device),
        "api": api_arm(copy.deepcopy(base), images, labels, args.device, None),
    }
    if args.old:
        old = asib.Runtime(torch.device(args.device), None, channels_last=False)
        arms["fp32"] = api_arm(copy.deepcopy(base), images, labels, args.device, old)

    for run in arms.values():
        run(args.warmup)
    rates: dict[str, list[float]] = {name: [] for name in arms}
    cpu_rates: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            arms[name](args.steps)
            rates[name].append(args.steps * BATCH / (time.perf_counter() - t0))
            cpu_rates[name].append(args.steps * BATCH / (time.process_time() - c0))

    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}, "
          f"{args.rounds} rounds x {args.steps} steps of {BATCH} images per arm")
    print(f"runtime (both): {asib.default_runtime(args.device)}")
    for name, values in rates.items():
        print(f"{name:5s} median {statistics.median(values):7.1f} img/s, best {max(values):7.1f}"
              f"  (rounds: {', '.join(f'{v:.0f}' for v in values)})")
    for name, values in cpu_rates.items():
        print(f"{name:5s} median {statistics.median(values):7.1f} img per CPU-second (this process's CPU time)")
    for name in names[1:]:
        ratio = statistics.median(c / a for c, a in zip(rates["cli"], rates[name], strict=True))
        cpu = statistics.median(c / a for c, a in zip(cpu_rates["cli"], cpu_rates[name], strict=True))
        print(f"cli/{name} = {ratio:.3f} wall-clock, {cpu:.3f} CPU time (medians of the per-round ratios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
