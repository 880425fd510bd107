"""Progress display: on a terminal, one live display for the whole run (its bar and ETA over
every plan of the command, the current epoch's bar, and what is happening before the first
step); one plain line per epoch when output is piped; nothing when quiet."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any


def duration(seconds: float) -> str:
    """``0:03:07``, ``1 day, 2:00:00``: whole seconds."""
    return str(timedelta(seconds=max(0, round(seconds))))


class Progress:
    """Shows the run's progress on ``stream`` (stderr): live bars on a TTY, plain lines when
    output is piped, nothing when not ``enabled`` (``--quiet``).

    A command that runs several plans (finetune-teacher of several teachers) announces their
    steps with ``expect``; the loop reports each plan's exact steps with ``begin_plan``; the run
    row counts all of them, and its ETA is measured over every step this process has run
    (validation and checkpoints included). Lines (``line``) also go to ``sink`` when one is
    set (the run folder's train.log), quiet or not.
    """

    def __init__(self, enabled: bool = True, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.live = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.sink: Callable[[str], None] | None = None
        self._bar: Any = None  # the rich display while shown
        self._task: Any = None  # the current epoch's row
        self._run_task: Any = None  # the whole run's row
        self._status_task: Any = None  # what is happening while no step counts
        # the whole run, in steps
        self._plans_left: list[int] | None = None  # estimated steps of the plans to come (``expect``)
        self._plans_total = 0
        self._plan_number = 0
        self._total = 0
        self._done = 0
        self._label = ""
        self._in_plan = False
        self._began: float | None = None  # when the run began in this process
        self._rate_from: float | None = None  # first step counted for the ETA, and the steps since
        self._rate_steps = 0
        self._epoch_done, self._epoch_total = 0, None

    # ------------------------------------------------------------ the whole run

    def expect(self, plan_steps: Sequence[int]) -> None:
        """The steps of every plan the command will run (estimates; ``begin_plan`` corrects them)."""
        self._plans_left = [max(0, int(n)) for n in plan_steps]
        self._plans_total = len(self._plans_left)
        self._plan_number = 0
        self._total, self._done = sum(self._plans_left), 0
        self._began = self._began or time.perf_counter()

    def begin_plan(self, steps: int, done: int = 0, label: str = "") -> None:
        """A plan of ``steps`` steps starts, ``done`` of them run before (a resumed run)."""
        if self._plans_left:
            self._plan_number += 1
            self._total += steps - self._plans_left.pop(0)
        else:  # not announced: this plan is the run
            self._plans_left, self._plans_total, self._plan_number = None, 0, 0
            self._total, self._done, self._rate_from, self._rate_steps = steps, 0, None, 0
        self._done += done
        self._in_plan = True
        self._began = self._began or time.perf_counter()
        self._label = label or "run"
        if self._plans_total > 1:
            self._label += f" ({self._plan_number}/{self._plans_total})"
        self._show_run()

    def end_plan(self) -> None:
        """The plan ended; the display closes when no announced plan is left."""
        self._in_plan = False
        if not self._plans_left:
            self.close()

    def skip_plan(self) -> None:
        """An announced plan that will not run (a finished run found by ``--resume``)."""
        if self._plans_left:
            self._plan_number += 1
            self._total -= self._plans_left.pop(0)
        if not self._plans_left and not self._in_plan:
            self.close()

    def eta(self) -> float | None:
        """Seconds left for the whole run at the rate of this process so far (None: not known yet)."""
        if self._rate_from is None or self._rate_steps == 0:
            return None
        rate = (time.perf_counter() - self._rate_from) / self._rate_steps
        return max(0, self._total - self._done) * rate

    def eta_text(self) -> str:
        eta = self.eta()
        return "" if eta is None or self._done >= self._total else f"run ETA {duration(eta)}"

    def status(self, text: str) -> None:
        """What the run is doing while no step counts (loading teachers, preparing the loaders);
        on a terminal only."""
        if not self.live:
            return
        self._ensure_bar()
        if self._status_task is None:
            self._status_task = self._bar.add_task(text, total=None, info="")
        else:
            self._bar.update(self._status_task, description=text, visible=True)

    # ------------------------------------------------------------ the current epoch

    def start(self, description: str, total: int | None) -> None:
        """The current epoch's bar (``total`` steps)."""
        if self._rate_from is None:
            self._rate_from = time.perf_counter()
        self._epoch_done, self._epoch_total = 0, total
        if not self.live:
            return
        self._ensure_bar()
        if self._status_task is not None:
            self._bar.update(self._status_task, visible=False)
        if self._task is not None:
            self._bar.remove_task(self._task)
        self._task = self._bar.add_task(description, total=total, info=f"0/{total}" if total else "")

    def advance(self, n: int = 1) -> None:
        self._done += n
        self._rate_steps += n
        if self._bar is None:
            return
        self._epoch_done += n
        if self._task is not None:
            of = "" if self._epoch_total is None else f"/{self._epoch_total}"
            self._bar.update(self._task, advance=n, info=f"{self._epoch_done}{of}")
        self._show_run()

    def stop(self) -> None:
        """The epoch's bar ends; the whole display ends with it unless a run is in progress."""
        if self._bar is None:
            return
        if self._task is not None:
            self._bar.remove_task(self._task)
            self._task = None
        if not self._in_plan and not self._plans_left:
            self.close()

    def close(self) -> None:
        """Take the live display down (safe to call again)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = self._task = self._run_task = self._status_task = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ lines

    def line(self, text: str) -> None:
        """A line that stays: the summary of an epoch, a warning, a note (also into ``sink``)."""
        if self.sink is not None:
            self.sink(text)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    # ------------------------------------------------------------ the display

    def _ensure_bar(self) -> None:
        if self._bar is not None:
            return
        from rich.console import Console
        from rich.progress import BarColumn, TextColumn
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            console=Console(file=self.stream),
            transient=True,
        )
        self._bar.start()

    def _show_run(self) -> None:
        if not self.live or not self._in_plan:
            return
        self._ensure_bar()
        elapsed = time.perf_counter() - (self._began or time.perf_counter())
        eta = self.eta()
        info = f"{self._done}/{self._total} steps, {duration(elapsed)} elapsed, ETA {'-' if eta is None else duration(eta)}"
        if self._run_task is None:
            self._run_task = self._bar.add_task(self._label, total=self._total, completed=self._done, info=info)
        else:
            self._bar.update(self._run_task, description=self._label, total=self._total, completed=self._done,
                             info=info)


def format_record(record: dict[str, Any], keys: list[str]) -> str:
    """``key=value`` pairs of the figures worth a glance."""
    parts = []
    for key in keys:
        value = record.get(key)
        if value is None:
            continue
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)
