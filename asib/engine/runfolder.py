"""A run folder: recipe.yaml, metrics.jsonl, summary.json, checkpoints and the train state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from asib.engine.io import append_jsonl, atomic_write_json, atomic_write_text
from asib.errors import RunError

STATE_FILE = "train_state.safetensors"


class RunFolder:
    """The files of one training step; refuses to overwrite a run unless told to."""

    def __init__(self, path: str | Path, artifacts: tuple[str, ...]) -> None:
        self.path = Path(path)
        self.artifacts = ("recipe.yaml", "metrics.jsonl", "summary.json", STATE_FILE, *artifacts)
        self.writer = True  # False on torchrun ranks other than 0: they read, never write or lock

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def state_path(self) -> Path:
        return self.path / STATE_FILE

    def existing(self) -> list[str]:
        return [name for name in self.artifacts if (self.path / name).exists()]

    def check(self, force: bool, resume: bool, recipe_yaml: str | None = None) -> None:
        """Before any work: is the folder free, or are we told to continue or replace it?

        A resume must use the recipe the run started with (``recipe_yaml``, resolved).
        """
        if force and resume:
            raise RunError("--force and --resume exclude each other")
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"{self.path}: exists and is not a folder")
        found = self.existing()
        if resume:
            if not self.state_path.exists():
                done = (self.path / "summary.json").exists()
                why = "the run has finished" if done else "no train state was written"
                raise RunError(f"{self.path}: nothing to resume ({why})", hint="use --force to start over")
            saved = self.path / "recipe.yaml"
            if recipe_yaml is not None and saved.exists() and saved.read_text() != recipe_yaml:
                old, new = saved.read_text().splitlines(), recipe_yaml.splitlines()
                first = next((i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b), min(len(old), len(new)))
                shown = new[first].strip() if first < len(new) else "(end of recipe)"
                raise RunError(
                    f"{self.path}: the recipe differs from the one the run started with (first at: {shown})",
                    hint=f"resume with the same recipe and --set values (see {saved}), or use --force",
                )
            return
        if found and not force:
            raise RunError(
                f"{self.path}: already holds a run ({', '.join(found)})",
                hint="use --resume to continue it or --force to start over",
            )

    def lock(self) -> None:
        """Hold an exclusive lock on the folder for this process's lifetime: two processes
        writing one run folder would corrupt each other's files."""
        import fcntl
        import os

        if not self.writer:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fh = open(self.path / ".lock", "a+")  # noqa: SIM115 (held open on purpose)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "unknown"
            fh.close()
            raise RunError(f"{self.path}: another asib process (pid {owner}) is writing this run") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._lock = fh

    def start(self, recipe_yaml: str, force: bool, resume: bool) -> None:
        """Lock and create the folder (after ``check``); with ``force`` remove the old run's files only."""
        self.lock()
        if not self.writer:
            return
        if force:
            for name in self.existing():
                (self.path / name).unlink()
        if not resume:
            self.metrics_path.touch()
        atomic_write_text(self.path / "recipe.yaml", recipe_yaml)

    def log(self, record: dict[str, Any]) -> None:
        if self.writer:
            append_jsonl(self.metrics_path, record)

    def truncate_metrics(self, n_records: int) -> None:
        """On resume, keep the records the train state knows of (a crash may have written more)."""
        if not self.writer:
            return
        lines = self.metrics_path.read_text().splitlines() if self.metrics_path.exists() else []
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in lines[:n_records]))

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.writer:
            atomic_write_json(self.path / "summary.json", summary)

    def finish(self) -> None:
        """A finished run needs no train state."""
        if self.writer:
            self.state_path.unlink(missing_ok=True)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
