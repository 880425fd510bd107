"""Logging helpers for scripts that use asib as a library: a file + console logger, a small
metrics recorder for one experiment folder, and a progress bar that shows itself only on a terminal.

The CLI does not need these (its run folders have metrics.jsonl and summary.json); they
are for notebooks and custom scripts built on ``asib.api``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO, TypeVar

from asib.engine.io import atomic_write_json
from asib.engine.progress import Progress

T = TypeVar("T")
LOG_FILE = "log.txt"
RESULTS_FILE = "results.json"
_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def get_logger(exp_dir: str | Path, level: int | str = "INFO") -> logging.Logger:
    """A logger writing to ``exp_dir/log.txt`` and to stderr.

    Calling it again for the same folder returns the same logger without adding handlers
    twice (a notebook cell run twice must not double every line).
    """
    exp_dir = Path(exp_dir)
    exp_dir.mkdir(parents=True, exist_ok=True)
    name = f"asib.experiment.{exp_dir.resolve()}"
    logger = logging.getLogger(name)
    logger.setLevel(logging.getLevelName(level.upper()) if isinstance(level, str) else level)
    logger.propagate = False
    if not logger.handlers:
        formatter = logging.Formatter(_FORMAT)
        file_handler = logging.FileHandler(exp_dir / LOG_FILE, encoding="utf-8")
        console = logging.StreamHandler(sys.stderr)
        for handler in (file_handler, console):
            handler.setFormatter(formatter)
            logger.addHandler(handler)
    return logger


class ExperimentLogger:
    """Named metrics of one experiment, saved as ``exp_dir/results.json``.

    ``update_metric(name, value, step)`` keeps the latest value and, with a step, the history;
    ``save_results()`` writes the file (atomically) at any time; ``finalize()`` adds the
    elapsed time and status, writes it a last time and closes the log file.
    """

    def __init__(self, exp_dir: str | Path, config: dict[str, Any] | None = None, level: int | str = "INFO") -> None:
        self.exp_dir = Path(exp_dir)
        self.logger = get_logger(self.exp_dir, level)
        self.config = dict(config or {})
        self.metrics: dict[str, Any] = {}
        self.history: dict[str, list[dict[str, Any]]] = {}
        self.started = time.time()
        self.finished = False

    def update_metric(self, name: str, value: Any, step: int | None = None) -> None:
        """Record a value (a number, a string, a list...); with ``step`` also append it to the history."""
        self.metrics[name] = value
        if step is not None:
            self.history.setdefault(name, []).append({"step": step, "value": value})
        self.logger.debug("%s=%s%s", name, value, "" if step is None else f" (step {step})")

    def results(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "metrics": self.metrics,
            "history": self.history,
            "status": "finished" if self.finished else "running",
            "seconds": round(time.time() - self.started, 3),
        }

    def save_results(self) -> Path:
        """Write ``results.json``; returns its path."""
        return atomic_write_json(self.exp_dir / RESULTS_FILE, self.results())

    def finalize(self) -> Path:
        """Mark the experiment finished, write the results and release the log file."""
        self.finished = True
        path = self.save_results()
        self.logger.info("results in %s", path)
        for handler in list(self.logger.handlers):
            if isinstance(handler, logging.FileHandler):
                handler.close()
                self.logger.removeHandler(handler)
        return path


def track(
    iterable: Iterable[T], description: str = "", total: int | None = None, stream: TextIO | None = None
) -> Iterator[T]:
    """Yield the items of ``iterable`` with a progress bar on ``stream`` (stderr) when it is a terminal.

    Piped or redirected output (a log file, CI, a test) shows nothing at all: no bar and
    no plain lines, so logs stay clean.
    """
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    progress = Progress(enabled=True, stream=stream or sys.stderr)
    if progress.live:
        progress.start(description, total)  # type: ignore[arg-type]  # None: a bar of unknown length
    try:
        for item in iterable:
            yield item
            progress.advance()
    finally:
        progress.stop()
