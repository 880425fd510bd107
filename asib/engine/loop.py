"""The one training loop. Every command runs its training through ``run_plan``.

A task (fine-tuning one model, or distilling with any method) gives a plan of epochs, the
batches of each and a step function; the loop owns everything around the step: metric
accumulation on the device (read once per epoch), the finiteness guard, train-state saves,
resume, clean stops on SIGINT/SIGTERM, the progress display and the epoch records (to the
run folder: metrics.jsonl, metrics.csv, the trackers, and the epoch lines to train.log).
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from asib.data import Batch
from asib.engine.progress import Progress, format_record
from asib.engine.runfolder import RunFolder
from asib.engine.runtime import rng_state, set_rng_state
from asib.engine.trainstate import load_train_state, save_train_state
from asib.errors import CheckpointError, Interrupted, RunError, clip, first_line, short_repr

if TYPE_CHECKING:
    from asib.engine.distributed import Dist

# Under torchrun, ranks agree on a stop request (SIGINT/SIGTERM) every this many steps.
STOP_CHECK_STEPS = 20
# Keys of an epoch record that are wall-clock times (the epoch's seconds, validation included):
# the only fields in which two runs of a deterministic recipe differ.
TIMING_KEYS = frozenset({"seconds"})


def without_timings(record: dict[str, Any]) -> dict[str, Any]:
    """A record less its ``TIMING_KEYS``: what a deterministic recipe repeats exactly."""
    return {k: v for k, v in record.items() if k not in TIMING_KEYS}


@dataclass(frozen=True)
class EpochPlan:
    """One epoch of a plan: which phase, which stage, and its counters."""

    index: int  # position in the whole plan; also seeds the epoch's data order
    phase: str  # "train" (fine-tuning / baselines), "A" (teacher side), "B" (student)
    stage: int  # 0-based stage
    phase_epoch: int  # epochs of this phase before this one, over all stages
    stage_epoch: int  # epoch within this phase of this stage


class Task(Protocol):
    """What the loop needs from a training task."""

    def plan(self) -> list[EpochPlan]: ...
    def steps(self, ep: EpochPlan) -> int: ...
    def batches(self, ep: EpochPlan, start: int = 0) -> Iterator[Batch]: ...
    def begin_epoch(self, ep: EpochPlan) -> None: ...
    def step(self, ep: EpochPlan, batch: Batch) -> dict[str, torch.Tensor | float]: ...
    def end_epoch(self, ep: EpochPlan, record: dict[str, Any]) -> dict[str, Any]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class MetricSums:
    """Per-term running sums: tensors stay on the device (no host sync inside the step loop),
    plain floats (schedule values) are summed on the host. With a distributed ``dist`` the
    sums and counts of every rank are added up in ``read`` (a collective).

    A step's tensor terms are stacked into one vector, so accumulating them and keeping the
    first non-finite step of each costs a handful of kernels per step, whatever their number.
    """

    def __init__(self, dist: Dist | None = None) -> None:
        self.names: list[str] = []  # tensor terms, in the order of ``_sums`` and ``_first_bad``
        self._sums: torch.Tensor | None = None  # (T,) float32
        self._first_bad: torch.Tensor | None = None  # (T,) int64, -1 while finite
        self._positions: dict[tuple[str, ...], torch.Tensor | None] = {}
        self.host: dict[str, float] = {}
        self.count = 0
        self.dist = dist if dist is not None and dist.enabled else None

    def add(self, terms: dict[str, torch.Tensor | float], n: int, step: int) -> None:
        names, values = [], []
        for name, value in terms.items():
            if isinstance(value, torch.Tensor):
                names.append(name)
                values.append(value.detach().float())
            else:
                self.host[name] = self.host.get(name, 0.0) + float(value) * n
        self.count += n
        if not values:
            return
        vec = torch.stack(values)
        where = self._where(tuple(names), vec.device)
        assert self._sums is not None and self._first_bad is not None
        bad = ~torch.isfinite(vec)
        if where is None:  # the usual case: the same terms as every step before
            self._sums.add_(vec, alpha=n)
            first = self._first_bad
            self._first_bad = torch.where(bad & (first < 0), step, first)
        else:
            self._sums.index_add_(0, where, vec, alpha=n)
            first = self._first_bad.index_select(0, where)
            self._first_bad.index_copy_(0, where, torch.where(bad & (first < 0), step, first))

    def _where(self, key: tuple[str, ...], device: torch.device) -> torch.Tensor | None:
        """Positions of a step's terms in the sum vector (None: all of them, in order); new
        terms get new, zeroed places."""
        if key in self._positions:
            return self._positions[key]
        new = [k for k in key if k not in self.names]
        if new or self._sums is None:
            self.names += new
            grow = torch.zeros(len(new), device=device)
            self._sums = grow if self._sums is None else torch.cat([self._sums, grow])
            never = torch.full((len(new),), -1, device=device, dtype=torch.long)
            self._first_bad = never if self._first_bad is None else torch.cat([self._first_bad, never])
            self._positions.clear()  # an earlier "all of them, in order" no longer holds
        where = None if list(key) == self.names else torch.tensor([self.names.index(k) for k in key], device=device)
        self._positions[key] = where
        return where

    def read(self) -> tuple[dict[str, float], dict[str, int]]:
        """Means and first non-finite step per term, with one transfer."""
        if self.dist is not None:
            return self.reduced().read()
        count = max(1, self.count)
        means = {k: v / count for k, v in self.host.items()}
        if self._sums is None:
            return means, {}
        t = len(self.names)
        flat = torch.cat([self._sums, self._first_bad.float()]).tolist()
        means.update({k: flat[i] / count for i, k in enumerate(self.names)})
        bad = {k: int(flat[t + i]) for i, k in enumerate(self.names) if flat[t + i] >= 0}
        return means, bad

    def reduced(self) -> MetricSums:
        """The sums of every rank added up (every rank gets them): two all-reduces, one transfer."""
        dist, hosts = self.dist, list(self.host)
        assert dist is not None
        dev = dist.device
        t = len(self.names)
        parts = [self._sums.to(dev)] if self._sums is not None else []
        totals = torch.cat(parts + [torch.tensor([*self.host.values(), float(self.count)], device=dev)])
        bad = self._first_bad.to(dev) if self._first_bad is not None else torch.zeros(0, device=dev)
        dist.all_reduce_sum(totals)
        dist.all_reduce_max(bad)
        flat = totals.tolist()
        out = MetricSums()
        if self._sums is not None:
            out.names = list(self.names)
            out._sums = totals[:t].to(self._sums.device)
            out._first_bad = bad.to(self._sums.device)
        out.host = {k: flat[t + i] for i, k in enumerate(hosts)}
        out.count = int(flat[-1])
        return out

    def state_dict(self) -> dict[str, Any]:
        """Per-term tensors by name (the train-state format); separate tensors, not views."""
        sums = first_bad = {}
        if self._sums is not None and self._first_bad is not None:
            sums = {k: self._sums[i].clone() for i, k in enumerate(self.names)}
            first_bad = {k: self._first_bad[i].clone() for i, k in enumerate(self.names)}
        return {"sums": sums, "first_bad": first_bad, "host": dict(self.host), "count": self.count}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.names = list(state["sums"])
        self._positions = {}
        if self.names:
            self._sums = torch.stack([state["sums"][k].float() for k in self.names]).to(device)
            self._first_bad = torch.stack([state["first_bad"][k].long() for k in self.names]).to(device)
        else:
            self._sums = self._first_bad = None
        self.host = dict(state["host"])
        self.count = state["count"]


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop reads between steps."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Install the handlers for the duration of a run (only possible in the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum: int, _frame: object) -> None:
            if self.signum is not None:  # a second signal: stop at once, without saving
                raise KeyboardInterrupt
            self.signum = signum

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


@dataclass
class LoopConfig:
    save_every_steps: int = 0  # also save the train state every N steps (0: at epoch ends only)
    stop_after_steps: int | None = None  # for tests and benchmarks: stop (as if interrupted) after N steps

    def __post_init__(self) -> None:
        if self.save_every_steps < 0:
            raise ValueError(f"save_every_steps must be 0 (epoch ends only) or more, not {self.save_every_steps}")


@dataclass
class PlanResult:
    records: list[dict[str, Any]]  # one per epoch, as in metrics.jsonl
    seconds: float  # training time over every process of the run (resumes included)


def _state(
    task: Task, pos: int, step: int, sums: MetricSums, records: list[dict[str, Any]], elapsed: float,
    epoch_seconds: float = 0.0,
) -> dict[str, Any]:
    return {
        "position": {"epoch_index": pos, "step": step},
        "task": task.state_dict(),
        "rng": rng_state(),
        "sums": sums.state_dict(),
        "records": records,
        "elapsed": elapsed,
        "epoch_seconds": epoch_seconds,  # time spent in the epoch stopped at ``step`` (0 at its start)
    }


def run_plan(
    task: Task,
    folder: RunFolder,
    progress: Progress,
    device: torch.device,
    resume: bool = False,
    config: LoopConfig | None = None,
    summary_keys: list[str] | None = None,
    dist: Dist | None = None,
    label: str = "",
) -> PlanResult:
    """Run every epoch of the task's plan (from the saved position with ``resume``).

    Per-epoch records go to the run folder (metrics.jsonl, metrics.csv, the trackers) and a
    line per epoch to the progress display and train.log. A record holds the epoch's figures
    and its wall-clock ``seconds`` (``TIMING_KEYS``); without those, two runs of a
    deterministic recipe write identical records (``without_timings``). ``label`` names the
    plan on the progress display. Under torchrun (``dist``) every rank runs the loop and takes
    part in every collective; epoch means are over all ranks, and rank 0 alone writes the
    train state (the saved sums are the global ones, so on resume the other ranks start from
    zero).
    """
    sink, progress.sink = progress.sink, folder.log_line
    try:
        result = _run_plan(task, folder, progress, device, resume, config or LoopConfig(), summary_keys, dist, label)
    except BaseException:
        progress.close()
        raise
    finally:
        progress.sink = sink
    progress.end_plan()
    return result


def _run_plan(
    task: Task,
    folder: RunFolder,
    progress: Progress,
    device: torch.device,
    resume: bool,
    config: LoopConfig,
    summary_keys: list[str] | None,
    dist: Dist | None,
    label: str,
) -> PlanResult:
    plan = task.plan()
    records: list[dict[str, Any]] = []
    start_epoch, start_step, prior, epoch_prior = 0, 0, 0.0, 0.0
    world = dist.world_size if dist is not None else 1
    is_main = dist is None or dist.is_main
    sums = MetricSums(dist)
    if resume:
        state = load_train_state(folder.state_path)
        start_epoch, start_step, saved_world = _position(state, plan, task, folder)
        if start_step > 0 and saved_world != world:
            raise RunError(
                f"{folder.path}: stopped mid-epoch with {saved_world} processes; this run has {world}",
                hint=f"resume with {saved_world} processes (the data order of an epoch depends on it)",
            )
        records, prior = _restore(state, task, sums if is_main else None, device, folder)
        epoch_prior = _number(state.get("epoch_seconds")) if start_step > 0 else 0.0
        folder.truncate_metrics(len(records), records)
        if start_epoch < len(plan):
            progress.line(f"resuming at epoch {start_epoch + 1}/{len(plan)}, step {start_step}")
        else:
            progress.line("resuming after the last epoch: finishing the run")
    began = time.perf_counter()
    steps_of = [task.steps(ep) for ep in plan]
    progress.begin_plan(sum(steps_of), sum(steps_of[:start_epoch]) + start_step, label)
    tick = began

    def save(pos: int, step: int) -> None:
        total = sums.reduced() if sums.dist is not None else sums  # a collective under torchrun
        if is_main:
            now = time.perf_counter()
            in_epoch = epoch_prior + now - tick if step > 0 else 0.0
            state = _state(task, pos, step, total, records, prior + now - began, in_epoch)
            state["position"]["world_size"] = world
            save_train_state(folder.state_path, state)
        if dist is not None:
            dist.barrier()

    total_steps = 0
    with StopRequest().installed() as stop:
        for ep in plan[start_epoch:]:
            n_steps = task.steps(ep)
            tick = time.perf_counter()
            task.begin_epoch(ep)
            progress.start(f"{_label(ep)} {ep.index + 1}/{len(plan)}", n_steps - start_step)
            step = start_step
            try:
                for batch in task.batches(ep, start_step):
                    terms = task.step(ep, batch)
                    sums.add(terms, batch.y.shape[0], step)
                    step += 1
                    total_steps += 1
                    progress.advance()
                    halt = _agreed_stop(stop, dist, total_steps) or (
                        config.stop_after_steps is not None and total_steps >= config.stop_after_steps
                    )
                    periodic = config.save_every_steps > 0 and step % config.save_every_steps == 0
                    if step < n_steps and (halt or periodic):
                        check_finite(sums, ep)
                        save(ep.index, step)
                        if halt:
                            raise _interrupted(stop.signum, folder)
            finally:
                progress.stop()
            if dist is not None:
                dist.sync_buffers()  # every rank validates rank 0's model
            record = _close_epoch(task, ep, sums)
            record["seconds"] = round(epoch_prior + time.perf_counter() - tick, 3)
            records.append(record)
            folder.log(record)
            line = format_record(record, [k for k in summary_keys or list(record) if k not in TIMING_KEYS])
            eta = progress.eta_text()
            progress.line(f"{line} ({record['seconds']:.1f}s{', ' + eta if eta else ''})")
            sums, start_step, epoch_prior = MetricSums(dist), 0, 0.0
            save(ep.index + 1, 0)
            if _agreed_stop(stop, dist, 0) and ep.index + 1 < len(plan):
                raise _interrupted(stop.signum, folder)
    return PlanResult(records, prior + time.perf_counter() - began)


def _number(value: Any) -> float:
    """A saved time (0 when missing or not a number: a train state of an earlier version)."""
    return float(value) if type(value) in (int, float) and math.isfinite(value) and value >= 0 else 0.0


def _damaged(folder: RunFolder, why: str) -> CheckpointError:
    return CheckpointError(
        f"{folder.state_path}: the train state does not fit this run ({clip(why, 200)})",
        hint="it is damaged or from another version of the run; use --force to start over",
    )


def _position(state: dict[str, Any], plan: list[EpochPlan], task: Task, folder: RunFolder) -> tuple[int, int, int]:
    """Where a saved run stopped (epoch, step, processes), checked against the plan."""
    pos = state.get("position")
    if not isinstance(pos, dict):
        raise _damaged(folder, "no position")
    epoch, step, world = pos.get("epoch_index"), pos.get("step"), pos.get("world_size", 1)
    if not all(type(v) is int for v in (epoch, step, world)) or not 0 <= epoch <= len(plan) or world < 1:
        raise _damaged(folder, f"position {short_repr(pos, 100)}")
    if step < 0 or (step > 0 and (epoch == len(plan) or step >= task.steps(plan[epoch]))):
        raise _damaged(folder, f"step {step} of epoch {epoch + 1}")
    return epoch, step, world


def _restore(
    state: dict[str, Any], task: Task, sums: MetricSums | None, device: torch.device, folder: RunFolder
) -> tuple[list[dict[str, Any]], float]:
    """Load the task, RNG and metric sums of a train state; return the records and time so far.

    The state comes from a file, so anything odd in it (a missing entry, a tensor of the wrong
    shape, a value of the wrong type) is a CheckpointError naming it, not a traceback.
    """
    try:
        records, elapsed = state["records"], state["elapsed"]
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise TypeError("records is not a list of records")
        if type(elapsed) not in (int, float):
            raise TypeError(f"elapsed is {type(elapsed).__name__}")
        task.load_state_dict(state["task"])
        set_rng_state(state["rng"])
        if sums is not None:
            sums.load_state_dict(state["sums"], device)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
        raise _damaged(folder, f"{exc.__class__.__name__}: {first_line(exc)}") from None
    return records, float(elapsed)


def _agreed_stop(stop: StopRequest, dist: Dist | None, steps: int) -> bool:
    """Alone: the stop flag. Under torchrun: whether any rank was asked to stop, checked by
    every rank at the same steps (every ``STOP_CHECK_STEPS``), so all stop together."""
    if dist is None or not dist.enabled:
        return bool(stop)
    return steps % STOP_CHECK_STEPS == 0 and dist.any(bool(stop))


def _label(ep: EpochPlan) -> str:
    return {"train": "epoch", "A": f"stage {ep.stage + 1} A-step", "B": f"stage {ep.stage + 1} B-step"}[ep.phase]


def check_finite(sums: MetricSums, ep: EpochPlan) -> None:
    """Stop on a non-finite term, naming the first one to go bad: a component of the loss
    rather than ``loss`` itself when both went bad at the same step."""
    means, bad = sums.read()
    if bad:
        first = min(bad.values())
        at_first = [name for name, step in bad.items() if step == first]
        name = next((n for n in at_first if n != "loss"), at_first[0])
        step = first
        raise RunError(
            f"loss term '{name}' is not finite at step {step} of epoch {ep.index + 1} ({_label(ep)})",
            hint="the last good checkpoint and train state are kept; lower the learning rate or check the data",
        )
    for name, value in means.items():
        if not math.isfinite(value):
            raise RunError(f"loss term '{name}' is not finite in epoch {ep.index + 1} ({_label(ep)})")


def _close_epoch(task: Task, ep: EpochPlan, sums: MetricSums) -> dict[str, Any]:
    check_finite(sums, ep)
    means, _ = sums.read()
    record: dict[str, Any] = {
        "epoch": ep.index + 1,
        "phase": ep.phase,
        "stage": ep.stage + 1,
        **{k: round(v, 6) for k, v in means.items()},
    }
    record.update(task.end_epoch(ep, record))
    return record


def _interrupted(signum: int | None, folder: RunFolder) -> Interrupted:
    name = signal.Signals(signum).name if signum else "a stop request"
    code = 128 + signum if signum else 130
    return Interrupted(
        f"stopped by {name}; the train state is saved in {folder.state_path}",
        exit_code=code,
        hint="run the same command with --resume to continue",
    )
